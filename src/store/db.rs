//! PostgreSQL: the clock shown on the page and the counter of record.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_util::sync::CancellationToken;

use super::error::DepError;
use super::health::Dependency;
use super::tls::PostgresTls;

/// Connections in the pool. Requests are coalesced (see `visits`), so a handful is plenty.
const POOL_SIZE: usize = 8;

/// Serialises schema set-up between replicas that start at the same moment: two concurrent
/// `CREATE TABLE IF NOT EXISTS` can both decide to create and one then fails.
pub const SCHEMA_LOCK_ID: i64 = 0x6465_7361_6669_6f33; // "desafio3"

/// Lets one replica fence at a time: replicas that fence at once would renew each other's
/// tokens and withhold each other's counts.
const FENCING_LOCK_ID: i64 = SCHEMA_LOCK_ID + 1;
const TRY_FENCING_LOCK: &str = "SELECT pg_try_advisory_xact_lock($1)";

/// The fence of a counter row that this process had to create: PostgreSQL must not count by
/// itself from 0 while Redis may hold a higher count. No Redis fence has this value, so nothing
/// is confirmed under it either; the first fencing lifts the row to Redis's counter.
pub const UNLIFTED: &str = "unlifted";

/// Run once, at the first connection (never by a recovery probe: a lock behind a frozen
/// session would stall it). The counter of record never exceeds `cache::MAX_COUNT` (the
/// `CHECK`, added `NOT VALID` to a table from before it, so an old row cannot stop start-up). `fence` names the Redis that may count (its data and fencing
/// token, see `cache`), is empty while PostgreSQL counts itself, or is [`UNLIFTED`]. Tables
/// from before fencing gain the column; the `ALTER`, which locks the table exclusively even
/// when the column exists, runs only when it is missing.
const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS visit_counter (
        id         smallint    PRIMARY KEY CHECK (id = 1),
        value      bigint      NOT NULL CHECK (value >= 0),
        updated_at timestamptz NOT NULL DEFAULT now(),
        fence      text        NOT NULL DEFAULT ''
    );
    DO $$ BEGIN
        IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                       WHERE table_schema = current_schema() AND table_name = 'visit_counter'
                         AND column_name = 'fence') THEN
            ALTER TABLE visit_counter ADD COLUMN fence text NOT NULL DEFAULT '';
        END IF;
    END $$;
    DO $$ BEGIN
        IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'visit_counter_value_max'
                       AND conrelid = 'visit_counter'::regclass) THEN
            ALTER TABLE visit_counter ADD CONSTRAINT visit_counter_value_max
                CHECK (value <= 999999999999999) NOT VALID;
        END IF;
    END $$;
    INSERT INTO visit_counter (id, value, fence) VALUES (1, 0, 'unlifted') ON CONFLICT (id) DO NOTHING;
";

/// The row that schema set-up reads back: proves the table is there without taking any lock
/// a reader would wait on.
const CHECK_TABLE: &str = "SELECT value FROM visit_counter WHERE id = 1";

/// The database clock as the page shows it, in the time zone bound to parameter `$tz`, for
/// every statement that reads it. `to_char` renders microseconds always with six digits,
/// which `now()::text` does not.
macro_rules! clock {
    ($tz:literal) => {
        concat!(
            "to_char(now() AT TIME ZONE ",
            $tz,
            "::text, 'YYYY-MM-DD HH24:MI:SS.US')"
        )
    };
}

const NOW: &str = concat!("SELECT ", clock!("$1"));

/// Records a batch counted in Redis, in the round trip that reads the clock: the counter of
/// record rises to the batch's total if, and only if, the batch was counted under the fence in
/// force. The row lock orders this against fencing and against counting in PostgreSQL. Only a
/// confirmation that raises the counter renews Redis's lease (`updated_at`): one sent ahead
/// for a batch Redis then refused (a poisoned counter) must not keep PostgreSQL from counting.
const CONFIRM: &str = concat!(
    "UPDATE visit_counter SET value = GREATEST(value, $1),
                             updated_at = CASE WHEN $1 > value THEN now() ELSE updated_at END
     WHERE id = 1 AND fence = $2 AND fence <> ''
     RETURNING ",
    clock!("$3")
);

