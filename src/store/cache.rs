//! Redis: the live visit counter.

use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use anyhow::Context;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio_util::sync::CancellationToken;

use super::error::{DepError, FunctionsMissing};
use super::health::Dependency;
use super::tls::{self, TrustRoots};

/// The key the seed's Flask app used; kept so the counter survives a switch between the two.
pub const COUNTER_KEY: &str = "visitas";

/// The fence this Redis counts under: a hash of the fencing `token` (gone after a
/// `FLUSHALL`) and the `top` of the counter as this service last left it (a counter below it
/// went back: someone lowered it, or an older copy of it was restored).
pub const FENCE_KEY: &str = "visitas:fence";

/// The counting functions, `desafio3_count` and `desafio3_fence`, are a Redis Functions
/// library (`deploy/kubernetes/base/cache/functions/desafio3.lua`, which says what each does),
/// loaded by Redis's `admin` user, not by this service: `web` may call them (`FCALL`) but not
/// run Lua of its own, so it cannot wedge Redis with a script that never returns.
const COUNT: &str = "desafio3_count";
const FENCE: &str = "desafio3_fence";
/// Answers (with the loaded library's version) when the library is loaded: the readiness
/// check and the recovery probe call it, so that a Redis without the functions is not up.
const LOADED: &str = "desafio3_version";

/// The largest count accepted from Redis, and the most the counter of record may hold
/// (PostgreSQL's `CHECK`): a million visits a second for thirty years, and still far below
/// where Lua's doubles (2^53) stop being exact. 15 digits.
pub const MAX_COUNT: i64 = 999_999_999_999_999;

/// The largest value the functions take from the counter key: a million below [`MAX_COUNT`], so
/// that no batch counted on top of a plausible value, and no fencing that lifts the counter of
/// record to it, can reach the maximum. A value planted near the maximum is refused like any
/// other poison instead of being copied into PostgreSQL.
pub const MAX_PLAUSIBLE: i64 = MAX_COUNT - 1_000_000;

/// The error codes of the functions' refusals.
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
        let mut call = counting(COUNT);
        call.arg(n).arg(fence);
        let counted = async {
            match call.query_async::<String>(&mut conn).await {
                Ok(total) => Ok(plausible(&total).map(Some)),
                Err(e) if e.code() == Some(UNFENCED) => Ok(Ok(None)),
                Err(e) if e.code() == Some(IMPLAUSIBLE) => {
                    Ok(Err(DepError::Invalid(e.to_string())))
                }
                Err(e) => Err(unless_functions_missing(e)),
            }
        };
        self.dependency.call(counted).await?
    }

    /// Fences this Redis (`desafio3_fence`): the counter at least `floor`, and the fence in
    /// force, `held` if it still holds, else one made of `token`. Returns the counter and that
    /// fence.
    pub async fn fence(
        &self,
        floor: i64,
        token: &str,
        held: &str,
    ) -> Result<(i64, String), DepError> {
        let mut conn = self.connection();
        let mut call = counting(FENCE);
        call.arg(floor).arg(token).arg(held);
        let fenced = async {
            match call.query_async::<(String, String)>(&mut conn).await {
                Ok((counter, fence)) => Ok(plausible(&counter).map(|counter| (counter, fence))),
                Err(e) if e.code() == Some(IMPLAUSIBLE) => {
                    Ok(Err(DepError::Invalid(e.to_string())))
                }
                Err(e) => Err(unless_functions_missing(e)),
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

    /// Readiness: one call of the library's version function over the live connection, so
    /// that a Redis without the functions is not ready. While the cache is down this fails
    /// fast with the reason; it never opens a connection of its own.
    pub async fn check(&self) -> Result<(), DepError> {
        let mut conn = self.connection();
        self.dependency.call(functions_loaded(&mut conn)).await
    }

    /// The watcher's probe while the cache is not up: the version function over a new
    /// connection, which replaces the live one when it answers. The connection manager
    /// reconnects by itself only when a connection is reported closed; one cut off by the
    /// network just times out, and after the network heals TCP's retransmission backoff can
    /// keep it silent for seconds longer than a fresh connection needs. The swap happens
    /// before the watcher marks the cache up, so no batch sees the cache up while it still
    /// holds the dead connection.
    async fn reconnect(&self) -> anyhow::Result<()> {
        let mut conn =
            ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone())?;
        functions_loaded(&mut conn).await?;
        *self
            .connection
            .write()
            .unwrap_or_else(PoisonError::into_inner) = conn;
        Ok(())
    }
}

/// `FCALL function 2 visitas visitas:fence`, for the caller to add the arguments.
fn counting(function: &str) -> redis::Cmd {
    let mut call = redis::cmd("FCALL");
    call.arg(function).arg(2).arg(COUNTER_KEY).arg(FENCE_KEY);
    call
}

/// Whether Redis holds the counting functions: the version function answers.
async fn functions_loaded(conn: &mut ConnectionManager) -> anyhow::Result<()> {
    redis::cmd("FCALL_RO")
        .arg(LOADED)
        .arg(0)
        .query_async::<String>(conn)
        .await
        .map(drop)
        .map_err(unless_functions_missing)
}

/// A call's error, typed as [`FunctionsMissing`] when Redis answered that it has no such
/// function (they are not loaded yet, or any more: its data was replaced), so that it reads
/// "functions not loaded" from the first failed call on. Redis gives that answer no code of
/// its own (`ERR Function not found`), so the plain error code is told apart by its text.
fn unless_functions_missing(e: redis::RedisError) -> anyhow::Error {
    use redis::{ErrorKind, ServerErrorKind};
    let missing = e.kind() == ErrorKind::Server(ServerErrorKind::ResponseError)
        && e.detail()
            .is_some_and(|d| d.starts_with("Function not found"));
    if missing {
        FunctionsMissing(e).into()
    } else {
        e.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The library, as the cache healthcheck loads it.
    const LIBRARY: &str = include_str!("../../deploy/kubernetes/base/cache/functions/desafio3.lua");

    #[test]
    fn the_functions_refuse_a_counter_above_the_plausible_maximum() {
        assert!(LIBRARY.contains(&format!("tonumber(raw) > {MAX_PLAUSIBLE})")));
    }

    #[test]
    fn the_library_registers_the_functions_called_here() {
        for function in [COUNT, FENCE, LOADED] {
            assert!(LIBRARY.contains(&format!("'{function}'")), "{function}");
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
