//! A model check of the counting protocol (`docs/counting.md`, version 2: fencing by
//! compare-and-set, no lock held across Redis) with stateright: two replicas, Redis and
//! PostgreSQL as shared state, each atomic step (a Lua script, one SQL statement) an action,
//! and every fault the document lists an action too. The checker explores every interleaving
//! within small bounds (visits, faults) and asserts, at every state, that no count was handed
//! out twice and that the counter of record is at least every count handed out.
//!
//! Two weakened variants show the check can fail: without `replid` in the fence, a resync from
//! an older copy repeats counts; without `value <= c` in the fencing compare-and-set, a count
//! taken while a replica fences is given out again by Redis.

use std::collections::BTreeSet;
use std::time::Instant;

use stateright::{Checker, HasDiscoveries, Model, Property, Representative};

/// The seed's counter a Redis may already hold before any fencing.
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
struct Fence {
    run_id: u8,
    replid: u8,
    token: u8,
}

/// PostgreSQL's `fence` column.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
enum Record {
    /// `''`: PostgreSQL counts itself.
    Pg,
    /// `'unlifted'`: a fresh table, which may not count by itself before one fencing.
    Unlifted,
    Redis(Fence),
}

/// The keys Redis holds and a restart, a resync or a `FLUSHALL` replaces together.
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq, PartialOrd, Ord)]
struct RedisData {
    counter: Option<u8>,
    token: Option<u8>,
    top: Option<u8>,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
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
    /// Committed, but the replica saw an error: the batch gets no count.
    Lost,
}

/// What the replica learnt from Redis's count script.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
enum Counting {
    Pending,
    Total(u8),
    Unfenced,
    /// Unreachable, or counted with the answer lost: PostgreSQL may count instead.
    Failed,
}

/// Where a replica is with its one batch of `n` visits.
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    #[default]
    Idle,
    Batch {
        n: u8,
        ahead: Ahead,
        count: Counting,
    },
    /// Redis counted beyond the guess (or nothing was sent ahead): confirm the real total.
    Confirming {
        n: u8,
        total: u8,
    },
    PgCounting {
        n: u8,
    },
    FenceRead {
        n: u8,
    },
    FenceRedis {
        n: u8,
        v0: u8,
        f0: Record,
    },
    FenceCas {
        c: u8,
        fence: Fence,
        f0: Record,
    },
}

#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq, PartialOrd, Ord)]
struct Replica {
    /// The fence this replica counts under (`""`: none, fence first).
    f: Option<Fence>,
    step: Step,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct State {
    redis: Redis,
    /// PostgreSQL's row: the counter of record, its fence, and whether the lease holds
    /// (renewed by a confirmation that raised `value`, or a fencing; "expires" any time).
    value: u8,
    fence: Record,
    lease_live: bool,
    replicas: [Replica; 2],
    /// The next fresh `run_id`, `replid` or token.
    ids: u8,
    visits_left: u8,
    faults_left: u8,
    /// The history of answers: every count handed out (bit k = count k), and whether one was
    /// handed out twice.
    handed: u32,
    repeated: bool,
}

/// How a call to Redis ended, seen from the replica.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Reach {
    Answered,
    Unreachable,
    /// The script ran, the answer never came.
    AnswerLost,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Action {
    Start {
        r: usize,
        n: u8,
        guess: Option<Guess>,
    },
    Count {
        r: usize,
        reach: Reach,
    },
    /// The PostgreSQL steps; `lost`: committed, but the answer never came.
    ConfirmAhead {
        r: usize,
        lost: bool,
    },
    Confirm {
        r: usize,
        lost: bool,
    },
    PgCount {
        r: usize,
        lost: bool,
    },
    FenceRead {
        r: usize,
    },
    FenceRedis {
        r: usize,
        reach: Reach,
    },
    FenceCas {
        r: usize,
        lost: bool,
    },
    Crash {
        r: usize,
    },
    LeaseExpires,
    /// Redis saves a copy of its data (no fault by itself).
    Snapshot,
    /// Redis restarts: new `run_id`; its own data, the older copy, or nothing.
    Restart {
        data: Restored,
        new_replid: bool,
    },
    Flushall,
    /// Redis's data replaced by the older copy, the process the same: new `replid` only.
    Resync,
    LowerCounter {
        to: u8,
    },
}

/// A replica's guess of the total for its confirmation sent ahead, against what Redis will
/// reach if nobody else counts first: below (another replica counts first), exact, or above
/// (Redis went back since the replica's last batch).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Guess {
    Below,
    Exact,
    Above,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Restored {
    Own,
    Saved,
    Nothing,
}

struct Protocol {
    variant: Variant,
    /// How many visits the replicas may count in all (batches of 1 or 2): bounds every counter.
    visits: u8,
    /// How many faults may happen in one run (restarts, lost answers, crashes, ...).
    faults: u8,
}

impl State {
    /// Redis's fence string, if it has a token.
    fn redis_fence(&self, variant: Variant) -> Option<Fence> {
        let replid = match variant {
            Variant::FenceWithoutReplid => 0,
            _ => self.redis.replid,
        };
        let (run_id, token) = (self.redis.run_id, self.redis.data.token?);
        Some(Fence {
            run_id,
            replid,
            token,
        })
    }

