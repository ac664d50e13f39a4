//! Dependencies that come and go: every line of the outage table, recovery, timeouts, and the
//! counting invariants through each single fault.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Blackhole, Env, Partition, Postgres, Redis, TestApp, count_of, free_port, inject};

/// What `Env` sets: every dependency call gives up after this long.
const TIMEOUT: Duration = Duration::from_millis(500);
/// The contract's bound on a recovery after a dependency returns.
const RECOVERY: Duration = Duration::from_secs(2);

async fn healthy_app() -> (Redis, Postgres, TestApp) {
    let redis = Redis::start();
    let pg = Postgres::start();
    let app = TestApp::spawn_ready(Env::for_servers(&redis, &pg)).await;
    (redis, pg, app)
}

fn assert_increasing(counts: &[i64]) {
    assert!(
        counts.windows(2).all(|w| w[0] < w[1]),
        "counts must strictly increase: {counts:?}"
    );
}

async fn visits(app: &TestApp, n: usize) -> Vec<(u16, Value)> {
    let mut pages = Vec::new();
    for _ in 0..n {
        pages.push(app.visit().await);
    }
    pages
}

/// Polls `GET /` until it reports `ok`, returning how long that took and every count seen.
async fn until_ok(app: &TestApp, limit: Duration) -> (Duration, Vec<i64>) {
    let started = Instant::now();
    let mut counts = Vec::new();
    loop {
        let (_, page) = app.visit().await;
        counts.extend(count_of(&page));
        if page["status"] == "ok" {
            return (started.elapsed(), counts);
        }
        assert!(started.elapsed() < limit, "not ok after {limit:?}: {page}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cache_down_counts_durably_in_postgres() {
    let (mut redis, pg, app) = healthy_app().await;
    let mut counts: Vec<i64> = visits(&app, 2)
        .await
        .iter()
        .map(|(_, p)| count_of(p).unwrap())
        .collect();
    inject(|| redis.kill());
    for (status, page) in visits(&app, 3).await {
        assert_eq!(status, 200);
        assert_eq!(page["status"], "degraded", "{page}");
        assert!(page["hora_db"].is_string(), "{page}");
        assert!(page["erros"]["cache"].is_string(), "{page}");
        assert!(page["erros"].get("db").is_none(), "{page}");
        counts.push(count_of(&page).unwrap());
    }
    assert_eq!(counts, vec![1, 2, 3, 4, 5]);
    assert_eq!(pg.counter(), Some(5), "counted durably in PostgreSQL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn db_down_counts_in_redis_without_the_clock() {
    let (redis, mut pg, app) = healthy_app().await;
    visits(&app, 2).await;
    inject(|| pg.kill());
    let mut counts = Vec::new();
    for (status, page) in visits(&app, 3).await {
        assert_eq!(status, 200);
        assert_eq!(page["status"], "degraded", "{page}");
        assert!(page["hora_db"].is_null(), "{page}");
        assert!(page["erros"]["db"].is_string(), "{page}");
        assert!(page["erros"].get("cache").is_none(), "{page}");
        counts.push(count_of(&page).unwrap());
    }
    assert_eq!(counts, vec![3, 4, 5]);
    assert_eq!(redis.get_counter(), Some(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_down_is_a_503_error_page() {
    let (mut redis, mut pg, app) = healthy_app().await;
    inject(|| redis.kill());
    inject(|| pg.kill());
    let (status, page) = app.visit().await;
    assert_eq!(status, 503);
    assert_eq!(page["status"], "error");
    assert!(
        page["visitas_cache"].is_null() && page["hora_db"].is_null(),
        "{page}"
    );
    assert!(
        page["erros"]["cache"].is_string() && page["erros"]["db"].is_string(),
        "{page}"
    );
    let health = app.get("/healthz").await;
    assert_eq!(
        health.status(),
        200,
        "liveness does not depend on dependencies"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_names_the_failed_dependency() {
    let (mut redis, _pg, app) = healthy_app().await;
    inject(|| redis.kill());
    let ready = app.get_admin("/readyz").await;
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.unwrap();
    assert!(body["erros"]["cache"].is_string(), "{body}");
    assert!(body["erros"].get("db").is_none(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_restarted_empty_never_sends_the_count_backwards() {
    let (mut redis, _pg, app) = healthy_app().await;
    let mut counts: Vec<i64> = Vec::new();
    for _ in 0..3 {
        for (_, page) in visits(&app, 4).await {
            counts.extend(count_of(&page));
        }
        // Immediately: no flush had a chance to run since the last visits.
        inject(|| redis.restart_empty());
    }
    let (_, recovered) = until_ok(&app, RECOVERY * 2).await;
    counts.extend(recovered);
    assert_increasing(&counts);
    assert!(counts.len() >= 12);
    assert_eq!(
        *counts.last().unwrap(),
        counts.len() as i64,
        "no gap, no repeat: {counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flushall_and_a_stale_restore_are_survived() {
    let (redis, _pg, app) = healthy_app().await;
    let mut counts: Vec<i64> = Vec::new();
    for (_, page) in visits(&app, 5).await {
        counts.extend(count_of(&page));
    }
    inject(|| redis.flushall());
    for (_, page) in visits(&app, 2).await {
        counts.extend(count_of(&page));
    }
    // As if Redis came back from an append-only file a few writes old.
    inject(|| redis.set_counter(2));
    for (_, page) in visits(&app, 2).await {
        counts.extend(count_of(&page));
    }
    assert_eq!(counts, (1..=9).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_killed_and_restarted_recovers_within_two_seconds() {
    let (_redis, mut pg, app) = healthy_app().await;
    let mut counts: Vec<i64> = Vec::new();
    for (_, page) in visits(&app, 3).await {
        counts.extend(count_of(&page));
    }
    inject(|| pg.kill());
    for (_, page) in visits(&app, 3).await {
        assert_eq!(page["status"], "degraded");
        counts.extend(count_of(&page));
    }
    inject(|| pg.restart());
    let (took, more) = until_ok(&app, RECOVERY).await;
    counts.extend(more);
    assert_increasing(&counts);
    println!("recovered {took:?} after PostgreSQL answered again");
    // The write-behind catches up (FLUSH_INTERVAL_MS is 200 in tests).
    let last = counts.last().copied();
    let deadline = Instant::now() + Duration::from_secs(2);
    while pg.counter() != last {
        assert!(
            Instant::now() < deadline,
            "not flushed: {:?} vs {last:?}",
            pg.counter()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_back_after_an_outage_continues_from_postgres_counts() {
    let (mut redis, _pg, app) = healthy_app().await;
    let port = redis.port;
    let mut counts: Vec<i64> = Vec::new();
    for (_, page) in visits(&app, 3).await {
        counts.extend(count_of(&page));
    }
    inject(|| redis.kill());
    for (_, page) in visits(&app, 3).await {
        counts.extend(count_of(&page));
    }
    let _redis = inject(|| Redis::start_on(port));
    let (took, more) = until_ok(&app, RECOVERY).await;
    counts.extend(more);
    assert_increasing(&counts);
    println!("recovered {took:?} after Redis answered again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serves_liveness_before_dependencies_exist_and_recovers_when_they_arrive() {
    let (redis_port, pg_port) = (free_port(), free_port());
    let env = Env::new(
        &format!("redis://127.0.0.1:{redis_port}/0"),
        &format!("postgres://admin@127.0.0.1:{pg_port}/desafio3"),
    );
    let app = TestApp::spawn(env).await;
    assert_eq!(app.get("/healthz").await.status(), 200);
    let ready = app.get_admin("/readyz").await;
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.unwrap();
    assert!(body["erros"]["cache"].is_string() && body["erros"]["db"].is_string());
    let (status, page) = app.visit().await;
    assert_eq!((status, page["status"].as_str()), (503, Some("error")));

    // Let the watchers reach their longest backoff, as they would during a slow start.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _pg = inject(|| Postgres::start_on(pg_port));
    let _redis = inject(|| Redis::start_on(redis_port));
    let (took, counts) = until_ok(&app, RECOVERY).await;
    // PostgreSQL came up first, so early visits may have been counted there (degraded).
    assert_eq!(counts.first(), Some(&1), "{counts:?}");
    assert_increasing(&counts);
    println!("ok {took:?} after both dependencies answered");
}

/// Every response of a blackholed period arrives within timeout + 0.5 s, also when many
/// arrive at once (no request queues behind a hung one, no pool exhaustion).
async fn assert_answers_promptly(app: &Arc<TestApp>) -> Vec<Value> {
    let started = Instant::now();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                let (_, page) = app.visit().await;
                (t.elapsed(), page)
            })
        })
        .collect();
    let mut pages = Vec::new();
    for task in tasks {
        let (took, page) = task.await.unwrap();
        assert!(
            took <= TIMEOUT + Duration::from_millis(500),
            "took {took:?}: {page}"
        );
        pages.push(page);
    }
    // And sequential requests afterwards are fast: the dependency is known to be down.
    for _ in 0..3 {
        let t = Instant::now();
        let (_, page) = app.visit().await;
        assert!(t.elapsed() <= TIMEOUT + Duration::from_millis(500));
        pages.push(page);
    }
    println!("blackhole round took {:?}", started.elapsed());
    pages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blackholed_redis_cannot_hang_requests() {
    let (mut redis, pg, app) = healthy_app().await;
    let app = Arc::new(app);
    visits(&app, 2).await;
    let port = redis.port;
    inject(|| redis.kill());
    let _hole = Blackhole::start_on(port);
    let pages = assert_answers_promptly(&app).await;
    let mut counts = HashSet::new();
    for page in &pages {
        assert_eq!(page["status"], "degraded", "{page}");
        assert!(counts.insert(count_of(page).expect("counted in PostgreSQL")));
    }
    assert_eq!(pg.counter(), counts.iter().max().copied());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blackholed_postgres_cannot_hang_requests() {
    let (redis, mut pg, app) = healthy_app().await;
    let app = Arc::new(app);
    visits(&app, 2).await;
    let port = pg.port;
    inject(|| pg.kill());
    let _hole = Blackhole::start_on(port);
    let pages = assert_answers_promptly(&app).await;
    for page in &pages {
        assert_eq!(page["status"], "degraded", "{page}");
        assert!(page["hora_db"].is_null());
    }
    assert_eq!(redis.get_counter(), Some(2 + pages.len() as i64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_blackholed_from_the_start_answer_503_promptly() {
    let (cache_hole, db_hole) = (Blackhole::start(), Blackhole::start());
    let env = Env::new(
        &format!("redis://127.0.0.1:{}/0", cache_hole.port),
        &format!("postgres://admin@127.0.0.1:{}/desafio3", db_hole.port),
    );
    let app = Arc::new(TestApp::spawn(env).await);
    for page in assert_answers_promptly(&app).await {
        assert_eq!(page["status"], "error");
    }
    let t = Instant::now();
    assert_eq!(app.get_admin("/readyz").await.status(), 503);
    assert!(t.elapsed() <= TIMEOUT + Duration::from_millis(500));
}

/// Load from several clients while a dependency is down for `OUTAGE`: every count handed out
/// is distinct, none is lost, the over-count stays within the requests in flight, and the
/// service kept answering during the outage (the fault is injected off the runtime, so the
/// app and its clients run on while it happens).
async fn load_through_fault(
    take_down: impl FnOnce(&mut Redis, &mut Postgres),
    bring_back: impl FnOnce(&mut Redis, &mut Postgres),
) {
    const CLIENTS: usize = 16;
    const OUTAGE: Duration = Duration::from_millis(800);
    let (mut redis, mut pg, app) = healthy_app().await;
    let app = Arc::new(app);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (app, stop) = (app.clone(), stop.clone());
            tokio::spawn(async move {
                let mut answers = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (status, page) = app.visit().await;
                    answers.push((Instant::now(), status, page));
                }
                answers
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    inject(|| take_down(&mut redis, &mut pg));
    let down_at = Instant::now();
    tokio::time::sleep(OUTAGE).await;
    let back_at = Instant::now();
    inject(|| bring_back(&mut redis, &mut pg));
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut all = Vec::new();
    let mut during_outage = 0;
    for worker in workers {
        let answers = worker.await.unwrap();
        let mine: Vec<i64> = answers.iter().filter_map(|(_, _, p)| count_of(p)).collect();
        assert_increasing(&mine);
        during_outage += answers
            .iter()
            .filter(|(at, status, page)| {
                (down_at..back_at).contains(at) && *status == 200 && page["status"] == "degraded"
            })
            .count();
        all.extend(mine);
    }
    // Typically hundreds; the bar is low only because this 2-core machine may be busy.
    assert!(
        during_outage >= CLIENTS / 2,
        "only {during_outage} degraded answers during the {OUTAGE:?} outage"
    );
    let (_, recovered) = until_ok(&app, RECOVERY * 2).await;
    let next = *recovered.last().unwrap();
    let handed_out = all.len() as i64;
    let distinct: HashSet<_> = all.iter().collect();
    assert_eq!(
        distinct.len() as i64,
        handed_out,
        "a count was handed out twice"
    );
    let over_count = (next - 1) - handed_out - (recovered.len() as i64 - 1);
    println!(
        "answers during the outage: {during_outage}, with a count: {handed_out}, \
         counter after: {next}, over-count: {over_count}"
    );
    assert!(over_count >= 0, "visits lost: {over_count}");
    assert!(
        over_count <= CLIENTS as i64,
        "over-count {over_count} > in flight"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_load_through_redis_killed_and_restarted_empty() {
    load_through_fault(|redis, _| redis.kill(), |redis, _| redis.relaunch_empty()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_load_through_postgres_killed_and_restarted() {
    load_through_fault(|_, pg| pg.kill(), |_, pg| pg.relaunch()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_stop_flushes_and_a_new_instance_continues_even_if_redis_lost_everything() {
    let redis = Redis::start();
    let pg = Postgres::start();
    let env = || Env::for_servers(&redis, &pg).set("FLUSH_INTERVAL_MS", "3600000");
    let app = TestApp::spawn_ready(env()).await;
    visits(&app, 4).await;
    app.stop().await;
    assert_eq!(pg.counter(), Some(4), "flushed on shutdown");
    inject(|| redis.flushall());
    let app = TestApp::spawn_ready(env()).await;
    let (_, page) = app.visit().await;
    assert_eq!(count_of(&page), Some(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn counting_in_redis_before_postgres_is_reached_then_catching_up_with_its_durable_count() {
    let redis = Redis::start();
    let mut pg = Postgres::start();
    // A durable count from an earlier life of the stack, and PostgreSQL down at start.
    pg.execute(
        "CREATE TABLE visit_counter (id smallint PRIMARY KEY CHECK (id = 1), \
         value bigint NOT NULL CHECK (value >= 0), updated_at timestamptz NOT NULL DEFAULT now()); \
         INSERT INTO visit_counter (id, value) VALUES (1, 100);",
    );
    inject(|| pg.kill());
    let app = TestApp::spawn(Env::for_servers(&redis, &pg)).await;
    app.wait_for(|page| count_of(page).is_some()).await;
    let (status, page) = app.visit().await;
    assert_eq!(status, 200);
    assert_eq!(page["status"], "degraded", "cache up, db down: {page}");
    assert!(
        count_of(&page).unwrap() < 100,
        "Redis counts on its own: {page}"
    );
    inject(|| pg.restart());
    let (_, counts) = until_ok(&app, RECOVERY * 2).await;
    // The first `ok` page may still carry a count from a batch that read its floor before
    // PostgreSQL was back (a known hole, issue 10); from the next visit on, the durable count
    // learned by the recovery probe is the floor.
    let (_, page) = app.visit().await;
    let next = count_of(&page).expect("counted");
    assert!(
        next > 100,
        "lifted above the durable count: {counts:?} then {next}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_postgres_times_out_on_open_connections_and_recovers_when_thawed() {
    let (_redis, pg, app) = healthy_app().await;
    let app = Arc::new(app);
    visits(&app, 3).await;
    inject(|| pg.pause());
    let pages = assert_answers_promptly(&app).await;
    for page in &pages {
        assert_eq!(page["status"], "degraded", "{page}");
        assert!(page["hora_db"].is_null(), "{page}");
    }
    inject(|| pg.resume());
    let (took, _) = until_ok(&app, RECOVERY).await;
    println!("ok {took:?} after PostgreSQL was thawed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_network_cut_to_redis_is_survived_and_healed_within_two_seconds() {
    let redis = Redis::start();
    let pg = Postgres::start();
    let network = Partition::start(redis.port);
    let env = Env::new(&format!("redis://127.0.0.1:{}/0", network.port), &pg.url());
    let app = Arc::new(TestApp::spawn_ready(env).await);
    let mut counts: Vec<i64> = Vec::new();
    for (_, page) in visits(&app, 3).await {
        counts.extend(count_of(&page));
    }
    network.cut();
    for page in assert_answers_promptly(&app).await {
        assert_eq!(page["status"], "degraded", "{page}");
    }
    // Long enough for the watcher to reach its longest backoff.
    tokio::time::sleep(Duration::from_secs(3)).await;
    network.heal();
    let (took, more) = until_ok(&app, RECOVERY).await;
    counts.extend(more);
    assert_increasing(&counts);
    println!("ok {took:?} after the network healed");
}
