//! Chaos: three real `web` processes on one Redis (append-only file, as in
//! compose) and one PostgreSQL, eight clients sending requests to them throughout, and faults
//! injected while the load runs, off the runtime. Every scenario checks what the clients were
//! told against the counting invariant:
//!
//! 1. no count is handed out twice, across all replicas;
//! 2. the counter of record, polled all along the run (every 100 ms while PostgreSQL answers),
//!    is ≥ every count received before each poll was sent; and once every dependency is back
//!    and each replica answered a fresh visit with a count, it is ≥ the highest count handed out;
//! 3. the load flowed during each outage: HTTP answers came back, and no request anywhere
//!    took longer than `HANG`; while Redis was out for every replica (over 2 s) some answers
//!    carried a count (PostgreSQL counts), while PostgreSQL was out none sent then did (503,
//!    status "error");
//! 4. the gaps (counter of record − distinct counts handed out) ≤ the requests in flight at
//!    the faults: at each fault or repair, per replica, those in flight at that moment or sent
//!    before the replica's first answer to a request sent after it (`in_flight`). Answers
//!    without a count during an outage do not widen the bound: no number is used for them.
//!
//! Fault timing is drawn from a seeded RNG; the seed is printed, and `CHAOS_SEED=n` replays
//! it (timing on a busy machine still varies).

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use crate::support::{
    Counted, Env, Partition, Postgres, Redis, Signal, WebProcess, count_of, http_client, inject,
    try_get_page,
};

const REPLICAS: usize = 3;
const ALL: &[usize] = &[0, 1, 2];
const CLIENTS: usize = 8;
/// The services' `DEPENDENCY_TIMEOUT_MS` (the harness's `Env` default).
const TIMEOUT: Duration = Duration::from_millis(500);
/// Longest any request may take: a batch ahead of it waiting out the timeout, then its own,
/// and a second of margin for this busy 2-core machine.
const HANG: Duration = Duration::from_millis(2 * TIMEOUT.as_millis() as u64 + 1000);
/// How long dependency outages last, in milliseconds: over 2 s, so that PostgreSQL counts
/// for a while in place of a Redis that is out.
const OUTAGE_MS: Range<u64> = 2200..3000;
/// After an instant fault (`FLUSHALL`, new replicas), how long the answers are watched.
const AFTERMATH: Duration = Duration::from_secs(1);

/// xorshift64*: reproducible fault timing without a crate.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn millis(&mut self, range: Range<u64>) -> Duration {
        Duration::from_millis(range.start + self.next() % (range.end - range.start))
    }
}

/// The suite's seed: `CHAOS_SEED`, or the clock's.
fn suite_seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| {
        let seed = std::env::var("CHAOS_SEED")
            .ok()
            .map(|s| s.parse().expect("CHAOS_SEED is a number"))
            .unwrap_or_else(|| {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
                now.expect("clock after 1970").as_nanos() as u64
            });
        println!("chaos seed {seed} (CHAOS_SEED={seed} replays it)");
        seed
    })
}

/// What one client was told, or not.
struct Answer {
    replica: usize,
    sent: Instant,
    took: Duration,
    /// `None` when no HTTP answer came (refused, reset, cut short).
    status: Option<u16>,
    /// The page's `status`: "ok", "degraded" or "error".
    page: Option<String>,
    count: Option<i64>,
}

impl Answer {
    fn received(&self) -> Instant {
        self.sent + self.took
    }

    /// For the report: `replica 1 at 4078 ms: 200 degraded, count 1523`.
    fn describe(&self, t0: Instant) -> String {
        let at = self.sent.saturating_duration_since(t0).as_millis();
        let answer = match (self.status, &self.page) {
            (Some(status), Some(page)) => format!("{status} {page}"),
            (Some(status), None) => status.to_string(),
            (None, _) => "no answer".into(),
        };
        let count = self
            .count
            .map_or("no count".into(), |c| format!("count {c}"));
        format!("replica {} at {at} ms: {answer}, {count}", self.replica)
    }
}

