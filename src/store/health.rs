//! Health state of one dependency, shared by every request and by its watcher task.
//!
//! A dependency is `Connecting` until its watcher's first attempt ends, then `Up` or `Down`.
//! Only the watcher's probe makes it `Up`, because only the probe does the recovery work
//! (a fresh connection, a purged pool, the schema checked). A failed call makes it
//! `Down`, but only if it started in the current `Up` epoch: a call that began before an
//! outage and ends after the recovery changes nothing, so the state never flaps on stale news.
//!
//! While a dependency is down, callers get an immediate [`DepError::Unavailable`] instead of
//! each waiting out the timeout, which keeps a blackholed dependency from stacking up requests
//! or exhausting the pool; while it is connecting, they wait for the attempt in flight.

use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::error::DepError;

/// First and longest pause between probes of a dependency that is down. The ceiling keeps
/// recovery under two seconds after the dependency returns.
const PROBE_BACKOFF_MIN: Duration = Duration::from_millis(50);
const PROBE_BACKOFF_MAX: Duration = Duration::from_millis(1000);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Health {
    /// The first attempt has not ended yet: callers wait for it (bounded).
    Connecting,
    Up,
    Down(DepError),
}

#[derive(Debug, Clone)]
struct State {
    /// Bumped on every change of health, so an outcome can be tied to the state it saw.
    epoch: u64,
    health: Health,
}

/// Runs `call` for at most `timeout`.
async fn bounded<T, E: Into<anyhow::Error>>(
    timeout: Duration,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, DepError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(DepError::failed(e)),
        Err(_) => Err(DepError::Timeout(timeout)),
    }
}

/// The pauses between probes while a dependency stays down: a ceiling doubling from the
/// minimum up to the maximum, back to the minimum once it is up. Each pause is drawn between
/// half the ceiling and the ceiling ("equal jitter"): replicas that lost a dependency at the
/// same moment would otherwise probe it in lockstep, all at once, just as it recovers. The
/// upper bound is unchanged, so recovery is still noticed within [`PROBE_BACKOFF_MAX`].
#[derive(Debug)]
struct Backoff {
    ceiling: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self {
            ceiling: PROBE_BACKOFF_MIN,
        }
    }

    fn next_pause(&mut self) -> Duration {
        let ceiling = self.ceiling;
        self.ceiling = (ceiling * 2).min(PROBE_BACKOFF_MAX);
        let half = ceiling / 2;
        // A fresh `RandomState` has new random keys: different in every call and process.
        let draw = RandomState::new().hash_one(std::process::id());
        half + half.mul_f64(draw as f64 / u64::MAX as f64)
    }
}

pub struct Dependency {
    name: &'static str,
    state: watch::Sender<State>,
    timeout: Duration,
}

