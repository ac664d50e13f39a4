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
///
/// A value that is not a plausible count (not digits, or more than [`MAX_COUNT`]) was written
/// by someone else: the script refuses it with the error code `IMPLAUSIBLE` and changes
/// nothing, so the value never reaches an answer or PostgreSQL.
const INCREMENT_WITH_FLOOR: &str = r"
local raw = redis.call('GET', KEYS[1])
local current = nil
if raw then
  if #raw > 15 or not string.match(raw, '^%d+$') then
    return redis.error_reply('IMPLAUSIBLE the counter holds no plausible count')
  end
  current = tonumber(raw)
end
local floor = tonumber(ARGV[2])
if current == nil or current < floor then
  redis.call('SET', KEYS[1], floor)
end
return redis.call('INCRBY', KEYS[1], ARGV[1])
";

/// The largest count accepted from Redis: a million visits a second for thirty years, and still
/// far below where Lua's doubles (2^53) stop being exact. 15 digits, as the script checks.
pub const MAX_COUNT: i64 = 999_999_999_999_999;

/// The error code of the script's refusal.
const IMPLAUSIBLE: &str = "IMPLAUSIBLE";

/// A count read from Redis, if it is one this service could have written.
fn plausible(raw: &str) -> Result<i64, DepError> {
    raw.parse::<i64>()
        .ok()
        .filter(|value| (0..=MAX_COUNT).contains(value))
        .ok_or_else(|| DepError::Invalid(format!("{COUNTER_KEY} holds {raw:.40}")))
}

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
    ///
    /// `password` (from `REDIS_PASSWORD_FILE`) is set on the connection info, never in a URL;
    /// `roots` is what a `rediss://` server must chain to (see `tls::redis_client`).
    pub fn new(
        url: &str,
        password: Option<&str>,
        roots: Option<&TrustRoots>,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let info = redis::IntoConnectionInfo::into_connection_info(url).context("REDIS_URL")?;
        // No `CLIENT SETINFO` on connect: the ACL grants `web` only the commands it uses.
        let mut settings = info.redis_settings().clone().set_skip_set_lib_name();
        if let Some(password) = password {
            settings = settings.set_password(password);
        }
        let info = info.set_redis_settings(settings);
        let client = tls::redis_client(info, roots).context("REDIS_URL")?;
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
    /// A refused value is an error for this call only: Redis answered, so it stays up.
    pub async fn increment(&self, n: u64, floor: i64) -> Result<i64, DepError> {
        let mut conn = self.connection();
        let mut invocation = self.increment.key(COUNTER_KEY);
        invocation.arg(n).arg(floor);
        let counted = async {
            match invocation.invoke_async::<String>(&mut conn).await {
                Ok(total) => Ok(plausible(&total)),
                Err(e) if e.code() == Some(IMPLAUSIBLE) => {
                    Ok(Err(DepError::Invalid(e.to_string())))
                }
                Err(e) => Err(e),
            }
        };
        self.dependency.call(counted).await?
    }

    /// The counter as Redis holds it now (0 when absent), for the write-behind flush.
    pub async fn current(&self) -> Result<i64, DepError> {
        let mut conn = self.connection();
        let value: Option<String> = self
            .dependency
            .call(redis::cmd("GET").arg(COUNTER_KEY).query_async(&mut conn))
            .await?;
        value.map_or(Ok(0), |raw| plausible(&raw))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_counts_this_service_could_have_written_are_accepted() {
        assert_eq!(plausible("0"), Ok(0));
        assert_eq!(plausible("999999999999999"), Ok(MAX_COUNT));
        for poison in [
            "1000000000000000",
            "9223372036854775806",
            "-1",
            "3.5",
            "abc",
            "",
        ] {
            assert!(
                matches!(plausible(poison), Err(DepError::Invalid(_))),
                "{poison}"
            );
        }
    }
}
