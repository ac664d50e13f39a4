//! Logs (JSON lines on stdout) and metrics (a Prometheus recorder rendered on `/metrics`).

use std::cell::Cell;
use std::fmt::{self, Write as _};
use std::io::Write;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use anyhow::Context;
use chrono::{Datelike, Timelike};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

/// Lines the log queue holds while stdout falls behind. A line is a few hundred bytes, under
/// 1 KiB (the request log cuts paths to `http::MAX_LOGGED_PATH_BYTES`; nothing else logs what
/// a client sent), so the queue holds at most 2,048 × 1 KiB = 2 MiB.
pub const LOG_QUEUE_LINES: usize = 2048;

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
    let (queue, guard) = LogQueue::start(raw_stdout());
    let _ = DROPPED_LINES.set(Arc::clone(&queue.0.dropped));
    tracing_subscriber::fmt()
        .event_format(JsonLine)
        .with_env_filter(filter)
        .with_writer(queue)
        .init();
    guard
}

/// One JSON object per line: `timestamp` (RFC 3339, UTC, microseconds), `level`, then the
/// event's fields in the order given (`message` first), as `tracing-subscriber`'s JSON format
/// writes them with `flatten_event` and neither spans nor target (a unit test holds the two
/// to the same objects). Written straight into the subscriber's line buffer: that format
/// sends every field through serde (a map serializer, and a UTF-8 check of every fragment it
/// writes), which was most of what a request's log line cost (bench/README.md).
struct JsonLine;

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        writer.write_str("{\"timestamp\":\"")?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        write_timestamp(&mut writer, now.unwrap_or_default())?;
        write!(writer, "\",\"level\":\"{}\"", event.metadata().level())?;
        let mut fields = JsonFields {
            out: &mut writer,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_str("}\n")
    }
}

/// Writes the time as `tracing-subscriber`'s `SystemTime` does: RFC 3339 in UTC, with
/// microseconds (`2026-12-08T04:20:47.123456Z`). The date and time of day are worked out once
/// a second on each thread, and reused for the lines of that second: about 0.25 µs of CPU less
/// per request at `info` than working them out for every line (bench/README.md).
fn write_timestamp(writer: &mut Writer<'_>, since_epoch: Duration) -> fmt::Result {
    thread_local! {
        /// The second last written on this thread, and its text.
        static SECOND: Cell<(u64, [u8; 19])> = const { Cell::new((u64::MAX, [0; 19])) };
    }
    let seconds = since_epoch.as_secs();
    let text = SECOND.with(|last| match last.get() {
        (second, text) if second == seconds => text,
        _ => {
            let text = second_text(seconds);
            last.set((seconds, text));
            text
        }
    });
    writer.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)?;
    write!(writer, ".{:06}Z", since_epoch.subsec_micros())
}

/// `YYYY-MM-DDTHH:MM:SS` of a second since the Unix epoch, in UTC (chrono's calendar).
fn second_text(seconds: u64) -> [u8; 19] {
    let mut text = [b'0'; 19];
    if let Some(t) = i64::try_from(seconds)
        .ok()
        .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
    {
        let _ = write!(
            &mut text[..],
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
            t.year(),
            t.month(),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        );
    }
    text
}

/// Writes each field as `,"name":value`: 64-bit integers, finite floats and booleans as JSON
/// numbers and booleans (a float that is not finite as `null`, as serde_json does), anything
/// else as a JSON string of its `Display` (errors) or `Debug` (the rest) form.
struct JsonFields<'a, 'w> {
    out: &'a mut Writer<'w>,
    result: fmt::Result,
}

impl JsonFields<'_, '_> {
    /// Writes the field unless an earlier one failed: the line is then dropped whole.
    fn field(&mut self, field: &Field, value: fmt::Arguments<'_>, quoted: bool) {
        if self.result.is_ok() {
            self.result = write_field(self.out, field.name(), value, quoted);
        }
    }
}

fn write_field(
    out: &mut Writer<'_>,
    name: &str,
    value: fmt::Arguments<'_>,
    quoted: bool,
) -> fmt::Result {
    out.write_str(",\"")?;
    JsonEscaped(&mut *out).write_str(name)?;
    out.write_str("\":")?;
    if quoted {
        out.write_char('"')?;
        JsonEscaped(&mut *out).write_fmt(value)?;
        out.write_char('"')
    } else {
        out.write_fmt(value)
    }
}

impl Visit for JsonFields<'_, '_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        if value.is_finite() {
            // `Debug`, not `Display`: it keeps a float a float (`1.0`, `1e300`), where
            // `Display` writes `1` and 301 digits.
            self.field(field, format_args!("{value:?}"), false);
        } else {
            self.field(field, format_args!("null"), false);
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, format_args!("{value}"), false);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, format_args!("{value}"), false);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, format_args!("{value}"), false);
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, format_args!("{value}"), true);
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.field(field, format_args!("{value}"), true);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, format_args!("{value:?}"), true);
    }
}

