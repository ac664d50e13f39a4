//! What a hostile or careless client cannot do: grow memory or metric series with invented
//! methods, hold connections open without sending a request or without reading the answers,
//! exceed the connection cap or take every slot from one address, grow memory or log lines
//! with long paths, or poison the counter through Redis.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::task::JoinHandle;

use crate::support::{
    Env, Postgres, Redis, TestApp, WebProcess, count_of, healthcheck, http_client, inject,
};
use desafio3::store::REDIS_LEASE;

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
    let mut env = Env::unreachable();
    for (k, v) in vars {
        env = env.set(k, v);
    }
    TestApp::spawn(env).await
}

/// A `web` process whose dependencies are absent (with `vars` set, and its stdout left unread
/// after the start-up line if asked), once its public `/healthz` answers.
async fn web_without_dependencies(vars: &[(&str, &str)], stdout_unread: bool) -> WebProcess {
    let env = vars
        .iter()
        .fold(Env::unreachable(), |env, (k, v)| env.set(k, v));
    let web = if stdout_unread {
        WebProcess::spawn_with_stdout_unread(env)
    } else {
        WebProcess::spawn(env)
    };
    let (client, started) = (http_client(), Instant::now());
    while !client
        .get(format!("{}/healthz", web.address()))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(started.elapsed() < Duration::from_secs(10), "web not up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    web
}

/// `GET` of a 15 KB path: what the request log used to write whole.
async fn long_path_request(port: u16, i: usize) {
    let request = format!(
        "GET /{i:05}{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "p".repeat(15 * 1024)
    );
    let (answer, _) = exchange(port, request.as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 414"), "{:.80}", answer);
}

fn port_of(address: &str) -> u16 {
    address.rsplit(':').next().unwrap().parse().unwrap()
}

/// A connection to `port` from the loopback address `from` (all of 127.0.0.0/8 is local, so
/// one machine can play several clients), with a small receive buffer when asked.
async fn connect_from(from: [u8; 4], port: u16, receive_buffer: Option<u32>) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((from, 0).into()).unwrap();
    if let Some(bytes) = receive_buffer {
        socket.set_recv_buffer_size(bytes).unwrap();
    }
    socket.connect(([127, 0, 0, 1], port).into()).await.unwrap()
}

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";

/// A client that pipelines `n` requests and does not read the answers: it writes from a task
/// of its own (its writes block once the server stops reading). The writing half stays open
/// (no end of stream for the server) until the returned task is dropped.
async fn pipeline_without_reading(
    from: [u8; 4],
    port: u16,
    n: usize,
) -> (OwnedReadHalf, JoinHandle<OwnedWriteHalf>) {
    let (read, mut write) = connect_from(from, port, Some(4096)).await.into_split();
    let writing = tokio::spawn(async move {
        let requests = HEALTHZ.repeat(n);
        let _ = write.write_all(&requests).await;
        write
    });
    (read, writing)
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

/// stdout is a pipe nobody reads: once it is full, the log writer blocks, and every line the
/// service logs waits in its queue, which must drop lines rather than grow.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_paths_with_stdout_stalled_leave_memory_flat_and_count_dropped_lines() {
    let web = web_without_dependencies(&[], true).await;
    // Fill the pipe and the queue (2,048 lines), then measure.
    for i in 0..3000 {
        long_path_request(web.port, i).await;
    }
    let rss_before = rss_kib(web.child.id());
    for i in 3000..3500 {
        long_path_request(web.port, i).await;
    }
    let rss_after = rss_kib(web.child.id());
    println!("RSS {rss_before} → {rss_after} KiB over 500 requests");
    assert!(
        rss_after <= rss_before + 2 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
    let metrics = web.metrics_text().await;
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("log_lines_dropped_total "))
        .unwrap_or_else(|| panic!("no log_lines_dropped_total in\n{metrics}"))
        .parse()
        .unwrap();
    println!("{dropped} log lines dropped");
    assert!(dropped >= 500, "{dropped} lines dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_path_is_logged_cut_to_128_bytes_and_marked() {
    let web = web_without_dependencies(&[], false).await;
    long_path_request(web.port, 7).await;
    let started = Instant::now();
    let line: serde_json::Value = loop {
        let (stdout, _) = web.logs();
        if let Some(line) = stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|l| l["message"] == "request" && l["status"] == 414)
        {
            break line;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "not logged:\n{stdout}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!("{} bytes: {line}", line.to_string().len());
    let path = line["path"].as_str().expect("path");
    let kept = path.strip_suffix('…').expect("marked as cut with …");
    assert_eq!(kept.len(), 128, "{line}");
    assert!(kept.starts_with("/00007ppp"), "{line}");
    assert_eq!(line["path_truncated"], true, "{line}");
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
    assert!(
        closed >= TIMEOUT && closed < bound,
        "slow head closed after {closed:?}"
    );

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
        took >= TIMEOUT && took < bound,
        "idle kept-alive connection closed after {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_beyond_the_cap_wait_until_one_closes() {
    let app = app_without_dependencies(&[
        ("MAX_CONNECTIONS", "4"),
        ("MAX_CONNECTIONS_PER_ADDRESS", "4"),
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

/// One address floods the public port: 40 clients pipelining requests they never read, then
/// 1,700 idle sockets (the default caps: 512 connections, 128 per address). Another address
/// is still answered, each request within 1 s, and the container healthcheck (on the admin
/// port) stays healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_from_one_address_leaves_room_for_the_others() {
    // Idle sockets stay as long as the test: the header timeout does not thin the flood.
    let web = web_without_dependencies(&[("HTTP_HEADER_TIMEOUT_MS", "60000")], false).await;
    let port = web.port;
    let mut flood = Vec::new();
    for _ in 0..40 {
        flood.push(pipeline_without_reading([127, 0, 0, 1], port, 400).await);
    }
    let mut idle = Vec::new();
    for _ in 0..1_700 {
        idle.push(connect_from([127, 0, 0, 1], port, None).await);
    }
    // The flood in place: the server has taken what it takes and closed the rest.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 0..20 {
        let started = Instant::now();
        let mut other = connect_from([127, 0, 0, 2], port, None).await;
        let connected = started.elapsed();
        other
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(1), other.read_to_end(&mut answer)).await;
        assert!(
            read.is_ok() && answer.starts_with(b"HTTP/1.1 200"),
            "request {i} from another address: no answer within 1 s ({:?}; connected after \
             {connected:?})",
            started.elapsed()
        );
    }
    let (code, took, stderr) = healthcheck(web.admin_port);
    assert_eq!(code, Some(0), "unhealthy during the flood: {stderr}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    drop((flood, idle));
}

/// A client that stops reading its answers is cut off once no answer has made progress for
/// `HTTP_WRITE_TIMEOUT_MS`; without that bound it would hold its connection for as long as it
/// liked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_stops_reading_is_closed_after_the_write_timeout() {
    // The header timeout well out of the way: it is not what must end this connection.
    let app = app_without_dependencies(&[
        ("HTTP_WRITE_TIMEOUT_MS", "1000"),
        ("HTTP_HEADER_TIMEOUT_MS", "60000"),
    ])
    .await;
    let port = port_of(&app.address);
    // Requests written without end, answers never read: once the buffers on both sides are
    // full the server's writes stall, it stops reading, and so do this client's writes, for
    // good, unless the server closes the connection.
    let (_read, mut write) = connect_from([127, 0, 0, 1], port, Some(4096))
        .await
        .into_split();
    let started = Instant::now();
    let writing = async {
        let requests = HEALTHZ.repeat(100);
        loop {
            write.write_all(&requests).await?;
        }
    };
    let ended: Result<std::io::Result<()>, _> =
        tokio::time::timeout(Duration::from_secs(30), writing).await;
    assert!(
        matches!(ended, Ok(Err(_))),
        "still open {:?} after the client stopped reading",
        started.elapsed()
    );
}

/// Every connection ends after `HTTP_CONNECTION_MAX_AGE_MS`, however busy: its request in
/// flight is answered, then it is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_connection_is_closed_after_its_maximum_age() {
    let app = app_without_dependencies(&[("HTTP_CONNECTION_MAX_AGE_MS", "1000")]).await;
    let port = port_of(&app.address);
    let mut stream = connect_from([127, 0, 0, 1], port, None).await;
    let started = Instant::now();
    let mut answered = 0;
    let mut buffer = vec![0u8; 4096];
    let ended = loop {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "still open after 5 s"
        );
        if stream.write_all(HEALTHZ).await.is_err() {
            break started.elapsed();
        }
        match stream.read(&mut buffer).await {
            Ok(n) if n > 0 => answered += 1,
            _ => break started.elapsed(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        ended >= Duration::from_secs(1),
        "closed after {ended:?}, before its age"
    );
    assert!(answered >= 10, "only {answered} answers before it closed");
}
