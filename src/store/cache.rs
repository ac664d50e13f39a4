//! Redis: the live visit counter.

use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use anyhow::Context;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio_util::sync::CancellationToken;

use super::error::DepError;
use super::health::Dependency;
use super::tls::{self, TrustRoots};

/// The key the seed's Flask app used; kept so the counter survives a switch between the two.
pub const COUNTER_KEY: &str = "visitas";

/// The fence this Redis counts under: a hash of the fencing `token` (gone after a
/// `FLUSHALL`) and the `top` of the counter as this service last left it (a counter below it
/// went back: someone lowered it, or an older copy of it was restored).
pub const FENCE_KEY: &str = "visitas:fence";

/// The first lines of both scripts: `id`, the identity of this Redis's data, which changes
/// whenever the data may have been replaced. `run_id` is new at every start of the process (so a
/// restart from an older file is noticed); `master_replid` is new on every start and promotion,
/// and is taken from the master on a full resync (so a server whose data was replaced by a copy,
/// as a failover and failback or a repaired replica do, is noticed although its `run_id` stays).
/// Then the counter's value, refused unless it is a count this service could have written:
/// digits, at most [`MAX_PLAUSIBLE`] (the literal in the script).
macro_rules! script {
    ($body:literal) => {
        concat!(
            "local info = redis.call('INFO', 'server', 'replication')
local id = string.match(info, 'run_id:(%x+)') .. ':' .. string.match(info, 'master_replid:(%x+)')
local raw = redis.call('GET', KEYS[1])
if raw and (#raw > 15 or not string.match(raw, '^%d+$') or tonumber(raw) > 999999998999999) then
  return redis.error_reply('IMPLAUSIBLE the counter holds no plausible count')
end
local token, top = unpack(redis.call('HMGET', KEYS[2], 'token', 'top'))
",
            $body
        )
    };
}

/// Adds `ARGV[1]` visits and returns the new total, if this Redis is still the one the caller
/// was told may count: its fence (`ARGV[2]`) names this Redis's data (`id`) and the token, and
/// the counter is not below its top. Otherwise the error code `UNFENCED`, with nothing counted:
/// the caller fences again (`docs/counting.md`). A missing counter is never counted from zero.
///
/// A value that is not a plausible count (not digits, or more than [`MAX_PLAUSIBLE`]) was written
/// by someone else: the script refuses it with the error code `IMPLAUSIBLE` and changes
/// nothing, so the value never reaches an answer or PostgreSQL.
const COUNT: &str = script!(
    r"if not raw or not token or not top or id .. ':' .. token ~= ARGV[2] then
  return redis.error_reply('UNFENCED this Redis is not the fenced counter')
end
if tonumber(raw) < tonumber(top) then
  return redis.error_reply('UNFENCED the counter went back')
end
local total = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], 'top', total)
return total
"
);

/// Fences this Redis. When the fence of record (`ARGV[3]`) still names this Redis's data and
/// token, it is kept, and the counter is only held to its own top (a counter below it was
/// lowered: raised, and the fence renewed). Otherwise the counter is raised to the counter of
/// record PostgreSQL held when asked (`ARGV[1]`) and to its top, and the new token `ARGV[2]`
/// is written, so that counts taken under any older fence can no longer be confirmed.
///
/// A kept fence is not raised to PostgreSQL's value: under the same data and token, every
/// count handed out came from this counter, so a value above it can only be a confirmation
/// sent ahead for a batch this Redis is still to count (or that was never answered).
/// Raising and renewing there would refuse that batch after its confirmation went through,
/// skipping its numbers with no fault at all, and unfence every other replica.
/// Returns the counter and the fence now in force; the caller records a new fence in
/// PostgreSQL only if the row has not moved meanwhile.
const FENCE: &str = script!(
    r"local renew = not token or id .. ':' .. token ~= ARGV[3]
local floor = '0'
if renew then
  floor = ARGV[1]
end
if top and tonumber(top) > tonumber(floor) then
  floor = top
end
if not raw or tonumber(raw) < tonumber(floor) then
  raw = floor
  redis.call('SET', KEYS[1], raw)
  renew = true
end
if renew then
  token = ARGV[2]
end
redis.call('HSET', KEYS[2], 'token', token, 'top', raw)
return {raw, id .. ':' .. token}
"
);

