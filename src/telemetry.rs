//! Logs (JSON lines on stdout) and metrics (a Prometheus recorder rendered on `/metrics`).

use std::io::{BufWriter, Write};
use std::os::fd::AsFd;
use std::sync::OnceLock;

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Lines the log queue holds while stdout falls behind. A line is a few hundred bytes, under
/// 1 KiB (the request log cuts paths to `http::MAX_LOGGED_PATH_BYTES`; nothing else logs what
/// a client sent), so the queue holds at most 2,048 × 1 KiB = 2 MiB.
pub const LOG_QUEUE_LINES: usize = 2048;

/// Bytes of log lines gathered before a write to stdout: the writer thread takes every line
/// waiting in the queue, then writes them together (one `write` for many lines under load,
/// where `std::io::stdout()` writes each line on its own).
const LOG_WRITE_BUFFER_BYTES: usize = 32 * 1024;

/// Counts the lines the log queue dropped, once `init_logging` has run.
static DROPPED_LINES: OnceLock<ErrorCounter> = OnceLock::new();

/// Installs the JSON log subscriber. Lines go through a background writer thread, so a slow
/// stdout (a full pipe, a busy log collector) never stalls a request; if it falls more than
/// `LOG_QUEUE_LINES` behind, lines are dropped (and counted in `log_lines_dropped_total`)
/// rather than requests slowed or memory grown. Keep the guard until exit: dropping it flushes
/// what is buffered. `filter` was validated by `Config`.
pub fn init_logging(filter: &str) -> WorkerGuard {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .finish(stdout_in_batches());
    let _ = DROPPED_LINES.set(writer.error_counter());
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_target(false)
        .with_env_filter(filter)
        .with_writer(writer)
        .init();
    guard
}

/// Standard output behind a buffer of `LOG_WRITE_BUFFER_BYTES`, which the writer thread
/// flushes each time it has emptied the queue (and at exit, when the guard is dropped), so a
/// line waits only while more lines are being written before it. Written to a duplicate of
/// the descriptor, past `std::io::stdout()`'s own line buffer, which would write each line.
fn stdout_in_batches() -> Box<dyn Write + Send> {
    match std::io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => Box::new(BufWriter::with_capacity(
            LOG_WRITE_BUFFER_BYTES,
            std::fs::File::from(fd),
        )),
        Err(_) => Box::new(std::io::stdout()),
    }
}

/// Copies the log queue's count of dropped lines into `log_lines_dropped_total` (0 until one
/// is dropped, or when logging goes elsewhere, as in tests).
pub fn publish_dropped_log_lines() {
    let dropped = DROPPED_LINES.get().map_or(0, ErrorCounter::dropped_lines);
    metrics::counter!("log_lines_dropped_total").absolute(dropped as u64);
}

/// Latency buckets, in seconds, around what a coalesced request costs on a loopback network.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

/// Installs the process-wide Prometheus recorder and returns the handle that renders it.
/// Called once, by `main` (tests: once per test binary); the handle is then passed to the
/// application explicitly.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("http_request_duration_seconds".into()),
            LATENCY_BUCKETS,
        )?
        .set_buckets_for_metric(Matcher::Full("visit_batch_size".into()), BATCH_BUCKETS)?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).context("installing the metrics recorder")?;
    describe();
    Ok(handle)
}

/// Histograms keep every sample until the exporter folds them into buckets, which it does
/// on render and on upkeep. A process nobody scrapes would grow by every request it serves,
/// so fold them every second, on `tasks`, until `stop`; the count of dropped log lines is
/// refreshed then too.
pub fn spawn_metrics_upkeep(
    handle: PrometheusHandle,
    tasks: &TaskTracker,
    stop: CancellationToken,
) {
    const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
    tasks.spawn(async move {
        let mut ticker = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticker.tick() => {
                    publish_dropped_log_lines();
                    handle.run_upkeep();
                }
            }
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
    describe_counter!(
        "visits_uncounted_total",
        "Answers without a count, by reason: withheld, db (PostgreSQL failed), cache (Redis failed, PostgreSQL may not count yet)"
    );
    describe_histogram!(
        "visit_batch_size",
        "Visits served by one coalesced round trip"
    );
    describe_gauge!(
        "dependency_up",
        "1 while the dependency (cache, db) is up, 0 while it is down"
    );
    describe_counter!(
        "log_lines_dropped_total",
        "Log lines dropped because stdout fell more than the log queue behind"
    );
    describe_counter!(
        "visit_counter_fences_total",
        "Times this process fenced Redis anew (a restart, a resync, FLUSHALL, or PostgreSQL counting meanwhile)"
    );
    describe_counter!(
        "visit_counter_confirmations_total",
        "Redis batches confirmed in PostgreSQL: sent=ahead with the count, sent=after once Redis answered, sent=again as a second write"
    );
}
