//! The desafio3 `web` service: the seed's visit counter (Redis) and database clock
//! (PostgreSQL) as JSON, kept correct while either dependency comes and goes.

pub mod config;
pub mod healthcheck;
pub mod http;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod visits;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::http::AppState;
use crate::store::Store;
use crate::visits::Visits;

/// What Docker waits between SIGTERM and SIGKILL (`stop_grace_period` in docker-compose.yml;
/// Kubernetes' `terminationGracePeriodSeconds` is longer). The whole shutdown must fit in it,
/// for every dependency timeout `Config` accepts.
pub const STOP_GRACE_PERIOD: Duration = Duration::from_secs(10);

/// How long each step of the shutdown may take, all derived from the dependency timeout `t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownBudget {
    /// Longest a request may take (its answer is then a 503): a first request waits for the
    /// connection attempt in flight (`t`), then Redis's count (`t`), then PostgreSQL's
    /// confirmation and clock, or its own count in place of a failed Redis (`t`).
    pub request: Duration,
    /// In-flight requests finish within `request`; the margin lets their answers go out.
    pub drain: Duration,
    /// The batch still running after the drain, if requests timed out on it: at worst a count
    /// (`t`), a fencing (`2t`), a second count and its confirmation (`2t`).
    pub batch: Duration,
}

impl ShutdownBudget {
    pub fn for_timeout(t: Duration) -> Self {
        Self {
            request: 3 * t,
            drain: 3 * t + Duration::from_millis(250),
            batch: 5 * t,
        }
    }

    pub fn total(&self) -> Duration {
        self.drain + self.batch
    }
}

/// A bound, not yet serving, instance of the service. It owns every task it starts: the
/// batching task, the dependency watchers and the metrics upkeep.
pub struct Application {
    listener: TcpListener,
    router: Router,
    admin_listener: TcpListener,
    admin_router: Router,
    limits: server::Limits,
    budget: ShutdownBudget,
    /// The batching task alone: closed and awaited after the drain, so that every visit
    /// accepted is answered before the watchers stop.
    batching: TaskTracker,
    close_queue: CancellationToken,
    /// Watchers, metrics upkeep: cancelled and joined last.
    background: TaskTracker,
    stop_background: CancellationToken,
}

impl Application {
    /// Binds the port and starts the background tasks. Does not wait for Redis or
    /// PostgreSQL: the service serves `/healthz` before they exist.
    pub async fn build(config: Config, metrics: PrometheusHandle) -> anyhow::Result<Self> {
        let listener = bind(config.port).await?;
        let admin_listener = bind(config.admin_port).await?;
        let store = Store::new(&config.store)?;
        let (background, stop_background) = (TaskTracker::new(), CancellationToken::new());
        telemetry::spawn_metrics_upkeep(metrics.clone(), &background, stop_background.clone());
        store.spawn_tasks(&background, &stop_background);
        let (batching, close_queue) = (TaskTracker::new(), CancellationToken::new());
        let visits = Visits::spawn(Arc::clone(&store), &batching, close_queue.clone());
        let budget = ShutdownBudget::for_timeout(config.store.dependency_timeout);
        let state = AppState {
            store,
            visits,
            metrics,
            request_timeout: budget.request,
        };
        Ok(Self {
            listener,
            router: http::public_router(state.clone()),
            admin_listener,
            admin_router: http::admin_router(state),
            limits: server::Limits {
                max_connections: config.max_connections,
                max_per_address: config.max_connections_per_address,
                header_timeout: config.http_header_timeout,
                write_timeout: config.http_write_timeout,
                max_age: config.http_connection_max_age,
            },
            budget,
            batching,
            close_queue,
            background,
            stop_background,
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub fn admin_port(&self) -> u16 {
        self.admin_listener
            .local_addr()
            .map(|a| a.port())
            .unwrap_or(0)
    }

    /// Serves until `shutdown` completes, then: stops accepting, drains (each request bounded
    /// by the request timeout), closes the batch queue and awaits it, and cancels and joins the
    /// background tasks. There is nothing to flush: every count answered is already in
    /// PostgreSQL. If this future is dropped instead, the tasks are cancelled too.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Self {
            listener,
            router,
            admin_listener,
            admin_router,
            limits,
            budget,
            batching,
            close_queue,
            background,
            stop_background,
        } = self;
        let _cancel_on_drop = (
            close_queue.clone().drop_guard(),
            stop_background.clone().drop_guard(),
        );
        tracing::info!(
            port = listener.local_addr()?.port(),
            admin_port = admin_listener.local_addr()?.port(),
            "listening"
        );
        let stop_serving = CancellationToken::new();
        let signalled = async {
            shutdown.await;
            stop_serving.cancel();
        };
        tokio::join!(
            signalled,
            server::serve(
                listener,
                router,
                limits,
                stop_serving.cancelled(),
                budget.drain
            ),
            server::serve(
                admin_listener,
                admin_router,
                limits,
                stop_serving.cancelled(),
                budget.drain
            ),
        );

        close_queue.cancel();
        batching.close();
        if tokio::time::timeout(budget.batch, batching.wait())
            .await
            .is_err()
        {
            tracing::warn!("the last batch did not finish in time");
        }

        stop_background.cancel();
        background.close();
        background.wait().await;
        tracing::info!("stopped; bye");
        Ok(())
    }
}

/// Listens on every IPv4 address (`0.0.0.0`), not on IPv6: what the container and the
/// Service need, and what README promises for `PORT` and `ADMIN_PORT`.
async fn bind(port: u16) -> anyhow::Result<TcpListener> {
    let address = SocketAddr::from(([0, 0, 0, 0], port));
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket
        .set_reuseaddr(true)
        .and_then(|()| socket.bind(address))
        .and_then(|()| socket.listen(server::LISTEN_BACKLOG))
        .with_context(|| format!("binding {address}"))
}

/// What unit tests share: a store whose dependencies refuse connections (closed loopback
/// ports: real refusals, no servers needed) and the metrics recorder.
#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::{Arc, OnceLock};

