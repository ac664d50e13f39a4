//! A model check of the counting protocol (`docs/counting.md`, version 2: fencing by
//! compare-and-set, no lock held across Redis) with stateright: two replicas, Redis and
//! PostgreSQL as shared state, each atomic step (a Redis function, one SQL statement) an action,
//! and every fault the document lists an action too. The checker explores every interleaving
//! within small bounds (visits, faults) and asserts, at every state, that no count was handed
//! out twice and that the counter of record is at least every count handed out.
//!
//! Two weakened variants show the check can fail: without `replid` in the fence, a resync from
//! an older copy repeats counts; without `value <= c` in fencing's compare-and-set, counts
//! confirmed or counted in PostgreSQL while a replica fenced are counted again in Redis.
//!
//! Not modelled: PostgreSQL unreachable or restored from an older backup (docs' Limits), a
//! batch retried after its fencing (a new batch does the same), and Redis losing the seed's
//! counter before a fresh table's first fencing (nothing else holds those counts then).

use std::collections::BTreeSet;
use std::time::Instant;

use stateright::{Checker, HasDiscoveries, Model, Path, Property, Representative};

/// The counter a Redis may hold before any fencing: the seed's app handed out 1 and 2.
const SEEDED: u8 = 2;

/// Which protocol is checked: the design, or a deliberately broken one.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Variant {
    AsDesigned,
    /// Redis's fence is `run_id:token`: a resync from an older copy keeps it.
    FenceWithoutReplid,
    /// Fencing's compare-and-set checks only the fence, not `value <= c`.
    CasWithoutValueCheck,
}

/// Redis's fence string, `run_id:replid:token`, as numbers (fresh ones from `State::ids`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
struct Fence(u8, u8, u8);

/// PostgreSQL's `fence` column.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
enum Record {
    /// `''`: PostgreSQL counts itself.
    Pg,
    /// `'unlifted'`: a fresh table, which may not count by itself before one fencing.
    Unlifted,
    Redis(Fence),
}

/// The keys a restart, a resync or a `FLUSHALL` replaces together.
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq)]
struct RedisData {
    counter: Option<u8>,
    token: Option<u8>,
    top: Option<u8>,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Redis {
    run_id: u8,
    replid: u8,
    data: RedisData,
    /// An older copy (a snapshot file, a replica's data) a restart or a resync may bring back.
    saved: RedisData,
}

/// A confirmation sent ahead of the count, for a guessed total.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
enum Ahead {
    NotSent,
    Pending(u8),
    Matched(u8),
    Refused,
    /// Committed, but the answer was lost: the batch gets no count.
    Lost,
}

/// What the replica learnt from Redis's count function.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
enum Counting {
    Pending,
    Total(u8),
    Unfenced,
    /// Unreachable, or counted with the answer lost: PostgreSQL may count instead.
    Failed,
}

/// Where a replica is with its one batch of `n` visits (always the first field); each step
/// but `Idle` and `Batch` waits for one server, `Batch` for both.
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    #[default]
    Idle,
    /// The count at Redis and the confirmation sent ahead, in flight together.
    Batch(u8, Ahead, Counting),
    /// Redis's total is above the guess (or nothing was sent ahead): confirm the total.
    Confirming(u8, u8),
    PgCounting(u8),
    FenceRead(u8),
    /// Fencing at Redis, with what PostgreSQL held: value `v0`, fence `f0`.
    FenceRedis(u8, u8, Record),
    /// Fencing's compare-and-set: Redis's counter `c` and fence, and `f0` as read. (The
    /// batch is not retried after a fencing: a new one starts.)
    FenceCas(u8, Fence, Record),
}

#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq, PartialOrd, Ord)]
struct Replica {
    /// The fence this replica counts under (`None`: `""`, it must fence first).
    f: Option<Fence>,
    step: Step,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct State {
    redis: Redis,
    /// PostgreSQL's row: the counter of record, its fence, and whether the lease holds
    /// (renewed by a fencing or a confirmation that raised `value`; it expires at any time).
    value: u8,
    fence: Record,
    lease_live: bool,
    replicas: [Replica; 2],
    /// The last `run_id`, `replid` or token made: the next is new.
    ids: u8,
    visits_left: u8,
    faults_left: u8,
    /// The history of answers: every count handed out (bit k: count k), and whether one was
    /// handed out twice.
    handed: u32,
    repeated: bool,
}

/// How a call ended, seen from the replica (PostgreSQL's calls are never `Unreachable` here:
/// without PostgreSQL no count is handed out, which is safe).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Outcome {
    Answered,
    /// Nothing happened.
    Unreachable,
    /// It happened, but the replica saw an error.
    AnswerLost,
}

