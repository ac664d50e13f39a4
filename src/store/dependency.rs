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
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// First and longest pause between probes of a dependency that is down. The ceiling keeps
/// recovery under two seconds after the dependency returns.
const PROBE_BACKOFF_MIN: Duration = Duration::from_millis(50);
const PROBE_BACKOFF_MAX: Duration = Duration::from_millis(1000);

/// Why a dependency call gave no answer. The `Display` is a few words, safe to show to
/// anyone (the page's `erros`, `/readyz`): never a user name, SQL, script or server message.
/// [`DepError::detail`] has the driver's full text, for the logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DepError {
    /// No answer within the dependency timeout.
    #[error("timeout")]
    Timeout(Duration),
    /// Failing fast while the dependency is down; says what brought it down.
    #[error("unavailable ({0})")]
    Unavailable(&'static str),
    /// The call failed: `summary` is public, `detail` is for the logs.
    #[error("{summary}")]
    Failed {
        summary: &'static str,
        detail: String,
    },
    /// The dependency answered, with a value this service refuses (a counter out of range).
    /// Not an outage: the dependency stays up, and the value goes no further.
    #[error("invalid counter value")]
    Invalid(String),
    /// Redis counted, but PostgreSQL no longer names that Redis as the counter: the counts
    /// may not be new, so they are withheld (`docs/counting.md`). Not an outage either.
    #[error("count withheld: counter changing hands")]
    Unconfirmed,
}

impl DepError {
    /// A driver error and its causes: classified for the public text, kept whole (on one
    /// line) for the logs. Drivers repeat themselves along the chain (the pool's error quotes
    /// the client's, which quotes the server's), so a cause already quoted is not appended.
    pub fn failed(error: impl Into<anyhow::Error>) -> Self {
        let error = error.into();
        let mut text = String::new();
        for cause in error.chain() {
            let cause = cause.to_string();
            if !text.contains(&cause) {
                if !text.is_empty() {
                    text.push_str(": ");
                }
                text.push_str(&cause);
            }
        }
        let detail = text.split_whitespace().collect::<Vec<_>>().join(" ");
        Self::Failed {
            summary: summarise(&detail),
            detail,
        }
    }

    /// The full story, for the logs only.
    pub fn detail(&self) -> String {
        match self {
            Self::Timeout(after) => format!("timed out after {} ms", after.as_millis()),
            Self::Failed { detail, .. } | Self::Invalid(detail) => detail.clone(),
            Self::Unavailable(_) | Self::Unconfirmed => self.to_string(),
        }
    }

    /// The answer while the dependency is down: what brought it down, in public words.
    fn as_unavailable(&self) -> Self {
        match self {
            Self::Timeout(_) => Self::Unavailable("timeout"),
            Self::Failed { summary, .. } => Self::Unavailable(summary),
            Self::Invalid(_) => Self::Unavailable("invalid counter value"),
            Self::Unconfirmed => Self::Unavailable("count withheld: counter changing hands"),
            Self::Unavailable(summary) => Self::Unavailable(summary),
        }
    }
}

/// A few public words for a driver's error text. The first match wins, so the specific
/// (authentication, TLS) come before the generic (a lost connection).
fn summarise(detail: &str) -> &'static str {
    const RULES: &[(&[&str], &str)] = &[
        (
            &[
                "authentication",
                "wrongpass",
                "noauth",
                "invalid username-password",
            ],
            "authentication failed",
        ),
        (&["noperm", "permission denied"], "permission denied"),
        (
            &[
                "unknownissuer",
                "unknown issuer",
                "certificate verify failed",
                "badsignature",
            ],
            "tls: certificate not trusted",
        ),
        (
            &["notvalidforname", "not valid for name", "name mismatch"],
            "tls: certificate name mismatch",
        ),
        (
            &["server does not support tls", "does not support ssl"],
            "tls: not offered by the server",
        ),
        (
            &["tls", "ssl", "certificate", "handshake"],
            "tls: handshake failed",
        ),
        (&["connection refused"], "connection refused"),
        (
            &[
                "the database system is",
                "loading the dataset",
                "loading redis",
            ],
            "server not ready",
        ),
        (&["timed out", "timeout"], "timeout"),
        (
            &[
                "broken pipe",
                "reset by peer",
                "connection closed",
                "eof",
                "terminating connection",
            ],
            "connection lost",
        ),
    ];
    let lower = detail.to_lowercase();
    RULES
        .iter()
        .find(|(needles, _)| needles.iter().any(|n| lower.contains(n)))
        .map_or("error", |(_, summary)| summary)
}

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