    use metrics_exporter_prometheus::PrometheusHandle;

    use crate::config::Config;
    use crate::store::Store;

    fn closed_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port")
    }

    pub fn unreachable_config() -> Config {
        let (redis_port, pg_port) = (closed_port(), closed_port());
        Config::from_lookup(|name| match name {
            "REDIS_URL" => Some(format!("redis://127.0.0.1:{redis_port}/0").into()),
            "DATABASE_URL" => Some(format!("postgres://u@127.0.0.1:{pg_port}/d").into()),
            "DEPENDENCY_TIMEOUT_MS" => Some("300".into()),
            _ => None,
        })
        .expect("config")
    }

    pub fn unreachable_store() -> Arc<Store> {
        Store::new(&unreachable_config().store).expect("store")
    }

    pub fn metrics() -> PrometheusHandle {
        static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
        HANDLE
            .get_or_init(|| crate::telemetry::install_metrics().expect("one recorder"))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listeners_are_on_every_ipv4_address_only() {
        let listener = bind(0).await.expect("binds");
        let address = listener.local_addr().expect("address");
        assert_eq!(address.ip(), std::net::IpAddr::from([0, 0, 0, 0]));
        let port = address.port();
        assert!(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        );
        // IPv6 loopback, where the host has it: nothing there.
        if std::net::TcpListener::bind("[::1]:0").is_ok() {
            assert!(tokio::net::TcpStream::connect(("::1", port)).await.is_err());
        }
    }

    #[test]
    fn shutdown_fits_the_grace_period_for_every_accepted_timeout() {
        let longest = Duration::from_millis(config::MAX_DEPENDENCY_TIMEOUT_MS);
        let budget = ShutdownBudget::for_timeout(longest);
        assert!(
            budget.total() < STOP_GRACE_PERIOD,
            "{budget:?} totals {:?}",
            budget.total()
        );
    }

    #[test]
    fn the_compose_file_gives_web_the_grace_period_the_budget_assumes() {
        let compose = include_str!("../docker-compose.yml");
        let web = compose
            .split("\n  cache:")
            .next()
            .expect("the web service comes first");
        let expected = format!("stop_grace_period: {}s", STOP_GRACE_PERIOD.as_secs());
        assert!(web.contains(&expected), "web lacks {expected}");
    }
}