/// Passes text on with what JSON requires escaped inside a string: `"`, `\\` and the
/// control characters below U+0020.
struct JsonEscaped<'a, 'w>(&'a mut Writer<'w>);

impl fmt::Write for JsonEscaped<'_, '_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let mut plain = 0;
        for (at, byte) in text.bytes().enumerate() {
            let escaped = match byte {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..0x20 => "",
                _ => continue,
            };
            self.0.write_str(&text[plain..at])?;
            plain = at + 1;
            if escaped.is_empty() {
                write!(self.0, "\\u{byte:04x}")?;
            } else {
                self.0.write_str(escaped)?;
            }
        }
        self.0.write_str(&text[plain..])
    }
}

/// Standard output, past `std::io::stdout()`'s own line buffer (which would write each line):
/// a duplicate of its descriptor, which the writer thread writes each batch of lines to at once.
fn raw_stdout() -> Box<dyn Write + Send> {
    match std::io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => Box::new(std::fs::File::from(fd)),
        Err(_) => Box::new(std::io::stdout()),
    }
}

/// The sending side of the log queue: each event's line, formatted by the subscriber, is
/// appended whole to the lines waiting for the writer thread, or dropped and counted when
/// `LOG_QUEUE_LINES` already wait.
///
/// Written here rather than taken from `tracing-appender`, whose writer thread waits on its
/// queue line by line, so that under load the lines queued kept waking it. This writer waits on
/// the queue only while it is empty; once it has written, it pauses `LOG_GATHER` and takes
/// everything queued meanwhile (side by side at `info`: about a fifth fewer `futex` calls and
/// task switches per request, and half the `write` calls; bench/README.md). The lines wait in
/// one buffer that the writer swaps for its own, so queueing a line allocates nothing and the
/// writer frees nothing (measured in bench/README.md).
#[derive(Clone)]
struct LogQueue(Arc<Queue>);

struct Queue {
    waiting: Mutex<Waiting>,
    /// Signalled when a line arrives while the writer waits on an empty queue, or at exit.
    arrived: Condvar,
    dropped: Arc<AtomicU64>,
}

/// The lines not yet written, and the writer's state, under one lock.
#[derive(Default)]
struct Waiting {
    bytes: Vec<u8>,
    /// Lines in `bytes`, and in the batch the writer is writing: what `LOG_QUEUE_LINES` bounds.
    lines: usize,
    writer_waits: bool,
    stopping: bool,
}

impl LogQueue {
    /// The queue, and the guard that owns its writer thread (writing to `out`).
    fn start(out: Box<dyn Write + Send>) -> (Self, LogGuard) {
        let queue = Self(Arc::new(Queue {
            waiting: Mutex::default(),
            arrived: Condvar::new(),
            dropped: Arc::new(AtomicU64::new(0)),
        }));
        let (done, finished) = mpsc::channel();
        let writer = {
            let queue = queue.clone();
            move || {
                queue.write_lines(out);
                let _ = done.send(());
            }
        };
        // Without the thread, lines queue until the queue is full, then are dropped and counted.
        let _ = std::thread::Builder::new()
            .name("web-log-writer".into())
            .spawn(writer);
        let guard = LogGuard {
            queue: queue.clone(),
            finished,
        };
        (queue, guard)
    }

    /// A panic elsewhere while holding the lock leaves the lines as they were: go on with them.
    fn lock(&self) -> MutexGuard<'_, Waiting> {
        self.0
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes the queued lines to `out`, batch by batch, until the queue is stopping and empty.
    fn write_lines(&self, mut out: Box<dyn Write + Send>) {
        let mut batch = Vec::new();
        let mut written = 0;
        loop {
            let stopping = {
                let mut waiting = self.lock();
                waiting.lines -= written;
                while waiting.bytes.is_empty() && !waiting.stopping {
                    waiting.writer_waits = true;
                    waiting = self
                        .0
                        .arrived
                        .wait(waiting)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                waiting.writer_waits = false;
                std::mem::swap(&mut waiting.bytes, &mut batch);
                written = waiting.lines;
                waiting.stopping
            };
            if batch.is_empty() {
                return; // stopping, and nothing left
            }
            // A write error (stdout closed) loses those lines; there is nowhere else to say so.
            let _ = out.write_all(&batch);
            let _ = out.flush();
            batch.clear();
            if !stopping {
                std::thread::sleep(LOG_GATHER);
            }
        }
    }
}

impl<'a> MakeWriter<'a> for LogQueue {
    type Writer = QueuedLine<'a>;

