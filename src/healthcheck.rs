//! `web healthcheck [--ready]`: the container healthcheck for an image with no shell and no
//! curl. Plain: `/healthz` on `PORT` (alive). `--ready`: `/readyz` on `ADMIN_PORT` (both
//! dependencies answer), for a person or a test that cannot reach the unpublished admin port.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// The whole probe, connect to verdict, fits in this budget (Compose's timeout is longer).
const BUDGET: Duration = Duration::from_millis(1800);

/// Asks the local service for `path`; `Ok` only on an HTTP 200.
pub fn probe(port: u16, path: &str) -> Result<(), String> {
    let deadline = Instant::now() + BUDGET;
    let remaining = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&address, remaining())
        .map_err(|e| format!("connecting to {address}: {e}"))?;
    stream
        .set_write_timeout(Some(remaining()))
        .and_then(|()| {
            stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        })
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut head = [0u8; 16];
    let mut read = 0;
    while read < head.len() {
        stream
            .set_read_timeout(Some(remaining()))
            .map_err(|e| format!("reading the answer: {e}"))?;
        match stream.read(&mut head[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) => return Err(format!("reading the answer: {e}")),
        }
    }
    let status_line = String::from_utf8_lossy(&head[..read]);
    match status_line.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        other => Err(format!(
            "unexpected answer: status {}",
            other.unwrap_or("missing")
        )),
    }
}
