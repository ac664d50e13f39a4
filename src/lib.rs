//! The desafio3 `web` service: the seed's visit counter (Redis) and database clock
//! (PostgreSQL) as JSON, kept correct while either dependency comes and goes.

pub mod config;
pub mod healthcheck;
pub mod http;
pub mod secrets;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod telemetry;
#[cfg(test)]
pub(crate) mod test_support;
pub mod visits;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::http::AppState;
use crate::shutdown::ShutdownBudget;
use crate::store::Store;
use crate::visits::Visits;

/// A bound, not yet serving, instance of the service. It owns every task it starts: the
/// batching task, the dependency watchers and the metrics upkeep.
pub struct Application {
    listener: TcpListener,
    router: Router,
    admin_listener: TcpListener,
    admin_router: Router,
    limits: server::Limits,
    budget: ShutdownBudget,
    tasks: Tasks,
}

/// The tasks an [`Application`] started, and the tokens that stop them. Dropping it cancels
/// them all and closes the trackers, so an application built and never run (a start-up that
/// fails after `build`, a test that only binds) leaves no task running on the runtime: each
/// returns at its next await, and `wait()` on a tracker then completes. `run_until` stops them
/// in order instead (it must answer every queued visit before the watchers go), joins them,
/// and drops this last; if its future is dropped midway, this cancels what is left.
struct Tasks {
    /// The batching task alone: closed and awaited after the drain, so that every visit
    /// accepted is answered before the watchers stop.
    batching: TaskTracker,
    close_queue: CancellationToken,
    /// Watchers, metrics upkeep: cancelled and joined last.
    background: TaskTracker,
    stop_background: CancellationToken,
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.close_queue.cancel();
        self.batching.close();
        self.stop_background.cancel();
        self.background.close();
    }
}

impl Application {
    /// Binds the port and starts the background tasks. Does not wait for Redis or
    /// PostgreSQL: the service serves `/healthz` before they exist.
    pub async fn build(config: Config, metrics: PrometheusHandle) -> anyhow::Result<Self> {
        for name in &config.unknown_variables {
            tracing::warn!(
                variable = %name,
                "this environment variable looks like one of web's but is not read: a typo, \
                 or a variable web does not have (any more)"
            );
        }
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
            tasks: Tasks {
                batching,
                close_queue,
                background,
                stop_background,
            },
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
            tasks,
        } = self;
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

        tasks.close_queue.cancel();
        tasks.batching.close();
        if tokio::time::timeout(budget.batch, tasks.batching.wait())
            .await
            .is_err()
        {
            tracing::warn!("the last batch did not finish in time");
        }

        tasks.stop_background.cancel();
        tasks.background.close();
        tasks.background.wait().await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_application_dropped_without_running_stops_its_tasks() {
        let mut config = crate::test_support::unreachable_config();
        (config.port, config.admin_port) = (0, 0);
        let app = Application::build(config, crate::test_support::metrics())
            .await
            .expect("builds");
        let (batching, background) = (app.tasks.batching.clone(), app.tasks.background.clone());
        assert!(
            batching.len() == 1 && background.len() >= 3,
            "tasks started"
        );
        drop(app);
        for tracker in [batching, background] {
            tokio::time::timeout(std::time::Duration::from_secs(1), tracker.wait())
                .await
                .expect("every task stops once the application is dropped");
            assert!(tracker.is_empty());
        }
    }

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
}