/// The largest count accepted from Redis, and the most the counter of record may hold
/// (PostgreSQL's `CHECK`): a million visits a second for thirty years, and still far below
/// where Lua's doubles (2^53) stop being exact. 15 digits.
pub const MAX_COUNT: i64 = 999_999_999_999_999;

/// The largest value the scripts take from the counter key: a million below [`MAX_COUNT`], so
/// that no batch counted on top of a plausible value, and no fencing that lifts the counter of
/// record to it, can reach the maximum. A value planted near the maximum is refused like any
/// other poison instead of being copied into PostgreSQL.
pub const MAX_PLAUSIBLE: i64 = MAX_COUNT - 1_000_000;

/// The error codes of the scripts' refusals.
const IMPLAUSIBLE: &str = "IMPLAUSIBLE";
const UNFENCED: &str = "UNFENCED";

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
    count: redis::Script,
    fence: redis::Script,
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
            count: redis::Script::new(COUNT),
            fence: redis::Script::new(FENCE),
            dependency: Dependency::new("cache", timeout),
        })
    }

    /// Why the cache is down, if it is known to be, without a round trip.
    pub fn down_reason(&self) -> Option<DepError> {
        self.dependency.down_reason()
    }

    /// Counts `n` visits at once under `fence` and returns the new total (the caller hands out
    /// the `n` values ending there once PostgreSQL confirms them), or `None` when this Redis is
    /// not under that fence any more: nothing was counted.
    /// A refused value is an error for this call only: Redis answered, so it stays up.
    pub async fn count(&self, n: u64, fence: &str) -> Result<Option<i64>, DepError> {
        let mut conn = self.connection();
        let mut invocation = self.count.key(COUNTER_KEY);
        invocation.key(FENCE_KEY).arg(n).arg(fence);
        let counted = async {
            match invocation.invoke_async::<String>(&mut conn).await {
                Ok(total) => Ok(plausible(&total).map(Some)),
                Err(e) if e.code() == Some(UNFENCED) => Ok(Ok(None)),
                Err(e) if e.code() == Some(IMPLAUSIBLE) => {
                    Ok(Err(DepError::Invalid(e.to_string())))
                }
                Err(e) => Err(e),
            }
        };
        self.dependency.call(counted).await?
    }

    /// Fences this Redis (see [`FENCE`]): the counter at least `floor`, and the fence in force,
    /// `held` if it still holds, else one made of `token`. Returns the counter and that fence.
    pub async fn fence(
        &self,
        floor: i64,
        token: &str,
        held: &str,
    ) -> Result<(i64, String), DepError> {
        let mut conn = self.connection();
        let mut invocation = self.fence.key(COUNTER_KEY);
        invocation.key(FENCE_KEY).arg(floor).arg(token).arg(held);
        let fenced = async {
            match invocation.invoke_async::<(String, String)>(&mut conn).await {
                Ok((counter, fence)) => Ok(plausible(&counter).map(|counter| (counter, fence))),
                Err(e) if e.code() == Some(IMPLAUSIBLE) => {
                    Ok(Err(DepError::Invalid(e.to_string())))
                }
                Err(e) => Err(e),
            }
        };
        self.dependency.call(fenced).await?
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
    fn both_scripts_refuse_a_counter_above_the_plausible_maximum() {
        for script in [COUNT, FENCE] {
            assert!(script.contains(&format!("tonumber(raw) > {MAX_PLAUSIBLE})")));
        }
    }

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
