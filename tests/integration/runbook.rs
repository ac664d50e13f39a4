//! README's runbook, step by step, against real servers: repairing a poisoned counter with
//! the Redis user and command the README gives, and restoring an older PostgreSQL backup with
//! `pg_dump`/`psql` and the README's SQL. Neither may hand out a count twice.

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{
    DB_PASSWORD, Env, Postgres, Redis, Signal, TestApp, WebProcess, count_of, get_page,
    http_client, inject, ok_count, stack_secret,
};

/// README's `redis-cli --user admin --askpass ...` with the password on stdin, or the same
/// as `web` (with its password, from its own volume).
fn redis_cli_as(redis: &Redis, user: &str, args: &[&str]) -> String {
    let password = match user {
        "admin" => "cache/redis_admin_password",
        _ => "web/redis_password",
    };
    let output = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "--user", user, "--askpass"])
        .args(args)
        .stdin(std::fs::File::open(stack_secret(password)).expect("password"))
        .stderr(Stdio::inherit())
        .output()
        .expect("running redis-cli");
    assert!(output.status.success(), "redis-cli {args:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `psql -U admin -d desafio3 -v ON_ERROR_STOP=1 ...`, optionally fed a file on stdin.
fn psql(pg: &Postgres, args: &[&str], stdin: Option<&std::path::Path>) -> String {
    let mut cmd = pg.client_command("psql");
    cmd.args([
        "-U",
        "admin",
        "-d",
        "desafio3",
        "-v",
        "ON_ERROR_STOP=1",
        "-X",
    ])
    .args(args)
    .stderr(Stdio::inherit());
    cmd.stdin(stdin.map_or_else(Stdio::null, |path| {
        Stdio::from(std::fs::File::open(path).expect("SQL file"))
    }));
    let output = cmd.output().expect("running psql");
    assert!(output.status.success(), "psql {args:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn assert_unique(counts: &[i64]) {
    let unique: HashSet<_> = counts.iter().collect();
    assert_eq!(unique.len(), counts.len(), "a count repeated: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poisoned_counter_is_repaired_by_resetting_it_as_admin() {
    let redis = Redis::start();
    let pg = Postgres::start();
    let app = TestApp::spawn_ready(Env::as_web_user(&redis, &pg)).await;
    let mut before = Vec::new();
    for _ in 0..3 {
        before.push(ok_count(&app.visit().await));
    }

    // The poison comes through `web`'s user, the one that writes the key.
    assert!(redis_cli_as(&redis, "web", &["SET", "visitas", "not-a-count"]).contains("OK"));
    let (status, page) = app.visit().await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["status"], "degraded", "{page}");
    assert_eq!(page["erros"]["cache"], "invalid counter value", "{page}");
    before.extend(count_of(&page));
    // As if Redis were down: after the lease, PostgreSQL counts.
    let deadline = Instant::now() + Duration::from_secs(5);
    while before.len() < 5 {
        assert!(Instant::now() < deadline, "PostgreSQL never counted");
        let (_, page) = app.visit().await;
        before.extend(count_of(&page));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The repair, as README's admin: any plausible value below the count; web raises it from
    // PostgreSQL.
    assert!(redis_cli_as(&redis, "admin", &["SET", "visitas", "0"]).contains("OK"));
    let mut after = Vec::new();
    for _ in 0..5 {
        after.push(ok_count(&app.visit().await));
    }
    assert_eq!(after.len(), 5, "every visit counted again: {after:?}");
    let highest_before = *before.iter().max().expect("counts");
    assert!(
        after.iter().all(|c| *c > highest_before),
        "{before:?} {after:?}"
    );
    let all: Vec<i64> = before.iter().chain(&after).copied().collect();
    assert_unique(&all);
    let in_redis = redis_cli_as(&redis, "admin", &["GET", "visitas"]);
    assert!(
        in_redis.contains(&after.iter().max().expect("counts").to_string()),
        "Redis counts again: {in_redis}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restoring_an_older_backup_as_documented_repeats_no_count() {
    let mut redis = Redis::start_persistent();
    let pg = Postgres::start();
    // As the compose stack has it: web logs in as its own role and owns the schema `web`.
    psql(
        &pg,
        &[
            "-c",
            &format!(
                "CREATE ROLE web LOGIN PASSWORD '{DB_PASSWORD}'; CREATE SCHEMA web AUTHORIZATION web;"
            ),
        ],
        None,
    );
    let (redis_url, database_url) = (
        redis.url(),
        format!("postgres://web@127.0.0.1:{}/desafio3", pg.port),
    );
    let env = || Env::new(&redis_url, &database_url);
    let client = http_client();
    let mut answered = Vec::new();
    let mut web = WebProcess::spawn(env());
    web.wait_ready(Duration::from_secs(10)).await;
    for _ in 0..3 {
        answered.extend(count_of(&get_page(&client, &web.address()).await.1));
    }

    // The backup, taken while web runs.
    let dir = tempfile::tempdir().expect("temp dir");
    let backup = dir.path().join("backup.sql");
    let dump = pg
        .client_command("pg_dump")
        .args(["-U", "admin", "--clean", "--if-exists", "desafio3"])
        .stdout(std::fs::File::create(&backup).expect("backup file"))
        .status()
        .expect("running pg_dump");
    assert!(dump.success());

    // Counting goes on after it: in Redis, then in PostgreSQL alone while Redis is down.
    for _ in 0..3 {
        answered.extend(count_of(&get_page(&client, &web.address()).await.1));
    }
    inject(|| redis.stop());
    let counted_in_redis = answered.len();
    let deadline = Instant::now() + Duration::from_secs(5);
    while answered.len() < counted_in_redis + 3 {
        assert!(Instant::now() < deadline, "PostgreSQL never counted");
        answered.extend(count_of(&get_page(&client, &web.address()).await.1));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(answered.len(), 9, "{answered:?}");
    let highest = *answered.iter().max().expect("counts");

    // The runbook: stop web, restore, raise the counter of record, start again.
    web.signal(Signal::TERM);
    assert_eq!(web.wait_exit(Duration::from_secs(10)).0, Some(0));
    psql(&pg, &["--single-transaction"], Some(&backup));
    let restored = psql(&pg, &["-Atc", "SELECT value FROM web.visit_counter"], None);
    assert_eq!(restored.trim(), "3", "the backup's counter is back");
    psql(
        &pg,
        &[
            "-c",
            &format!(
                "UPDATE web.visit_counter SET value = GREATEST(value, {highest}), fence = '' WHERE id = 1"
            ),
        ],
        None,
    );
    inject(|| redis.relaunch()); // with its data: it counted to 6, below what PostgreSQL handed out
    let web = WebProcess::spawn(env());
    web.wait_ready(Duration::from_secs(10)).await;
    let mut after = Vec::new();
    for _ in 0..5 {
        after.push(ok_count(&get_page(&client, &web.address()).await));
    }
    assert_eq!(after.len(), 5);
    assert!(after.iter().all(|c| *c > highest), "{answered:?} {after:?}");
    answered.extend(after);
    assert_unique(&answered);
}
