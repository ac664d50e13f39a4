//! The accept loop. Every connection is a task this loop owns: at shutdown it stops
//! accepting, asks each connection to finish its request in flight and close, and closes
//! whatever is still open when the drain deadline passes, before the caller goes on to
//! close the batch queue. (`axum::serve` spawns connections it cannot close, and runs hyper
//! without a timer, so hyper's header-read timeout never applies.)
//!
//! Fairness: one client address holds at most `max_per_address` of the `max_connections`
//! slots (its further connections are closed at once, so they do not sit in the backlog
//! either); a connection whose answers make no write progress for `write_timeout` (a client
//! that stopped reading) is closed, and every connection is closed after `max_age`, once its
//! request in flight is answered. Without these, one address holding idle or non-reading
//! sockets could take every slot.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_io_timeout::TimeoutStream;
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
    /// Connections served at once for one client address, below `max_connections`, so one
    /// client cannot take every slot.
    pub max_per_address: usize,
    /// A request head must arrive whole within this time, and an idle kept-alive connection
    /// is closed after it (hyper runs the same timer while it waits for the next head).
    pub header_timeout: Duration,
    /// An answer that cannot be written for this long (the client stopped reading) closes
    /// the connection: hyper runs no timer while its writes wait.
    pub write_timeout: Duration,
    /// A connection is closed after this long, once its request in flight is answered.
    pub max_age: Duration,
}

/// The kernel's queue of connections not yet accepted, set rather than inherited (the
/// kernel caps it at `net.core.somaxconn`): room for a burst while every slot is taken.
pub const LISTEN_BACKLOG: u32 = 1024;
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
    let per_address = PerAddress::default();
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
        let (stream, own) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => match per_address.take(peer.ip(), limits.max_per_address) {
                    Some(own) => (stream, own),
                    None => {
                        // Closed at once: the slot goes back to the others.
                        tracing::debug!(%peer, "connection refused: too many from its address");
                        continue;
                    }
                },
                Err(e) => {
                    tracing::warn!(reason = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            },
        };
        let connection =
            serve_connection(stream, router.clone(), limits, drain.clone(), abort.clone());
        connections.spawn(async move {
            connection.await;
            drop((own, slot));
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
    limits: Limits,
    drain: CancellationToken,
    abort: CancellationToken,
) {
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        router.clone().oneshot(request)
    });
    let mut stream = TimeoutStream::new(stream);
    stream.set_write_timeout(Some(limits.write_timeout));
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_BUF_SIZE)
        .serve_connection(TokioIo::new(Box::pin(stream)), service);
    tokio::pin!(connection);
    // Shutdown, or the connection's age: either way, answer the request in flight and close.
    let stop = async {
        tokio::select! {
            () = drain.cancelled() => {}
            () = tokio::time::sleep(limits.max_age) => {}
        }
    };
    let finished = tokio::select! {
        finished = connection.as_mut() => finished,
        () = stop => {
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

/// Connections open per client address.
#[derive(Default)]
struct PerAddress(Arc<Mutex<HashMap<IpAddr, usize>>>);

impl PerAddress {
    /// One more connection for `ip`, if it has fewer than `cap`; released when dropped.
    fn take(&self, ip: IpAddr, cap: usize) -> Option<AddressSlot> {
        let mut open = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(ip).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            open: Arc::clone(&self.0),
            ip,
        })
    }
}

/// One connection's share of its address's cap.
struct AddressSlot {
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_gets_its_cap_and_its_slots_back() {
        let per_address = PerAddress::default();
        let (a, b): (IpAddr, IpAddr) = ([127, 0, 0, 1].into(), [127, 0, 0, 2].into());
        let held: Vec<_> = (0..3)
            .map(|_| per_address.take(a, 3).expect("under the cap"))
            .collect();
        assert!(
            per_address.take(a, 3).is_none(),
            "a fourth for the same address"
        );
        let other = per_address.take(b, 3);
        assert!(other.is_some(), "another address is not held back");
        drop(held);
        drop(other);
        let again = per_address.take(a, 3);
        assert!(again.is_some());
        assert_eq!(
            per_address.0.lock().unwrap().len(),
            1,
            "released addresses are forgotten"
        );
    }
}