/// The pauses between probes while a dependency stays down: doubling from the minimum up to
/// the ceiling, back to the minimum once it is up.
#[derive(Debug)]
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Self(PROBE_BACKOFF_MIN)
    }

    fn next_pause(&mut self) -> Duration {
        let pause = self.0;
        self.0 = (self.0 * 2).min(PROBE_BACKOFF_MAX);
        pause
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

    use tokio::time::{Instant, advance, sleep};

    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(500);

    fn ok() -> std::future::Ready<Result<u32, anyhow::Error>> {
        std::future::ready(Ok(7))
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
                    async move {
                        if up {
                            Ok(())
                        } else {
                            Err(anyhow::anyhow!("Connection refused"))
                        }
                    }
                },
                s,
            )
            .await;
        });
        (dep, stop, watcher)
    }

    #[test]
    fn backoff_doubles_up_to_the_ceiling() {
        let mut backoff = Backoff::new();
        let pauses: Vec<u128> = (0..8).map(|_| backoff.next_pause().as_millis()).collect();
        assert_eq!(pauses, [50, 100, 200, 400, 800, 1000, 1000, 1000]);
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
        dep.set_health(
            0,
            Health::Down(DepError::failed(anyhow::anyhow!("Connection refused"))),
        );
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
        // Probes at 0, 50, 150, 350, 750 ms: five in the first 0.8 s.
        sleep(Duration::from_millis(800)).await;
        assert_eq!(probes.load(Ordering::SeqCst), 5);
        assert!(matches!(dep.state.borrow().health, Health::Down(_)));
        // Calls meanwhile fail fast and never reach the dependency.
        let started = Instant::now();
        assert_eq!(
            dep.call(ok()).await,
            Err(DepError::Unavailable("connection refused"))
        );
        assert_eq!(started.elapsed(), Duration::ZERO);

        healthy.store(true, Ordering::SeqCst);
        // The next probe is due at 1550 ms (750 + 800): healed by then, not before.
        advance(Duration::from_millis(700)).await;
        assert!(!dep.is_up());
        sleep(Duration::from_millis(100)).await;
        assert!(dep.is_up());
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

    #[test]
    fn driver_errors_become_one_line_without_repeats() {
        let chain = anyhow::anyhow!("connection refused").context("pool: connection refused");
        assert_eq!(DepError::failed(chain).detail(), "pool: connection refused");
        let multiline = anyhow::anyhow!("ERR script\n  line 3").context("script failed");
        assert_eq!(
            DepError::failed(multiline).detail(),
            "script failed: ERR script line 3"
        );
    }

    #[test]
    fn the_public_text_names_the_failure_never_the_server_s_words() {
        let cases = [
            (
                r#"db error: FATAL: password authentication failed for user "admin""#,
                "authentication failed",
            ),
            (
                "WRONGPASS invalid username-password pair",
                "authentication failed",
            ),
            (
                "NOPERM User web has no permissions to run the 'flushall' command",
                "permission denied",
            ),
            (
                "invalid peer certificate: UnknownIssuer",
                "tls: certificate not trusted",
            ),
            (
                "invalid peer certificate: NotValidForName",
                "tls: certificate name mismatch",
            ),
            (
                "error performing TLS handshake: server does not support TLS",
                "tls: not offered by the server",
            ),
            (
                "error connecting to server: Connection refused (os error 111)",
                "connection refused",
            ),
            ("broken pipe", "connection lost"),
            (
                "db error: FATAL: the database system is shutting down",
                "server not ready",
            ),
            (
                "LOADING Redis is loading the dataset in memory",
                "server not ready",
            ),
            (
                "ERR user_script:3: Script attempted to access a non local key f_8c1e",
                "error",
            ),
            ("ERROR: relation \"visit_counter\" does not exist", "error"),
        ];
        for (detail, public) in cases {
            let error = DepError::failed(anyhow::anyhow!(detail.to_owned()));
            assert_eq!(error.to_string(), public, "{detail}");
            assert_eq!(
                error.as_unavailable().to_string(),
                format!("unavailable ({public})")
            );
            assert_eq!(error.detail(), detail, "the logs keep it all");
        }
        assert_eq!(DepError::Timeout(TIMEOUT).to_string(), "timeout");
        assert_eq!(
            DepError::Timeout(TIMEOUT).detail(),
            "timed out after 500 ms"
        );
    }
}
