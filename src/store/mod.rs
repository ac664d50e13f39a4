//! The two dependencies and the counting rules that span them.
//!
//! Redis holds the live counter; PostgreSQL holds the counter of record, raised from Redis
//! at least every flush interval and on shutdown (write-behind). While Redis is down, visits
//! are counted in PostgreSQL directly. This process also remembers the highest count it has
//! seen (`high_water`); it is passed as a floor to every increment, so that whichever store
//! counts, and whatever either of them lost, the count handed out never goes backwards.

pub mod cache;
pub mod db;
pub mod dependency;
pub mod tls;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use cache::Cache;
use db::Db;
pub use dependency::DepError;

/// Which store counted a batch of visits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountedIn {
    Cache,
    Db,
}

/// The outcome of counting a batch of `n` visits: the total after the batch, or why neither
/// store could count it, plus the cache's error when PostgreSQL had to stand in.
#[derive(Debug, Clone)]
pub struct Counted {
    pub total: Result<(i64, CountedIn), DepError>,
    pub cache_error: Option<DepError>,
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
    /// Highest count known to this process: handed out, read from PostgreSQL or flushed.
    high_water: AtomicI64,
    /// When the counter of record last caught up with the live count (for `/metrics`).
    last_flush: Mutex<Instant>,
}

/// The value the write-behind raises the counter of record to: what Redis holds, or this
/// process's high-water mark when Redis is unreachable or lost data (it can only be lower
/// than what was handed out, never higher).
fn flush_target(live: Option<i64>, high_water: i64) -> i64 {
    live.unwrap_or(0).max(high_water)
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
            high_water: AtomicI64::new(0),
            last_flush: Mutex::new(Instant::now()),
        }))
    }

    /// Starts, on `tasks`, the watcher of each dependency and the write-behind ticker; all
    /// three return when `stop` is cancelled.
    pub fn spawn_tasks(
        self: &Arc<Self>,
        tasks: &TaskTracker,
        stop: &CancellationToken,
        flush_interval: Duration,
    ) {
        let (store, token) = (Arc::clone(self), stop.clone());
        tasks.spawn(async move { store.cache.watch(token).await });
        let (store, token) = (Arc::clone(self), stop.clone());
        tasks.spawn(async move { store.db.watch(|durable| store.learn(durable), token).await });
        let (store, token) = (Arc::clone(self), stop.clone());
        tasks.spawn(async move {
            // The first tick one interval from now: at start there is nothing to flush.
            let first = tokio::time::Instant::now() + flush_interval;
            let mut ticker = tokio::time::interval_at(first, flush_interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = token.cancelled() => return,
                    _ = ticker.tick() => {}
                }
                // Failures are already logged and counted by the dependency state.
                let _ = store.flush().await;
            }
        });
    }

    fn learn(&self, total: i64) {
        self.high_water.fetch_max(total, Ordering::SeqCst);
    }

    /// Counts `n` visits and reads the database clock, concurrently. The count goes to
    /// Redis; if Redis fails, PostgreSQL counts instead, unless the clock read just failed
    /// too (trying PostgreSQL again would double the wait for nothing).
    pub async fn count_and_clock(&self, n: u64) -> (Counted, Result<String, DepError>) {
        let floor = self.high_water.load(Ordering::SeqCst);
        let (cached, clock) = tokio::join!(self.cache.increment(n, floor), self.db.now());
        let counted = match cached {
            Ok(total) => {
                self.learn(total);
                Counted {
                    total: Ok((total, CountedIn::Cache)),
                    cache_error: None,
                }
            }
            Err(cache_error) => {
                let total = match &clock {
                    // `n` is at most the batch size, far below i64::MAX.
                    Ok(_) => self.db.increment(n as i64, floor).await.map(|total| {
                        self.learn(total);
                        (total, CountedIn::Db)
                    }),
                    Err(e) => Err(e.clone()),
                };
                Counted {
                    total,
                    cache_error: Some(cache_error),
                }
            }
        };
        (counted, clock)
    }

    /// One round trip to each dependency over the connections it already has: no schema
    /// work, no lock, no new connection while a dependency is down.
    pub async fn readiness(&self) -> Readiness {
        let (cache, db) = tokio::join!(self.cache.check(), self.db.check());
        Readiness { cache, db }
    }

    /// Write-behind: makes the counter of record at least the live count. Returns the durable
    /// count.
    pub async fn flush(&self) -> Result<i64, DepError> {
        let value = self.flush_value().await;
        let durable = self.db.raise(value).await?;
        self.flushed(durable);
        Ok(durable)
    }

    /// The flush at shutdown: tried once, bounded by the dependency timeout, even when the
    /// database is marked down, because there is no later chance.
    pub async fn final_flush(&self) -> Result<i64, DepError> {
        let value = self.flush_value().await;
        let durable = self.db.raise_once_more(value).await?;
        self.flushed(durable);
        Ok(durable)
    }

    async fn flush_value(&self) -> i64 {
        let live = self.cache.current().await.ok();
        flush_target(live, self.high_water.load(Ordering::SeqCst))
    }

    fn flushed(&self, durable: i64) {
        self.learn(durable);
        *self
            .last_flush
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }

    /// Time since the counter of record last caught up with the live count.
    pub fn flush_age(&self) -> Duration {
        self.last_flush
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::unreachable_store;

    #[test]
    fn the_flush_never_lowers_what_this_process_handed_out() {
        // Redis ahead of this process (other replicas counted): Redis wins.
        assert_eq!(flush_target(Some(90), 40), 90);
        // Redis restarted empty, lost data, or is unreachable: the high-water mark wins.
        assert_eq!(flush_target(Some(3), 40), 40);
        assert_eq!(flush_target(None, 40), 40);
        assert_eq!(flush_target(None, 0), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_high_water_mark_only_rises() {
        let store = unreachable_store();
        store.learn(10);
        store.learn(4);
        assert_eq!(store.high_water.load(Ordering::SeqCst), 10);
        store.learn(11);
        assert_eq!(store.high_water.load(Ordering::SeqCst), 11);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_both_dependencies_refusing_everything_fails_promptly_and_tasks_stop() {
        let store = unreachable_store();
        let (tasks, stop) = (TaskTracker::new(), CancellationToken::new());
        store.spawn_tasks(&tasks, &stop, Duration::from_millis(50));
        let started = Instant::now();
        let (counted, clock) = store.count_and_clock(3).await;
        assert!(counted.total.is_err() && counted.cache_error.is_some());
        assert!(clock.is_err());
        let ready = store.readiness().await;
        assert!(ready.cache.is_err() && ready.db.is_err(), "{ready:?}");
        assert!(store.flush().await.is_err());
        assert!(
            started.elapsed() < Duration::from_millis(700),
            "refusals are known within one timeout: {:?}",
            started.elapsed()
        );
        stop.cancel();
        tasks.close();
        tokio::time::timeout(Duration::from_secs(1), tasks.wait())
            .await
            .expect("watchers and the flush ticker stop when cancelled");
    }
}
