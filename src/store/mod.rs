//! The two dependencies and the counting rules that span them (`docs/counting.md` argues
//! them).
//!
//! Redis counts; PostgreSQL keeps the counter of record and decides which Redis may count.
//! Every batch Redis counts is confirmed in PostgreSQL, in the round trip that reads the
//! clock, before any of its counts is handed out: the counter of record is never behind an
//! answer. Redis counts only under a fence: the Redis process and a token, both recorded in
//! PostgreSQL. Anything that could have made Redis forget or repeat counts (a restart, an
//! older file, `FLUSHALL`, PostgreSQL counting meanwhile) changes the fence, and a batch
//! counted under an old fence is withheld instead of answered. While Redis is down, visits
//! are counted in PostgreSQL itself, once no Redis batch was confirmed for [`REDIS_LEASE`].

pub mod cache;
pub mod db;
pub mod error;
pub mod health;
pub mod postgres_url;
pub mod tls;

use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use cache::Cache;
use db::Db;
pub use error::DepError;
use tls::{PostgresTls, TrustRoots};

/// What the store needs, built by `config` from the environment. The store never reads the
/// environment and never sees `Config`: `config` depends on `store`, not the other way round.
///
/// The passwords are plain `String`s, not `secrecy::SecretString`, and `Debug` is written by
/// hand instead: both drivers take the password into their own settings (`tokio_postgres::Config`
/// as bytes, redis' `ConnectionInfo` as a `String`), which live as long as the process, so a
/// secret wrapper would guard only our copy for the few lines before it is handed over. What
/// can leak is a log line: this `Debug` is the one place every secret field is printed, and
/// `config`'s tests check that no password comes out.
#[derive(Clone)]
pub struct Settings {
    /// Redis connection URL; may contain a password, so it is never logged.
    pub redis_url: String,
    /// Password for Redis's ACL user, from `REDIS_PASSWORD_FILE`.
    pub redis_password: Option<String>,
    /// CA certificates a `rediss://` Redis must chain to (`REDIS_CA_FILE`, else the system
    /// bundle); `None` for `redis://` and for `rediss://…#insecure`.
    pub redis_roots: Option<TrustRoots>,
    /// PostgreSQL connection settings, with the password from the password file applied.
    pub database: tokio_postgres::Config,
    /// TLS to PostgreSQL: `sslmode` and `sslrootcert` from `DATABASE_URL`, libpq's meaning.
    pub database_tls: PostgresTls,
    /// IANA time zone in which `hora_db` is rendered, canonical spelling.
    pub db_timezone: String,
    /// Upper bound for every single call to Redis or PostgreSQL, connecting included.
    pub dependency_timeout: Duration,
}

impl fmt::Debug for Settings {
    /// Hand-written so that the URLs and the passwords can never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("redis_url", &"<redacted>")
            .field(
                "redis_password",
                &self.redis_password.as_ref().map(|_| "<redacted>"),
            )
            .field("redis_roots", &self.redis_roots)
            .field("database", &"<redacted>")
            .field("database_tls", &self.database_tls)
            .field("db_timezone", &self.db_timezone)
            .field("dependency_timeout", &self.dependency_timeout)
            .finish()
    }
}

/// How long after the last confirmed Redis batch PostgreSQL may count itself. A replica that
/// cannot reach Redis while others still count there answers without a count instead of
/// taking the counter from them, so a Redis cut off from one replica only costs that replica.
pub const REDIS_LEASE: Duration = Duration::from_secs(1);

/// Which store counted a batch of visits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountedIn {
    Cache,
    Db,
}

/// What counting a batch of visits gave: the one outcome the page is made from.
#[derive(Debug, Clone)]
pub struct Batch {
    /// The total after the batch and the store that counted it; `None` when the batch got no
    /// count.
    pub total: Option<(i64, CountedIn)>,
    /// The database clock, or why PostgreSQL failed: every statement that counts also reads
    /// the clock, so this is the batch's one database error.
    pub clock: Result<String, DepError>,
    /// Why Redis's count was not used, if it was not.
    pub cache_error: Option<DepError>,
}

/// What `/readyz` reports: each dependency's answer to one round trip.
#[derive(Debug)]
pub struct Readiness {
    pub cache: Result<(), DepError>,
    pub db: Result<(), DepError>,
}

/// What this process knows about counting in Redis. Owned by the one task that counts (see
/// `visits`), which hands it to every [`Store::count_and_clock`]: no lock, no sharing.
#[derive(Debug, Default)]
pub struct Counting {
    /// The fence this process last saw PostgreSQL hold; empty until it fenced once.
    fence: String,
    /// Redis's total after this process's last batch.
    last_total: i64,
    /// Whether other replicas counted in Redis between this process's last two batches.
    shared: bool,
}

impl Counting {
    /// The total to confirm together with a batch of `n`, before Redis answers: what Redis
    /// will reach if nobody else counts meanwhile. Only worth sending while this process
    /// counts alone: when another replica counted in between, the guess falls short and a
    /// second confirmation follows, two writes for one batch. Then the confirmation waits for
    /// Redis's total instead (one round trip later, one write).
    fn ahead(&self, n: i64) -> Option<i64> {
        let expected = self.last_total.saturating_add(n);
        (!self.fence.is_empty() && !self.shared && expected <= cache::MAX_COUNT).then_some(expected)
    }

