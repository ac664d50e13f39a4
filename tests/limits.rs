//! What a hostile or careless client cannot do: grow memory or metric series with invented
//! methods, hold connections open without sending a request, exceed the connection cap, or
//! poison the counter through Redis.

mod support;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use desafio3::store::REDIS_LEASE;
use support::{
    Env, Postgres, Redis, TestApp, WebProcess, count_of, free_port, http_client, inject,
};

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("/proc status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Sends raw bytes on a new connection and returns everything read until the server closes
/// it (or `limit` passes), with the time that took.
async fn exchange(port: u16, bytes: &[u8], limit: Duration) -> (String, Duration) {
    let started = Instant::now();
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    stream.write_all(bytes).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(limit, stream.read_to_end(&mut answer)).await;
    (
        String::from_utf8_lossy(&answer).into_owned(),
        started.elapsed(),
    )
}

/// An app whose dependencies are absent: what is tested here never reaches them.
async fn app_without_dependencies(vars: &[(&str, &str)]) -> TestApp {
    let mut env = Env::new(
        &format!("redis://127.0.0.1:{}/0", free_port()),
        &format!("postgres://admin@127.0.0.1:{}/desafio3", free_port()),
    );
    for (k, v) in vars {
        env = env.set(k, v);
    }
    TestApp::spawn(env).await
}

fn port_of(address: &str) -> u16 {
    address.rsplit(':').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_long_invented_methods_leave_memory_and_metrics_flat() {
    let redis = Redis::start();
    let pg = Postgres::start();
    let web = WebProcess::spawn(Env::for_servers(&redis, &pg));
    web.wait_ready(Duration::from_secs(10)).await;
    let client = http_client();
    let metrics = || async {
        let url = format!("{}/metrics", web.admin_address());
        client
            .get(&url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            .len()
    };
    let flood = |from: usize, to: usize| {
        let port = web.port;
        async move {
            for i in from..to {
                // 8 KB of method: what hyper's 16 KB buffer lets through.
                let method = format!("M{i:05}{}", "X".repeat(8 * 1024));
                let request =
                    format!("{method} / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                let (answer, _) = exchange(port, request.as_bytes(), Duration::from_secs(5)).await;
                assert!(answer.starts_with("HTTP/1.1 405"), "{:.80}", answer);
            }
        }
    };
    // Warm up: the first invented method creates the one `other` series there will be, and
    // the first scrape the series of `/metrics` itself.
    flood(0, 20).await;
    metrics().await;
    let (rss_before, metrics_before) = (rss_kib(web.child.id()), metrics().await);
    flood(20, 220).await;
    let (rss_after, metrics_after) = (rss_kib(web.child.id()), metrics().await);
    println!("RSS {rss_before} → {rss_after} KiB, /metrics {metrics_before} → {metrics_after} B");
    assert!(
        rss_after < rss_before + 4 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
    // Only counter values change (a digit or two), no series is added.
    assert!(
        metrics_after < metrics_before + 256,
        "/metrics grew from {metrics_before} to {metrics_after} bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_and_slow_header_connections_are_closed_within_the_header_timeout() {
    const TIMEOUT: Duration = Duration::from_millis(1000);
    let app = app_without_dependencies(&[("HTTP_HEADER_TIMEOUT_MS", "1000")]).await;
    let port = port_of(&app.address);
    let bound = TIMEOUT + Duration::from_millis(700);

    // A socket that never sends a byte.
    let (_, took) = exchange(port, b"", Duration::from_secs(10)).await;
    assert!(
        took >= TIMEOUT && took < bound,
        "idle socket closed after {took:?}"
    );

    // A head that trickles in, one header line every 300 ms.
    let started = Instant::now();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\n")
        .await
        .unwrap();
    let closed = loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if stream.write_all(b"X-Slow: 1\r\n").await.is_err() {
            break started.elapsed();
        }
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_millis(1), stream.read(&mut byte)).await;
        if let Ok(Ok(0) | Err(_)) = read {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "slow head still open"
        );
    };
    assert!(closed < bound, "slow head closed after {closed:?}");

    // A kept-alive connection, idle after one answered request.
    let started = Instant::now();
    let (answer, took) = exchange(
        port,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        took < bound,
        "idle kept-alive connection closed after {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_beyond_the_cap_wait_until_one_closes() {
    let app = app_without_dependencies(&[
        ("MAX_CONNECTIONS", "4"),
        ("HTTP_HEADER_TIMEOUT_MS", "20000"),
    ])
    .await;
    let port = port_of(&app.address);
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    // The fifth connects (the kernel's backlog) but is not served while four are open.
    let mut fifth = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    fifth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let waited =
        tokio::time::timeout(Duration::from_millis(800), fifth.read_to_end(&mut answer)).await;
    assert!(
        waited.is_err() && answer.is_empty(),
        "served beyond the cap"
    );
    drop(held.pop());
    tokio::time::timeout(Duration::from_secs(2), fifth.read_to_end(&mut answer))
        .await
        .expect("served once a slot is free")
        .unwrap();
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poisoned_redis_counter_never_reaches_an_answer_or_postgresql() {
    let redis = Redis::start();
    let pg = Postgres::start();
    let app = TestApp::spawn_ready(Env::for_servers(&redis, &pg)).await;
    for expected in 1..=3 {
        assert_eq!(count_of(&app.visit().await.1), Some(expected));
    }
    // A value near the maximum is poison too: counting on it, or fencing PostgreSQL up to it,
    // would leave no room to count.
    for poison in ["9223372036854775806", "-5", "999999999999999", "lots"] {
        inject(|| redis.set_raw_counter(poison));
        let (poisoned, mut counted) = (Instant::now(), 0);
        while counted < 3 {
            let (status, page) = app.visit().await;
            assert_eq!(status, 200);
            assert_eq!(page["status"], "degraded", "{page}");
            assert_eq!(page["erros"]["cache"], "invalid counter value", "{page}");
            // Counted in PostgreSQL instead, once Redis's lease has run out.
            if let Some(count) = count_of(&page) {
                assert!(count < 100, "{poison}: {page}");
                counted += 1;
            }
            assert!(
                poisoned.elapsed() < 3 * REDIS_LEASE,
                "never counted: {page}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let durable = pg.counter().expect("counter row");
    assert!(durable < 100, "poison reached PostgreSQL: {durable}");
    assert_eq!(
        redis.get_raw_counter().as_deref(),
        Some("lots"),
        "left for a person to see"
    );
    // Once someone repairs the key, counting in Redis resumes above the durable count.
    inject(|| redis.set_counter(0));
    let (_, page) = app.visit().await;
    assert_eq!(page["status"], "ok", "{page}");
    assert!(count_of(&page).unwrap() > durable);
}