    /// The subscriber asks for a writer once per event, with the line already formatted, and
    /// writes the line with it at once: the lock is held for that copy only.
    fn make_writer(&'a self) -> Self::Writer {
        let waiting = self.lock();
        QueuedLine {
            full: waiting.lines >= LOG_QUEUE_LINES,
            waiting,
            queue: &self.0,
            wrote: false,
        }
    }
}

/// One event's line, appended to the queue as the subscriber writes it (whole, since the lock
/// is held until the line is done), or dropped when the queue is full.
struct QueuedLine<'a> {
    queue: &'a Queue,
    waiting: MutexGuard<'a, Waiting>,
    full: bool,
    wrote: bool,
}

impl Write for QueuedLine<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if !self.full {
            self.waiting.bytes.extend_from_slice(bytes);
        }
        self.wrote |= !bytes.is_empty();
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for QueuedLine<'_> {
    fn drop(&mut self) {
        if !self.wrote {
            return;
        }
        if self.full {
            self.queue.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.waiting.lines += 1;
        if self.waiting.writer_waits {
            self.waiting.writer_waits = false;
            self.queue.arrived.notify_one();
        }
    }
}

/// Owns the log writer thread: dropping it waits, up to `LOG_FLUSH_AT_EXIT`, for the thread
/// to write what is queued and end.
pub struct LogGuard {
    queue: LogQueue,
    finished: Receiver<()>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.queue.lock().stopping = true;
        self.queue.0.arrived.notify_one();
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

    /// A subscriber's writer, too: every line it writes goes to the same record.
    impl<'a> MakeWriter<'a> for Recorded {
        type Writer = Recorded;

        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    /// Every control character, quotes, a backslash and text beyond ASCII: what a log line
    /// must escape, or carry through as it is.
    fn nasty() -> String {
        (0u8..0x20)
            .map(char::from)
            .chain("\"\\/é€😀".chars())
            .collect()
    }

    /// Every kind of field an event can carry, with strings that need escaping.
    fn events() {
        let nasty = nasty();
        let error = std::io::Error::other("disk \"full\"");
        tracing::info!(
            method = "GET",
            path = nasty.as_str(),
            status = 200u16,
            latency_ms = 0.026808000000000002,
            "request"
        );
        tracing::info!(
            path_truncated = Option::<bool>::None,
            ok = true,
            delta = -3i64,
            max = u64::MAX,
            "fields"
        );
        tracing::warn!(dependency = "db", reason = %nasty, list = ?vec![1, 2], "state changed");
        tracing::error!(
            error = &error as &(dyn std::error::Error + 'static),
            nan = f64::NAN,
            inf = f64::INFINITY,
            "failed"
        );
        tracing::info!("{} formatted {:?}", nasty, 1.5);
        tracing::info!(
            whole = 1.0,
            zero = -0.0,
            big = 1e300,
            tiny = 5e-324,
            wide = i128::MIN,
            "a\"b" = 1,
            "floats"
        );
    }

    /// The keys of a JSON object in the order the line has them (serde_json's `Value` sorts them).
    struct Keys(Vec<String>);

    impl<'de> serde::Deserialize<'de> for Keys {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct InOrder;
            impl<'de> serde::de::Visitor<'de> for InOrder {
                type Value = Keys;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<M: serde::de::MapAccess<'de>>(
                    self,
                    mut map: M,
                ) -> Result<Keys, M::Error> {
                    let mut keys = Vec::new();
                    while let Some((key, serde::de::IgnoredAny)) = map.next_entry::<String, _>()? {
                        keys.push(key);
                    }
                    Ok(Keys(keys))
                }
            }
            deserializer.deserialize_map(InOrder)
        }
    }

    /// Each line as a JSON value, and each line's keys in order.
    fn parsed(lines: &Recorded) -> (Vec<serde_json::Value>, Vec<Vec<String>>) {
        let text = String::from_utf8(lines.0.lock().unwrap().0.clone()).unwrap();
        let parse = |line| {
            (
                serde_json::from_str::<serde_json::Value>(line).unwrap(),
                serde_json::from_str::<Keys>(line).unwrap().0,
            )
        };
        text.lines().map(parse).unzip()
    }

    /// Length, the characters at 10 and 19, and the last one, of a timestamp.
    fn timestamp_shape(t: &serde_json::Value) -> Option<(usize, u8, u8, u8)> {
        let t = t.as_str()?.as_bytes();
        Some((t.len(), *t.get(10)?, *t.get(19)?, *t.last()?))
    }

