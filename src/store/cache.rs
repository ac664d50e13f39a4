//! Redis: the live visit counter.

use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use anyhow::Context;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio_util::sync::CancellationToken;

use super::dependency::{DepError, Dependency};
use super::tls::{self, TrustRoots};

/// The key the seed's Flask app used; kept so the counter survives a switch between the two.
pub const COUNTER_KEY: &str = "visitas";

/// Adds `ARGV[1]` visits and returns the new total, after raising the counter to the floor
/// `ARGV[2]` when it is below it. A counter below the floor means Redis lost data (restarted
/// empty, FLUSHALL, an older append-only file): the floor is the highest count this process
/// knows was handed out or made durable, so counting never goes backwards.
///
/// A process that has not reached PostgreSQL yet has only its own counts as a floor (zero
/// right after start). Redis then counts from what it holds, as the outage table requires;
/// once PostgreSQL answers, its durable count becomes the floor and the next increment
/// lifts Redis above it.
const INCREMENT_WITH_FLOOR: &str = r"
local current = tonumber(redis.call('GET', KEYS[1]))
local floor = tonumber(ARGV[2])
if current == nil or current < floor then
  redis.call('SET', KEYS[1], floor)
end
return redis.call('INCRBY', KEYS[1], ARGV[1])
";

pub struct Cache {
    /// The live, multiplexed connection; replaced only by a recovery probe (see `ping`).
    connection: RwLock<ConnectionManager>,
    client: redis::Client,
    config: ConnectionManagerConfig,
    increment: redis::Script,
    dependency: Dependency,
}

impl Cache {
    /// Creates the client without connecting: the service must start, and serve `/healthz`,
    /// before Redis exists. The connection manager reconnects by itself afterwards.
    /// `roots`: what a `rediss://` server must chain to (see `tls::redis_client`).
    pub fn new(url: &str, roots: Option<&TrustRoots>, timeout: Duration) -> anyhow::Result<Self> {
        let client = tls::redis_client(url, roots).context("REDIS_URL")?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let connection = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
            .context("creating the Redis connection manager")?;
        Ok(Self {
            connection: RwLock::new(connection),
            client,
            config,
            increment: redis::Script::new(INCREMENT_WITH_FLOOR),
            dependency: Dependency::new("cache", timeout),
        })
    }

    /// Counts `n` visits at once and returns the new total; the caller hands out the `n` values
    /// ending there.
    pub async fn increment(&self, n: u64, floor: i64) -> Result<i64, DepError> {
        let mut conn = self.connection();
        let mut invocation = self.increment.key(COUNTER_KEY);
        invocation.arg(n).arg(floor);
        self.dependency
            .call(invocation.invoke_async::<i64>(&mut conn))
            .await
    }

    /// The counter as Redis holds it now (0 when absent), for the write-behind flush.
    pub async fn current(&self) -> Result<i64, DepError> {
        let mut conn = self.connection();
        let value: Option<i64> = self
            .dependency
            .call(redis::cmd("GET").arg(COUNTER_KEY).query_async(&mut conn))
            .await?;
        Ok(value.unwrap_or(0))
    }

    fn connection(&self) -> ConnectionManager {
        self.connection
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Keeps the cache's state up to date until `stop` (see [`Dependency::watch`]).
    pub async fn watch(&self, stop: CancellationToken) {
        self.dependency.watch(|| self.reconnect(), stop).await;
    }

    /// Readiness: one `PING` over the live connection. While the cache is down this fails
    /// fast with the reason; it never opens a connection of its own.
    pub async fn check(&self) -> Result<(), DepError> {
        let mut conn = self.connection();
        self.dependency
            .call(redis::cmd("PING").query_async::<String>(&mut conn))
            .await
            .map(drop)
    }

    /// The watcher's probe while the cache is not up: a `PING` over a new connection, which
    /// replaces the live one when it answers. The connection manager reconnects by itself
    /// only when a connection is reported closed; one cut off by the network just times out,
    /// and after the network heals TCP's retransmission backoff can keep it silent for
    /// seconds longer than a fresh connection needs. The swap happens before the watcher marks
    /// the cache up, so no batch sees the cache up while it still holds the dead connection.
    async fn reconnect(&self) -> Result<(), redis::RedisError> {
        let mut conn =
            ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone())?;
        redis::cmd("PING").query_async::<String>(&mut conn).await?;
        *self
            .connection
            .write()
            .unwrap_or_else(PoisonError::into_inner) = conn;
        Ok(())
    }
}
