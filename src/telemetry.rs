//! Logs (JSON lines on stdout) and metrics (a Prometheus recorder rendered on `/metrics`).

use std::io::{BufWriter, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// Lines the log queue holds while stdout falls behind. A line is a few hundred bytes, under
/// 1 KiB (the request log cuts paths to `http::MAX_LOGGED_PATH_BYTES`; nothing else logs what
/// a client sent), so the queue holds at most 2,048 × 1 KiB = 2 MiB.
pub const LOG_QUEUE_LINES: usize = 2048;

/// Bytes of log lines gathered before a write to stdout.
const LOG_WRITE_BUFFER_BYTES: usize = 32 * 1024;

/// How long the log writer lets lines gather once it has written some: under load, lines
/// then leave in one `write` every pause, and queueing one never wakes the writer thread.
const LOG_GATHER: Duration = Duration::from_millis(2);

/// How long exit waits for the log writer to write what is queued.
const LOG_FLUSH_AT_EXIT: Duration = Duration::from_secs(1);

/// Counts the lines the log queue dropped, once `init_logging` has run.
static DROPPED_LINES: OnceLock<Arc<AtomicU64>> = OnceLock::new();

/// Installs the JSON log subscriber. Lines go through a queue to a writer thread of their
/// own, so a slow stdout (a full pipe, a busy log collector) never stalls a request; if it
/// falls more than `LOG_QUEUE_LINES` behind, lines are dropped (and counted in
/// `log_lines_dropped_total`) rather than requests slowed or memory grown. Keep the guard
/// until exit: dropping it writes what is queued. `filter` was validated by `Config`.
pub fn init_logging(filter: &str) -> LogGuard {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let (queue, guard) = LogQueue::start(stdout_in_batches());
    let _ = DROPPED_LINES.set(Arc::clone(&queue.dropped));
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_target(false)
        .with_env_filter(filter)
        .with_writer(queue)
        .init();
    guard
}

/// Standard output behind a buffer of `LOG_WRITE_BUFFER_BYTES`, flushed by the writer thread
/// each time it has emptied the queue. Written to a duplicate of the descriptor, past
/// `std::io::stdout()`'s own line buffer, which would write each line.
fn stdout_in_batches() -> Box<dyn Write + Send> {
    match std::io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => Box::new(BufWriter::with_capacity(
            LOG_WRITE_BUFFER_BYTES,
            std::fs::File::from(fd),
        )),
        Err(_) => Box::new(std::io::stdout()),
    }
}

/// The sending side of the log queue: each event's line, formatted by the subscriber, is
/// queued whole, or dropped and counted when the queue is full.
///
/// Written here rather than taken from `tracing-appender`, whose writer thread waits on its
/// queue line by line, so that under load the lines queued kept waking it. This writer waits on
/// the queue only while it is empty; once it has written, it pauses `LOG_GATHER` and takes
/// everything queued meanwhile (side by side at `info`: about a fifth fewer `futex` calls and
/// task switches per request, and half the `write` calls; bench/README.md).
#[derive(Clone)]
struct LogQueue {
    lines: SyncSender<Vec<u8>>,
    dropped: Arc<AtomicU64>,
}

impl LogQueue {
    /// The queue, and the guard that owns its writer thread (writing to `out`).
    fn start(out: Box<dyn Write + Send>) -> (Self, LogGuard) {
        let (lines, queued) = mpsc::sync_channel(LOG_QUEUE_LINES);
        let (done, finished) = mpsc::channel();
        let stopping = Arc::new(AtomicBool::new(false));
        let writer = {
            let stopping = Arc::clone(&stopping);
            move || {
                write_lines(&queued, out, &stopping);
                let _ = done.send(());
            }
        };
        // Without the thread, lines queue until the queue is full, then are dropped and counted.
        let _ = std::thread::Builder::new()
            .name("web-log-writer".into())
            .spawn(writer);
        let queue = Self {
            lines,
            dropped: Arc::new(AtomicU64::new(0)),
        };
        let guard = LogGuard {
            wake: queue.lines.clone(),
            stopping,
            finished,
        };
        (queue, guard)
    }
}

