//! Logs (JSON lines on stdout) and metrics (a Prometheus recorder rendered on `/metrics`).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// Installs the JSON log subscriber. `filter` was validated by `Config`.
pub fn init_logging(filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_target(false)
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .init();
}

/// Latency buckets, in seconds, around what a coalesced request costs on a loopback network.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

/// The process-wide metrics recorder, installed on first use. A process has one recorder,
/// so every `Application` in it (tests start several) shares it.
pub fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("http_request_duration_seconds".into()),
                LATENCY_BUCKETS,
            )
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full("visit_batch_size".into()), BATCH_BUCKETS)
            })
            .expect("bucket lists are non-empty constants")
            .build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder was installed first; its metrics then go there.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        handle
    })
}

/// Histograms keep every sample until the exporter folds them into buckets, which it does
/// on render and on upkeep. A process nobody scrapes would grow by every request it serves,
/// so fold them regularly.
pub fn spawn_metrics_upkeep() {
    const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
    let handle = metrics();
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            ticker.tick().await;
            handle.run_upkeep();
        }
    });
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "http_requests_total",
        "HTTP requests by method, route and status"
    );
    describe_histogram!(
        "http_request_duration_seconds",
        metrics::Unit::Seconds,
        "HTTP request latency by route"
    );
    describe_counter!(
        "dependency_errors_total",
        "Failed or timed-out calls to a dependency (cache, db)"
    );
    describe_counter!(
        "visits_counted_total",
        "Visits counted, by the store that counted them"
    );
    describe_histogram!(
        "visit_batch_size",
        "Visits served by one coalesced round trip"
    );
    describe_gauge!(
        "visit_counter_flush_age_seconds",
        metrics::Unit::Seconds,
        "Time since the durable counter in PostgreSQL last caught up with the live count"
    );
}
