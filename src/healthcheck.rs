//! What a person or a container runtime asks a running `web` from inside its container, where
//! the image has no shell and no curl: `web healthcheck` (`/healthz` on `ADMIN_PORT`, alive;
//! the admin port, so that a flood of clients on the public port cannot make it unhealthy),
//! `web healthcheck --ready` (`/readyz` on `ADMIN_PORT`, both dependencies answer) and
//! `web metrics` (`/metrics` on `ADMIN_PORT`, printed), for the admin port that is not
//! published.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Each request, connect to last byte, fits in this budget (Compose's timeout is longer).
const BUDGET: Duration = Duration::from_millis(1800);

/// An answer larger than this is not one `web` gives (`/metrics` is a few kilobytes).
const MAX_ANSWER_BYTES: usize = 4 << 20;

/// Asks the local service for `path`; `Ok` only on an HTTP 200.
pub fn probe(port: u16, path: &str) -> Result<(), String> {
    get(port, path).map(drop)
}

/// The body of `path` on the local service, if it answers 200.
pub fn get(port: u16, path: &str) -> Result<Vec<u8>, String> {
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
    // HTTP/1.0: the server closes the connection after the answer, which ends the body.
    let mut answer = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        stream
            .set_read_timeout(Some(remaining()))
            .map_err(|e| format!("reading the answer: {e}"))?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) if answer.len() + n <= MAX_ANSWER_BYTES => answer.extend_from_slice(&chunk[..n]),
            Ok(_) => return Err(format!("answer over {MAX_ANSWER_BYTES} bytes")),
            Err(e) => return Err(format!("reading the answer: {e}")),
        }
    }
    let head_end = answer.windows(4).position(|w| w == b"\r\n\r\n");
    let status_line = String::from_utf8_lossy(&answer[..head_end.unwrap_or(answer.len())]);
    match status_line.split_whitespace().nth(1) {
        Some("200") => Ok(head_end.map_or_else(Vec::new, |end| answer[end + 4..].to_vec())),
        other => Err(format!(
            "unexpected answer: status {}",
            other.unwrap_or("missing")
        )),
    }
}