/// Counts a batch in PostgreSQL itself, and reads the clock: allowed once no Redis batch was
/// confirmed for the lease (`$2` ms), and then it lifts the fence, so that Redis counts taken
/// meanwhile are never confirmed. NULL while the lease holds, and while the row is
/// [`UNLIFTED`].
const COUNT_HERE: &str = concat!(
    "WITH counted AS (
         UPDATE visit_counter SET value = value + $1, fence = '', updated_at = now()
         WHERE id = 1 AND fence <> 'unlifted'
           AND (fence = '' OR updated_at < now() - $2::bigint * interval '1 millisecond')
         RETURNING value)
     SELECT (SELECT value FROM counted), ",
    clock!("$3")
);

const READ_FENCE: &str = "SELECT value, fence FROM visit_counter WHERE id = 1";

/// Records a new fence, compare-and-set: only if the fence is still the one read before Redis
/// was fenced (`$3`), and the counter of record is not above what Redis now holds (PostgreSQL
/// did not count past it meanwhile).
const RECORD_FENCE: &str = "UPDATE visit_counter SET value = GREATEST(value, $1), fence = $2, \
                            updated_at = now() WHERE id = 1 AND fence = $3 AND value <= $1 \
                            RETURNING value";

/// What a fencing left: the counter Redis holds, the fence in force there, whether Redis
/// renewed it, and whether it is the fence of record (a renewed one may not be).
pub struct Fenced {
    pub counter: i64,
    pub fence: String,
    pub renewed: bool,
    pub recorded: bool,
}

pub struct Db {
    pool: Pool,
    timezone: String,
    dependency: Dependency,
    /// Set once the schema is in place; recovery probes then only read.
    schema_ready: AtomicBool,
}