/// Writes the lines of `queued` to `out` until `stopping` is set and the queue is empty.
fn write_lines(queued: &Receiver<Vec<u8>>, mut out: Box<dyn Write + Send>, stopping: &AtomicBool) {
    // A write error (stdout closed) loses those lines; there is nowhere else to say so.
    while let Ok(first) = queued.recv() {
        let mut gathered = Some(first);
        while let Some(first) = gathered {
            for line in std::iter::once(first).chain(queued.try_iter()) {
                let _ = out.write_all(&line);
            }
            let _ = out.flush();
            if stopping.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(LOG_GATHER);
            // Nothing came during the pause: wait on the queue again.
            gathered = queued.try_recv().ok();
        }
    }
}

impl<'a> MakeWriter<'a> for LogQueue {
    type Writer = QueuedLine<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        QueuedLine {
            queue: self,
            line: Vec::new(),
        }
    }
}

/// One event's line, queued when the subscriber is done writing it.
struct QueuedLine<'a> {
    queue: &'a LogQueue,
    line: Vec<u8>,
}

impl Write for QueuedLine<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for QueuedLine<'_> {
    fn drop(&mut self) {
        if self.line.is_empty() {
            return;
        }
        let line = std::mem::take(&mut self.line);
        if let Err(TrySendError::Full(_)) = self.queue.lines.try_send(line) {
            self.queue.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Owns the log writer thread: dropping it waits, up to `LOG_FLUSH_AT_EXIT`, for the thread
/// to write what is queued and end.
pub struct LogGuard {
    wake: SyncSender<Vec<u8>>,
    stopping: Arc<AtomicBool>,
    finished: Receiver<()>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        // An empty line wakes a writer waiting on an empty queue; a full queue needs no wake.
        let _ = self.wake.try_send(Vec::new());
        let _ = self.finished.recv_timeout(LOG_FLUSH_AT_EXIT);
    }
}

/// Copies the log queue's count of dropped lines into `log_lines_dropped_total` (0 until one
/// is dropped, or when logging goes elsewhere, as in tests).
pub fn publish_dropped_log_lines() {
    let dropped = DROPPED_LINES
        .get()
        .map_or(0, |dropped| dropped.load(Ordering::Relaxed));
    metrics::counter!("log_lines_dropped_total").absolute(dropped);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// What the log writer wrote, write by write, and how often it flushed.
    #[derive(Clone, Default)]
    struct Recorded(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Recorded {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().0.extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            self.0.lock().unwrap().1 += 1;
            Ok(())
        }
    }

    fn log(queue: &LogQueue, line: &str) {
        queue.make_writer().write_all(line.as_bytes()).unwrap();
    }

    #[test]
    fn lines_leave_in_order_in_batches_and_exit_writes_what_is_queued() {
        let out = Recorded::default();
        let (queue, guard) = LogQueue::start(Box::new(out.clone()));
        let lines: Vec<String> = (0..1000).map(|i| format!("line {i}\n")).collect();
        for line in &lines {
            log(&queue, line);
        }
        drop(guard);
        let (written, flushes) = out.0.lock().unwrap().clone();
        assert_eq!(String::from_utf8(written).unwrap(), lines.concat());
        assert!(flushes < 100, "{flushes} flushes for 1000 lines");
        assert_eq!(queue.dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_full_queue_drops_and_counts_lines_instead_of_waiting() {
        /// A stdout that never takes a byte, as a pipe nobody reads.
        struct Stuck(std::sync::mpsc::Receiver<()>);
        impl Write for Stuck {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                let _ = self.0.recv();
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let (unstick, stuck) = std::sync::mpsc::channel();
        let (queue, guard) = LogQueue::start(Box::new(Stuck(stuck)));
        // One line held by the stuck writer, the queue's worth waiting, the rest dropped.
        for i in 0..LOG_QUEUE_LINES + 100 {
            log(&queue, &format!("line {i}\n"));
        }
        let dropped = queue.dropped.load(Ordering::Relaxed);
        assert!((99..=100).contains(&dropped), "{dropped} dropped");
        drop(unstick);
        drop(guard);
    }
}