async fn visit(client: &reqwest::Client, replica: usize, address: &str) -> Answer {
    let sent = Instant::now();
    let result = try_get_page(client, address).await;
    let took = sent.elapsed();
    let (status, page, count) = match &result {
        Ok((status, page)) => (Some(*status), page["status"].as_str(), count_of(page)),
        Err(_) => (None, None, None),
    };
    Answer {
        replica,
        sent,
        took,
        status,
        page: page.map(str::to_owned),
        count,
    }
}

/// Redis, PostgreSQL and three replicas, each reaching Redis and PostgreSQL through links of
/// its own that can be cut (frozen half-open): replicas then see a dependency go and come back
/// at different moments, or alone.
struct Stack {
    redis: Redis,
    pg: Postgres,
    links: Vec<Partition>,
    pg_links: Vec<Partition>,
    webs: Vec<Option<WebProcess>>,
    /// Where the clients send each replica's share; a replaced replica has a new address.
    addresses: Arc<RwLock<Vec<String>>>,
}

impl Stack {
    async fn start() -> Self {
        let redis = Redis::start_persistent();
        let pg = Postgres::start();
        let links = (0..REPLICAS)
            .map(|_| Partition::start(redis.port))
            .collect();
        let pg_links = (0..REPLICAS).map(|_| Partition::start(pg.port)).collect();
        let mut stack = Self {
            redis,
            pg,
            links,
            pg_links,
            webs: (0..REPLICAS).map(|_| None).collect(),
            addresses: Arc::new(RwLock::new(vec![String::new(); REPLICAS])),
        };
        stack.spawn_all();
        for web in stack.webs.iter().flatten() {
            web.wait_ready(Duration::from_secs(10)).await;
        }
        stack
    }

    /// A new `web` process in `slot`: the clients send to it at once, ready or not.
    fn spawn(&mut self, slot: usize) {
        let redis_url = format!("redis://127.0.0.1:{}/0", self.links[slot].port);
        let database_url = Postgres::url_on(self.pg_links[slot].port);
        let web = WebProcess::spawn(Env::new(&redis_url, &database_url));
        self.addresses.write().expect("addresses")[slot] = web.address();
        self.webs[slot] = Some(web);
    }

    fn spawn_all(&mut self) {
        (0..REPLICAS).for_each(|slot| self.spawn(slot));
    }

    /// `kill -9`; the clients keep knocking on its port, and are refused.
    fn kill(&mut self, slot: usize) {
        if let Some(mut web) = self.webs[slot].take() {
            web.kill();
        }
    }

    fn kill_all(&mut self) {
        (0..REPLICAS).for_each(|slot| self.kill(slot));
    }

    /// SIGTERM, and the process drains and exits cleanly.
    fn terminate(&mut self, slot: usize) {
        let mut web = self.webs[slot].take().expect("replica running");
        web.signal(Signal::TERM);
        assert_eq!(web.wait_exit(Duration::from_secs(10)).0, Some(0));
    }
}

/// The clients: each sends `GET /` to a random replica, again and again, and keeps every
/// answer. Stopped by `stop`.
fn start_load(
    addresses: &Arc<RwLock<Vec<String>>>,
    stop: &Arc<AtomicBool>,
    seed: u64,
) -> Vec<tokio::task::JoinHandle<Vec<Answer>>> {
    let client = http_client();
    (1..=CLIENTS as u64)
        .map(|i| {
            let mut rng = Rng::new(seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let (client, addresses, stop) = (client.clone(), addresses.clone(), stop.clone());
            tokio::spawn(async move {
                let mut answers = Vec::new();
                while !stop.load(Relaxed) {
                    let replica = rng.below(REPLICAS);
                    let address = addresses.read().expect("addresses")[replica].clone();
                    let answer = visit(&client, replica, &address).await;
                    // Refused by a replica that is gone: no point knocking at full speed.
                    let pause = match answer.status {
                        Some(_) => rng.millis(0..4),
                        None => Duration::from_millis(20),
                    };
                    answers.push(answer);
                    tokio::time::sleep(pause).await;
                }
                answers
            })
        })
        .collect()
}

/// What the clients should have seen while a fault was in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// HTTP answers, promptly.
    Answers,
    /// Answers, and some carried a count: Redis is out, PostgreSQL counts.
    Counts,
    /// Every answer sent during it was `ok`: the fault is not these replicas'.
    AllOk,
    /// Answers, and none sent during the outage carried a count: PostgreSQL is out, and it
    /// confirms every count. 503, status "error".
    NoCounts,
}