/// Server-side bounds on every session `web` opens, and the durability a confirmation relies
/// on, whatever the server's defaults: a statement, a lock wait or a transaction left idle by
/// a frozen or cut-off replica is ended by the server itself. TCP keepalives and a user
/// timeout let the client's kernel drop a half-open connection. Connecting never takes longer
/// than any other call.
fn bounded(mut config: tokio_postgres::Config, timeout: Duration) -> tokio_postgres::Config {
    let ms = timeout.as_millis();
    let ours = format!(
        "-c statement_timeout={} -c lock_timeout={ms} -c idle_in_transaction_session_timeout={} \
         -c synchronous_commit=on",
        2 * ms,
        2 * ms
    );
    let options = match config.get_options() {
        Some(theirs) if !theirs.is_empty() => format!("{theirs} {ours}"),
        _ => ours,
    };
    config
        .options(options)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(5))
        .keepalives_interval(Duration::from_secs(1))
        .keepalives_retries(3)
        .tcp_user_timeout(4 * timeout)
        .connect_timeout(timeout)
        .application_name("desafio3-web");
    config
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
            bounded(config, timeout),
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
            schema_ready: AtomicBool::new(false),
        })
    }

    /// The database's `now()`, formatted for the page.
    pub async fn now(&self) -> Result<String, DepError> {
        self.dependency
            .call(async {
                let row = self.row(NOW, &[&self.timezone]).await?;
                Ok::<String, anyhow::Error>(row.context("no clock")?.try_get(0)?)
            })
            .await
    }

    /// Why counting must not start, without a round trip: PostgreSQL is known to be down, so a
    /// batch counted in Redis now could never be confirmed.
    pub fn down_reason(&self) -> Option<DepError> {
        self.dependency.down_reason()
    }

    /// Confirms a batch Redis counted under `fence` up to `total` (see [`CONFIRM`]); returns
    /// whether it was confirmed, and the clock (read apart when it was not: rare).
    pub async fn confirm(&self, total: i64, fence: &str) -> Result<(bool, String), DepError> {
        let confirmed = self.dependency.call(async {
            let row = self.row(CONFIRM, &[&total, &fence, &self.timezone]).await?;
            Ok::<_, anyhow::Error>(row.map(|row| row.try_get(0)).transpose()?)
        });
        match confirmed.await? {
            Some(clock) => Ok((true, clock)),
            None => Ok((false, self.now().await?)),
        }
    }

    /// Counts `n` visits in PostgreSQL itself once Redis's `lease` has run out (see
    /// [`COUNT_HERE`]); returns the new total, `None` while the lease holds, and the clock.
    pub async fn count_here(
        &self,
        n: i64,
        lease: Duration,
    ) -> Result<(Option<i64>, String), DepError> {
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        self.dependency
            .call(async {
                let row = self
                    .row(COUNT_HERE, &[&n, &lease_ms, &self.timezone])
                    .await?;
                let row = row.context("no count")?;
                Ok::<_, anyhow::Error>((row.try_get(0)?, row.try_get(1)?))
            })
            .await
    }

    /// Fences Redis, one replica at a time: in a transaction that holds the fencing lock (an
    /// advisory lock, taken without waiting: `None` when another replica holds it), reads the
    /// counter and fence of record, hands them to `fence_redis`, and records a fence it
    /// renewed only if the row did not move meanwhile (see [`RECORD_FENCE`]). No row is
    /// locked while Redis is asked, so confirmations and PostgreSQL's own counting go on; a
    /// replica that freezes while it fences loses the lock when the server ends its idle
    /// transaction (`idle_in_transaction_session_timeout`). Returns what Redis holds, the
    /// fence in force and whether it is the fence of record ([`Fenced`]). The outer error is
    /// PostgreSQL's, the inner one Redis's.
    pub async fn fence<F, Fut>(
        &self,
        fence_redis: F,
    ) -> Result<Option<Result<Fenced, DepError>>, DepError>
    where
        F: FnOnce(i64, String) -> Fut,
        Fut: std::future::Future<Output = Result<(i64, String), DepError>>,
    {
        let dep = &self.dependency;
        let mut client = dep.call(self.pool.get()).await?;
        let tx = dep.call(client.transaction()).await?;
        let locked = dep
            .call(tx.query_one(TRY_FENCING_LOCK, &[&FENCING_LOCK_ID]))
            .await?;
        if !dep.call(async { locked.try_get::<_, bool>(0) }).await? {
            return Ok(None);
        }
        let row = dep.call(tx.query_one(READ_FENCE, &[])).await?;
        let (floor, held): (i64, String) = dep
            .call(async { Ok::<_, tokio_postgres::Error>((row.try_get(0)?, row.try_get(1)?)) })
            .await?;
        let (counter, fence) = match fence_redis(floor, held.clone()).await {
            Ok(fenced) => fenced,
            Err(e) => return Ok(Some(Err(e))),
        };
        let renewed = fence != held;
        let recorded = !renewed
            || dep
                .call(tx.query_opt(RECORD_FENCE, &[&counter, &fence, &held]))
                .await?
                .is_some();
        dep.call(tx.commit()).await?;
        Ok(Some(Ok(Fenced {
            counter,
            fence,
            renewed,
            recorded,
        })))
    }

    /// Keeps the database's state up to date until `stop` (see [`Dependency::watch`]).
    pub async fn watch(&self, stop: CancellationToken) {
        self.dependency.watch(|| self.prepare(), stop).await;
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

    /// The row a prepared statement returns, if any, on a pooled connection.
    async fn row(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> anyhow::Result<Option<tokio_postgres::Row>> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(sql).await?;
        Ok(client.query_opt(&statement, params).await?)
    }

    /// The watcher's probe while the database is not up. The first one that reaches the
    /// database sets up the schema; later ones only read the counter row over a new connection:
    /// a dropped table then keeps the database down, named in the log, instead of being made
    /// again at 0.
    async fn prepare(&self) -> anyhow::Result<()> {
        // Idle connections from before the outage may be half-open: they would time out
        // instead of failing, and the database would never look up again.
        self.pool.retain(|_, _| false);
        let mut client = self.pool.get().await?;
        if !self.schema_ready.load(Ordering::Acquire) {
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK_ID])
                .await?;
            tx.batch_execute(SCHEMA).await?;
            tx.commit().await?;
            self.schema_ready.store(true, Ordering::Release);
        }
        client
            .query_one(CHECK_TABLE, &[])
            .await
            .context("reading the counter of record")?;
        Ok(())
    }
}