    /// Redis counted a batch of `n` up to `total`.
    fn counted(&mut self, n: i64, total: i64) {
        self.shared = total != self.last_total.saturating_add(n);
        self.last_total = total;
    }

    /// Redis now holds `counter` under `fence`. Until a batch shows that this process counts
    /// alone, nothing is confirmed ahead: right after a fencing other replicas are likely
    /// fencing too, and a confirmation sent ahead for a batch Redis then refuses would skip
    /// numbers.
    fn fenced(&mut self, counter: i64, fence: String) {
        self.fence = fence;
        self.last_total = counter;
        self.shared = true;
    }

    /// The fence this process knew is not the fence of record any more: fence again next time.
    fn forget_fence(&mut self) {
        self.fence.clear();
    }
}

/// How a fencing ended, when PostgreSQL answered.
enum Fencing {
    /// Redis counts under the fence of record, which this process now knows.
    Fenced,
    /// Redis failed: PostgreSQL may count in its place.
    CacheFailed(DepError),
    /// Another replica is fencing, or the row moved while Redis was fenced (PostgreSQL
    /// counted): this batch tries again after a pause, or goes without a count.
    Superseded,
}

pub struct Store {
    cache: Cache,
    db: Db,
}

/// How many times one batch may fence before it gives up and goes without a count.
const FENCINGS_PER_BATCH: usize = 5;

/// 1 to 16 ms, different in every call and every process.
fn jitter() -> Duration {
    Duration::from_millis(1 + RandomState::new().hash_one(std::process::id()) % 16)
}

/// A token no fence has held before: 64 random bits.
fn new_token() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{:016x}",
        RandomState::new().hash_one((nanos, std::process::id()))
    )
}

impl Store {
    /// Creates the clients without connecting: the service must start, and serve `/healthz`,
    /// before Redis or PostgreSQL exist.
    pub fn new(settings: &Settings) -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            cache: Cache::new(
                &settings.redis_url,
                settings.redis_password.as_deref(),
                settings.redis_roots.as_ref(),
                settings.dependency_timeout,
            )
            .context("configuring Redis")?,
            db: Db::new(
                settings.database.clone(),
                &settings.database_tls,
                settings.db_timezone.clone(),
                settings.dependency_timeout,
            )
            .context("configuring PostgreSQL")?,
        }))
    }

    /// Starts, on `tasks`, the watcher of each dependency; both return when `stop` is cancelled.
    pub fn spawn_tasks(self: &Arc<Self>, tasks: &TaskTracker, stop: &CancellationToken) {
        let (store, token) = (Arc::clone(self), stop.clone());
        tasks.spawn(async move { store.cache.watch(token).await });
        let (store, token) = (Arc::clone(self), stop.clone());
        tasks.spawn(async move { store.db.watch(token).await });
    }

    /// Counts `n` visits and reads the database clock. Redis counts under the fence this
    /// process knows (`counting`); if Redis says the fence changed, this process fences again
    /// (once) and retries. If Redis fails, PostgreSQL counts once the lease allows.
    pub async fn count_and_clock(&self, counting: &mut Counting, n: u64) -> Batch {
        if let Some(e) = self.db.down_reason() {
            return Batch::db_failed(e);
        }
        let n_i64 = n as i64; // At most the batch size.
        for attempt in 0..=FENCINGS_PER_BATCH {
            let fence = counting.fence.clone();
            let expected = counting.ahead(n_i64);
            // Not while Redis is known to be down: there will be no count to confirm, and
            // PostgreSQL's own count (`count_here`) makes its round trip anyway.
            let early = async {
                match expected {
                    Some(expected) if self.cache.down_reason().is_none() => {
                        Some(self.db.confirm(expected, &fence).await)
                    }
                    _ => None,
                }
            };
            let (counted, early) = tokio::join!(self.cache.count(n, &fence), early);
            match counted {
                Ok(Some(total)) => {
                    counting.counted(n_i64, total);
                    let sent = match early {
                        Some(Ok((true, clock))) if Some(total) <= expected => {
                            confirmations("ahead");
                            return Batch::counted(total, CountedIn::Cache, clock, None);
                        }
                        Some(Ok((false, clock))) => return withhold(counting, Ok(clock)),
                        Some(Err(e)) => return Batch::db_failed(e),
                        Some(Ok((true, _))) => "again",
                        None => "after",
                    };
                    confirmations(sent);
                    return self.confirm(counting, total, &fence).await;
                }
                Ok(None) => {}
                Err(cache_error) => return self.count_here(counting, n, cache_error).await,
            }
            if attempt == FENCINGS_PER_BATCH {
                break; // Fenced and superseded every time: no count this time.
            }
            if attempt > 0 {
                // Another replica was fencing: a pause of a few random milliseconds lets it
                // finish; this process then adopts its fence.
                tokio::time::sleep(jitter() * attempt as u32).await;
            }
            match self.fence_redis(counting).await {
                Ok(Fencing::Fenced | Fencing::Superseded) => {}
                Ok(Fencing::CacheFailed(cache_error)) => {
                    return self.count_here(counting, n, cache_error).await;
                }
                Err(e) => return Batch::db_failed(e),
            }
        }
        let clock = self.db.now().await;
        withhold(counting, clock)
    }

    async fn confirm(&self, counting: &mut Counting, total: i64, fence: &str) -> Batch {
        match self.db.confirm(total, fence).await {
            Ok((true, clock)) => Batch::counted(total, CountedIn::Cache, clock, None),
            Ok((false, clock)) => withhold(counting, Ok(clock)),
            Err(e) => Batch::db_failed(e),
        }
    }

    async fn count_here(&self, counting: &mut Counting, n: u64, cache_error: DepError) -> Batch {
        // `n` is at most the batch size, far below i64::MAX.
        match self.db.count_here(n as i64, REDIS_LEASE).await {
            Ok((Some(total), clock)) => {
                counting.forget_fence();
                Batch::counted(total, CountedIn::Db, clock, Some(cache_error))
            }
            Ok((None, clock)) => Batch {
                total: None,
                clock: Ok(clock),
                cache_error: Some(cache_error),
            },
            Err(e) => Batch {
                total: None,
                clock: Err(e),
                cache_error: Some(cache_error),
            },
        }
    }

    /// Fences Redis (see `db::Db::fence` and `cache::Cache::fence`): Redis raised to the
    /// counter of record, the fence kept or renewed, a renewed fence recorded if the row did
    /// not move meanwhile. The error is PostgreSQL's.
    async fn fence_redis(&self, counting: &mut Counting) -> Result<Fencing, DepError> {
        let token = new_token();
        let fencing = self
            .db
            .fence(|floor, held| async move { self.cache.fence(floor, &token, &held).await });
        let fenced = match fencing.await? {
            Some(Ok(fenced)) if fenced.recorded => fenced,
            Some(Err(cache_error)) => return Ok(Fencing::CacheFailed(cache_error)),
            Some(Ok(_)) | None => {
                counting.forget_fence();
                return Ok(Fencing::Superseded);
            }
        };
        if fenced.renewed {
            tracing::info!(fence = %fenced.fence, "counting in Redis under a new fence");
            metrics::counter!("visit_counter_fences_total").increment(1);
        }
        counting.fenced(fenced.counter, fenced.fence);
        Ok(Fencing::Fenced)
    }

    /// One round trip to each dependency over the connections it already has: no schema
    /// work, no lock, no new connection while a dependency is down.
    pub async fn readiness(&self) -> Readiness {
        let (cache, db) = tokio::join!(self.cache.check(), self.db.check());
        Readiness { cache, db }
    }
}