struct Window {
    what: String,
    from: Instant,
    to: Instant,
    /// The replicas the fault is seen by.
    replicas: Vec<usize>,
    expect: Expect,
}

impl Window {
    /// What the answers of this window's replicas show against `expect`.
    fn check(&self, answers: &[Answer], t0: Instant, v: &mut Vec<String>) {
        let received: Vec<&Answer> = answers
            .iter()
            .filter(|a| self.replicas.contains(&a.replica) && a.status.is_some())
            .filter(|a| (self.from..self.to).contains(&a.received()))
            .collect();
        // Sent once the fault was in force: an answer already on its way cannot pass for one.
        let sent = || received.iter().filter(|a| a.sent >= self.from);
        let ms = |t: Instant| t.saturating_duration_since(t0).as_millis();
        let span = format!("{} ({}–{} ms)", self.what, ms(self.from), ms(self.to));
        if received.len() < CLIENTS {
            v.push(format!("{span}: only {} answers", received.len()));
        }
        // What follows is about answers to requests sent during the fault: without any, it
        // would hold for nothing.
        if self.expect != Expect::Answers && sent().next().is_none() {
            v.push(format!(
                "{span}: no request sent during it was answered in it"
            ));
        }
        match self.expect {
            Expect::Answers => {}
            Expect::Counts if sent().all(|a| a.count.is_none()) => {
                v.push(format!("{span}: no answer sent during it carried a count"));
            }
            Expect::Counts => {}
            Expect::AllOk => {
                if let Some(a) = sent().find(|a| a.page.as_deref() != Some("ok")) {
                    v.push(format!("{span}: not ok: {}", a.describe(t0)));
                }
            }
            Expect::NoCounts => {
                let error = |a: &Answer| {
                    a.count.is_none() && a.status == Some(503) && a.page.as_deref() == Some("error")
                };
                let wrong: Vec<&&Answer> = sent().filter(|a| !error(a)).collect();
                if let Some(a) = wrong.first() {
                    v.push(format!(
                        "{span}: {} of {} answers sent during it not a 503 error without a \
                         count, e.g. {}",
                        wrong.len(),
                        sent().count(),
                        a.describe(t0)
                    ));
                }
            }
        }
    }
}

/// One scenario: the stack under load, the faults injected so far, and what went wrong.
struct Chaos {
    stack: Stack,
    rng: Rng,
    /// When the load started: times are reported from there.
    t0: Instant,
    /// When each fault (or repair) began, to count the requests in flight at it.
    injected: Vec<Instant>,
    windows: Vec<Window>,
}

impl Chaos {
    async fn wait(&mut self, millis: Range<u64>) {
        tokio::time::sleep(self.rng.millis(millis)).await;
    }

    /// Injects a fault, or a repair, off the runtime (the load goes on meanwhile); returns
    /// when it is in force.
    fn inject(&mut self, fault: impl FnOnce(&mut Stack)) -> Instant {
        self.injected.push(Instant::now());
        let stack = &mut self.stack;
        inject(|| fault(stack));
        Instant::now()
    }