    /// The highest count handed out, 0 if none.
    fn highest(&self) -> u8 {
        (u32::BITS - self.handed.leading_zeros()).saturating_sub(1) as u8
    }

    fn fresh(&mut self) -> u8 {
        self.ids += 1;
        self.ids
    }

    fn hand_out(&mut self, last: u8, n: u8) {
        for k in last + 1 - n..=last {
            self.repeated |= self.handed & (1 << k) != 0;
            self.handed |= 1 << k;
        }
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

    /// Merges states that differ only where nothing can tell them apart any more: the lease
    /// of a fence that is not Redis's (nothing reads it until a fencing renews it), and the
    /// older copy of Redis's data once no fault is left to bring it back.
    fn forget_what_cannot_matter(&mut self) {
        if !matches!(self.fence, Record::Redis(_)) {
            self.lease_live = false;
        }
        if self.faults_left == 0 {
            self.redis.saved = RedisData::default();
        }
    }

    /// Moves a batch on once both its count and its confirmation sent ahead have answered.
    fn settle(&mut self, r: usize) {
        let Step::Batch { n, ahead, count } = self.replicas[r].step else {
            return;
        };
        if count == Counting::Pending || matches!(ahead, Ahead::Pending(_)) {
            return;
        }
        self.replicas[r].step = match (count, ahead) {
            (Counting::Unfenced, _) => Step::FenceRead { n },
            (Counting::Failed, _) => Step::PgCounting { n },
            (_, Ahead::Lost) => Step::Idle,
            (Counting::Total(total), Ahead::Matched(guess)) if total <= guess => {
                self.hand_out(total, n);
                Step::Idle
            }
            (Counting::Total(_), Ahead::Refused) => {
                self.replicas[r].f = None; // Withheld.
                Step::Idle
            }
            (Counting::Total(total), _) => Step::Confirming { n, total },
            (Counting::Pending, _) => unreachable!(),
        };
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
        let redis = |data| Redis {
            run_id: 1,
            replid: 2,
            data,
            saved: data,
        };
        // A fresh table and an empty Redis, or a seeded Redis and a table PostgreSQL counts in.
        [
            (RedisData::default(), 0, Record::Unlifted),
            (seeded, 1, Record::Pg),
        ]
        .into_iter()
        .map(|(data, value, fence)| State {
            redis: redis(data),
            value,
            fence,
            lease_live: false,
            replicas: [Replica::default(); 2],
            ids: 2,
            visits_left: self.visits,
            faults_left: self.faults,
            handed: 0,
            repeated: false,
        })
        .collect()
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        let fault = s.faults_left > 0;
        let losses: &[bool] = if fault { &[false, true] } else { &[false] };
        let reaches: &[Reach] = if fault {
            &[Reach::Answered, Reach::Unreachable, Reach::AnswerLost]
        } else {
            &[Reach::Answered]
        };
        for (r, replica) in s.replicas.iter().enumerate() {
            match replica.step {
                Step::Idle => {
                    for n in 1..=s.visits_left.min(2) {
                        actions.push(Action::Start { r, n, guess: None });
                        if replica.f.is_some() {
                            for guess in [Guess::Below, Guess::Exact, Guess::Above] {
                                let guess = Some(guess);
                                actions.push(Action::Start { r, n, guess });
                            }
                        }
                    }
                }
                Step::Batch { ahead, count, .. } => {
                    if count == Counting::Pending {
                        actions.extend(reaches.iter().map(|&reach| Action::Count { r, reach }));
                    }
                    if let Ahead::Pending(_) = ahead {
                        let ahead = |&lost| Action::ConfirmAhead { r, lost };
                        actions.extend(losses.iter().map(ahead));
                    }
                }
                Step::Confirming { .. } => {
                    actions.extend(losses.iter().map(|&lost| Action::Confirm { r, lost }));
                }
                Step::PgCounting { .. } => {
                    actions.extend(losses.iter().map(|&lost| Action::PgCount { r, lost }));
                }
                Step::FenceRead { .. } => actions.push(Action::FenceRead { r }),
                Step::FenceRedis { .. } => {
                    actions.extend(reaches.iter().map(|&reach| Action::FenceRedis { r, reach }));
                }
                Step::FenceCas { .. } => {
                    actions.extend(losses.iter().map(|&lost| Action::FenceCas { r, lost }));
                }
            }
            if fault && *replica != Replica::default() {
                actions.push(Action::Crash { r });
            }
        }
        if s.lease_live {
            actions.push(Action::LeaseExpires);
        }
        if fault {
            if s.redis.saved != s.redis.data {
                actions.push(Action::Snapshot);
            }
            // Redis 7 keeps `replid` across a restart; a new one is only detected sooner.
            for data in [Restored::Own, Restored::Saved, Restored::Nothing] {
                let new_replid = data == Restored::Nothing;
                actions.push(Action::Restart { data, new_replid });
            }
            actions.push(Action::Flushall);
            actions.push(Action::Resync);
            if let Some(c @ 1..) = s.redis.data.counter {
                actions.push(Action::LowerCounter { to: c - 1 });
            }
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut s = last.clone();
        let variant = self.variant;
        let is_fault = match action {
            Action::Count { reach, .. } | Action::FenceRedis { reach, .. } => {
                reach != Reach::Answered
            }
            Action::ConfirmAhead { lost, .. }
            | Action::Confirm { lost, .. }
            | Action::PgCount { lost, .. }
            | Action::FenceCas { lost, .. } => lost,
            Action::Crash { .. }
            | Action::Restart { .. }
            | Action::Flushall
            | Action::Resync
            | Action::LowerCounter { .. } => true,
            _ => false,
        };
        s.faults_left -= u8::from(is_fault);
        match action {
            Action::Start { r, n, guess } => {
                s.visits_left -= n;
                let exact = s.redis.data.counter.unwrap_or(0) + n;
                let ahead = match guess {
                    None => Ahead::NotSent,
                    Some(Guess::Below) => Ahead::Pending(exact - 1),
                    Some(Guess::Exact) => Ahead::Pending(exact),
                    Some(Guess::Above) => Ahead::Pending(exact + 1),
                };
                let count = Counting::Pending;
                s.replicas[r].step = Step::Batch { n, ahead, count };
            }
            Action::Count { r, reach } => {
                let Step::Batch { n, ahead, .. } = s.replicas[r].step else {
                    unreachable!()
                };
                // Redis's count script, atomic; nothing happens when Redis is unreachable.
                let data = s.redis.data;
                let mut count = Counting::Unfenced;
                if reach != Reach::Unreachable
                    && let (Some(c), Some(_), Some(top)) = (data.counter, data.token, data.top)
                    && s.redis_fence(variant) == s.replicas[r].f
                    && c >= top
                {
                    s.redis.data.counter = Some(c + n);
                    s.redis.data.top = Some(c + n);
                    count = Counting::Total(c + n);
                }
                if reach != Reach::Answered {
                    count = Counting::Failed;
                }
                s.replicas[r].step = Step::Batch { n, ahead, count };
                s.settle(r);
            }
            Action::ConfirmAhead { r, lost } => {
                let Step::Batch { n, count, ahead } = s.replicas[r].step else {
                    unreachable!()
                };
                let Ahead::Pending(guess) = ahead else {
                    unreachable!()
                };
                let ahead = match s.confirm(guess, s.replicas[r].f) {
                    _ if lost => Ahead::Lost,
                    true => Ahead::Matched(guess),
                    false => Ahead::Refused,
                };
                s.replicas[r].step = Step::Batch { n, ahead, count };
                s.settle(r);
            }
            Action::Confirm { r, lost } => {
                let Step::Confirming { n, total } = s.replicas[r].step else {
                    unreachable!()
                };
                if s.confirm(total, s.replicas[r].f) {
                    if !lost {
                        s.hand_out(total, n);
                    }
                } else {
                    s.replicas[r].f = None; // Withheld.
                }
                s.replicas[r].step = Step::Idle;
            }
            Action::PgCount { r, lost } => {
                let Step::PgCounting { n } = s.replicas[r].step else {
                    unreachable!()
                };
                let lease_over = !s.lease_live && s.fence != Record::Unlifted;
                if s.fence == Record::Pg || lease_over {
                    s.value += n;
                    s.fence = Record::Pg;
                    s.replicas[r].f = None;
                    if !lost {
                        s.hand_out(s.value, n);
                    }
                }
                s.replicas[r].step = Step::Idle;
            }
            Action::FenceRead { r } => {
                let Step::FenceRead { n } = s.replicas[r].step else {
                    unreachable!()
                };
                let (v0, f0) = (s.value, s.fence);
                s.replicas[r].step = Step::FenceRedis { n, v0, f0 };
            }
            Action::FenceRedis { r, reach } => {
                let Step::FenceRedis { n, v0, f0 } = s.replicas[r].step else {
                    unreachable!()
                };
                s.replicas[r].f = None;
                if reach == Reach::Unreachable {
                    s.replicas[r].step = Step::PgCounting { n };
                    return Some(s);
                }
                // Redis's fence script, atomic.
                let data = s.redis.data;
                let floor = v0.max(data.top.unwrap_or(0));
                let held = s.redis_fence(variant).map(Record::Redis);
                let mut renew = data.token.is_none() || held != Some(f0);
                let mut c = data.counter.unwrap_or(0);
                if data.counter.is_none() || c < floor {
                    c = floor;
                    renew = true;
                }
                if renew {
                    s.redis.data.token = Some(s.fresh());
                }
                s.redis.data.counter = Some(c);
                s.redis.data.top = Some(c);
                let fence = s.redis_fence(variant).expect("a token was just set");
                s.replicas[r].step = match reach {
                    Reach::Answered => Step::FenceCas { c, fence, f0 },
                    _ => Step::PgCounting { n },
                };
            }
            Action::FenceCas { r, lost } => {
                let Step::FenceCas { c, fence, f0 } = s.replicas[r].step else {
                    unreachable!()
                };
                let below = s.value <= c || variant == Variant::CasWithoutValueCheck;
                if s.fence == f0 && below {
                    s.value = s.value.max(c);
                    s.fence = Record::Redis(fence);
                    s.lease_live = true;
                    s.replicas[r].f = Some(fence).filter(|_| !lost);
                }
                s.replicas[r].step = Step::Idle;
            }
            Action::Crash { r } => s.replicas[r] = Replica::default(),
            Action::LeaseExpires => s.lease_live = false,
            Action::Snapshot => s.redis.saved = s.redis.data,
            Action::Restart { data, new_replid } => {
                s.redis.run_id = s.fresh();
                if new_replid || data == Restored::Nothing {
                    s.redis.replid = s.fresh();
                }
                s.redis.data = match data {
                    Restored::Own => s.redis.data,
                    Restored::Saved => s.redis.saved,
                    Restored::Nothing => RedisData::default(),
                };
            }
            Action::Flushall => s.redis.data = RedisData::default(),
            Action::Resync => {
                s.redis.data = s.redis.saved;
                s.redis.replid = s.fresh();
            }
            Action::LowerCounter { to } => s.redis.data.counter = Some(to),
        }
        s.forget_what_cannot_matter();
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("no count twice", |_, s: &State| !s.repeated),
            Property::always("record >= every count answered", |_, s: &State| {
                s.value >= s.highest()
            }),
            Property::sometimes("counts handed out", |_, s: &State| s.highest() > 0),
            // Only PostgreSQL's counting empties a fence once a count was handed out.
            Property::sometimes("PostgreSQL counted", |_, s: &State| {
                s.fence == Record::Pg && s.highest() > 0
            }),
        ]
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

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Checks the design within bounds, to the end; returns the number of unique states.
fn check(visits: u8, faults: u8) -> usize {
    let started = Instant::now();
    let variant = Variant::AsDesigned;
    let checker = Protocol {
        variant,
        visits,
        faults,
    }
    .checker()
    .threads(threads())
    .symmetry()
    .spawn_bfs()
    .join();
    let states = checker.unique_state_count();
    println!(
        "{visits} visits, {faults} faults: {states} unique states, depth {}, {:?}",
        checker.max_depth(),
        started.elapsed()
    );
    checker.assert_properties();
    states
}

#[test]
fn the_protocol_never_hands_out_a_count_twice() {
    // More visits with one fault, or two faults with fewer visits: about 0.5 M states each,
    // where 4 visits with 2 faults are 7 M (over a minute in a debug build).
    assert!(check(4, 1) > 100_000);
    assert!(check(3, 2) > 100_000);
}

/// The counterexample the weakened `variant` must produce, printed.
fn counterexample(variant: Variant) -> bool {
    let started = Instant::now();
    let checker = Protocol {
        variant,
        visits: 4,
        faults: 1,
    }
    .checker()
    .threads(threads())
    .symmetry()
    .finish_when(HasDiscoveries::AnyOf(BTreeSet::from(["no count twice"])))
    .spawn_bfs()
    .join();
    let found = checker.discovery("no count twice");
    println!(
        "{variant:?}: {} unique states, {:?}, counterexample: {}",
        checker.unique_state_count(),
        started.elapsed(),
        found
            .as_ref()
            .map_or("none".to_string(), ToString::to_string)
    );
    found.is_some()
}

#[test]
fn a_fence_without_replid_repeats_counts_after_a_resync_from_an_older_copy() {
    assert!(counterexample(Variant::FenceWithoutReplid));
}

#[test]
fn fencing_without_checking_the_value_repeats_counts() {
    assert!(counterexample(Variant::CasWithoutValueCheck));
}