/// A replica's guess of the total for its confirmation sent ahead, against what Redis reaches
/// if nobody else counts first: below (someone else counted), exact, above (Redis went back).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Guess {
    Below,
    Exact,
    Above,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Action {
    /// Replica `r` starts a batch of `n` visits, with a confirmation sent ahead or not.
    Start(usize, u8, Option<Guess>),
    /// Replica `r`'s step at Redis (one Redis function) or PostgreSQL (one statement).
    Redis(usize, Outcome),
    Pg(usize, Outcome),
    /// Replica `r` crashes: it loses its fence and its batch.
    Crash(usize),
    LeaseExpires,
    /// Redis saves a copy of its data (no fault by itself).
    Snapshot,
    /// Redis restarts (new `run_id`) with its own data, the older copy, or nothing (then also
    /// a new `replid`; Redis 7 keeps it otherwise, and a new one is only noticed sooner).
    Restart,
    RestartFromCopy,
    RestartEmpty,
    Flushall,
    /// Redis's data replaced by the older copy, same process: only `replid` is new.
    Resync,
    /// The counter set one lower by hand.
    LowerCounter,
}

impl Action {
    fn is_fault(self) -> bool {
        match self {
            Action::Redis(_, outcome) | Action::Pg(_, outcome) => outcome != Outcome::Answered,
            Action::Start(..) | Action::LeaseExpires | Action::Snapshot => false,
            _ => true,
        }
    }
}

struct Protocol {
    variant: Variant,
    /// How many visits the replicas may count in all (batches of 1 or 2): bounds every counter.
    visits: u8,
    /// How many faults may happen in one run.
    faults: u8,
}

impl Redis {
    fn new(data: RedisData) -> Self {
        let (run_id, replid, saved) = (1, 2, data);
        Self {
            run_id,
            replid,
            data,
            saved,
        }
    }
}

impl State {
    fn redis_fence(&self, variant: Variant) -> Option<Fence> {
        let replid = match variant {
            Variant::FenceWithoutReplid => 0,
            _ => self.redis.replid,
        };
        Some(Fence(self.redis.run_id, replid, self.redis.data.token?))
    }

    fn fresh(&mut self) -> u8 {
        self.ids += 1;
        self.ids
    }

    /// The highest count handed out, 0 if none.
    fn highest(&self) -> u8 {
        (u32::BITS - self.handed.leading_zeros()).saturating_sub(1) as u8
    }

    fn hand_out(&mut self, last: u8, n: u8) {
        for k in last + 1 - n..=last {
            self.repeated |= self.handed & (1 << k) != 0;
            self.handed |= 1 << k;
        }
    }

    /// Redis's count function: adds `n` under fence `f` if the counter did not go back.
    fn count(&mut self, n: u8, f: Option<Fence>, variant: Variant) -> Option<u8> {
        let (Some(c), Some(top)) = (self.redis.data.counter, self.redis.data.top) else {
            return None;
        };
        if f.is_none() || self.redis_fence(variant) != f || c < top {
            return None;
        }
        self.redis.data.counter = Some(c + n);
        self.redis.data.top = Some(c + n);
        Some(c + n)
    }

    /// Redis's fence function: the fence kept if it is `f0` (the counter then held to its own
    /// top only), else the counter raised to the counter of record `v0` and its top; a raise
    /// renews the fence too. Returns (counter, fence).
    fn fence_redis(&mut self, v0: u8, f0: Record, variant: Variant) -> (u8, Fence) {
        let data = self.redis.data;
        let held = self.redis_fence(variant).map(Record::Redis);
        let kept = held == Some(f0);
        let floor = if kept { 0 } else { v0 }.max(data.top.unwrap_or(0));
        let c = data.counter.unwrap_or(0);
        let (c, raised) = if data.counter.is_none() || c < floor {
            (floor, true)
        } else {
            (c, false)
        };
        if raised || !kept {
            self.redis.data.token = Some(self.fresh());
        }
        self.redis.data.counter = Some(c);
        self.redis.data.top = Some(c);
        (c, self.redis_fence(variant).expect("a token was set"))
    }