    fn window(&mut self, what: &str, time: Range<Instant>, replicas: &[usize], expect: Expect) {
        self.windows.push(Window {
            what: what.into(),
            from: time.start,
            to: time.end,
            replicas: replicas.to_vec(),
            expect,
        });
    }

    /// A dependency taken `down`, out for `OUTAGE_MS`, and brought back `up`.
    async fn outage(
        &mut self,
        what: &str,
        replicas: &[usize],
        expect: Expect,
        down: impl FnOnce(&mut Stack),
        up: impl FnOnce(&mut Stack),
    ) {
        let from = self.inject(down);
        self.wait(OUTAGE_MS).await;
        let to = Instant::now();
        self.inject(up);
        self.window(what, from..to, replicas, expect);
    }

    /// Redis out for every replica: PostgreSQL counts meanwhile.
    async fn redis_out(
        &mut self,
        what: &str,
        down: impl FnOnce(&mut Stack),
        up: impl FnOnce(&mut Stack),
    ) {
        self.outage(what, ALL, Expect::Counts, down, up).await;
    }

    /// PostgreSQL out: nothing can be confirmed, so nothing is counted.
    async fn postgres_out(
        &mut self,
        what: &str,
        down: impl FnOnce(&mut Stack),
        up: impl FnOnce(&mut Stack),
    ) {
        self.outage(what, ALL, Expect::NoCounts, down, up).await;
    }

    /// A fault that takes no time: the answers right after it must still flow.
    fn instant(&mut self, what: &str, fault: impl FnOnce(&mut Stack)) {
        let at = self.inject(fault);
        self.window(what, at..at + AFTERMATH, ALL, Expect::Answers);
    }

    /// Replica `slot` taken down by `down`; the others answer until a new process replaces it.
    async fn replica_out(&mut self, what: &str, slot: usize, down: impl FnOnce(&mut Stack)) {
        let from = self.inject(down);
        self.wait(300..1500).await;
        let others: Vec<usize> = (0..REPLICAS).filter(|r| *r != slot).collect();
        self.window(what, from..Instant::now(), &others, Expect::Answers);
        self.instant(&format!("{what}: replaced"), |stack| stack.spawn(slot));
    }

