//! Shared test harness: throwaway Redis and PostgreSQL servers on free loopback ports, the
//! app started in-process on a random port (as zero2prod does), or as the real `web` binary
//! when a test needs a process (signals, exit codes, several replicas).
//!
//! Works as root (CI: PostgreSQL refuses to run as root, so its processes drop to `nobody`)
//! and as an ordinary user (developer machines, the Nix build sandbox).

pub mod tls;

mod app;
mod counting;
mod postgres_server;
mod process;
mod proxies;
mod redis_server;

pub use app::*;
pub use counting::Counted;
pub use postgres_server::*;
pub use process::{WebProcess, healthcheck};
pub use proxies::{Blackhole, Partition};
pub use redis_server::*;

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::TcpListener as StdListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use desafio3::Application;
use desafio3::config::Config;
use serde_json::Value;
use tempfile::TempDir;

pub const DB_USER: &str = "admin";
pub const DB_NAME: &str = "desafio3";
/// Distinctive so tests can prove it never reaches a log line or a response.
pub const DB_PASSWORD: &str = "pw-Zq8-never-in-logs";

/// A loopback port for a server a test starts, now or later, that nobody else will take
/// meanwhile. Ports come from just below the kernel's ephemeral range, where neither `bind` to
/// port 0 nor the source port of an outgoing connection is ever placed: an app probing a server
/// that is not started yet cannot end up holding its port (its probes use ephemeral ports),
/// nor can another test asking the kernel for one. Each call in this process moves on to the
/// next port, so two tests never get the same one; a port some other program holds is skipped.
pub fn free_port() -> u16 {
    static NEXT: OnceLock<AtomicU16> = OnceLock::new();
    let (low, high) = harness_ports();
    let span = u32::from(high - low);
    let next = NEXT.get_or_init(|| {
        // Another test binary running beside this one starts elsewhere in the range.
        AtomicU16::new((u64::from(std::process::id()) * 7919 % u64::from(span)) as u16)
    });
    for _ in 0..span {
        let port = low + (u32::from(next.fetch_add(1, SeqCst)) % span) as u16;
        if StdListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {low}..{high}");
}

/// `low..high`: the 16,384 ports below the kernel's ephemeral range (`ip_local_port_range`).
fn harness_ports() -> (u16, u16) {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .unwrap_or_else(|_| "32768 60999".into());
    let ephemeral_low: u16 = range
        .split_whitespace()
        .next()
        .and_then(|low| low.parse().ok())
        .expect("ip_local_port_range starts with a port");
    assert!(
        ephemeral_low > 17_408,
        "the ephemeral range starts at {ephemeral_low}: no room for test servers below it"
    );
    (ephemeral_low - 16_384, ephemeral_low)
}

/// A file of this repository, by its path from the top.
pub fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A file of the compose stack's secrets as its first start writes them (`web secrets`, one
/// directory per consumer: `"cache/redis_users.acl"`, `"web/redis_password"`, ...), made once
/// per test run in a temporary directory.
pub fn stack_secret(path: &str) -> PathBuf {
    static SECRETS: OnceLock<TempDir> = OnceLock::new();
    let dir = SECRETS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir for the secrets");
        desafio3::secrets::write(dir.path()).expect("web secrets");
        dir
    });
    dir.path().join(path)
}

/// The password in one of those files, as the service reads it: without the final newline.
pub fn stack_password(path: &str) -> String {
    let text = std::fs::read_to_string(stack_secret(path)).expect("a stack password file");
    text.trim_end_matches(['\r', '\n']).to_owned()
}

pub use rustix::process::Signal;

fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

fn is_root() -> bool {
    euid() == 0
}

/// Signals one process. A process that already exited is not an error here.
fn send_signal(pid: i32, signal: Signal) {
    let Some(pid) = rustix::process::Pid::from_raw(pid) else {
        panic!("refusing to signal pid {pid}");
    };
    if let Err(error) = rustix::process::kill_process(pid, signal) {
        eprintln!("signal {signal:?} to {pid:?}: {error}");
    }
}

/// Runs a blocking fault injection (a server killed, restarted, frozen) without stopping the
/// runtime: the app under test and its clients go on being served on the other workers.
/// Panics on a single-threaded runtime, where that cannot hold.
pub fn inject<T>(fault: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(fault)
}

/// The process-wide metrics recorder, installed once per test binary.
pub fn metrics() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            desafio3::telemetry::install_metrics().expect("one recorder per test binary")
        })
        .clone()
}

/// Uid/gid PostgreSQL runs as when the tests run as root.
const NOBODY: u32 = 65534;

fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "{what} not ready after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn accepts_connections(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// `pid` and every process descending from it. PostgreSQL's children each start a session
/// of their own, so a process group would not reach them.
fn process_tree(pid: u32) -> Vec<i32> {
    let parent_of = |p: &str| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        // pid (comm) state ppid ...; comm may contain spaces, so split after the last ')'.
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let all: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let pid = name.parse().ok()?;
            Some((pid, parent_of(&name)?))
        })
        .collect();
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(all.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
        i += 1;
    }
    tree.into_iter()
        .filter_map(|p| i32::try_from(p).ok())
        .collect()
}

/// Signals a server and all its processes at once, as when its container is killed.
fn signal_tree(child: &Child, signal: Signal) {
    for pid in process_tree(child.id()) {
        send_signal(pid, signal);
    }
}

fn kill_tree(child: &mut Child) {
    signal_tree(child, Signal::KILL);
    let _ = child.wait();
}

/// `cp -a`: a file or directory with its owner and modes, as a server's data must keep them.
fn copy_tree(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("running cp");
    assert!(
        status.success(),
        "copying {} to {}",
        from.display(),
        to.display()
    );
}

/// `server.crt`, `server.key` (0600, owned by the server's user, as PostgreSQL insists) and
/// `ca.crt` in `dir`.
fn write_tls_files(dir: &Path, tls: &tls::ServerTls) {
    use std::os::unix::fs::PermissionsExt;
    for (name, content, mode) in [
        ("server.crt", &tls.cert_pem, 0o644),
        ("server.key", &tls.key_pem, 0o600),
        ("ca.crt", &tls.ca_pem, 0o644),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, content).expect("TLS file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        give_to_postgres(&path);
    }
}

/// The server processes run as `nobody` when the tests run as root (see `NOBODY`).
fn give_to_postgres(path: &Path) {
    if is_root() {
        std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY)).expect("chown for postgres");
    }
}
