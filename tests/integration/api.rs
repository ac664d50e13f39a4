//! The HTTP contract with both dependencies healthy: the seed's page, what counts and what
//! does not, error answers, health, readiness and metrics.

use std::collections::HashSet;
use std::time::Duration;

use crate::support::{Env, Postgres, Redis, TestApp, count_of, healthy_app};

fn assert_db_time_format(value: &str) {
    // YYYY-MM-DD HH:MM:SS.ffffff, always six fraction digits.
    let bytes = value.as_bytes();
    assert_eq!(bytes.len(), 26, "{value}");
    for (i, b) in bytes.iter().enumerate() {
        let expected_sep = match i {
            4 | 7 => Some(b'-'),
            10 => Some(b' '),
            13 | 16 => Some(b':'),
            19 => Some(b'.'),
            _ => None,
        };
        match expected_sep {
            Some(sep) => assert_eq!(*b, sep, "{value}"),
            None => assert!(b.is_ascii_digit(), "{value}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn root_serves_the_seed_page_with_keys_in_order() {
    let (_redis, _pg, app) = healthy_app().await;
    let response = app.get("/").await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let text = response.text().await.unwrap();
    let page: serde_json::Value = serde_json::from_str(&text).unwrap();
    let keys: Vec<_> = page.as_object().unwrap().keys().cloned().collect();
    // serde_json's map sorts keys, so check the order on the raw text.
    assert!(
        text.starts_with(r#"{"status":"ok","visitas_cache":"1","hora_db":""#),
        "{text}"
    );
    assert_eq!(keys.len(), 3, "no erros key when healthy: {text}");
    assert_db_time_format(page["hora_db"].as_str().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sequential_visits_count_one_two_three() {
    let (redis, _pg, app) = healthy_app().await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        let (status, page) = app.visit().await;
        assert_eq!(status, 200);
        assert_eq!(page["status"], "ok", "{page}");
        assert!(page["visitas_cache"].is_string(), "a JSON string: {page}");
        seen.push(count_of(&page).unwrap());
    }
    assert_eq!(seen, vec![1, 2, 3]);
    assert_eq!(
        redis.get_counter(),
        Some(3),
        "the counter lives in Redis key visitas"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_visits_get_two_hundred_consecutive_counts() {
    let (redis, pg) = (Redis::start(), Postgres::start());
    // Two hundred connections from one address: more than its default share of the slots.
    let env = Env::for_servers(&redis, &pg).set("MAX_CONNECTIONS_PER_ADDRESS", "512");
    let app = TestApp::spawn_ready(env).await;
    let app = std::sync::Arc::new(app);
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { app.visit().await })
        })
        .collect();
    let mut counts = Vec::new();
    for task in tasks {
        let (status, page) = task.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(page["status"], "ok");
        counts.push(count_of(&page).unwrap());
    }
    counts.sort_unstable();
    assert_eq!(counts, (1..=200).collect::<Vec<_>>());
    assert_eq!(redis.get_counter(), Some(200));
}

/// `n` visits at once; every one answered 200.
async fn burst(app: &std::sync::Arc<TestApp>, n: usize) {
    let visits: Vec<_> = (0..n)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { app.visit().await })
        })
        .collect();
    for visit in visits {
        assert_eq!(visit.await.unwrap().0, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_are_reused_not_opened_per_request() {
    let (redis, pg) = (Redis::start(), Postgres::start());
    let app = TestApp::spawn_ready(Env::for_servers(&redis, &pg)).await;
    let app = std::sync::Arc::new(app);
    burst(&app, 100).await;
    let (pg_before, redis_before) = (pg.web_backends(), redis.connections_accepted());
    assert!(
        (1..=2).contains(&pg_before.len()),
        "the service holds one or two PostgreSQL connections: {pg_before:?}"
    );
    for _ in 0..3 {
        burst(&app, 100).await;
    }
    // 300 visits, and no new connection (one batch at a time needs one PostgreSQL session; the
    // start-up may have left a second): the same PostgreSQL sessions, and no Redis connection
    // beyond the one this check itself opens.
    let pg_after = pg.web_backends();
    assert!(
        pg_after.len() <= 2 && pg_before.iter().all(|b| pg_after.contains(b)),
        "PostgreSQL sessions changed: {pg_before:?} then {pg_after:?}"
    );
    assert_eq!(
        redis.connections_accepted() - redis_before,
        1,
        "new Redis connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_get_root_counts_a_visit() {
    let (redis, _pg, app) = healthy_app().await;
    let head = app
        .client
        .head(format!("{}/", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    for path in [
        "/favicon.ico",
        "/healthz",
        "/readyz",
        "/metrics",
        "/nope",
        "/index.html",
    ] {
        app.get(path).await;
    }
    assert_eq!(redis.get_counter(), None, "nothing counted yet");
    let (_, page) = app.visit().await;
    assert_eq!(count_of(&page), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_http_gets_a_4xx_and_the_service_keeps_serving() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_redis, _pg, app) = healthy_app().await;
    let port: u16 = app.address.rsplit(':').next().unwrap().parse().unwrap();
    for garbage in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        b"GET / HTTP/1.1\r\nHo st: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    ] {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        stream.write_all(garbage).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
            .await
            .expect("answered and closed, not left hanging")
            .expect("read");
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 400 "), "{garbage:?} → {text:?}");
    }
    let (status, page) = app.visit().await;
    assert_eq!((status, count_of(&page)), (200, Some(1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn liveness_readiness_and_metrics() {
    let (_redis, _pg, app) = healthy_app().await;
    let health = app.get("/healthz").await;
    assert_eq!(health.status(), 200);
    let ready = app.get_admin("/readyz").await;
    assert_eq!(ready.status(), 200);
    assert_eq!(
        ready.json::<serde_json::Value>().await.unwrap()["status"],
        "ok"
    );

    for _ in 0..3 {
        app.visit().await;
    }
    app.get("/nope").await;
    let metrics = app.get_admin("/metrics").await;
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.unwrap();
    for needle in [
        r#"http_requests_total{method="GET",route="/",status="200"}"#,
        r#"http_requests_total{method="GET",route="unmatched",status="404"}"#,
        "http_request_duration_seconds_bucket",
        r#"visits_counted_total{store="cache"}"#,
        "visit_counter_fences_total",
        "visit_batch_size",
        // Present; its value is shared with the other apps this test binary runs.
        r#"dependency_up{dependency="cache"}"#,
        r#"dependency_up{dependency="db"}"#,
    ] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hora_db_follows_db_timezone() {
    let redis = Redis::start();
    let pg = Postgres::start();
    let utc = TestApp::spawn_ready(Env::for_servers(&redis, &pg)).await;
    let sp =
        TestApp::spawn_ready(Env::for_servers(&redis, &pg).set("DB_TIMEZONE", "America/Sao_Paulo"))
            .await;
    let parse = |page: &serde_json::Value| {
        let t = page["hora_db"].as_str().unwrap().to_owned();
        assert_db_time_format(&t);
        chrono::NaiveDateTime::parse_from_str(&t, "%Y-%m-%d %H:%M:%S%.f").unwrap()
    };
    let (_, a) = utc.visit().await;
    let (_, b) = sp.visit().await;
    // São Paulo is UTC−3 all year (no daylight saving since 2019); the second visit comes a
    // moment after the first, which the tolerance absorbs (also across an hour or a day).
    let offset = parse(&a) - parse(&b);
    let off_by = (offset - chrono::TimeDelta::hours(3)).abs();
    assert!(
        off_by < chrono::TimeDelta::seconds(5),
        "UTC {a} vs São Paulo {b}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn counts_are_distinct_across_many_sequential_and_parallel_clients() {
    let (_redis, _pg, app) = healthy_app().await;
    let app = std::sync::Arc::new(app);
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move {
                let mut mine = Vec::new();
                for _ in 0..25 {
                    let (_, page) = app.visit().await;
                    mine.push(count_of(&page).unwrap());
                }
                mine
            })
        })
        .collect();
    let mut all = HashSet::new();
    for client in clients {
        let mine = client.await.unwrap();
        assert!(
            mine.windows(2).all(|w| w[0] < w[1]),
            "per-client order: {mine:?}"
        );
        for c in mine {
            assert!(all.insert(c), "count {c} handed out twice");
        }
    }
    assert_eq!(all.len(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_first_request_after_a_cold_start_is_ok() {
    let redis = Redis::start();
    let pg = Postgres::start();
    // Not waiting for readiness: the request arrives while the first connection attempts
    // are in flight, and waits for them instead of failing fast.
    let app = TestApp::spawn(Env::for_servers(&redis, &pg)).await;
    let (status, page) = app.visit().await;
    assert_eq!(status, 200);
    assert_eq!(page["status"], "ok", "{page}");
    assert_eq!(count_of(&page), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readiness_checks_run_no_schema_work_take_no_lock_and_open_no_connection() {
    let (redis, pg) = (Redis::start(), Postgres::start());
    // The checks run one at a time, on one connection.
    let app = TestApp::spawn_ready(Env::for_servers(&redis, &pg)).await;
    // Separate statements: ALTER SYSTEM cannot run inside a multi-statement batch.
    pg.execute("ALTER SYSTEM SET log_statement = 'all'");
    pg.execute("SELECT pg_reload_conf()");
    let backends = pg.web_backends();
    let redis_before = redis.connections_accepted();
    let logged_before = pg.log().len();
    for _ in 0..200 {
        assert_eq!(app.get_admin("/readyz").await.status(), 200);
    }
    let log = pg.log()[logged_before..].to_owned();
    assert!(
        log.matches("SELECT 1").count() >= 200,
        "statements are logged:\n{log}"
    );
    assert!(!log.contains("CREATE TABLE"), "schema work on /readyz");
    assert!(!log.contains("pg_advisory"), "a lock taken on /readyz");
    assert_eq!(pg.web_backends(), backends, "PostgreSQL sessions changed");
    assert_eq!(
        redis.connections_accepted() - redis_before,
        1,
        "new Redis connections"
    );
}