    /// Every replica running answers a fresh visit with a count (10 s at most each).
    async fn recover(&self, violations: &mut Vec<String>) -> Vec<Answer> {
        let client = http_client();
        let mut answers = Vec::new();
        for (replica, web) in self.stack.webs.iter().enumerate() {
            let Some(web) = web else { continue };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let answer = visit(&client, replica, &web.address()).await;
                let counted = answer.count.is_some();
                answers.push(answer);
                if counted {
                    break;
                }
                if Instant::now() > deadline {
                    violations.push(format!("replica {replica}: no count 10 s after recovery"));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        answers
    }
}

fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Runs `scenario` on a fresh stack under load, then recovers and checks the invariant.
async fn chaos(name: &str, scenario: impl AsyncFnOnce(&mut Chaos)) {
    let started = Instant::now();
    let seed = suite_seed() ^ fnv1a(name);
    let stack = Stack::start().await;
    let stop = Arc::new(AtomicBool::new(false));
    let clients = start_load(&stack.addresses, &stop, seed);
    let polls = poll_counter(stack.pg.port, &stop);
    let mut chaos = Chaos {
        stack,
        rng: Rng::new(seed),
        t0: Instant::now(),
        injected: Vec::new(),
        windows: Vec::new(),
    };
    chaos.wait(300..1000).await;
    scenario(&mut chaos).await;
    tokio::time::sleep(AFTERMATH).await;
    stop.store(true, Relaxed);
    let mut answers = Vec::new();
    for client in clients {
        answers.extend(client.await.expect("client task"));
    }
    let mut violations = Vec::new();
    let polls = polls.await.expect("poller task");
    check_polls(&polls, &answers, chaos.t0, &mut violations);
    answers.extend(chaos.recover(&mut violations).await);
    let counter = chaos.stack.pg.counter();
    let summary = check(&chaos, &answers, counter, &mut violations);
    println!("{name}: {summary}; took {:.1?}", started.elapsed());
    assert!(
        violations.is_empty(),
        "{name} (CHAOS_SEED={}):\n  {}",
        suite_seed(),
        violations.join("\n  ")
    );
}

/// Reads the counter of record every 100 ms until `stop`, off the runtime: when each read was
/// sent, and what it found (`None` while PostgreSQL is out).
fn poll_counter(
    port: u16,
    stop: &Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(Instant, Option<i64>)>> {
    let stop = stop.clone();
    tokio::spawn(async move {
        let mut polls = Vec::new();
        while !stop.load(Relaxed) {
            let sent = Instant::now();
            let read = tokio::task::spawn_blocking(move || Postgres::counter_on(port));
            polls.push((sent, read.await.expect("counter read")));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        polls
    })
}

/// Invariant 2 during the run: every poll found the counter ≥ every count received before the
/// poll was sent.
fn check_polls(
    polls: &[(Instant, Option<i64>)],
    answers: &[Answer],
    t0: Instant,
    v: &mut Vec<String>,
) {
    let read: Vec<_> = polls
        .iter()
        .filter_map(|(at, c)| Some((*at, (*c)?)))
        .collect();
    if read.len() < 5 {
        v.push(format!(
            "only {} reads of the counter of record",
            read.len()
        ));
    }
    for (at, counter) in read {
        let before = answers.iter().filter(|a| a.received() < at);
        if let Some(a) = before
            .filter(|a| a.count > Some(counter))
            .max_by_key(|a| a.count)
        {
            let ms = at.saturating_duration_since(t0).as_millis();
            v.push(format!(
                "counter of record {counter} read at {ms} ms < a count received before: {}",
                a.describe(t0)
            ));
            return;
        }
    }
}

/// Checks the invariant on every answer (see the top of the file); returns a summary line.
fn check(chaos: &Chaos, answers: &[Answer], counter: Option<i64>, v: &mut Vec<String>) -> String {
    let t0 = chaos.t0;
    // 1. No count twice, 2. the counter of record ≥ every count handed out, at once, and
    // 4. gaps within the requests in flight at the faults (`in_flight`).
    let counter = counter.unwrap_or(0);
    let counted = Counted::of(answers.iter().filter_map(|a| a.count), counter);
    let mut in_flight_at_faults = 0;
    let injected: Vec<String> = chaos
        .injected
        .iter()
        .map(|&at| {
            let (at, n) = (
                at.saturating_duration_since(t0).as_millis(),
                in_flight(at, answers),
            );
            in_flight_at_faults += n as i64;
            format!("{at} ms ({n} in flight)")
        })
        .collect();
    v.extend(counted.violations(in_flight_at_faults));
    for repeated in counted.repeated.iter().take(4) {
        let twice = answers.iter().filter(|a| a.count == Some(*repeated));
        let described: Vec<String> = twice.map(|a| a.describe(t0)).collect();
        v.push(format!("count {repeated}: {}", described.join(" and ")));
    }

    // 3. The load flowed through every outage, and nothing hung.
    for window in &chaos.windows {
        window.check(answers, t0, v);
    }
    let slow: Vec<&Answer> = answers.iter().filter(|a| a.took > HANG).collect();
    if let Some(a) = slow.first() {
        let (n, took, a) = (slow.len(), a.took, a.describe(t0));
        v.push(format!(
            "{n} requests took over {HANG:?}, e.g. {took:?}, {a}"
        ));
    }

    let no_count = answers.iter().filter(|a| a.count.is_none()).count();
    format!(
        "{} answers, {} counts, {no_count} without; gaps {} (bound {in_flight_at_faults}); \
         {} duplicates; counter {counter}, highest {}; injected at {}",
        answers.len(),
        counted.distinct,
        counted.gaps,
        counted.repeated.len(),
        counted.highest,
        injected.join(", ")
    )
}

/// The requests that met a fault (or a repair) at `at` while it was news to their replica: in
/// flight at that moment, or sent to that replica before its first answer to a request sent
/// after it (the batch that ran into the fault: Redis may have counted it while PostgreSQL
/// could not confirm it), refused requests left out. Only these can leave numbers unanswered.
fn in_flight(at: Instant, answers: &[Answer]) -> usize {
    (0..REPLICAS)
        .map(|replica| {
            let own = || answers.iter().filter(move |a| a.replica == replica);
            let noticed = own()
                .filter(|a| a.sent >= at && a.status.is_some())
                .map(Answer::received)
                .min()
                .unwrap_or(at);
            // A request refused while its replica was gone reached nothing.
            let reached = |a: &&Answer| a.sent < at || a.status.is_some();
            own()
                .filter(|a| a.received() > at && a.sent < noticed)
                .filter(reached)
                .count()
        })
        .sum()
}

// ---------------------------------------------------------------------------------------
// Redis

/// The scenarios rely on these moves: without them, "stale data" would test nothing.
#[test]
fn the_harness_restarts_redis_with_its_data_older_data_or_none() {
    let mut redis = Redis::start_persistent();
    redis.set_counter(5);
    let older = redis.snapshot();
    redis.set_counter(10);
    redis.kill();
    redis.relaunch();
    assert_eq!(
        redis.get_counter(),
        Some(10),
        "kill -9 keeps what was written"
    );
    redis.stop();
    redis.restore(&older);
    redis.relaunch();
    assert_eq!(redis.get_counter(), Some(5), "back from the older file");
    redis.restart_empty();
    assert_eq!(redis.get_counter(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_stopped_and_started_with_its_data() {
    chaos("redis stop/start with its data", async |c| {
        c.redis_out("redis stopped", |s| s.redis.stop(), |s| s.redis.relaunch())
            .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_restarted_from_older_data() {
    chaos("redis restarted with stale data", async |c| {
        let older = inject(|| c.stack.redis.snapshot());
        c.wait(500..1500).await;
        let back = move |s: &mut Stack| {
            s.redis.restore(&older);
            s.redis.relaunch();
        };
        c.redis_out(
            "redis killed, back with older data",
            |s| s.redis.kill(),
            back,
        )
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_restarted_empty() {
    chaos("redis restarted empty", async |c| {
        let back = |s: &mut Stack| s.redis.relaunch_empty();
        c.redis_out("redis killed, back empty", |s| s.redis.kill(), back)
            .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_flushall_twice() {
    chaos("FLUSHALL", async |c| {
        c.instant("FLUSHALL", |s| s.redis.flushall());
        c.wait(500..1500).await;
        c.instant("FLUSHALL again", |s| s.redis.flushall());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn network_cut_to_redis_reaching_the_replicas_at_different_moments() {
    chaos("network cut to redis, staggered", async |c| {
        let pauses: Vec<Duration> = (0..2 * REPLICAS).map(|_| c.rng.millis(0..400)).collect();
        let (cuts, heals) = pauses.split_at(REPLICAS);
        let one_by_one = |pauses: &[Duration], s: &mut Stack, change: fn(&Partition)| {
            for (link, pause) in s.links.iter().zip(pauses) {
                change(link);
                std::thread::sleep(*pause);
            }
        };
        let cut = |s: &mut Stack| one_by_one(cuts, s, Partition::cut);
        let heal = |s: &mut Stack| one_by_one(heals, s, Partition::heal);
        c.redis_out("redis cut off, replica by replica", cut, heal)
            .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn network_cut_to_redis_seen_by_one_replica() {
    chaos("network cut to redis, one replica", async |c| {
        let slot = c.rng.below(REPLICAS);
        let what = format!("redis cut off from replica {slot} only");
        let cut = move |s: &mut Stack| s.links[slot].cut();
        let heal = move |s: &mut Stack| s.links[slot].heal();
        // Answers, not counts: the other replicas go on confirming Redis's counts, so this one
        // cannot know that PostgreSQL may count, and degrades instead; the others stay ok.
        let from = Instant::now();
        c.outage(&what, &[slot], Expect::Answers, cut, heal).await;
        let others: Vec<usize> = (0..REPLICAS).filter(|r| *r != slot).collect();
        c.window(
            "the other replicas meanwhile",
            from..Instant::now(),
            &others,
            Expect::AllOk,
        );
    })
    .await;
}

/// A resync replaces the data but keeps the process (`run_id`), and the fencing token comes
/// along with the copy: only the data's identity (`master_replid`) shows the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_resynced_from_an_older_copy() {
    chaos("redis resynced from an older copy", async |c| {
        let copy = inject(|| {
            let copy = Redis::start();
            copy.resync_from(&c.stack.redis);
            copy
        });
        c.wait(500..1500).await;
        c.instant("redis resynced from the older copy", |s| {
            s.redis.resync_from(&copy);
        });
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn counter_lowered_by_hand() {
    chaos("counter lowered by hand", async |c| {
        c.instant("visitas lowered by 50", |s| {
            let now = s.redis.get_counter().unwrap_or(0);
            s.redis.set_counter((now - 50).max(0));
        });
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// PostgreSQL

/// One replica's link to PostgreSQL frozen half-open (bytes stop both ways, sockets stay
/// open: a node failure, a partition, a frozen container) just as every replica fences (after
/// a `FLUSHALL`). No replica holds a lock while it waits on another service, so the others
/// count again within 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_link_of_one_replica_frozen_while_fencing() {
    chaos("postgres link of one replica frozen", async |c| {
        let slot = c.rng.below(REPLICAS);
        let from = c.inject(|s| {
            s.redis.flushall();
            s.pg_links[slot].cut();
        });
        c.wait(OUTAGE_MS).await;
        let to = Instant::now();
        c.inject(|s| s.pg_links[slot].heal());
        let others: Vec<usize> = (0..REPLICAS).filter(|r| *r != slot).collect();
        let what = format!("postgres frozen for replica {slot}: the others, 2 s on");
        c.window(
            &what,
            from + Duration::from_secs(2)..to,
            &others,
            Expect::AllOk,
        );
        c.window("the frozen replica", from..to, &[slot], Expect::Answers);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_links_of_every_replica_frozen() {
    chaos("postgres frozen for all", async |c| {
        let freeze = |s: &mut Stack| s.pg_links.iter().for_each(Partition::cut);
        let thaw = |s: &mut Stack| s.pg_links.iter().for_each(Partition::heal);
        let from = c.inject(freeze);
        // The first second: batches already sent wait out their timeout.
        c.wait(OUTAGE_MS).await;
        let to = Instant::now();
        c.inject(thaw);
        c.window(
            "postgres frozen for all",
            from + TIMEOUT * 2..to,
            ALL,
            Expect::NoCounts,
        );
        c.window(
            "postgres frozen for all (answers)",
            from..to,
            ALL,
            Expect::Answers,
        );
    })
    .await;
}

/// A slow link to PostgreSQL for every replica (100 ms more per round trip): batches grow and
/// every answer is slower, but answers and counts keep coming and nothing hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_links_slow_for_every_replica() {
    chaos("postgres slow for all", async |c| {
        let slow = |s: &mut Stack| {
            for link in &s.pg_links {
                link.slow(Duration::from_millis(50));
            }
        };
        let fast = |s: &mut Stack| s.pg_links.iter().for_each(Partition::heal);
        c.outage("postgres slow for all", ALL, Expect::Counts, slow, fast)
            .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_and_postgres_stopped_together() {
    chaos("redis and postgres together", async |c| {
        c.postgres_out(
            "redis and postgres stopped",
            |s| {
                s.redis.stop();
                s.pg.stop();
            },
            |s| {
                s.pg.relaunch();
                s.redis.relaunch();
            },
        )
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_stopped_and_started() {
    chaos("postgres stop/start", async |c| {
        c.postgres_out("postgres stopped", |s| s.pg.stop(), |s| s.pg.relaunch())
            .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_killed() {
    chaos("postgres kill -9", async |c| {
        c.postgres_out("postgres killed", |s| s.pg.kill(), |s| s.pg.relaunch())
            .await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// The replicas

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_replica_killed_and_replaced() {
    chaos("kill -9 of one web", async |c| {
        let slot = c.rng.below(REPLICAS);
        let what = format!("replica {slot} killed");
        c.replica_out(&what, slot, |s| s.kill(slot)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_replica_terminated_and_replaced() {
    chaos("SIGTERM of one web", async |c| {
        let slot = c.rng.below(REPLICAS);
        let what = format!("replica {slot} terminated");
        c.replica_out(&what, slot, |s| s.terminate(slot)).await;
    })
    .await;
}

/// SIGSTOP under load: a paused process (a frozen container, a VM stalled by its host) keeps
/// its connections and whatever it was doing; the others must not wait for it. New requests
/// go to the others meanwhile, as a load balancer's health check would send them; those
/// already at the paused replica wait for it (the pause stays under `HANG`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_replica_paused_under_load() {
    chaos("one web paused", async |c| {
        // In steady state: while replicas still fence at start, clients can all be waiting on
        // one replica, and pausing that one would leave none to load the others.
        c.wait(500..1000).await;
        let slot = c.rng.below(REPLICAS);
        let addresses = c.stack.addresses.clone();
        let own = addresses.read().expect("addresses")[slot].clone();
        let other = addresses.read().expect("addresses")[(slot + 1) % REPLICAS].clone();
        let signal = move |s: &Stack, signal| {
            s.webs[slot]
                .as_ref()
                .expect("replica running")
                .signal(signal);
        };
        let from = c.inject(|s| {
            signal(s, Signal::STOP);
            addresses.write().expect("addresses")[slot] = other;
        });
        c.wait(1000..1400).await;
        let to = Instant::now();
        c.inject(|s| {
            addresses.write().expect("addresses")[slot] = own;
            signal(s, Signal::CONT);
        });
        let others: Vec<usize> = (0..REPLICAS).filter(|r| *r != slot).collect();
        let what = format!("replica {slot} paused: the others");
        c.window(&what, from..to, &others, Expect::AllOk);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_replica_killed_at_its_own_moment_then_replaced() {
    chaos("kill -9 of all three webs", async |c| {
        for slot in 0..REPLICAS {
            c.wait(0..600).await;
            c.inject(|s| s.kill(slot));
        }
        c.wait(200..800).await;
        c.instant("three new replicas", Stack::spawn_all);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_starting_on_an_empty_redis_while_postgres_holds_the_count() {
    chaos("webs start on an empty redis", async |c| {
        for slot in 0..REPLICAS {
            c.inject(|s| s.terminate(slot));
        }
        c.inject(|s| s.redis.restart_empty());
        c.instant("three new replicas on an empty redis", Stack::spawn_all);
    })
    .await;
}

/// As after a host crash: the replicas and Redis die together, and Redis comes back without
/// its last second (`appendfsync everysec`), which a `kill -9` alone never loses.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_and_redis_crash_together_redis_back_without_its_last_second() {
    chaos("kill -9 of all webs and redis", async |c| {
        let older = inject(|| c.stack.redis.snapshot());
        c.wait(300..1000).await;
        c.inject(|s| {
            s.kill_all();
            s.redis.kill();
            s.redis.restore(&older);
        });
        c.wait(200..800).await;
        c.inject(|s| s.redis.relaunch());
        c.instant("new replicas, redis back from its file", Stack::spawn_all);
    })
    .await;
}