    /// PostgreSQL's `UPDATE SET value = GREATEST(value, total) WHERE fence = f AND fence NOT
    /// IN ('', 'unlifted')`; a raise renews the lease. Whether it matched.
    fn confirm(&mut self, total: u8, f: Option<Fence>) -> bool {
        let matched = f.is_some_and(|f| self.fence == Record::Redis(f));
        if matched && total > self.value {
            self.value = total;
            self.lease_live = true;
        }
        matched
    }

    fn redis_step(&mut self, r: usize, outcome: Outcome, variant: Variant) {
        let reached = outcome != Outcome::Unreachable;
        self.replicas[r].step = match self.replicas[r].step {
            Step::Batch(n, ahead, _) => {
                let total = if reached {
                    self.count(n, self.replicas[r].f, variant)
                } else {
                    None
                };
                let count = match total {
                    _ if outcome != Outcome::Answered => Counting::Failed,
                    Some(total) => Counting::Total(total),
                    None => Counting::Unfenced,
                };
                Step::Batch(n, ahead, count)
            }
            Step::FenceRedis(n, v0, f0) => {
                let fenced = reached.then(|| self.fence_redis(v0, f0, variant));
                match fenced {
                    Some((c, fence)) if outcome == Outcome::Answered => {
                        Step::FenceCas(c, fence, f0)
                    }
                    _ => Step::PgCounting(n),
                }
            }
            step => unreachable!("no Redis step in {step:?}"),
        };
        self.settle(r);
    }

    /// One statement; when its answer is lost, its effect stays and the batch ends uncounted.
    fn pg_step(&mut self, r: usize, lost: bool, variant: Variant) {
        let (f, v0, f0) = (self.replicas[r].f, self.value, self.fence);
        // The next step, the counts handed out, and the replica's fence afterwards.
        let (step, answer, f) = match self.replicas[r].step {
            Step::Batch(n, ahead, count) => {
                let Ahead::Pending(guess) = ahead else {
                    unreachable!()
                };
                let ahead = match self.confirm(guess, f) {
                    _ if lost => Ahead::Lost,
                    true => Ahead::Matched(guess),
                    false => Ahead::Refused,
                };
                self.replicas[r].step = Step::Batch(n, ahead, count);
                return self.settle(r);
            }
            Step::Confirming(n, total) => match self.confirm(total, f) {
                true => (Step::Idle, Some((total, n)), f),
                false => (Step::Idle, None, None), // Withheld.
            },
            Step::PgCounting(n) => {
                let lease_over = !self.lease_live && self.fence != Record::Unlifted;
                if self.fence == Record::Pg || lease_over {
                    self.value += n;
                    self.fence = Record::Pg;
                    (Step::Idle, Some((self.value, n)), None)
                } else {
                    (Step::Idle, None, f)
                }
            }
            Step::FenceRead(n) => (Step::FenceRedis(n, v0, f0), None, f),
            Step::FenceCas(c, fence, f0) => {
                let below = self.value <= c || variant == Variant::CasWithoutValueCheck;
                if self.fence == f0 && below {
                    self.value = self.value.max(c);
                    self.fence = Record::Redis(fence);
                    self.lease_live = true;
                    (Step::Idle, None, Some(fence))
                } else {
                    (Step::Idle, None, None)
                }
            }
            step => unreachable!("no PostgreSQL step in {step:?}"),
        };
        if lost {
            self.replicas[r].step = Step::Idle;
            return;
        }
        self.replicas[r] = Replica { f, step };
        if let Some((last, n)) = answer {
            self.hand_out(last, n);
        }
    }

