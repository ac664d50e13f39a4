//! Dependencies that come and go: every line of the outage table, recovery, timeouts, and the
//! counting invariants through each single fault.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::{
    Blackhole, Counted, Env, Partition, Postgres, Redis, TestApp, count_of, free_port, healthy_app,
    inject,
};
use desafio3::store::REDIS_LEASE;
use serde_json::Value;

/// What `Env` sets: every dependency call gives up after this long.
const TIMEOUT: Duration = Duration::from_millis(500);
/// The contract's bound on a recovery after a dependency returns.
const RECOVERY: Duration = Duration::from_secs(2);

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
async fn cache_down_counts_durably_in_postgres_once_the_lease_ran_out() {
    let (mut redis, pg, app) = healthy_app().await;
    let mut counts: Vec<i64> = visits(&app, 2)
        .await
        .iter()
        .map(|(_, p)| count_of(p).unwrap())
        .collect();
    inject(|| redis.kill());
    let killed = Instant::now();
    while counts.len() < 5 {
        let (status, page) = app.visit().await;
        assert_eq!(status, 200);
        assert_eq!(page["status"], "degraded", "{page}");
        assert!(page["hora_db"].is_string(), "{page}");
        assert!(page["erros"]["cache"].is_string(), "{page}");
        assert!(page["erros"].get("db").is_none(), "{page}");
        match count_of(&page) {
            Some(count) => counts.push(count),
            // No count while Redis's lease may still hold (it began before the kill).
            None => assert!(killed.elapsed() < REDIS_LEASE + TIMEOUT, "{page}"),
        }
        assert!(killed.elapsed() < 3 * REDIS_LEASE, "still no count: {page}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The batch in flight when Redis died may have been confirmed ahead (for 3) before its
    // count failed: that number is skipped, never repeated. PostgreSQL then counts on, one by one.
    assert_eq!(counts[..2], [1, 2]);
    assert!(counts[2] == 3 || counts[2] == 4, "{counts:?}");
    assert_eq!(counts[3..], [counts[2] + 1, counts[2] + 2], "{counts:?}");
    assert_eq!(
        pg.counter(),
        counts.last().copied(),
        "counted durably in PostgreSQL"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn db_down_gives_no_count_because_none_can_be_confirmed() {
    let (redis, mut pg, app) = healthy_app().await;
    visits(&app, 2).await;
    inject(|| pg.kill());
    let pages = visits(&app, 3).await;
    for (status, page) in &pages {
        assert_eq!(*status, 503);
        assert_eq!(page["status"], "error", "{page}");
        assert!(
            page["visitas_cache"].is_null() && page["hora_db"].is_null(),
            "{page}"
        );
        assert!(page["erros"]["db"].is_string(), "{page}");
        assert!(page["erros"].get("cache").is_none(), "{page}");
    }
    // Only the batch that found PostgreSQL gone counted in Redis, in vain; the next ones knew.
    // (Two visits were counted before: 2 or 3, never none.)
    let counter = redis.get_counter();
    assert!(matches!(counter, Some(2..=3)), "{counter:?}");
    inject(|| pg.restart());
    let (_, counts) = until_ok(&app, RECOVERY).await;
    assert!(counts.last() > Some(&2), "{counts:?}");
    assert!(pg.counter() >= counts.last().copied());
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
    let (mut counts, mut answers) = (Vec::new(), 0);
    for _ in 0..3 {
        for (_, page) in visits(&app, 4).await {
            counts.extend(count_of(&page));
        }
        answers += 4;
        inject(|| redis.restart_empty());
        let (_, recovered) = until_ok(&app, RECOVERY * 2).await;
        answers += recovered.len();
        counts.extend(recovered);
    }
    assert_increasing(&counts);
    assert!(counts.len() >= 12, "{counts:?}");
    // Every count skipped belongs to an answer that carried none, or to the visit in flight
    // at one of the three restarts.
    let answered_without = answers - counts.len();
    assert!(
        *counts.last().unwrap() <= answers as i64 + 3,
        "{answered_without} answers without a count cannot explain {counts:?}"
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
    // Never backwards, never twice; a number may be skipped for the visit in flight at each
    // fault (its confirmation went out with the count, for the total Redis used to hold).
    assert_increasing(&counts);
    assert_eq!(counts.len(), 9, "{counts:?}");
    assert!(*counts.last().unwrap() <= 9 + 2, "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_killed_and_restarted_recovers_within_two_seconds() {
    let (_redis, mut pg, app) = healthy_app().await;
    let mut counts: Vec<i64> = Vec::new();
    for (_, page) in visits(&app, 3).await {
        counts.extend(count_of(&page));
    }
    inject(|| pg.kill());
    for (status, page) in visits(&app, 3).await {
        assert_eq!((status, &page["status"]), (503, &Value::from("error")));
        assert!(page["visitas_cache"].is_null(), "{page}");
    }
    inject(|| pg.restart());
    let (took, more) = until_ok(&app, RECOVERY).await;
    counts.extend(more);
    assert_increasing(&counts);
    println!("recovered {took:?} after PostgreSQL answered again");
    // Confirmed before it was answered: no waiting for a flush.
    assert_eq!(pg.counter(), counts.last().copied());
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
        if let Some(count) = count_of(page) {
            assert!(counts.insert(count), "{count} twice");
        }
    }
    // Once the lease has run out, PostgreSQL counts.
    tokio::time::sleep(REDIS_LEASE).await;
    let (_, page) = app.visit().await;
    let count = count_of(&page).expect("counted in PostgreSQL");
    assert!(counts.iter().all(|c| *c < count), "{page}");
    assert_eq!(pg.counter(), Some(count));
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
        assert_eq!(page["status"], "error", "{page}");
        assert!(page["hora_db"].is_null() && page["visitas_cache"].is_null());
    }
    // At most the batches that found PostgreSQL gone counted in Redis, in vain.
    let (counter, most) = (redis.get_counter(), 2 + pages.len() as i64);
    assert!(
        matches!(counter, Some(c) if (2..=most).contains(&c)),
        "{counter:?}"
    );
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
    let (mut all, mut without, mut during_outage) = (Vec::new(), 0, 0);
    for worker in workers {
        let answers = worker.await.unwrap();
        let mine: Vec<i64> = answers.iter().filter_map(|(_, _, p)| count_of(p)).collect();
        assert_increasing(&mine);
        without += answers.len() - mine.len();
        during_outage += answers
            .iter()
            .filter(|(at, _, page)| (down_at..back_at).contains(at) && page["status"] != "ok")
            .count();
        all.extend(mine);
    }
    // Typically hundreds; the bar is low only because this 2-core machine may be busy.
    assert!(
        during_outage >= CLIENTS / 2,
        "only {during_outage} answers during the {OUTAGE:?} outage"
    );
    let (_, recovered) = until_ok(&app, RECOVERY * 2).await;
    all.extend(&recovered);
    let record = pg.counter().expect("a counter of record");
    let counted = Counted::of(all.iter().copied(), record);
    println!(
        "answers during the outage: {during_outage}, with a count: {}, without: {without}, \
         counter of record: {record}, gaps: {}",
        all.len(),
        counted.gaps
    );
    // Every count skipped belongs to a request that met the outage's start or end while it
    // was news (in flight then, or in the batch that ran into it): each client has one
    // request in flight at a time, so at most 2 × CLIENTS per event, whatever the outage's
    // length and however many answers it left without a count.
    let violations = counted.violations(2 * 2 * CLIENTS as i64);
    assert!(violations.is_empty(), "{}", violations.join("; "));
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
async fn graceful_stop_and_a_new_instance_continues_even_if_redis_lost_everything() {
    let redis = Redis::start();
    let pg = Postgres::start();
    let env = || Env::for_servers(&redis, &pg);
    let app = TestApp::spawn_ready(env()).await;
    visits(&app, 4).await;
    assert_eq!(pg.counter(), Some(4), "confirmed before answered");
    app.stop().await;
    inject(|| redis.flushall());
    let app = TestApp::spawn_ready(env()).await;
    let (_, page) = app.visit().await;
    assert_eq!(count_of(&page), Some(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn starting_while_redis_is_empty_and_postgres_holds_the_count_continues_from_it() {
    let redis = Redis::start();
    let mut pg = Postgres::start();
    // A durable count from an earlier life of the stack (its table from before fencing), and
    // PostgreSQL down at start: Redis alone cannot know the count.
    pg.execute(
        "CREATE TABLE visit_counter (id smallint PRIMARY KEY CHECK (id = 1), \
         value bigint NOT NULL CHECK (value >= 0), updated_at timestamptz NOT NULL DEFAULT now()); \
         INSERT INTO visit_counter (id, value) VALUES (1, 100);",
    );
    inject(|| pg.kill());
    let app = TestApp::spawn(Env::for_servers(&redis, &pg)).await;
    for (status, page) in visits(&app, 3).await {
        assert_eq!(status, 503, "{page}");
        assert!(
            page["visitas_cache"].is_null(),
            "no count it cannot confirm: {page}"
        );
    }
    inject(|| pg.restart());
    let (_, counts) = until_ok(&app, RECOVERY * 2).await;
    assert_eq!(counts.first(), Some(&101), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_postgres_times_out_on_open_connections_and_recovers_when_thawed() {
    let (_redis, pg, app) = healthy_app().await;
    let app = Arc::new(app);
    visits(&app, 3).await;
    inject(|| pg.pause());
    let pages = assert_answers_promptly(&app).await;
    for page in &pages {
        assert_eq!(page["status"], "error", "{page}");
        assert!(
            page["hora_db"].is_null() && page["visitas_cache"].is_null(),
            "{page}"
        );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_count_the_counter_of_record_does_not_confirm_is_withheld_then_fenced_again() {
    let (_redis, pg, app) = healthy_app().await;
    let before = count_of(&app.visit().await.1).unwrap();
    // As if another replica had fenced Redis anew while this batch was counting there.
    pg.execute("UPDATE visit_counter SET fence = 'someone else''s' WHERE id = 1");
    let (status, page) = app.visit().await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["status"], "degraded", "{page}");
    assert!(page["visitas_cache"].is_null(), "withheld: {page}");
    assert!(page["hora_db"].is_string(), "{page}");
    assert_eq!(
        page["erros"]["cache"],
        "count withheld: counter changing hands"
    );
    // The next visit fences again, and counts on above everything withheld.
    let (_, page) = app.visit().await;
    assert_eq!(page["status"], "ok", "{page}");
    assert!(count_of(&page).unwrap() > before + 1, "{page}");
    assert_eq!(pg.counter(), count_of(&page));
}

/// A counter table this service had to create knows no count: PostgreSQL does not count by
/// itself from 0 while Redis may hold a higher count, even long after the lease, but waits
/// until a fencing lifted it to Redis's counter.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_created_while_redis_is_down_counts_nothing_until_lifted_to_redis() {
    let mut redis = Redis::start_persistent();
    redis.set_counter(500);
    inject(|| redis.stop());
    let pg = Postgres::start();
    let app = TestApp::spawn(Env::for_servers(&redis, &pg)).await;
    tokio::time::sleep(REDIS_LEASE + 2 * TIMEOUT).await;
    for (status, page) in visits(&app, 3).await {
        assert_eq!(status, 200, "{page}");
        assert!(page["visitas_cache"].is_null(), "no count from 0: {page}");
    }
    assert_eq!(pg.counter(), Some(0), "nothing counted in PostgreSQL");
    inject(|| redis.relaunch());
    let (_, counts) = until_ok(&app, RECOVERY * 2).await;
    assert_eq!(counts.first(), Some(&501), "{counts:?}");
}

/// Schema set-up runs once, at the first connection: a table dropped later is not made again
/// at 0 (which would let PostgreSQL count from 1), the page says the database failed instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_counter_table_is_an_error_not_a_new_count() {
    let (_redis, pg, app) = healthy_app().await;
    visits(&app, 3).await;
    pg.execute("DROP TABLE visit_counter");
    tokio::time::sleep(RECOVERY).await;
    for (status, page) in visits(&app, 3).await {
        assert_eq!(status, 503, "{page}");
        assert!(page["visitas_cache"].is_null(), "{page}");
    }
    assert_eq!(
        pg.table_exists("visit_counter"),
        Some(false),
        "not made again"
    );
}

/// The checker every load test relies on fails when it should.
#[test]
fn the_counting_check_catches_a_repeat_a_short_record_and_unexplained_gaps() {
    assert!(Counted::of([1, 2, 3], 3).violations(0).is_empty());
    assert!(Counted::of([1, 2, 3], 5).violations(2).is_empty());
    let repeated = Counted::of([1, 2, 2], 3).violations(1);
    assert!(repeated[0].contains("handed out twice"), "{repeated:?}");
    let short = Counted::of([1, 2, 3], 2).violations(0);
    assert!(short[0].contains("< highest"), "{short:?}");
    let gaps = Counted::of([1, 3], 5).violations(2);
    assert!(gaps[0].contains("3 gaps > 2"), "{gaps:?}");
}