    #[test]
    fn log_lines_are_the_objects_tracing_subscribers_json_format_writes() {
        let (ours, theirs) = (Recorded::default(), Recorded::default());
        let subscriber = tracing_subscriber::fmt()
            .event_format(JsonLine)
            .with_writer(ours.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, events);
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_target(false)
            .with_writer(theirs.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, events);
        let ((mut ours, our_keys), (mut theirs, their_keys)) = (parsed(&ours), parsed(&theirs));
        assert_eq!(ours.len(), 6);
        assert_eq!(our_keys, their_keys, "the same keys in the same order");
        assert_eq!(
            our_keys[0][..4],
            ["timestamp", "level", "message", "method"]
        );
        for (ours, theirs) in ours.iter_mut().zip(&mut theirs) {
            let (mine, reference) = (ours["timestamp"].take(), theirs["timestamp"].take());
            let shape = timestamp_shape(&mine);
            assert_eq!(shape, Some((27, b'T', b'.', b'Z')), "{mine}");
            assert_eq!(shape, timestamp_shape(&reference));
            // the same clock: the two lines were written moments apart
            let at = |t: &serde_json::Value| {
                chrono::DateTime::parse_from_rfc3339(t.as_str().unwrap()).unwrap()
            };
            let apart = (at(&mine) - at(&reference)).abs();
            assert!(
                apart < chrono::TimeDelta::seconds(5),
                "{mine} vs {reference}"
            );
        }
        assert_eq!(ours, theirs);
        assert_eq!(
            ours[0]["path"],
            nasty().as_str(),
            "escaped and read back whole"
        );
        assert_eq!(ours[0]["status"], 200);
        assert_eq!(ours[2]["level"], "WARN");
    }

    #[test]
    fn timestamps_are_utc_with_microseconds_each_second_its_own() {
        let mut text = String::new();
        for (seconds, micros) in [
            (0, 0),
            (951_868_799, 999_999),
            (951_868_800, 1),
            (951_868_800, 2),
            (1_709_251_199, 7),
            (1_798_761_599, 123_456),
            (253_402_300_799, 5),
        ] {
            let at = Duration::from_secs(seconds) + Duration::from_micros(micros);
            write_timestamp(&mut Writer::new(&mut text), at).unwrap();
            text.push(' ');
        }
        assert_eq!(
            text.split(' ').collect::<Vec<_>>(),
            [
                "1970-01-01T00:00:00.000000Z",
                "2000-02-29T23:59:59.999999Z",
                "2000-03-01T00:00:00.000001Z",
                "2000-03-01T00:00:00.000002Z",
                "2024-02-29T23:59:59.000007Z",
                "2026-12-31T23:59:59.123456Z",
                "9999-12-31T23:59:59.000005Z",
                ""
            ]
        );
    }

    fn log(queue: &LogQueue, line: &str) {
        queue.make_writer().write_all(line.as_bytes()).unwrap();
    }

    /// What `out` has been given, once it holds `expected` bytes or after 5 s.
    fn written_when(out: &Recorded, expected: usize) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let written = out.0.lock().unwrap().0.clone();
            if written.len() >= expected || std::time::Instant::now() > deadline {
                return String::from_utf8(written).unwrap();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn lines_leave_in_order_in_batches_without_waiting_for_exit() {
        let out = Recorded::default();
        let (queue, guard) = LogQueue::start(Box::new(out.clone()));
        let mut lines: Vec<String> = (0..1000).map(|i| format!("line {i}\n")).collect();
        for line in &lines {
            log(&queue, line);
        }
        assert_eq!(written_when(&out, lines.concat().len()), lines.concat());
        // the writer idle on an empty queue: one more line wakes it
        std::thread::sleep(LOG_GATHER * 5);
        lines.push("one more\n".into());
        log(&queue, &lines[1000]);
        assert_eq!(written_when(&out, lines.concat().len()), lines.concat());
        let flushes = out.0.lock().unwrap().1;
        assert!(flushes < 100, "{flushes} flushes for 1001 lines");
        assert_eq!(queue.0.dropped.load(Ordering::Relaxed), 0);
        drop(guard);
    }

    #[test]
    fn exit_writes_what_is_queued() {
        /// A stdout that takes its first write only once `go` says so.
        struct Late(Recorded, Option<std::sync::mpsc::Receiver<()>>);
        impl Write for Late {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                if let Some(go) = self.1.take() {
                    let _ = go.recv();
                }
                self.0.write(bytes)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                self.0.flush()
            }
        }
        let (out, (go, wait)) = (Recorded::default(), std::sync::mpsc::channel());
        let (queue, guard) = LogQueue::start(Box::new(Late(out.clone(), Some(wait))));
        let lines: Vec<String> = (0..100).map(|i| format!("line {i}\n")).collect();
        for line in &lines {
            log(&queue, line);
        }
        go.send(()).unwrap();
        drop(guard);
        assert_eq!(
            String::from_utf8(out.0.lock().unwrap().0.clone()).unwrap(),
            lines.concat()
        );
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
        let dropped = queue.0.dropped.load(Ordering::Relaxed);
        assert!((99..=100).contains(&dropped), "{dropped} dropped");
        drop(unstick);
        drop(guard);
    }
}
