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

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::Mutex;

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

pub struct Store {
    pub cache: Cache,
    pub db: Db,
    /// Highest count known to this process: handed out, read from PostgreSQL or flushed.
    high_water: AtomicI64,
    last_flush: Mutex<Instant>,
}

impl Store {
    pub fn new(config: &Config) -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            cache: Cache::new(&config.redis_url, config.dependency_timeout)
                .context("configuring Redis")?,
            db: Db::new(
                config.database.clone(),
                config.db_timezone.clone(),
                config.dependency_timeout,
            )
            .context("configuring PostgreSQL")?,
            high_water: AtomicI64::new(0),
            last_flush: Mutex::new(Instant::now()),
        }))
    }

    /// Starts the tasks that reconnect to each dependency and flush the counter.
    pub fn spawn_background(self: &Arc<Self>, flush_interval: Duration) {
        let store = Arc::clone(self);
        tokio::spawn(async move { store.cache.dependency.watch(|| store.cache.ping()).await });
        let store = Arc::clone(self);
        tokio::spawn(async move { store.db.dependency.watch(|| store.probe_db()).await });
        let store = Arc::clone(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(flush_interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                // Failures are already logged and counted by the dependency state.
                let _ = store.flush().await;
            }
        });
    }

    /// Reaches PostgreSQL, creating the schema if needed, and reads the durable count. The
    /// database only counts as up once this succeeded: before it, the table may not exist and
    /// the floor for re-seeding Redis is unknown.
    pub async fn probe_db(&self) -> Result<(), DepError> {
        let durable = self.db.dependency.attempt(self.db.prepare()).await?;
        self.learn(durable);
        Ok(())
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

    /// Write-behind: makes the counter of record at least the live count (Redis's value, or
    /// this process's high-water mark if Redis is unreachable or lost data). Returns the
    /// durable count.
    pub async fn flush(&self) -> Result<i64, DepError> {
        let live = self.cache.current().await.unwrap_or(0);
        let value = live.max(self.high_water.load(Ordering::SeqCst));
        let durable = self.db.raise(value).await?;
        self.learn(durable);
        *self.last_flush.lock().await = Instant::now();
        Ok(durable)
    }

    /// Time since the counter of record last caught up with the live count.
    pub async fn flush_age(&self) -> Duration {
        self.last_flush.lock().await.elapsed()
    }
}
