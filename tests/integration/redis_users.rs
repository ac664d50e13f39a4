//! Redis's users as the stack sets them up (the ACL file `web secrets` writes): `web` counts
//! through the counting functions, on its own keys only, and may run no Lua of its own;
//! `default`, which anyone on the network is without a password, may only `PING`; the
//! functions are loaded by `admin` (the cache healthcheck), and a Redis without them is not
//! ready; a runaway script can always be stopped by `admin`.

use std::time::{Duration, Instant};

use crate::support::{
    Env, Postgres, Redis, TestApp, count_of, inject, ok_count, stack_password, stack_secret,
};

/// A connection to `redis` as one of the stack's users, with its password file.
fn connect_as(redis: &Redis, user: &str, password_file: &str) -> redis::Connection {
    let url = format!(
        "redis://{user}:{}@127.0.0.1:{}/0",
        stack_password(password_file),
        redis.port
    );
    redis::Client::open(url)
        .and_then(|c| c.get_connection())
        .expect("connecting to redis")
}

fn refused_to(conn: &mut redis::Connection, command: &[&str]) -> Option<redis::ErrorKind> {
    let mut cmd = redis::cmd(command[0]);
    for arg in &command[1..] {
        cmd.arg(*arg);
    }
    cmd.query::<redis::Value>(conn).err().map(|e| e.kind())
}

/// Redis with the stack's users, PostgreSQL, and the app logged in to Redis as `web`.
async fn app_as_web() -> (Redis, Postgres, TestApp) {
    let redis = Redis::start();
    let pg = Postgres::start();
    let app = TestApp::spawn_ready(Env::as_web_user(&redis, &pg)).await;
    (redis, pg, app)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn web_counts_through_the_functions_and_may_run_no_lua_of_its_own() {
    let (redis, _pg, app) = app_as_web().await;
    assert_eq!(
        ok_count(&app.visit().await) + 1,
        ok_count(&app.visit().await)
    );

    let mut web = connect_as(&redis, "web", "web/redis_password");
    let no_perm = Some(redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm));
    for command in [
        &["EVAL", "while true do end", "0"][..],
        &["EVALSHA", "0000000000000000000000000000000000000000", "0"],
        &["SCRIPT", "LOAD", "return 1"],
        &[
            "FUNCTION",
            "LOAD",
            "#!lua name=x\nredis.register_function('x', function() end)",
        ],
        &["FUNCTION", "FLUSH"],
        &["FUNCTION", "DELETE", "desafio3"],
        &["SET", "other-key", "1"],
        &["GET", "other"],
        &["FLUSHALL"],
        &["CONFIG", "GET", "dir"],
    ] {
        assert_eq!(refused_to(&mut web, command), no_perm, "{command:?}");
    }
    // What it may do: the functions, and its own keys.
    let version: String = redis::cmd("FCALL_RO")
        .arg("desafio3_version")
        .arg(0)
        .query(&mut web)
        .expect("web may call the functions");
    assert!(!version.is_empty());
    let count: String = redis::cmd("GET")
        .arg("visitas")
        .query(&mut web)
        .expect("web may read its count");
    assert!(count.parse::<u64>().is_ok(), "{count}");
}

#[test]
fn the_default_user_may_only_ping() {
    let redis = Redis::start();
    redis.apply_acl(&stack_secret("cache/redis_users.acl"));
    let mut default = redis::Client::open(redis.url())
        .and_then(|c| c.get_connection())
        .expect("connecting to redis without a password");
    let pong: String = redis::cmd("PING")
        .query(&mut default)
        .expect("default may PING");
    assert_eq!(pong, "PONG");
    assert_eq!(
        refused_to(&mut default, &["GET", "visitas"]),
        Some(redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_runaway_script_is_stopped_by_admin_and_web_counts_again() {
    let (redis, _pg, app) = app_as_web().await;
    let before = ok_count(&app.visit().await);
    let mut admin = connect_as(&redis, "admin", "cache/redis_admin_password");
    // Redis answers BUSY to everyone else once a script has run this long (5 s by default).
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("busy-reply-threshold")
        .arg(200)
        .query(&mut admin)
        .expect("CONFIG SET");
    let runaway = std::thread::spawn(move || {
        redis::cmd("EVAL")
            .arg("while true do end")
            .arg(0)
            .query::<redis::Value>(&mut admin)
    });
    // Wait until Redis answers BUSY (the script started and ran past the threshold).
    let mut web = connect_as(&redis, "web", "web/redis_password");
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis::cmd("PING").query::<String>(&mut web).is_ok() {
        assert!(Instant::now() < deadline, "Redis never got busy");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Answered while Redis is wedged: degraded, promptly, with the count taken elsewhere.
    let started = Instant::now();
    let (status, page) = app.visit().await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["status"], "degraded", "{page}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    let mut admin = connect_as(&redis, "admin", "cache/redis_admin_password");
    let () = redis::cmd("SCRIPT")
        .arg("KILL")
        .query(&mut admin)
        .expect("admin stops the runaway script");
    let killed = inject(|| runaway.join()).expect("the runaway script's thread");
    assert!(killed.is_err(), "the script ended by itself: {killed:?}");

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, page) = app.visit().await;
        if page["status"] == "ok" {
            assert!(count_of(&page) > Some(before), "{page}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "web never counted in Redis again: {page}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_without_the_functions_is_not_ready_until_they_are_loaded_again() {
    let redis = Redis::start();
    let pg = Postgres::start();
    let app = TestApp::spawn_ready(Env::for_servers(&redis, &pg)).await;
    let mut counts = vec![ok_count(&app.visit().await)];

    // As after the data was replaced by a copy without them. Every reason given, on the page
    // and by /readyz, names it, from the first failed call on.
    inject(|| redis.flush_functions());
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut reasons = Vec::new();
    while !reasons.iter().any(|r: &String| r.starts_with("ready:")) {
        let (status, page) = app.visit().await;
        assert_eq!(status, 200, "answered, degraded: {page}");
        counts.extend(count_of(&page));
        reasons.extend(
            page["erros"]["cache"]
                .as_str()
                .map(|r| format!("page: {r}")),
        );
        let ready = app.get_admin("/readyz").await;
        let body: serde_json::Value = ready.json().await.expect("readyz JSON");
        reasons.extend(
            body["erros"]["cache"]
                .as_str()
                .map(|r| format!("ready: {r}")),
        );
        assert!(
            Instant::now() < deadline,
            "still ready without the functions"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        reasons.iter().all(|r| r.contains("functions not loaded")),
        "{reasons:?}"
    );
    // The cache healthcheck loads them; web counts in Redis again, no count repeated.
    inject(|| redis.load_functions());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, page) = app.visit().await;
        counts.extend(count_of(&page));
        if page["status"] == "ok" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "web never counted in Redis again: {page}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        counts.windows(2).all(|w| w[0] < w[1]),
        "counts must strictly increase: {counts:?}"
    );
}
