//! TLS to PostgreSQL (`sslmode`, `sslrootcert`) and Redis (`rediss://`, `REDIS_CA_FILE`,
//! `#insecure`) against real servers with throwaway certificates made at test time
//! (`crate::support::tls`): the server certificate is signed by `pki.ca` for the DNS name
//! `localhost` only; `pki.other_ca` signed nothing here.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::tls::Pki;
use crate::support::{
    DB_NAME, DB_PASSWORD, DB_USER, Env, Postgres, Redis, TestApp, WebProcess, inject,
};
use serde_json::Value;

/// The contract's bound on a recovery after a dependency returns.
const RECOVERY: Duration = Duration::from_secs(2);

fn pg_url(host: &str, pg: &Postgres, params: &str) -> String {
    format!("postgres://{DB_USER}@{host}:{}/{DB_NAME}?{params}", pg.port)
}

fn rediss_url(redis: &Redis, fragment: &str) -> String {
    format!("rediss://localhost:{}/0{fragment}", redis.port)
}

/// Polls `GET /` until `done` accepts the page; returns it.
async fn page_when(app: &TestApp, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, page) = app.visit().await;
        if done(&page) {
            return page;
        }
        assert!(Instant::now() < deadline, "still {page}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The app's answer while one dependency fails its TLS handshake: the page is degraded (an
/// error without PostgreSQL, which must confirm every count) with a one-line reason for it, `/readyz` gives the same reason, every answer comes
/// within the request bound, and no secret shows. Returns the reason.
async fn tls_failure_reason(app: &TestApp, dependency: &str) -> String {
    let started = Instant::now();
    let (code, page) = app.visit().await;
    // The first request waits for the connection attempt in flight (one timeout, 500 ms).
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    let expected = if dependency == "db" {
        (503, "error")
    } else {
        (200, "degraded")
    };
    assert_eq!(
        (code, page["status"].as_str().unwrap_or("")),
        expected,
        "{page}"
    );
    let reason = page["erros"][dependency]
        .as_str()
        .unwrap_or_else(|| panic!("no reason for {dependency}: {page}"))
        .to_owned();
    assert!(
        !reason.contains('\n') && !reason.contains(DB_PASSWORD),
        "{reason}"
    );

    let ready = app.get_admin("/readyz").await;
    assert_eq!(ready.status(), 503);
    let ready: Value = ready.json().await.expect("JSON");
    let ready_reason = ready["erros"][dependency].as_str().expect("readyz reason");
    assert!(ready_reason.contains(&reason), "{ready_reason} vs {reason}");
    println!("{dependency}: {reason}");
    reason
}

fn assert_names_tls(reason: &str, cause: &str) {
    assert!(
        reason.to_lowercase().contains(&cause.to_lowercase()),
        "the reason should name the TLS cause ({cause}): {reason}"
    );
}

// ---------------------------------------------------------------------------------------
// PostgreSQL

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_verify_full_with_the_right_ca_is_ok_and_runs_over_tls() {
    let pki = Pki::new();
    let (redis, pg) = (Redis::start(), Postgres::start_tls(&pki.server));
    let url = pg_url(
        "localhost",
        &pg,
        &format!("sslmode=verify-full&sslrootcert={}", pki.ca_path()),
    );
    let app = TestApp::spawn_ready(Env::new(&redis.url(), &url)).await;
    let (code, page) = app.visit().await;
    assert_eq!((code, &page["status"]), (200, &"ok".into()), "{page}");
    let sessions = pg.web_sessions_over_tls();
    assert!(
        !sessions.is_empty() && sessions.iter().all(|&tls| tls),
        "{sessions:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_signed_by_another_ca_is_refused_with_the_reason() {
    let pki = Pki::new();
    let (redis, pg) = (Redis::start(), Postgres::start_tls(&pki.server));
    let url = pg_url(
        "localhost",
        &pg,
        &format!("sslmode=verify-full&sslrootcert={}", pki.other_ca_path()),
    );
    let app = TestApp::spawn(Env::new(&redis.url(), &url)).await;
    let reason = tls_failure_reason(&app, "db").await;
    assert_names_tls(&reason, "tls: certificate not trusted");
    // Redis answers, but no count goes out that PostgreSQL has not confirmed.
    let (code, page) = app.visit().await;
    assert_eq!(
        (code, &page["visitas_cache"]),
        (503, &Value::Null),
        "{page}"
    );
    assert!(page["erros"].get("cache").is_none(), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_certificate_for_localhost_reached_as_127_0_0_1_fails_verify_full_passes_verify_ca() {
    let pki = Pki::new();
    let (redis, pg) = (Redis::start(), Postgres::start_tls(&pki.server));
    let ca = pki.ca_path();

    let full = pg_url(
        "127.0.0.1",
        &pg,
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let app = TestApp::spawn(Env::new(&redis.url(), &full)).await;
    let reason = tls_failure_reason(&app, "db").await;
    assert_names_tls(&reason, "tls: certificate name mismatch");
    drop(app);

    let chain_only = pg_url(
        "127.0.0.1",
        &pg,
        &format!("sslmode=verify-ca&sslrootcert={ca}"),
    );
    let app = TestApp::spawn_ready(Env::new(&redis.url(), &chain_only)).await;
    assert_eq!(app.visit().await.1["status"], "ok");
    assert!(pg.web_sessions_over_tls().iter().all(|&tls| tls));

    // verify-ca still checks the chain.
    let other = pki.other_ca_path();
    let wrong_ca = pg_url(
        "127.0.0.1",
        &pg,
        &format!("sslmode=verify-ca&sslrootcert={other}"),
    );
    let app = TestApp::spawn(Env::new(&redis.url(), &wrong_ca)).await;
    assert_names_tls(
        &tls_failure_reason(&app, "db").await,
        "tls: certificate not trusted",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn require_against_a_server_without_tls_is_degraded_prefer_falls_back_to_plain() {
    let (redis, pg) = (Redis::start(), Postgres::start());

    let app = TestApp::spawn(Env::new(
        &redis.url(),
        &pg_url("localhost", &pg, "sslmode=require"),
    ))
    .await;
    let reason = tls_failure_reason(&app, "db").await;
    assert_names_tls(&reason, "tls: not offered by the server");
    drop(app);

    for params in ["sslmode=prefer", ""] {
        let url = pg_url("localhost", &pg, params);
        let app = TestApp::spawn_ready(Env::new(&redis.url(), &url)).await;
        assert_eq!(app.visit().await.1["status"], "ok", "{params}");
        assert!(pg.web_sessions_over_tls().iter().all(|&tls| !tls));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disable_speaks_plain_tcp_and_prefer_and_require_encrypt_without_verifying() {
    let pki = Pki::new();
    let (redis, pg) = (Redis::start(), Postgres::start_tls(&pki.server));
    // No sslrootcert: as libpq, prefer and require encrypt but trust any certificate, so
    // 127.0.0.1 (not in the certificate) is fine.
    for (params, over_tls) in [
        ("sslmode=disable", false),
        ("sslmode=prefer", true),
        ("", true),
        ("sslmode=require", true),
    ] {
        let url = pg_url("127.0.0.1", &pg, params);
        let app = TestApp::spawn_ready(Env::new(&redis.url(), &url)).await;
        assert_eq!(app.visit().await.1["status"], "ok", "{params}");
        let sessions = pg.web_sessions_over_tls();
        assert!(
            !sessions.is_empty() && sessions.iter().all(|&tls| tls == over_tls),
            "{params}: {sessions:?}"
        );
        app.stop().await;
        // Its sessions end before the next mode is judged.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !pg.web_sessions_over_tls().is_empty() {
            assert!(
                Instant::now() < deadline,
                "the stopped app's sessions linger"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // libpq: with a root certificate, require verifies the chain as verify-ca does.
    let other = pki.other_ca_path();
    let url = pg_url(
        "127.0.0.1",
        &pg,
        &format!("sslmode=require&sslrootcert={other}"),
    );
    let app = TestApp::spawn(Env::new(&redis.url(), &url)).await;
    assert_names_tls(
        &tls_failure_reason(&app, "db").await,
        "tls: certificate not trusted",
    );
}

// ---------------------------------------------------------------------------------------
// Redis

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rediss_with_the_right_ca_is_ok_and_with_another_is_degraded() {
    let pki = Pki::new();
    let (redis, pg) = (Redis::start_tls(&pki.server), Postgres::start());

    let env = Env::new(&rediss_url(&redis, ""), &pg.url()).set("REDIS_CA_FILE", pki.ca_path());
    let app = TestApp::spawn_ready(env).await;
    let (_, page) = app.visit().await;
    assert_eq!(page["status"], "ok", "{page}");
    assert_eq!(page["visitas_cache"], "1");
    app.stop().await;

    // Without REDIS_CA_FILE the system bundle is used (here: SSL_CERT_FILE).
    let env = Env::new(&rediss_url(&redis, ""), &pg.url()).set("SSL_CERT_FILE", pki.ca_path());
    let app = TestApp::spawn_ready(env).await;
    assert_eq!(app.visit().await.1["status"], "ok");
    app.stop().await;

    let env =
        Env::new(&rediss_url(&redis, ""), &pg.url()).set("REDIS_CA_FILE", pki.other_ca_path());
    let app = TestApp::spawn(env).await;
    let reason = tls_failure_reason(&app, "cache").await;
    assert_names_tls(&reason, "tls: certificate not trusted");
    // PostgreSQL counts while the cache is refused.
    let page = page_when(&app, |p| p["visitas_cache"].is_string()).await;
    assert_eq!(page["status"], "degraded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rediss_insecure_skips_verification_and_says_so_in_the_log() {
    let pki = Pki::new();
    let (redis, pg) = (Redis::start_tls(&pki.server), Postgres::start());
    // Trusting only the other CA: only #insecure can make this work.
    let env = Env::new(&rediss_url(&redis, "#insecure"), &pg.url())
        .set("REDIS_CA_FILE", pki.other_ca_path());
    let mut web = WebProcess::spawn(env);
    web.wait_ready(Duration::from_secs(10)).await;
    let (_, page) = crate::support::get_page(&crate::support::http_client(), &web.address()).await;
    assert_eq!(page["status"], "ok", "{page}");
    web.signal(crate::support::Signal::TERM);
    assert_eq!(web.wait_exit(Duration::from_secs(10)).0, Some(0));
    let (stdout, _) = web.logs();
    let warning = stdout
        .lines()
        .find(|line| line.contains("#insecure"))
        .unwrap_or_else(|| panic!("no warning about #insecure in {stdout}"));
    assert!(warning.contains("WARN"), "{warning}");
}

// ---------------------------------------------------------------------------------------
// Both, through outages and at start

/// Polls `GET /` until it reports `ok`; returns how long that took.
async fn until_ok(app: &TestApp, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let (_, page) = app.visit().await;
        if page["status"] == "ok" {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "not ok after {limit:?}: {page}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_dependencies_that_go_away_and_come_back_recover_within_two_seconds() {
    let pki = Pki::new();
    let (mut redis, mut pg) = (
        Redis::start_tls(&pki.server),
        Postgres::start_tls(&pki.server),
    );
    let url = pg_url(
        "localhost",
        &pg,
        &format!("sslmode=verify-full&sslrootcert={}", pki.ca_path()),
    );
    let env = Env::new(&rediss_url(&redis, ""), &url).set("REDIS_CA_FILE", pki.ca_path());
    let app = TestApp::spawn_ready(env).await;
    assert_eq!(app.visit().await.1["status"], "ok");

    inject(|| pg.kill());
    page_when(&app, |p| {
        p["status"] == "error" && p["erros"]["db"].is_string()
    })
    .await;
    inject(|| pg.relaunch());
    let took = until_ok(&app, RECOVERY).await;
    println!("PostgreSQL over TLS: ok {took:?} after it answered again");
    assert!(pg.web_sessions_over_tls().iter().all(|&tls| tls));

    inject(|| redis.kill());
    page_when(&app, |p| {
        p["status"] == "degraded" && p["erros"]["cache"].is_string()
    })
    .await;
    inject(|| redis.relaunch_empty());
    let took = until_ok(&app, RECOVERY).await;
    println!("Redis over TLS: ok {took:?} after it answered again");
}

#[test]
fn an_unreadable_ca_file_exits_2_naming_the_variable() {
    let cases = [
        (
            "REDIS_CA_FILE",
            vec![("REDIS_CA_FILE", "/nonexistent/redis-ca.pem")],
        ),
        (
            "DATABASE_URL",
            vec![(
                "DATABASE_URL",
                "postgres://admin:hunter2@db/x?sslmode=verify-full&sslrootcert=/nonexistent/pg-ca.pem",
            )],
        ),
    ];
    for (var, env) in cases {
        let output = Command::new(env!("CARGO_BIN_EXE_web"))
            .env_clear()
            .envs(env)
            .output()
            .expect("web runs");
        assert_eq!(output.status.code(), Some(2), "{var}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(var) && stderr.contains("/nonexistent/"),
            "{stderr}"
        );
        assert!(!stderr.contains("hunter2"), "secret echoed: {stderr}");
    }
}