    /// Moves a batch on once both its count and its confirmation sent ahead have answered.
    fn settle(&mut self, r: usize) {
        let Step::Batch(n, ahead, count) = self.replicas[r].step else {
            return;
        };
        self.replicas[r].step = match (count, ahead) {
            (Counting::Pending, _) | (_, Ahead::Pending(_)) => return,
            (Counting::Unfenced, _) => Step::FenceRead(n),
            (Counting::Failed, _) => Step::PgCounting(n),
            (_, Ahead::Lost) => Step::Idle,
            (Counting::Total(total), Ahead::Matched(guess)) if total <= guess => {
                self.hand_out(total, n);
                Step::Idle
            }
            (Counting::Total(_), Ahead::Refused) => {
                self.replicas[r].f = None; // Withheld.
                Step::Idle
            }
            (Counting::Total(total), _) => Step::Confirming(n, total),
        };
    }

    /// Merges states that differ only where nothing can tell them apart any more: the lease
    /// while the fence of record is not Redis's (only a fencing, which renews it, reads it
    /// again), and the older copy of Redis's data once no fault is left to bring it back.
    fn forget_what_cannot_matter(&mut self) {
        if !matches!(self.fence, Record::Redis(_)) {
            self.lease_live = false;
        }
        if self.faults_left == 0 {
            self.redis.saved = RedisData::default();
        }
    }
}

/// The two replicas are alike: a state and the same with the replicas swapped are one.
impl Representative for State {
    fn representative(&self) -> Self {
        let mut s = self.clone();
        s.replicas.sort();
        s
    }
}

impl Model for Protocol {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let seeded = RedisData {
            counter: Some(SEEDED),
            ..RedisData::default()
        };
        // An empty Redis and a fresh table, or the seed's Redis (its counts 1 and 2 handed out)
        // and a fresh table, which holds none of them until fenced.
        [(RedisData::default(), 0), (seeded, 0b110)]
            .into_iter()
            .map(|(data, handed)| State {
                redis: Redis::new(data),
                value: 0,
                fence: Record::Unlifted,
                lease_live: false,
                replicas: [Replica::default(); 2],
                ids: 2,
                visits_left: self.visits,
                faults_left: self.faults,
                handed,
                repeated: false,
            })
            .collect()
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        let fault = s.faults_left > 0;
        let outcomes = [Outcome::Answered, Outcome::AnswerLost, Outcome::Unreachable];
        let outcomes = if fault { &outcomes[..] } else { &outcomes[..1] };
        for (r, replica) in s.replicas.iter().enumerate() {
            let (at_redis, at_pg) = match replica.step {
                Step::Idle => {
                    for n in 1..=s.visits_left.min(2) {
                        actions.push(Action::Start(r, n, None));
                        if replica.f.is_some() {
                            let guesses = [Guess::Below, Guess::Exact, Guess::Above];
                            actions.extend(guesses.map(|g| Action::Start(r, n, Some(g))));
                        }
                    }
                    (false, false)
                }
                Step::Batch(_, ahead, count) => (
                    count == Counting::Pending,
                    matches!(ahead, Ahead::Pending(_)),
                ),
                Step::FenceRedis(..) => (true, false),
                _ => (false, true),
            };
            if at_redis {
                actions.extend(outcomes.iter().map(|&o| Action::Redis(r, o)));
            }
            if at_pg {
                let pg = outcomes.iter().filter(|&&o| o != Outcome::Unreachable);
                actions.extend(pg.map(|&o| Action::Pg(r, o)));
            }
            if fault && *replica != Replica::default() {
                actions.push(Action::Crash(r));
            }
        }
        if s.lease_live {
            actions.push(Action::LeaseExpires);
        }
        // Until a fresh table is first fenced, the seed's counts live only in Redis's counter,
        // with no top to tell it went back: losing it then is out of scope (a known limit).
        if fault && !(s.fence == Record::Unlifted && s.handed != 0) {
            if s.redis.saved != s.redis.data {
                actions.push(Action::Snapshot);
            }
            let restarts = [
                Action::Restart,
                Action::RestartFromCopy,
                Action::RestartEmpty,
            ];
            actions.extend(restarts);
            actions.extend([Action::Flushall, Action::Resync]);
            if s.redis.data.counter.is_some_and(|c| c > 0) {
                actions.push(Action::LowerCounter);
            }
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut s = last.clone();
        s.faults_left -= u8::from(action.is_fault());
        match action {
            Action::Start(r, n, guess) => {
                s.visits_left -= n;
                let exact = s.redis.data.counter.unwrap_or(0) + n;
                let ahead = match guess {
                    None => Ahead::NotSent,
                    Some(Guess::Below) => Ahead::Pending(exact - 1),
                    Some(Guess::Exact) => Ahead::Pending(exact),
                    Some(Guess::Above) => Ahead::Pending(exact + 1),
                };
                let count = Counting::Pending;
                s.replicas[r].step = Step::Batch(n, ahead, count);
            }
            Action::Redis(r, outcome) => s.redis_step(r, outcome, self.variant),
            Action::Pg(r, outcome) => s.pg_step(r, outcome != Outcome::Answered, self.variant),
            Action::Crash(r) => s.replicas[r] = Replica::default(),
            Action::LeaseExpires => s.lease_live = false,
            Action::Snapshot => s.redis.saved = s.redis.data,
            Action::Restart => s.redis.run_id = s.fresh(),
            Action::RestartFromCopy => {
                s.redis.run_id = s.fresh();
                s.redis.data = s.redis.saved;
            }
            Action::RestartEmpty => {
                (s.redis.run_id, s.redis.replid) = (s.fresh(), s.fresh());
                s.redis.data = RedisData::default();
            }
            Action::Flushall => s.redis.data = RedisData::default(),
            Action::Resync => {
                s.redis.data = s.redis.saved;
                s.redis.replid = s.fresh();
            }
            Action::LowerCounter => s.redis.data.counter = s.redis.data.counter.map(|c| c - 1),
        }
        s.forget_what_cannot_matter();
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("no count twice", |_, s: &State| !s.repeated),
            // A fresh table holds none of the seed's counts before its first fencing.
            Property::always("record >= every count answered", |_, s: &State| {
                s.value >= s.highest() || s.fence == Record::Unlifted
            }),
            Property::sometimes("counts handed out", |_, s: &State| s.highest() > SEEDED),
            // Only PostgreSQL's counting empties the fence of record.
            Property::sometimes("PostgreSQL counted", |_, s: &State| s.fence == Record::Pg),
        ]
    }
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Checks `variant` within bounds, to the end or to the first repeated count, and prints the
/// number of unique states and the counterexample found, if any.
fn check(variant: Variant, visits: u8, faults: u8) -> impl Checker<Protocol> {
    let started = Instant::now();
    let model = Protocol {
        variant,
        visits,
        faults,
    };
    let checker = model
        .checker()
        .threads(threads())
        .symmetry()
        .finish_when(HasDiscoveries::AnyOf(BTreeSet::from(["no count twice"])))
        .spawn_bfs()
        .join();
    println!(
        "{variant:?}, {visits} visits, {faults} faults: {} unique states, depth {}, {:?}",
        checker.unique_state_count(),
        checker.max_depth(),
        started.elapsed()
    );
    if let Some(path) = checker.discovery("no count twice") {
        print_path(path);
    }
    checker
}

