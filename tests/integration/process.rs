//! What only the real `web` process shows: exit codes, signals, logs, the healthcheck
//! subcommand, and several replicas sharing one counter.

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{
    Blackhole, DB_PASSWORD, Env, Postgres, Redis, Signal, TestApp, WebProcess, count_of, free_port,
    get_page, healthcheck, http_client, inject, ok_count,
};

#[test]
fn bad_config_exits_2_with_one_line_naming_the_variable() {
    let cases = [
        ("PORT", "eighty"),
        ("PORT", "99999"),
        ("REDIS_URL", "mongodb://nope"),
        ("DATABASE_URL", "postgres://admin:hunter2@db:port/x"),
        ("DATABASE_PASSWORD_FILE", "/does/not/exist"),
        ("POSTGRES_PASSWORD_FILE", "/does/not/exist"),
        ("DB_TIMEZONE", "Atlantis/Capital"),
        ("DEPENDENCY_TIMEOUT_MS", "soon"),
        ("RUST_LOG", "=[[="),
    ];
    for (var, value) in cases {
        let started = Instant::now();
        let output = Command::new(env!("CARGO_BIN_EXE_web"))
            .env_clear()
            .env(var, value)
            .output()
            .expect("web runs");
        assert_eq!(output.status.code(), Some(2), "{var}={value}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.lines().count(), 1, "{var}: {stderr}");
        assert!(stderr.contains(var), "{var}: {stderr}");
        assert!(!stderr.contains("hunter2"), "secret echoed: {stderr}");
        assert!(output.stdout.is_empty());
        assert!(started.elapsed() < Duration::from_secs(2), "exits at once");
    }
}

#[test]
fn unknown_arguments_are_a_usage_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_web"))
        .arg("serve-please")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("usage"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_exits_zero_and_a_restart_continues() {
    let redis = Redis::start();
    let pg = Postgres::start();
    let env = || Env::for_servers(&redis, &pg);
    let mut web = WebProcess::spawn(env());
    web.wait_ready(Duration::from_secs(10)).await;
    let client = http_client();
    for expected in 1..=5 {
        let (_, page) = get_page(&client, &web.address()).await;
        assert_eq!(count_of(&page), Some(expected));
    }
    assert_eq!(pg.counter(), Some(5), "confirmed before answered");

    // A request in flight when the signal arrives still gets its answer. Redis is frozen so
    // the request is surely inside the service (waiting on its increment) at the signal.
    inject(|| redis.pause());
    let in_flight = {
        let (client, address) = (client.clone(), web.address());
        tokio::spawn(async move { get_page(&client, &address).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    web.signal(Signal::TERM);
    tokio::time::sleep(Duration::from_millis(100)).await;
    inject(|| redis.resume());
    let (code, took) = web.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0));
    println!("SIGTERM to exit: {took:?}");
    let (status, page) = in_flight.await.unwrap();
    assert_eq!((status, count_of(&page)), (200, Some(6)));
    assert_eq!(pg.counter(), Some(6), "the drained visit was confirmed too");

    // Redis loses everything while web is down; the new process continues from PostgreSQL.
    inject(|| redis.flushall());
    let web = WebProcess::spawn(env());
    web.wait_ready(Duration::from_secs(10)).await;
    let (_, page) = get_page(&client, &web.address()).await;
    assert_eq!(count_of(&page), Some(7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigint_also_stops_cleanly() {
    let redis = Redis::start();
    let pg = Postgres::start();
    let mut web = WebProcess::spawn(Env::for_servers(&redis, &pg));
    web.wait_ready(Duration::from_secs(10)).await;
    web.signal(Signal::INT);
    let (code, _) = web.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_exits_promptly_even_when_dependencies_are_gone() {
    let mut web = WebProcess::spawn(Env::unreachable());
    let client = http_client();
    let deadline = Instant::now() + Duration::from_secs(5);
    while client
        .get(format!("{}/healthz", web.address()))
        .send()
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    web.signal(Signal::TERM);
    let (code, took) = web.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0));
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn healthcheck_subcommand_answers_within_two_seconds() {
    // Dependencies absent on purpose: liveness does not need them.
    let web = WebProcess::spawn(Env::unreachable());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (code, took, _) = healthcheck(web.admin_port);
        assert!(took < Duration::from_secs(2));
        if code == Some(0) {
            break;
        }
        assert!(Instant::now() < deadline, "never healthy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (code, took, stderr) = healthcheck(free_port());
    assert_eq!(code, Some(1), "nothing listening");
    assert!(took < Duration::from_secs(2));
    assert!(stderr.contains("unhealthy"), "{stderr}");

    let hole = Blackhole::start();
    let (code, took, _) = healthcheck(hole.port);
    assert_eq!(
        code,
        Some(1),
        "a listener that never answers is not healthy"
    );
    assert!(took < Duration::from_secs(2), "{took:?}");
}

/// A typo in a variable name changes nothing; the warning at start says so, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_variable_that_looks_like_ours_but_is_not_read_is_named_at_start() {
    let env = Env::unreachable()
        .set("DEPENDENCY_TIMEOUT", "200")
        .set("HTTP_HEADER_TIMEOUT_MS", "5000");
    let web = WebProcess::spawn(env);
    let (stdout, _) = web.logs();
    let warnings: Vec<serde_json::Value> = stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["level"] == "WARN" && line["variable"].is_string())
        .collect();
    let named: Vec<&str> = warnings
        .iter()
        .filter_map(|w| w["variable"].as_str())
        .collect();
    assert_eq!(named, ["DEPENDENCY_TIMEOUT"], "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logs_are_json_lines_per_request_and_per_state_change_without_secrets() {
    let mut redis = Redis::start();
    let pg = Postgres::start();
    let mut web = WebProcess::spawn(Env::for_servers(&redis, &pg));
    web.wait_ready(Duration::from_secs(10)).await;
    let client = http_client();
    get_page(&client, &web.address()).await;
    client
        .get(format!("{}/nope", web.address()))
        .send()
        .await
        .unwrap();
    inject(|| redis.kill());
    get_page(&client, &web.address()).await;
    web.signal(Signal::TERM);
    assert_eq!(web.wait_exit(Duration::from_secs(10)).0, Some(0));

    let (stdout, stderr) = web.logs();
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    let requests: Vec<_> = lines.iter().filter(|l| l["message"] == "request").collect();
    let find = |path: &str, status: u64| {
        requests.iter().any(|l| {
            l["path"] == path
                && l["status"] == status
                && l["method"] == "GET"
                && l["latency_ms"].is_number()
        })
    };
    assert!(find("/", 200), "{stdout}");
    assert!(find("/nope", 404), "{stdout}");
    let changes: Vec<_> = lines
        .iter()
        .filter(|l| l["message"] == "dependency state changed")
        .map(|l| {
            (
                l["dependency"].as_str().unwrap_or(""),
                l["state"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert!(changes.contains(&("cache", "up")), "{changes:?}");
    assert!(changes.contains(&("db", "up")), "{changes:?}");
    assert!(changes.contains(&("cache", "down")), "{changes:?}");
    assert!(!stdout.contains(DB_PASSWORD) && !stderr.contains(DB_PASSWORD));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_password_is_reported_but_never_printed() {
    let redis = Redis::start();
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("pw");
    std::fs::write(&wrong, "Wr0ng-pw-should-stay-hidden\n").unwrap();
    let mut web = WebProcess::spawn(
        Env::for_servers(&redis, &pg).set("DATABASE_PASSWORD_FILE", wrong.to_str().unwrap()),
    );
    let client = http_client();
    let deadline = Instant::now() + Duration::from_secs(5);
    let page = loop {
        if let Ok(r) = client.get(web.address()).send().await {
            let page: serde_json::Value = r.json().await.unwrap();
            if page["erros"]["db"].is_string() {
                break page;
            }
        }
        assert!(Instant::now() < deadline, "no database error reported");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        page["status"], "error",
        "no count it cannot confirm: {page}"
    );
    assert!(count_of(&page).is_none(), "{page}");
    // The public answer says what failed, in a few words; the server's message (with the
    // user name) goes to the log only.
    assert_eq!(
        page["erros"]["db"], "unavailable (authentication failed)",
        "{page}"
    );
    let public = page.to_string();
    assert!(
        !public.contains("admin") && !public.contains("FATAL"),
        "{public}"
    );
    web.signal(Signal::TERM);
    web.wait_exit(Duration::from_secs(10));
    let (stdout, stderr) = web.logs();
    assert!(
        stdout.contains(r#"password authentication failed for user \"admin\""#),
        "the detail is logged: {stdout}"
    );
    for text in [&stdout, &stderr, &public] {
        assert!(!text.contains("Wr0ng-pw-should-stay-hidden"));
    }
}

/// Three `web` processes on the same servers, started together and all ready.
async fn three_webs(redis: &Redis, pg: &Postgres) -> Vec<WebProcess> {
    let webs: Vec<_> = (0..3)
        .map(|_| WebProcess::spawn(Env::for_servers(redis, pg)))
        .collect();
    for web in &webs {
        web.wait_ready(Duration::from_secs(10)).await;
    }
    webs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_processes_share_one_counter() {
    let redis = Redis::start();
    let pg = Postgres::start();
    // Started together against a fresh database: schema set-up races, and must not fail.
    let webs = three_webs(&redis, &pg).await;
    let client = http_client();
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let (client, address) = (client.clone(), webs[i % 3].address());
            tokio::spawn(async move { get_page(&client, &address).await })
        })
        .collect();
    let mut counts = HashSet::new();
    for task in tasks {
        assert!(counts.insert(ok_count(&task.await.unwrap())));
    }
    assert_eq!(counts, (1..=300).collect::<HashSet<_>>());
    // Every count was confirmed before it was answered: nothing is left to catch up.
    assert_eq!(pg.counter(), Some(300));
}

/// The value of a metric series in Prometheus text (0 when absent).
fn series(text: &str, name: &str) -> f64 {
    text.lines()
        .filter_map(|line| line.strip_prefix(name)?.trim().parse::<f64>().ok())
        .sum()
}

/// With several replicas counting at once, a batch still costs one PostgreSQL write: the
/// confirmation sent with the count (a guess of Redis's total) is kept for a process that
/// counts alone; once others count in between it waits for Redis's total instead of sending
/// a second one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_processes_confirm_each_batch_about_once() {
    let redis = Redis::start();
    let pg = Postgres::start();
    let webs = three_webs(&redis, &pg).await;
    let client = http_client();
    let clients: Vec<_> = (0..6)
        .map(|i| {
            let (client, address) = (client.clone(), webs[i % 3].address());
            tokio::spawn(async move {
                for _ in 0..100 {
                    ok_count(&get_page(&client, &address).await);
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    let (mut ahead, mut after, mut again) = (0.0, 0.0, 0.0);
    for web in &webs {
        let text = web.metrics_text().await;
        let sent = |how| format!("visit_counter_confirmations_total{{sent=\"{how}\"}}");
        ahead += series(&text, &sent("ahead"));
        after += series(&text, &sent("after"));
        again += series(&text, &sent("again"));
    }
    let batches = ahead + after + again;
    let writes_per_batch = (ahead + after + 2.0 * again) / batches;
    println!(
        "{batches} batches: {ahead} confirmed ahead, {after} after, {again} again: \
         {writes_per_batch:.2} writes per batch"
    );
    assert!(batches >= 30.0, "{batches} batches");
    assert!(
        writes_per_batch <= 1.3,
        "{writes_per_batch:.2} writes per batch"
    );
    assert_eq!(pg.counter(), Some(600));
}

#[test]
fn an_unreadable_password_file_exits_2_naming_the_variable_and_the_permission_problem() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let secret = dir.path().join("db_password");
    std::fs::write(&secret, "s3cret\n").unwrap();
    // As the README's old recipe made it: readable by its owner only.
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut web = if rustix::process::geteuid().is_root() {
        // Root reads anything: run web as the image's user, from a copy it may execute.
        let binary = dir.path().join("web");
        std::fs::copy(env!("CARGO_BIN_EXE_web"), &binary).unwrap();
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut command = Command::new(binary);
        command.uid(65532).gid(65532);
        command
    } else {
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o000)).unwrap();
        Command::new(env!("CARGO_BIN_EXE_web"))
    };
    web.env_clear().env("DATABASE_PASSWORD_FILE", &secret);
    // The copy was open for writing a moment ago, and a child another test forked meanwhile
    // holds it until that child execs: running it fails with ETXTBSY until then.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let output = loop {
        match web.output() {
            Err(e)
                if e.kind() == std::io::ErrorKind::ExecutableFileBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => break other.expect("web runs"),
        }
    };
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    // The whole line, as an operator sees it: the variable, the path, the cause and the fix.
    let expected = format!(
        "invalid configuration: DATABASE_PASSWORD_FILE: cannot read {secret:?}: Permission denied (os error 13) \
         (the image runs web as uid 65532: the file must be readable by it)"
    );
    assert_eq!(stderr.trim_end(), expected);
    assert!(!stderr.contains("s3cret"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn healthcheck_ready_follows_readyz_on_the_admin_port() {
    let ready = |admin_port: u16| {
        Command::new(env!("CARGO_BIN_EXE_web"))
            .args(["healthcheck", "--ready"])
            .env_clear()
            .env("ADMIN_PORT", admin_port.to_string())
            .output()
            .unwrap()
    };
    let (redis_port, pg_port) = (free_port(), free_port());
    let env = Env::new(
        &format!("redis://127.0.0.1:{redis_port}/0"),
        &format!("postgres://admin@127.0.0.1:{pg_port}/desafio3"),
    );
    let web = WebProcess::spawn(env);
    // Alive, but not ready: no dependency exists yet.
    let deadline = Instant::now() + Duration::from_secs(5);
    while healthcheck(web.admin_port).0 != Some(0) {
        assert!(Instant::now() < deadline, "never alive");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let output = ready(web.admin_port);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("503"));

    let _redis = inject(|| Redis::start_on(redis_port));
    let _pg = inject(|| Postgres::start_on(pg_port));
    web.wait_ready(Duration::from_secs(10)).await;
    assert_eq!(ready(web.admin_port).status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_subcommand_prints_the_admin_ports_metrics() {
    let metrics = |admin_port: u16| {
        Command::new(env!("CARGO_BIN_EXE_web"))
            .arg("metrics")
            .env_clear()
            .env("ADMIN_PORT", admin_port.to_string())
            .output()
            .unwrap()
    };
    let redis = Redis::start();
    let pg = Postgres::start();
    let web = WebProcess::spawn(Env::for_servers(&redis, &pg));
    web.wait_ready(Duration::from_secs(10)).await;
    let (status, page) = get_page(&http_client(), &web.address()).await;
    assert_eq!(status, 200, "{page}");

    let output = metrics(web.admin_port);
    assert_eq!(output.status.code(), Some(0));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains(r#"http_requests_total{method="GET",route="/",status="200"} 1"#),
        "{text}"
    );
    assert!(text.contains("visits_counted_total"), "{text}");
    assert!(!text.contains("HTTP/1."), "the body only: {text}");
    assert!(output.stderr.is_empty());

    let output = metrics(free_port());
    assert_eq!(output.status.code(), Some(1), "nothing listening");
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("metrics unavailable: "), "{stderr}");
}

/// A replica that fences while another replica's confirmation sent ahead is already in
/// PostgreSQL (its count not yet in Redis) keeps the fence and Redis's counter: raising Redis
/// to PostgreSQL's value would renew the fence, refuse that count after its confirmation went
/// through and skip its numbers, with no fault at all. The confirmation in flight is written
/// here by hand (the same fence, a value above Redis's), then a second replica starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_fencing_beside_a_confirmation_sent_ahead_skips_no_number() {
    let (redis, pg) = (Redis::start(), Postgres::start());
    let first = TestApp::spawn_ready(Env::for_servers(&redis, &pg)).await;
    for expected in 1..=3 {
        assert_eq!(count_of(&first.visit().await.1), Some(expected));
    }
    pg.execute("UPDATE visit_counter SET value = 8 WHERE id = 1");
    let second = TestApp::spawn_ready(Env::for_servers(&redis, &pg)).await;
    let (_, page) = second.visit().await;
    assert_eq!(page["status"], "ok", "{page}");
    assert_eq!(count_of(&page), Some(4), "{page}");
    let (_, page) = first.visit().await;
    assert_eq!(
        (page["status"].as_str(), count_of(&page)),
        (Some("ok"), Some(5)),
        "{page}"
    );
    assert_eq!(
        pg.counter(),
        Some(8),
        "the counter of record stays above every count"
    );
}
