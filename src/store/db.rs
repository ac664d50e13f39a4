//! PostgreSQL: the clock shown on the page and the counter of record.

use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_util::sync::CancellationToken;

use super::dependency::{DepError, Dependency};
use super::tls::PostgresTls;

/// Connections in the pool. Requests are coalesced (see `visits`), so a handful is plenty.
const POOL_SIZE: usize = 8;

/// Serialises schema set-up between replicas that start at the same moment: two concurrent
/// `CREATE TABLE IF NOT EXISTS` can both decide to create and one then fails.
pub const SCHEMA_LOCK_ID: i64 = 0x6465_7361_6669_6f33; // "desafio3"

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS visit_counter (
        id         smallint    PRIMARY KEY CHECK (id = 1),
        value      bigint      NOT NULL CHECK (value >= 0),
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    INSERT INTO visit_counter (id, value) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
";

/// `to_char` renders microseconds always with six digits, which `now()::text` does not.
const NOW: &str = "SELECT to_char(now() AT TIME ZONE $1::text, 'YYYY-MM-DD HH24:MI:SS.US')";
const INCREMENT: &str = "UPDATE visit_counter SET value = GREATEST(value, $1) + $2, updated_at = now() \
                         WHERE id = 1 RETURNING value";
const RAISE: &str = "UPDATE visit_counter SET value = GREATEST(value, $1), updated_at = now() \
                     WHERE id = 1 RETURNING value";

pub struct Db {
    pool: Pool,
    timezone: String,
    dependency: Dependency,
}

impl Db {
    /// Creates the pool without connecting, for the same reason as the cache.
    pub fn new(
        config: tokio_postgres::Config,
        tls: &PostgresTls,
        timezone: String,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let manager = Manager::from_config(
            config,
            tls.connector().context("configuring TLS to PostgreSQL")?,
            ManagerConfig {
                // A connection whose server closed it is discarded on checkout. Verifying
                // with a round trip instead would double the latency of every batch; the
                // half-open connections only a round trip would find are dropped by
                // `prepare` when recovering from an outage.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .build()
            .context("building the PostgreSQL pool")?;
        Ok(Self {
            pool,
            timezone,
            dependency: Dependency::new("db", timeout),
        })
    }

    /// The database's `now()`, formatted for the page.
    pub async fn now(&self) -> Result<String, DepError> {
        self.dependency
            .call(async {
                let client = self.pool.get().await?;
                let statement = client.prepare_cached(NOW).await?;
                let row = client.query_one(&statement, &[&self.timezone]).await?;
                Ok::<String, anyhow::Error>(row.try_get(0)?)
            })
            .await
    }

    /// Counts `n` visits in the counter of record (used while the cache is down) and returns
    /// the new total. `floor` is the highest count this process knows of, so the durable
    /// counter never falls behind what the cache handed out before it failed.
    pub async fn increment(&self, n: i64, floor: i64) -> Result<i64, DepError> {
        self.dependency
            .call(self.update(INCREMENT, &[&floor, &n]))
            .await
    }

    /// Write-behind: raises the counter of record to `value` and returns what it holds, which
    /// may be more when other replicas flushed more.
    pub async fn raise(&self, value: i64) -> Result<i64, DepError> {
        self.dependency.call(self.update(RAISE, &[&value])).await
    }

    /// Like [`raise`](Self::raise), but tried even while the database is marked down: the
    /// final flush at shutdown has no later chance.
    pub async fn raise_once_more(&self, value: i64) -> Result<i64, DepError> {
        if !self.dependency.is_up() {
            // Pooled connections may be half-open, or stuck behind a probe that timed out.
            self.pool.retain(|_, _| false);
        }
        self.dependency.attempt(self.update(RAISE, &[&value])).await
    }

    /// Keeps the database's state up to date until `stop` (see [`Dependency::watch`]); every
    /// successful probe hands the durable count to `learn`.
    pub async fn watch(&self, learn: impl Fn(i64), stop: CancellationToken) {
        let probe = || async {
            learn(self.prepare().await?);
            Ok::<(), anyhow::Error>(())
        };
        self.dependency.watch(probe, stop).await;
    }

    /// Readiness: `SELECT 1` on a pooled connection; fails fast while the database is down.
    pub async fn check(&self) -> Result<(), DepError> {
        self.dependency
            .call(async {
                let client = self.pool.get().await?;
                client.query_one("SELECT 1", &[]).await?;
                Ok::<(), anyhow::Error>(())
            })
            .await
    }

    async fn update(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> anyhow::Result<i64> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(sql).await?;
        Ok(client.query_one(&statement, params).await?.try_get(0)?)
    }

    /// The watcher's probe while the database is not up (see `Store::probe_db`): creates the
    /// schema if needed and returns the durable count. It runs at start and after every
    /// outage, which also repairs a dropped table.
    async fn prepare(&self) -> anyhow::Result<i64> {
        // Idle connections from before the outage may be half-open: they would time out
        // instead of failing, and the database would never look up again.
        self.pool.retain(|_, _| false);
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK_ID])
            .await?;
        tx.batch_execute(SCHEMA).await?;
        let value = tx
            .query_one("SELECT value FROM visit_counter WHERE id = 1", &[])
            .await?
            .try_get(0)?;
        tx.commit().await?;
        Ok(value)
    }
}