/// A counterexample, each step with the replica's step it took.
fn print_path(path: Path<State, Action>) {
    for (state, action) in path.into_vec() {
        match action {
            Some(a @ (Action::Redis(r, _) | Action::Pg(r, _))) => {
                println!("- {a:?} in {:?}", state.replicas[r].step)
            }
            Some(action) => println!("- {action:?}"),
            None => println!("  handed out (bit k: count k): {:b}", state.handed),
        }
    }
}

#[test]
fn the_protocol_never_hands_out_a_count_twice() {
    // More visits with one fault, or two faults with fewer visits: about 0.5 M states each,
    // where 4 visits with 2 faults are 7 M (over a minute in a debug build).
    for (visits, faults) in [(4, 1), (3, 2)] {
        let checker = check(Variant::AsDesigned, visits, faults);
        checker.assert_properties();
        assert!(checker.unique_state_count() > 100_000);
    }
}

#[test]
fn a_fence_without_replid_repeats_counts_after_a_resync_from_an_older_copy() {
    let checker = check(Variant::FenceWithoutReplid, 4, 1);
    assert!(checker.discovery("no count twice").is_some());
}

#[test]
fn fencing_without_checking_the_value_repeats_counts() {
    let checker = check(Variant::CasWithoutValueCheck, 4, 1);
    assert!(checker.discovery("no count twice").is_some());
}
