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
pub mod dependency;
pub mod tls;

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use cache::Cache;
use db::Db;
pub use dependency::DepError;

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

/// The outcome of counting a batch of `n` visits: the total after the batch, or nothing, and
/// each dependency's reason when it failed or its count could not be used.
#[derive(Debug, Clone, Default)]
pub struct Counted {
    pub total: Option<(i64, CountedIn)>,
    pub cache_error: Option<DepError>,
    pub db_error: Option<DepError>,
}

/// What `/readyz` reports: each dependency's answer to one round trip.
#[derive(Debug)]
pub struct Readiness {
    pub cache: Result<(), DepError>,
    pub db: Result<(), DepError>,
}

pub struct Store {
    cache: Cache,
    db: Db,
    /// The fence this process last saw PostgreSQL hold; empty until it fenced once.
    fence: Mutex<String>,
    /// What Redis's counter will be once this process's batches in flight are counted, if no
    /// other replica counts meanwhile: the guess that lets confirmation start with the count.
    expected: AtomicI64,
    /// Held while this process fences, so that batches counted at once fence once, not each
    /// (`visits` sends one batch at a time, but the store does not rely on it).
    fencing: tokio::sync::Mutex<()>,
    /// Bounds a whole fencing: the row stays locked for it, and the batch waits.
    fence_timeout: Duration,
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
    pub fn new(config: &Config) -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            cache: Cache::new(
                &config.redis_url,
                config.redis_password.as_deref(),
                config.redis_roots.as_ref(),
                config.dependency_timeout,
            )
            .context("configuring Redis")?,
            db: Db::new(
                config.database.clone(),
                &config.database_tls,
                config.db_timezone.clone(),
                config.dependency_timeout,
            )
            .context("configuring PostgreSQL")?,
            fence: Mutex::new(String::new()),
            expected: AtomicI64::new(0),
            fencing: tokio::sync::Mutex::new(()),
            fence_timeout: 2 * config.dependency_timeout,
        }))
    }

    /// Starts, on `tasks`, the watcher of each dependency; both return when `stop` is cancelled.
    pub fn spawn_tasks(self: &Arc<Self>, tasks: &TaskTracker, stop: &CancellationToken) {
        let (store, token) = (Arc::clone(self), stop.clone());
        tasks.spawn(async move { store.cache.watch(token).await });
        let (store, token) = (Arc::clone(self), stop.clone());
        tasks.spawn(async move { store.db.watch(token).await });
    }

    fn fence(&self) -> String {
        self.fence
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_fence(&self, fence: String) {
        *self.fence.lock().unwrap_or_else(PoisonError::into_inner) = fence;
    }

    /// Counts `n` visits and reads the database clock. Redis counts under the fence this
    /// process knows; if Redis says the fence changed, this process fences again (once) and
    /// retries. If Redis fails, PostgreSQL counts once the lease allows.
    pub async fn count_and_clock(&self, n: u64) -> (Counted, Result<String, DepError>) {
        if let Some(e) = self.db.down_reason() {
            return (Counted::db_failed(e.clone()), Err(e));
        }
        let mut fenced = false;
        loop {
            let fence = self.fence();
            // Confirmation starts with the count, for the total this process expects; when
            // another replica counted meanwhile, Redis's total is higher and is confirmed after.
            let n_i64 = n as i64; // At most the batch size.
            let expected = self.expected.fetch_add(n_i64, Ordering::SeqCst) + n_i64;
            // Not while Redis is known to be down: there will be no count to confirm, and
            // PostgreSQL's own count (`count_here`) makes its round trip anyway.
            let early = async {
                if fence.is_empty() || self.cache.down_reason().is_some() {
                    None
                } else {
                    Some(self.db.confirm(expected, &fence).await)
                }
            };
            let (counted, early) = tokio::join!(self.cache.count(n, &fence), early);
            match counted {
                Ok(Some(total)) => match early {
                    Some(Ok((true, clock))) if total <= expected => {
                        return (Counted::total(total, CountedIn::Cache, None), Ok(clock));
                    }
                    Some(Ok((false, clock))) => return (self.withhold(&fence), Ok(clock)),
                    Some(Err(e)) => return (Counted::db_failed(e.clone()), Err(e)),
                    _ => {
                        self.expected.fetch_max(total, Ordering::SeqCst);
                        return self.confirm(total, &fence).await;
                    }
                },
                Ok(None) => self.expected.fetch_sub(n_i64, Ordering::SeqCst),
                Err(cache_error) => {
                    self.expected.fetch_sub(n_i64, Ordering::SeqCst);
                    return self.count_here(n, cache_error).await;
                }
            };
            if fenced {
                // Fenced a moment ago and superseded already: no count this time.
                let clock = self.db.now().await;
                let counted = Counted {
                    cache_error: Some(DepError::Unconfirmed),
                    db_error: clock.as_ref().err().cloned(),
                    ..Counted::default()
                };
                return (counted, clock);
            }
            fenced = true;
            let _only_one = self.fencing.lock().await;
            if self.fence() != fence {
                continue; // Another batch of this process fenced meanwhile.
            }
            match self.fence_redis().await {
                Ok(Ok(())) => {}
                Ok(Err(cache_error)) => return self.count_here(n, cache_error).await,
                Err(e) => return (Counted::db_failed(e.clone()), Err(e)),
            }
        }
    }

    /// A batch counted under a fence that is no longer the fence of record: its counts may
    /// not be new. Fence again next time (unless another batch of this process already did).
    fn withhold(&self, fence: &str) -> Counted {
        let mut known = self.fence.lock().unwrap_or_else(PoisonError::into_inner);
        if *known == fence {
            known.clear();
        }
        Counted {
            cache_error: Some(DepError::Unconfirmed),
            ..Counted::default()
        }
    }

    async fn confirm(&self, total: i64, fence: &str) -> (Counted, Result<String, DepError>) {
        match self.db.confirm(total, fence).await {
            Ok((true, clock)) => (Counted::total(total, CountedIn::Cache, None), Ok(clock)),
            Ok((false, clock)) => (self.withhold(fence), Ok(clock)),
            Err(e) => (Counted::db_failed(e.clone()), Err(e)),
        }
    }

    async fn count_here(
        &self,
        n: u64,
        cache_error: DepError,
    ) -> (Counted, Result<String, DepError>) {
        // `n` is at most the batch size, far below i64::MAX.
        match self.db.count_here(n as i64, REDIS_LEASE).await {
            Ok((Some(total), clock)) => {
                self.set_fence(String::new());
                let counted = Counted::total(total, CountedIn::Db, Some(cache_error));
                (counted, Ok(clock))
            }
            Ok((None, clock)) => {
                let counted = Counted {
                    cache_error: Some(cache_error),
                    ..Counted::default()
                };
                (counted, Ok(clock))
            }
            Err(e) => {
                let counted = Counted {
                    cache_error: Some(cache_error),
                    db_error: Some(e.clone()),
                    ..Counted::default()
                };
                (counted, Err(e))
            }
        }
    }

    /// Fences Redis with the counter row locked (see `db::Db::fence`, `cache::Cache::fence`)
    /// and remembers the fence in force. The outer error is PostgreSQL's, the inner Redis's.
    async fn fence_redis(&self) -> Result<Result<(), DepError>, DepError> {
        let token = new_token();
        let fencing = self
            .db
            .fence(|floor, held| async move { self.cache.fence(floor, &token, &held).await });
        let (counter, fence) = match tokio::time::timeout(self.fence_timeout, fencing).await {
            Ok(Ok(Ok(fenced))) => fenced,
            Ok(Ok(Err(cache_error))) => return Ok(Err(cache_error)),
            Ok(Err(db_error)) => return Err(db_error),
            Err(_) => return Err(DepError::Timeout(self.fence_timeout)),
        };
        if fence != self.fence() {
            tracing::info!(fence = %fence, "counting in Redis under a new fence");
            metrics::counter!("visit_counter_fences_total").increment(1);
        }
        self.expected.store(counter, Ordering::SeqCst);
        self.set_fence(fence);
        Ok(Ok(()))
    }

    /// One round trip to each dependency over the connections it already has: no schema
    /// work, no lock, no new connection while a dependency is down.
    pub async fn readiness(&self) -> Readiness {
        let (cache, db) = tokio::join!(self.cache.check(), self.db.check());
        Readiness { cache, db }
    }
}

impl Counted {
    fn total(total: i64, counted_in: CountedIn, cache_error: Option<DepError>) -> Self {
        Self {
            total: Some((total, counted_in)),
            cache_error,
            db_error: None,
        }
    }

    fn db_failed(e: DepError) -> Self {
        Self {
            db_error: Some(e),
            ..Self::default()
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
        let (counted, clock) = store.count_and_clock(3).await;
        assert!(counted.total.is_none() && counted.db_error.is_some());
        assert!(clock.is_err());
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