/// A batch counted under a fence that is no longer the fence of record, or not counted for
/// lack of one: its counts may not be new. Fence again next time.
fn withhold(counting: &mut Counting, clock: Result<String, DepError>) -> Batch {
    counting.forget_fence();
    Batch {
        total: None,
        clock,
        cache_error: Some(DepError::Unconfirmed),
    }
}

/// Counts how each Redis batch was confirmed: with the count (`ahead`), after Redis answered
/// (`after`, while other replicas count too), or by a second write (`again`) because another
/// replica counted in between and Redis's total was above the guess.
fn confirmations(how: &'static str) {
    metrics::counter!("visit_counter_confirmations_total", "sent" => how).increment(1);
}

impl Batch {
    fn counted(
        total: i64,
        counted_in: CountedIn,
        clock: String,
        cache_error: Option<DepError>,
    ) -> Self {
        Self {
            total: Some((total, counted_in)),
            clock: Ok(clock),
            cache_error,
        }
    }

    fn db_failed(e: DepError) -> Self {
        Self {
            total: None,
            clock: Err(e),
            cache_error: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::test_support::unreachable_store;

    #[test]
    fn every_token_is_new() {
        let tokens: std::collections::HashSet<_> = (0..1000).map(|_| new_token()).collect();
        assert_eq!(tokens.len(), 1000);
        assert!(tokens.iter().all(|t| t.len() == 16));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_both_dependencies_refusing_everything_fails_promptly_and_tasks_stop() {
        let store = unreachable_store();
        let (tasks, stop) = (TaskTracker::new(), CancellationToken::new());
        store.spawn_tasks(&tasks, &stop);
        let started = Instant::now();
        let batch = store.count_and_clock(&mut Counting::default(), 3).await;
        assert!(batch.total.is_none() && batch.clock.is_err());
        let ready = store.readiness().await;
        assert!(ready.cache.is_err() && ready.db.is_err(), "{ready:?}");
        assert!(
            started.elapsed() < Duration::from_millis(700),
            "refusals are known within one timeout: {:?}",
            started.elapsed()
        );
        stop.cancel();
        tasks.close();
        tokio::time::timeout(Duration::from_secs(1), tasks.wait())
            .await
            .expect("the watchers stop when cancelled");
    }
}
