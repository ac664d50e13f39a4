//! Coalesces concurrent visits into one round trip per dependency.
//!
//! Every `GET /` needs an increment and the database clock. Instead of one Redis call and one
//! PostgreSQL query per request, a single task takes every visit waiting at that moment (a
//! batch of `n`), counts them in Redis with one `INCRBY n`, has PostgreSQL confirm the total in
//! the round trip that reads the clock (`store`, which sends both at once), and hands the `n`
//! counts ending at the new total out one per visit, in arrival order. While one batch is in
//! flight the next one gathers, so batches grow with the load and the dependencies see a
//! constant trickle of queries instead of one per request. The contract holds exactly: every
//! visit gets its own count, and a clock read that started after the visit arrived.
//!
//! One batch at a time, not several: the count and its confirmation already travel together,
//! so a second batch in flight overlaps nothing and only halves the batches, doubling the
//! round trips every dependency and this process pay per visit (wrk, c = 64, the two side by
//! side on one machine, medians of 3: one in flight 36,677 req/s, p99 3.34 ms; two 29,829
//! req/s, p99 3.80 ms).

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::store::{Batch, CountedIn, Counting, DepError, Store};

/// Most visits served by one round trip; bounds the work lost to a failure mid-batch.
const MAX_BATCH: usize = 1024;
/// Visits that may wait for the batching task before callers are slowed down.
const QUEUE_DEPTH: usize = 8192;

/// What one visit gets back: its own count, if the batch was counted, and the batch's
/// outcome, shared by every visit of the batch.
#[derive(Debug, Clone)]
pub struct Visit {
    pub count: Option<i64>,
    pub batch: Arc<Batch>,
}

impl Visit {
    /// The visit at `index` (0-based, arrival order) of a batch of `size` gets the
    /// `index`-th of the `size` consecutive counts that end at the batch's total.
    fn of(batch: &Arc<Batch>, size: usize, index: usize) -> Self {
        let count = batch
            .total
            .map(|(total, _)| total - size as i64 + 1 + index as i64);
        Self {
            count,
            batch: Arc::clone(batch),
        }
    }
}

/// Handle to the batching task; cheap to clone into every request.
#[derive(Clone)]
pub struct Visits {
    queue: mpsc::Sender<oneshot::Sender<Visit>>,
}

/// Returned when the batching task is gone: during shutdown, or if it died.
#[derive(Debug, thiserror::Error)]
#[error("the visit counter is not running")]
pub struct NotRunning;

impl Visits {
    /// Starts the batching task on `tasks`. Once `close` is cancelled the queue takes no new
    /// visit; the task answers those already queued, then returns.
    pub fn spawn(store: Arc<Store>, tasks: &TaskTracker, close: CancellationToken) -> Self {
        let (queue, waiting) = mpsc::channel::<oneshot::Sender<Visit>>(QUEUE_DEPTH);
        tasks.spawn(batch_loop(store, waiting, close));
        Self { queue }
    }

    /// False once the batching task is gone (closed at shutdown, or died): `/healthz` then
    /// fails, since no visit could be counted any more.
    pub fn is_running(&self) -> bool {
        !self.queue.is_closed()
    }

    /// Counts one visit and reads the database clock, sharing the round trips with every
    /// visit that arrives meanwhile.
    pub async fn record(&self) -> Result<Visit, NotRunning> {
        let (reply, answer) = oneshot::channel();
        self.queue.send(reply).await.map_err(|_| NotRunning)?;
        answer.await.map_err(|_| NotRunning)
    }
}

async fn batch_loop(
    store: Arc<Store>,
    mut waiting: mpsc::Receiver<oneshot::Sender<Visit>>,
    close: CancellationToken,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // This task is the only one that counts, so it owns what counting needs to remember.
    let mut counting = Counting::default();
    loop {
        tokio::select! {
            received = waiting.recv_many(&mut batch, MAX_BATCH) => {
                if received == 0 {
                    break;
                }
                let size = batch.len();
                let outcome = Arc::new(run_batch(&store, &mut counting, size).await);
                for (index, reply) in batch.drain(..).enumerate() {
                    // A visitor who hung up still used its count: a gap the contract allows.
                    let _ = reply.send(Visit::of(&outcome, size, index));
                }
            }
            () = close.cancelled(), if !waiting.is_closed() => waiting.close(),
        }
    }
}

async fn run_batch(store: &Store, counting: &mut Counting, size: usize) -> Batch {
    let batch = store.count_and_clock(counting, size as u64).await;
    metrics::histogram!("visit_batch_size").record(size as f64);
    if let Some((_, counted_in)) = batch.total {
        let store_label = match counted_in {
            CountedIn::Cache => "cache",
            CountedIn::Db => "db",
        };
        metrics::counter!("visits_counted_total", "store" => store_label).increment(size as u64);
    } else {
        let reason = match (&batch.cache_error, &batch.clock) {
            (Some(DepError::Unconfirmed), _) => "withheld",
            (_, Err(_)) => "db",
            _ => "cache",
        };
        metrics::counter!("visits_uncounted_total", "reason" => reason).increment(size as u64);
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(total: Option<i64>) -> Arc<Batch> {
        Arc::new(Batch {
            total: total.map(|t| (t, CountedIn::Cache)),
            clock: Ok("2025-11-16 18:32:01.123456".into()),
            cache_error: None,
        })
    }

    #[test]
    fn a_batch_hands_out_consecutive_counts_in_arrival_order() {
        let batch = batch(Some(10));
        let counts: Vec<_> = (0..4).map(|i| Visit::of(&batch, 4, i).count).collect();
        assert_eq!(counts, vec![Some(7), Some(8), Some(9), Some(10)]);
    }

    #[test]
    fn a_batch_of_one_gets_the_total() {
        assert_eq!(Visit::of(&batch(Some(1)), 1, 0).count, Some(1));
    }

    #[test]
    fn a_failed_count_gives_no_count_to_anyone_but_keeps_the_clock() {
        let failed = Arc::new(Batch {
            cache_error: Some(DepError::Timeout(std::time::Duration::from_secs(1))),
            ..(*batch(None)).clone()
        });
        for i in 0..3 {
            let visit = Visit::of(&failed, 3, i);
            assert_eq!(visit.count, None);
            assert!(visit.batch.clock.is_ok());
        }
    }
}
