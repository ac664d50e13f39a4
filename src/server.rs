//! The accept loop. Every connection is a task this loop owns: at shutdown it stops
//! accepting, asks each connection to finish its request in flight and close, and closes
//! whatever is still open when the drain deadline passes, before the caller goes on to
//! close the batch queue. (`axum::serve` spawns connections it cannot close, and runs hyper
//! without a timer, so hyper's header-read timeout never applies.)

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// hyper's read buffer per connection (its default is ~400 KB): room for the 8 KB of headers
/// and 2 KB of URI that the router accepts, and for a somewhat larger head that the router
/// then rejects with its own JSON answer. A head that does not fit gets hyper's bare 431.
pub const MAX_BUF_SIZE: usize = 16 * 1024;

/// What one listener allows its clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; the next ones wait in the kernel's accept backlog, so a
    /// flood of idle sockets cannot exhaust file descriptors or memory.
    pub max_connections: usize,
    /// A request head must arrive whole within this time, and an idle kept-alive connection
    /// is closed after it (hyper runs the same timer while it waits for the next head).
    pub header_timeout: Duration,
}
/// Pause after a failed `accept` (out of file descriptors, most likely) before the next try.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Serves `router` on `listener` until `shutdown` completes, then drains: connections get
/// `drain_timeout` to finish the request they are serving, and are closed after that.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
    drain_timeout: Duration,
) {
    let connections = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let drain = CancellationToken::new();
    let abort = CancellationToken::new();
    tokio::pin!(shutdown);
    loop {
        // A free slot first, then accept: at the cap, new clients queue in the backlog.
        let slot = tokio::select! {
            () = &mut shutdown => break,
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break, // never closed
            },
        };
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(reason = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            },
        };
        let connection = serve_connection(
            stream,
            router.clone(),
            limits.header_timeout,
            drain.clone(),
            abort.clone(),
        );
        connections.spawn(async move {
            connection.await;
            drop(slot);
        });
    }
    drop(listener);
    tracing::info!(
        connections = connections.len(),
        "shutdown requested: draining"
    );
    connections.close();
    drain.cancel();
    if tokio::time::timeout(drain_timeout, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            connections = connections.len(),
            "drain timed out; closing the remaining connections"
        );
        abort.cancel();
        connections.wait().await;
    }
}

async fn serve_connection(
    stream: TcpStream,
    router: Router,
    header_timeout: Duration,
    drain: CancellationToken,
    abort: CancellationToken,
) {
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        router.clone().oneshot(request)
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_BUF_SIZE)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let finished = tokio::select! {
        finished = connection.as_mut() => finished,
        () = drain.cancelled() => {
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                finished = connection.as_mut() => finished,
                // Dropping the connection closes its socket.
                () = abort.cancelled() => return,
            }
        }
    };
    if let Err(e) = finished {
        // Resets, timeouts and malformed requests: the client's business, not an alert.
        tracing::debug!(reason = %e, "connection ended with an error");
    }
}
