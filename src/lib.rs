//! The desafio3 `web` service: the seed's visit counter (Redis) and database clock
//! (PostgreSQL) as JSON, kept correct while either dependency comes and goes.

pub mod config;
pub mod healthcheck;
pub mod http;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod visits;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::http::AppState;
use crate::store::Store;
use crate::visits::Visits;

/// In-flight requests get this long to finish after a shutdown signal; with dependency
/// calls bounded by their timeout they need far less. Together with the final flush it stays
/// inside the 10 s that Docker and Kubernetes wait before SIGKILL.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(7);

/// A bound, not yet serving, instance of the service.
pub struct Application {
    listener: TcpListener,
    state: AppState,
}

impl Application {
    /// Binds the port and starts the background tasks (reconnection, flushing). Does not
    /// wait for Redis or PostgreSQL: the service serves `/healthz` before they exist.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let address = SocketAddr::from(([0, 0, 0, 0], config.port));
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("binding {address}"))?;
        // Install the recorder before anything records.
        telemetry::spawn_metrics_upkeep();
        let store = Store::new(&config)?;
        store.spawn_background(config.flush_interval);
        let visits = Visits::spawn(store.clone());
        Ok(Self {
            listener,
            state: AppState { store, visits },
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Serves until `shutdown` completes, then stops accepting, lets in-flight requests finish
    /// and writes the counter to PostgreSQL one last time.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self { listener, state } = self;
        let store = state.store.clone();
        tracing::info!(port = listener.local_addr()?.port(), "listening");

        let (stopping_tx, mut stopping_rx) = tokio::sync::watch::channel(false);
        let signal = async move {
            shutdown.await;
            tracing::info!("shutdown requested: draining");
            let _ = stopping_tx.send(true);
        };
        let server = axum::serve(listener, http::router(state)).with_graceful_shutdown(signal);
        let drain_deadline = async move {
            let _ = stopping_rx.wait_for(|stopping| *stopping).await;
            tokio::time::sleep(DRAIN_TIMEOUT).await;
        };
        tokio::select! {
            served = server => served.context("serving HTTP")?,
            () = drain_deadline => tracing::warn!("drain timed out; closing remaining connections"),
        }

        match store.flush().await {
            Ok(durable) => tracing::info!(counter = durable, "counter flushed; bye"),
            Err(e) => {
                tracing::error!(reason = %e, "final flush failed; the last counts live only in Redis")
            }
        }
        Ok(())
    }
}