impl Dependency {
    pub fn new(name: &'static str, timeout: Duration) -> Self {
        Self {
            name,
            state: watch::Sender::new(State {
                epoch: 0,
                health: Health::Connecting,
            }),
            timeout,
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn is_up(&self) -> bool {
        self.state.borrow().health == Health::Up
    }

    /// Runs one call against the dependency, bounded by the configured timeout. Fails fast
    /// while the dependency is down; while its first attempt is in flight, waits for it (at
    /// most the timeout). A failure marks it down unless the state changed since the call
    /// started; a success changes nothing (only the watcher's probe heals).
    pub async fn call<T, E: Into<anyhow::Error>>(
        &self,
        call: impl Future<Output = Result<T, E>>,
    ) -> Result<T, DepError> {
        let epoch = self.admit().await?;
        let result = bounded(self.timeout, call).await;
        if let Err(e) = &result {
            metrics::counter!("dependency_errors_total", "dependency" => self.name).increment(1);
            self.set_health(epoch, Health::Down(e.clone()));
        }
        result
    }

    /// Why the dependency is down, if it is; without waiting or calling it.
    pub fn down_reason(&self) -> Option<DepError> {
        match &self.state.borrow().health {
            Health::Down(e) => Some(e.as_unavailable()),
            Health::Up | Health::Connecting => None,
        }
    }

    /// The epoch in which a call may proceed, or why it may not.
    async fn admit(&self) -> Result<u64, DepError> {
        let mut state = self.state.subscribe();
        let settled = tokio::time::timeout(
            self.timeout,
            state.wait_for(|s| s.health != Health::Connecting),
        )
        .await;
        match settled {
            Err(_) => Err(DepError::Timeout(self.timeout)),
            // The sender lives in `self`, so the channel cannot close while we borrow it.
            Ok(Err(_)) => Err(DepError::Unavailable("shutting down")),
            Ok(Ok(state)) => match &state.health {
                Health::Up => Ok(state.epoch),
                Health::Down(e) => Err(e.as_unavailable()),
                Health::Connecting => Err(DepError::Timeout(self.timeout)),
            },
        }
    }

    /// Moves to `health` if the state is still the one of `epoch`; logs real changes.
    fn set_health(&self, epoch: u64, health: Health) {
        let name = self.name;
        self.state.send_if_modified(|state| {
            if state.epoch != epoch || state.health == health {
                return false;
            }
            match (&state.health, &health) {
                // A new reason for a dependency still down: no new epoch, no log line.
                (Health::Down(_), Health::Down(_)) => {}
                (_, Health::Down(reason)) => {
                    tracing::warn!(dependency = name, state = "down", reason = %reason.detail(), "dependency state changed");
                    state.epoch += 1;
                }
                (_, _) => {
                    tracing::info!(dependency = name, state = "up", "dependency state changed");
                    state.epoch += 1;
                }
            }
            state.health = health;
            true
        });
        metrics::gauge!("dependency_up", "dependency" => name)
            .set(f64::from(u8::from(self.is_up())));
    }

    /// Probes the dependency, with backoff, whenever it is not up, until `stop` is cancelled.
    /// The probe does the recovery work (fresh connections, the schema); its success is
    /// the only way the dependency becomes up.
    pub async fn watch<F, Fut, E>(&self, mut probe: F, stop: CancellationToken)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: Into<anyhow::Error>,
    {
        let mut state = self.state.subscribe();
        let mut backoff = Backoff::new();
        loop {
            let seen = state.borrow_and_update().clone();
            if seen.health == Health::Up {
                backoff = Backoff::new();
                tokio::select! {
                    () = stop.cancelled() => return,
                    changed = state.changed() => if changed.is_err() { return },
                }
                continue;
            }
            let outcome = tokio::select! {
                () = stop.cancelled() => return,
                outcome = bounded(self.timeout, probe()) => outcome,
            };
            match outcome {
                Ok(()) => self.set_health(seen.epoch, Health::Up),
                Err(e) => {
                    metrics::counter!("dependency_errors_total", "dependency" => self.name)
                        .increment(1);
                    if seen.health == Health::Connecting {
                        tracing::warn!(dependency = self.name, reason = %e.detail(), "dependency not reachable yet, retrying");
                    }
                    self.set_health(seen.epoch, Health::Down(e));
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(backoff.next_pause()) => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::time::{Instant, sleep};

    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(500);

    fn ok() -> std::future::Ready<Result<u32, anyhow::Error>> {
        std::future::ready(Ok(7))
    }

    fn refused() -> std::io::Error {
        std::io::ErrorKind::ConnectionRefused.into()
    }

    fn boom() -> std::future::Ready<Result<u32, anyhow::Error>> {
        std::future::ready(Err(anyhow::anyhow!("boom")))
    }

    /// A dependency whose watcher probes with `healthy` deciding each probe's outcome; the
    /// watcher's handle, to see it stop.
    fn watched(
        healthy: Arc<std::sync::atomic::AtomicBool>,
        probes: Arc<AtomicUsize>,
    ) -> (
        Arc<Dependency>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let dep = Arc::new(Dependency::new("test", TIMEOUT));
        let stop = CancellationToken::new();
        let (d, s) = (dep.clone(), stop.clone());
        let watcher = tokio::spawn(async move {
            d.watch(
                || {
                    probes.fetch_add(1, Ordering::SeqCst);
                    let up = healthy.load(Ordering::SeqCst);
                    async move { if up { Ok(()) } else { Err(refused()) } }
                },
                s,
            )
            .await;
        });
        (dep, stop, watcher)
    }

    #[test]
    fn backoff_doubles_up_to_the_ceiling_each_pause_jittered_below_it() {
        let mut backoff = Backoff::new();
        for ceiling in [50, 100, 200, 400, 800, 1000, 1000, 1000] {
            let pause = backoff.next_pause().as_millis();
            assert!((ceiling / 2..=ceiling).contains(&pause), "{pause} ms");
        }
    }

    /// The instants at which a dependency that never answers is probed during `span`.
    async fn probe_schedule(span: Duration) -> Vec<Duration> {
        let dep = Dependency::new("test", TIMEOUT);
        let (start, probes) = (Instant::now(), std::sync::Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let probe = || {
            probes.lock().unwrap().push(start.elapsed());
            std::future::ready(Err::<(), _>(refused()))
        };
        let _ = tokio::time::timeout(span, dep.watch(probe, stop)).await;
        probes.into_inner().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn two_replicas_do_not_probe_in_lockstep_and_stay_within_the_bound() {
        let span = Duration::from_secs(6);
        let (one, two) = tokio::join!(probe_schedule(span), probe_schedule(span));
        assert_ne!(one, two, "two schedules drawn alike");
        for schedule in [&one, &two] {
            assert_eq!(schedule[0], Duration::ZERO, "the first probe is at once");
            let mut ceiling = PROBE_BACKOFF_MIN;
            for gap in schedule.windows(2).map(|w| w[1] - w[0]) {
                assert!(
                    ceiling / 2 <= gap && gap <= ceiling,
                    "{gap:?} vs {ceiling:?}"
                );
                ceiling = (ceiling * 2).min(PROBE_BACKOFF_MAX);
            }
            // 25+50+100+200+400 ms, then at most 1 s apart: at least 5 pauses of the
            // ceiling fit in 6 s, and no more probes than pauses of half the ceiling.
            assert!((9..=16).contains(&schedule.len()), "{schedule:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_waits_for_the_first_attempt_then_proceeds() {
        let dep = Arc::new(Dependency::new("test", TIMEOUT));
        let d = dep.clone();
        tokio::spawn(async move {
            sleep(Duration::from_millis(200)).await;
            d.set_health(0, Health::Up);
        });
        let started = Instant::now();
        assert_eq!(dep.call(ok()).await, Ok(7));
        assert_eq!(started.elapsed(), Duration::from_millis(200));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_waits_at_most_the_timeout_for_the_first_attempt() {
        let dep = Dependency::new("test", TIMEOUT);
        let started = Instant::now();
        assert_eq!(dep.call(ok()).await, Err(DepError::Timeout(TIMEOUT)));
        assert_eq!(started.elapsed(), TIMEOUT);
        assert!(!dep.is_up(), "waiting is not a verdict: still connecting");
        assert_eq!(dep.state.borrow().health, Health::Connecting);
    }

    #[tokio::test(start_paused = true)]
    async fn a_down_dependency_fails_fast_with_the_reason() {
        let dep = Dependency::new("test", TIMEOUT);
        dep.set_health(0, Health::Down(DepError::failed(refused())));
        let started = Instant::now();
        let err = dep.call(ok()).await.unwrap_err();
        assert_eq!(err, DepError::Unavailable("connection refused"));
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_or_slow_call_marks_it_down_and_a_success_never_marks_it_up() {
        let dep = Dependency::new("test", TIMEOUT);
        dep.set_health(0, Health::Up);
        assert_eq!(dep.call(boom()).await.unwrap_err().detail(), "boom");
        assert!(!dep.is_up());

        let dep = Dependency::new("test", TIMEOUT);
        dep.set_health(0, Health::Up);
        let slow = async {
            sleep(TIMEOUT * 2).await;
            Ok::<_, anyhow::Error>(1)
        };
        assert_eq!(dep.call(slow).await, Err(DepError::Timeout(TIMEOUT)));
        assert!(!dep.is_up());
        // Callers can learn why without calling; a call fails fast with that reason.
        assert_eq!(dep.down_reason(), Some(DepError::Unavailable("timeout")));
        assert_eq!(dep.call(ok()).await, Err(DepError::Unavailable("timeout")));
        assert!(!dep.is_up());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_failure_after_recovery_changes_nothing() {
        let dep = Arc::new(Dependency::new("test", TIMEOUT));
        dep.set_health(0, Health::Up);
        // A call starts in epoch 1 and hangs...
        let d = dep.clone();
        let stale = tokio::spawn(async move {
            d.call(async {
                sleep(Duration::from_millis(300)).await;
                Err::<(), _>(anyhow::anyhow!("late news"))
            })
            .await
        });
        tokio::task::yield_now().await;
        // ...meanwhile the dependency goes down and a probe heals it.
        dep.set_health(1, Health::Down(DepError::Timeout(TIMEOUT)));
        dep.set_health(2, Health::Up);
        assert!(stale.await.unwrap().is_err());
        assert!(
            dep.is_up(),
            "a failure from an old epoch must not flip the state"
        );
        assert_eq!(dep.state.borrow().epoch, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn the_watcher_probes_with_backoff_and_alone_heals() {
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let probes = Arc::new(AtomicUsize::new(0));
        let (dep, stop, _) = watched(healthy.clone(), probes.clone());
        // Probes at 0, then after pauses of at most 50, 100, 200, 400 ms (jittered down to
        // half of that): at least five in the first 0.8 s.
        sleep(Duration::from_millis(800)).await;
        assert!(probes.load(Ordering::SeqCst) >= 5);
        assert!(matches!(dep.state.borrow().health, Health::Down(_)));
        // Calls meanwhile fail fast and never reach the dependency.
        let started = Instant::now();
        assert_eq!(
            dep.call(ok()).await,
            Err(DepError::Unavailable("connection refused"))
        );
        assert_eq!(started.elapsed(), Duration::ZERO);

        // The next probe heals it, and comes within the longest pause; not before a probe.
        let before = probes.load(Ordering::SeqCst);
        healthy.store(true, Ordering::SeqCst);
        assert!(!dep.is_up());
        sleep(PROBE_BACKOFF_MAX + Duration::from_millis(1)).await;
        assert!(dep.is_up());
        assert_eq!(probes.load(Ordering::SeqCst), before + 1);
        let healed_probes = probes.load(Ordering::SeqCst);
        // Up: no probing at all.
        sleep(Duration::from_secs(10)).await;
        assert_eq!(probes.load(Ordering::SeqCst), healed_probes);
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_failure_the_watcher_recovers_within_its_first_pause() {
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let probes = Arc::new(AtomicUsize::new(0));
        let (dep, stop, _) = watched(healthy, probes.clone());
        sleep(Duration::from_millis(1)).await;
        assert!(dep.is_up());
        assert_eq!(dep.call(boom()).await.unwrap_err().detail(), "boom");
        // Down now; the watcher probes at once and the (healthy) probe heals it.
        sleep(Duration::from_millis(1)).await;
        assert!(dep.is_up());
        assert_eq!(probes.load(Ordering::SeqCst), 2);
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_watcher_returns() {
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (_dep, stop, watcher) = watched(healthy, Arc::new(AtomicUsize::new(0)));
        sleep(Duration::from_millis(120)).await;
        stop.cancel();
        tokio::time::timeout(Duration::from_millis(1), watcher)
            .await
            .expect("the watcher stops at once when cancelled")
            .unwrap();
    }
}
