//! Shared test harness: throwaway Redis and PostgreSQL servers on free loopback ports, the
//! app started in-process on a random port (as zero2prod does), or as the real `web` binary
//! when a test needs a process (signals, exit codes, several replicas).
//!
//! Works as root (CI: PostgreSQL refuses to run as root, so its processes drop to `nobody`)
//! and as an ordinary user (developer machines, the Nix build sandbox).
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod tls;

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicU64};
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

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral port")
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

// ---------------------------------------------------------------------------------------
// Redis

pub struct Redis {
    pub port: u16,
    dir: TempDir,
    child: Option<Child>,
    /// TLS only (see `start_tls`).
    tls: bool,
    /// Keeps its data in an append-only file (see `start_persistent`).
    persistent: bool,
}

/// What a Redis server keeps on disk: its append-only files (and an RDB file, if any).
const REDIS_DATA: [&str; 2] = ["appendonlydir", "dump.rdb"];

/// A copy of a Redis server's data files as they were at one moment (see `Redis::snapshot`).
pub struct RedisData(TempDir);

impl Redis {
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Self {
        Self::configured(port, false, false).launched()
    }

    /// With an append-only file, written at every increment and fsynced every second, as the
    /// compose file runs it: `stop` or `kill` then `relaunch` brings the data back (only a
    /// host crash loses the last second; `snapshot` and `restore` stand in for that).
    pub fn start_persistent() -> Self {
        Self::configured(free_port(), false, true).launched()
    }

    /// TLS only (no plain listener), presenting `tls`'s certificate; clients are not asked
    /// for one. Reach it as `rediss://localhost:{port}`; the harness's own helpers
    /// (`get_counter`, …) speak plain TCP and do not work on it.
    pub fn start_tls(tls: &tls::ServerTls) -> Self {
        let redis = Self::configured(free_port(), true, false);
        write_tls_files(redis.dir.path(), tls);
        redis.launched()
    }

    fn configured(port: u16, tls: bool, persistent: bool) -> Self {
        Self {
            port,
            dir: tempfile::tempdir().expect("temp dir for redis"),
            child: None,
            tls,
            persistent,
        }
    }

    fn launched(mut self) -> Self {
        self.launch();
        self
    }

    fn tls_args(&self) -> Vec<String> {
        if !self.tls {
            return Vec::new();
        }
        let file = |name: &str| self.dir.path().join(name).display().to_string();
        // The later `--port 0` overrides the plain port given before it.
        vec![
            "--port".into(),
            "0".into(),
            "--tls-port".into(),
            self.port.to_string(),
            "--tls-cert-file".into(),
            file("server.crt"),
            "--tls-key-file".into(),
            file("server.key"),
            "--tls-ca-cert-file".into(),
            file("ca.crt"),
            "--tls-auth-clients".into(),
            "no".into(),
        ]
    }

    fn launch(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--protected-mode", "no"])
            .args(["--appendonly", if self.persistent { "yes" } else { "no" }])
            .args(["--appendfsync", "everysec"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(self.tls_args())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server (is it installed and on PATH?)");
        self.child = Some(child);
        // A server loading its data file accepts connections and answers LOADING meanwhile;
        // the harness's own helpers (plain TCP only) wait until it answers.
        wait_until("redis", Duration::from_secs(10), || {
            accepts_connections(self.port) && (self.tls || self.answers())
        });
    }

    fn answers(&self) -> bool {
        let ping = redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
        ping.is_ok()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Freezes the server: connections stay open and nothing answers until `resume`.
    pub fn pause(&self) {
        signal_tree(self.child.as_ref().expect("redis is running"), Signal::STOP);
    }

    pub fn resume(&self) {
        signal_tree(self.child.as_ref().expect("redis is running"), Signal::CONT);
    }

    /// SIGKILL: no goodbye; a persistent server keeps what it wrote (the kernel has it).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_tree(&mut child);
        }
    }

    /// SIGTERM and wait: a clean shutdown, the append-only file complete.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_tree(&child, Signal::TERM);
            let _ = child.wait();
        }
    }

    /// Starts a stopped or killed server again on the same port and data directory.
    pub fn relaunch(&mut self) {
        self.launch();
    }

    /// Starts a killed server again on the same port, its data gone, as after a restart
    /// without a volume.
    pub fn relaunch_empty(&mut self) {
        self.wipe();
        self.launch();
    }

    pub fn restart_empty(&mut self) {
        self.kill();
        self.relaunch_empty();
    }

    fn wipe(&self) {
        assert!(self.child.is_none(), "redis still running");
        for name in REDIS_DATA {
            let path = self.dir.path().join(name);
            let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
        }
    }

    /// Copies the data files as they are now (running or not), for `restore` to bring back
    /// later: a server restarted from an older backup, or from a volume that lagged.
    pub fn snapshot(&self) -> RedisData {
        let copy = tempfile::tempdir().expect("temp dir for the snapshot");
        copy_data(self.dir.path(), copy.path());
        RedisData(copy)
    }

    /// Puts a snapshot's files in place of the data files of a stopped or killed server;
    /// `relaunch` then loads them.
    pub fn restore(&mut self, data: &RedisData) {
        self.wipe();
        copy_data(data.0.path(), self.dir.path());
    }

    fn client(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .expect("connecting to the test redis")
    }

    pub fn get_counter(&self) -> Option<i64> {
        redis::cmd("GET")
            .arg("visitas")
            .query(&mut self.client())
            .expect("GET visitas")
    }

    /// Writes anything into the counter key, as anyone on the network could.
    pub fn set_raw_counter(&self, value: &str) {
        let _: () = redis::cmd("SET")
            .arg("visitas")
            .arg(value)
            .query(&mut self.client())
            .expect("SET visitas");
    }

    pub fn get_raw_counter(&self) -> Option<String> {
        redis::cmd("GET")
            .arg("visitas")
            .query(&mut self.client())
            .expect("GET visitas")
    }

    pub fn set_counter(&self, value: i64) {
        let _: () = redis::cmd("SET")
            .arg("visitas")
            .arg(value)
            .query(&mut self.client())
            .expect("SET visitas");
    }

    /// Connections ever accepted by the server, this query's own included.
    pub fn connections_accepted(&self) -> i64 {
        let info: String = redis::cmd("INFO")
            .arg("stats")
            .query(&mut self.client())
            .expect("INFO stats");
        info.lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("total_connections_received")
    }

    /// Replaces this server's data with a copy of `source`'s, as a replica resyncing from a
    /// new master does (`REPLICAOF`, a full sync), then makes it a master again: same process
    /// (`run_id`), other data. A failover and failback, or a repaired replica, does the same.
    pub fn resync_from(&self, source: &Redis) {
        // Redis waits 5 s by default for more replicas before a diskless sync; a real
        // resync of a small data set takes milliseconds, too short for anyone to notice.
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("repl-diskless-sync-delay")
            .arg(0)
            .query(&mut source.client())
            .expect("CONFIG SET repl-diskless-sync-delay");
        let mut conn = self.client();
        let _: () = redis::cmd("REPLICAOF")
            .arg("127.0.0.1")
            .arg(source.port)
            .query(&mut conn)
            .expect("REPLICAOF");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut conn)
                .expect("INFO replication");
            if info.contains("master_link_status:up") && info.contains("master_sync_in_progress:0")
            {
                break;
            }
            assert!(Instant::now() < deadline, "no resync within 10 s: {info}");
            std::thread::sleep(Duration::from_millis(10));
        }
        let _: () = redis::cmd("REPLICAOF")
            .arg("NO")
            .arg("ONE")
            .query(&mut conn)
            .expect("REPLICAOF NO ONE");
    }

    pub fn flushall(&self) {
        let _: () = redis::cmd("FLUSHALL")
            .query(&mut self.client())
            .expect("FLUSHALL");
    }
}

/// Copies Redis's data files from one directory to another.
fn copy_data(from: &Path, to: &Path) {
    for name in REDIS_DATA {
        if from.join(name).exists() {
            copy_tree(&from.join(name), &to.join(name));
        }
    }
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

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------
// PostgreSQL

/// Directory holding `initdb` and `postgres`: from PATH (Nix, most distributions) or
/// Debian's versioned `/usr/lib/postgresql/<major>/bin`, newest first.
fn postgres_bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let has_both = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
        let from_path = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default();
        if let Some(dir) = from_path.into_iter().find(|d| has_both(d)) {
            return dir;
        }
        let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let major = e.file_name().to_str()?.parse().ok()?;
                Some((major, e.path().join("bin")))
            })
            .filter(|(_, d)| has_both(d))
            .collect();
        debian.sort();
        debian
            .pop()
            .map(|(_, d)| d)
            .expect("PostgreSQL not found: install it (initdb/postgres on PATH or /usr/lib/postgresql/*/bin)")
    })
}

fn pg_command(program: &str) -> Command {
    let mut cmd = Command::new(postgres_bin_dir().join(program));
    if is_root() {
        cmd.uid(NOBODY).gid(NOBODY);
    }
    cmd.env("LC_ALL", "C");
    cmd
}

fn give_to_postgres(path: &Path) {
    if is_root() {
        std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY)).expect("chown for postgres");
    }
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

/// `initdb` costs a second or two: do it once, keep the cluster under Cargo's per-target
/// temporary directory, and give each test a copy. Built aside and renamed into place, so
/// test binaries running in parallel never see half a template.
fn template_cluster() -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        // Named after the uid that owns (and runs) the cluster.
        let owner = if is_root() { NOBODY } else { euid() };
        let ready = base.join(format!("pg-template-v1-uid{owner}"));
        if ready.join("data/PG_VERSION").is_file() {
            return ready;
        }
        std::fs::create_dir_all(base).expect("target tmp dir");
        let building = tempfile::Builder::new()
            .prefix("pg-template-building")
            .tempdir_in(base)
            .expect("temp dir");
        give_to_postgres(building.path());
        let data = building.path().join("data");
        let pwfile = building.path().join("pw");
        std::fs::write(&pwfile, DB_PASSWORD).expect("password file");
        give_to_postgres(&pwfile);
        let status = pg_command("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                DB_USER,
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
            ])
            .args(["-E", "UTF8", "--locale=C", "--no-sync"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .status()
            .expect("running initdb");
        assert!(status.success(), "initdb failed");
        // Single-user mode creates the database without a port or a running server.
        let mut single = pg_command("postgres")
            .arg("--single")
            .arg("-D")
            .arg(&data)
            .arg("postgres")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("postgres --single");
        {
            use std::io::Write;
            let mut stdin = single.stdin.take().expect("stdin");
            writeln!(stdin, "CREATE DATABASE {DB_NAME};").expect("writing to postgres");
        }
        assert!(single.wait().expect("postgres --single").success());
        let built = building.keep();
        if std::fs::rename(&built, &ready).is_err() {
            // Another test binary won the race; its template is as good as ours.
            let _ = std::fs::remove_dir_all(&built);
        }
        ready
    })
}

pub struct Postgres {
    pub port: u16,
    dir: TempDir,
    child: Option<Child>,
    /// `ssl=on` (see `start_tls`).
    ssl: bool,
}

impl Postgres {
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Self {
        Self::start_with(port, None)
    }

    /// With `ssl=on`, presenting `tls`'s certificate. Plain connections are still accepted
    /// (the harness's own queries use them): `sslmode` decides what the client does.
    pub fn start_tls(tls: &tls::ServerTls) -> Self {
        Self::start_with(free_port(), Some(tls))
    }

    fn start_with(port: u16, tls: Option<&tls::ServerTls>) -> Self {
        let template = template_cluster().join("data");
        let dir = tempfile::tempdir().expect("temp dir for postgres");
        give_to_postgres(dir.path());
        copy_tree(&template, &dir.path().join("data"));
        if let Some(tls) = tls {
            write_tls_files(dir.path(), tls);
        }
        let mut pg = Self {
            port,
            dir,
            child: None,
            ssl: tls.is_some(),
        };
        pg.launch();
        pg
    }

    fn launch(&mut self) {
        let mut last_error = String::new();
        // A restart right after SIGKILL can find the old shared memory still attached for a
        // moment; PostgreSQL then refuses to start, and a retry succeeds.
        for _ in 0..50 {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.path().join("postgres.log"))
                .expect("postgres log file");
            let mut child = pg_command("postgres")
                .arg("-D")
                .arg(self.dir.path().join("data"))
                .args(["-p", &self.port.to_string(), "-k", ""])
                .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
                .args(["-c", "max_connections=200"])
                .args(self.ssl_args())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("starting postgres");
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    last_error = self.log();
                    break;
                }
                if self.answers() {
                    self.child = Some(child);
                    return;
                }
                assert!(Instant::now() < deadline, "postgres did not start");
                std::thread::sleep(Duration::from_millis(30));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("postgres would not start: {last_error}");
    }

    fn ssl_args(&self) -> Vec<String> {
        if !self.ssl {
            return Vec::new();
        }
        let file = |name: &str| self.dir.path().join(name).display().to_string();
        vec![
            "-c".into(),
            "ssl=on".into(),
            "-c".into(),
            format!("ssl_cert_file={}", file("server.crt")),
            "-c".into(),
            format!("ssl_key_file={}", file("server.key")),
        ]
    }

    /// For each of the service's sessions now open, whether it runs over TLS (`pg_stat_ssl`).
    pub fn web_sessions_over_tls(&self) -> Vec<bool> {
        with_client(self.port, |client| async move {
            let rows = client
                .query(
                    "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                     WHERE a.application_name = 'desafio3-web' ORDER BY pid",
                    &[],
                )
                .await?;
            rows.iter().map(|r| r.try_get(0)).collect()
        })
        .expect("pg_stat_ssl")
    }

    fn answers(&self) -> bool {
        accepts_connections(self.port) && query_i64(self.port, "SELECT 1::bigint").is_some()
    }

    pub fn url(&self) -> String {
        Self::url_on(self.port)
    }

    /// The server's URL as seen through a relay on `port` (a [`Partition`]).
    pub fn url_on(port: u16) -> String {
        format!("postgres://{DB_USER}@127.0.0.1:{port}/{DB_NAME}")
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_tree(&mut child);
        }
    }

    /// A clean shutdown (SIGINT, PostgreSQL's fast mode: sessions cut, data checkpointed).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            send_signal(
                i32::try_from(child.id()).expect("pid fits i32"),
                Signal::INT,
            );
            let _ = child.wait();
        }
    }

    /// Freezes every PostgreSQL process (as `docker pause` does): connections stay open,
    /// the kernel still accepts and acknowledges, and nothing answers.
    pub fn pause(&self) {
        self.signal_all(Signal::STOP);
    }

    pub fn resume(&self) {
        self.signal_all(Signal::CONT);
    }

    fn signal_all(&self, signal: Signal) {
        signal_tree(self.child.as_ref().expect("postgres is running"), signal);
    }

    /// Same data directory, same port: a crash and a restart.
    /// Starts a killed server again on the same data and port.
    pub fn relaunch(&mut self) {
        self.launch();
    }

    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// The counter of record, read directly; `None` before the service created its table.
    pub fn counter(&self) -> Option<i64> {
        Self::counter_on(self.port)
    }

    /// The counter of record of the server on `port`, blocking; `None` while it is out.
    pub fn counter_on(port: u16) -> Option<i64> {
        query_i64(port, "SELECT value FROM visit_counter WHERE id = 1")
    }

    /// Server processes of the service's connections now open (by `application_name`),
    /// sorted: a new connection shows as a new pid.
    pub fn web_backends(&self) -> Vec<i32> {
        with_client(self.port, |client| async move {
            let rows = client
                .query(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = 'desafio3-web' \
                     ORDER BY pid",
                    &[],
                )
                .await?;
            rows.iter().map(|r| r.try_get(0)).collect()
        })
        .expect("pg_stat_activity")
    }

    /// Everything the server logged so far (statements too, once `log_statement` is set).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// A client program (`psql`, `pg_dump`, ...), of the server's version where it lies
    /// beside the server, reaching this
    /// server as the superuser over TCP; `-U admin -d desafio3` on its command line then means
    /// what it means in the compose stack's `docker exec db ...`.
    pub fn client_command(&self, program: &str) -> Command {
        let beside_server = postgres_bin_dir().join(program);
        let mut cmd = if beside_server.is_file() {
            Command::new(beside_server)
        } else {
            Command::new(program) // e.g. Debian's version-independent wrapper on PATH
        };
        cmd.env("PGHOST", "127.0.0.1")
            .env("PGPORT", self.port.to_string())
            .env("PGPASSWORD", DB_PASSWORD)
            .env("LC_ALL", "C");
        cmd
    }

    /// Runs SQL as the superuser, for tests that arrange state behind the service's back.
    pub fn execute(&self, sql: &str) {
        let sql = sql.to_owned();
        with_client(self.port, move |client| async move {
            client.batch_execute(&sql).await
        })
        .expect("SQL runs");
    }

    /// Whether a table of that name is visible; `None` while the server is out.
    pub fn table_exists(&self, name: &str) -> Option<bool> {
        let name = name.to_owned();
        with_client(self.port, move |client| async move {
            let row = client
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
                .await?;
            row.try_get(0)
        })
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.kill();
    }
}

fn pg_conn_string(port: u16) -> String {
    format!(
        "host=127.0.0.1 port={port} user={DB_USER} password={DB_PASSWORD} dbname={DB_NAME} connect_timeout=2"
    )
}

/// Runs `f` with a fresh connection on a thread of its own, so that synchronous and async
/// tests alike can use it.
fn with_client<T, F, Fut>(port: u16, f: F) -> Option<T>
where
    T: Send + 'static,
    F: FnOnce(tokio_postgres::Client) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
{
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        rt.block_on(async {
            let (client, conn) =
                tokio_postgres::connect(&pg_conn_string(port), tokio_postgres::NoTls)
                    .await
                    .ok()?;
            tokio::spawn(conn);
            f(client).await.ok()
        })
    })
    .join()
    .ok()?
}

fn query_i64(port: u16, sql: &'static str) -> Option<i64> {
    with_client(port, move |client| async move {
        client
            .query_opt(sql, &[])
            .await?
            .map(|row| row.try_get(0))
            .transpose()
    })
    .flatten()
}

/// A listener that accepts connections and never says a word: the worst kind of outage.
pub struct Blackhole {
    pub port: u16,
    _thread: std::thread::JoinHandle<()>,
}

impl Blackhole {
    pub fn start() -> Self {
        Self::start_on(0)
    }

    pub fn start_on(port: u16) -> Self {
        let listener = StdListener::bind(("127.0.0.1", port)).expect("bind blackhole");
        let port = listener.local_addr().expect("addr").port();
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming().flatten() {
                held.push(stream);
            }
        });
        Self {
            port,
            _thread: thread,
        }
    }
}

/// A TCP relay in front of a server that can cut the network: after `cut`, connections that
/// were open stay open but silent for good (as when a container comes back with a new
/// address), and new ones are accepted and ignored until `heal`.
pub struct Partition {
    pub port: u16,
    generation: Arc<AtomicU64>,
    cut: Arc<AtomicBool>,
    /// Milliseconds each chunk waits before it is passed on, either way (a slow link).
    delay_ms: Arc<AtomicU64>,
}

impl Partition {
    pub fn start(upstream: u16) -> Self {
        let listener = StdListener::bind("127.0.0.1:0").expect("bind relay");
        let port = listener.local_addr().expect("addr").port();
        let generation = Arc::new(AtomicU64::new(0));
        let cut = Arc::new(AtomicBool::new(false));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let (gen_, cut_, delay_) = (generation.clone(), cut.clone(), delay_ms.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for client in listener.incoming().flatten() {
                if cut_.load(SeqCst) {
                    held.push(client);
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let born = gen_.load(SeqCst);
                for (from, to) in [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ] {
                    let (Ok(from), Ok(to)) = (from, to) else {
                        continue;
                    };
                    let (generation, delay) = (gen_.clone(), delay_.clone());
                    std::thread::spawn(move || relay(from, to, born, &generation, &delay));
                }
            }
        });
        Self {
            port,
            generation,
            cut,
            delay_ms,
        }
    }

    /// Every chunk waits `delay` before it is passed on, either way: a round trip takes
    /// twice that longer.
    pub fn slow(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).expect("a delay in milliseconds");
        self.delay_ms.store(ms, SeqCst);
    }

    pub fn cut(&self) {
        self.cut.store(true, SeqCst);
        self.generation.fetch_add(1, SeqCst);
    }

    pub fn heal(&self) {
        self.cut.store(false, SeqCst);
        self.delay_ms.store(0, SeqCst);
    }
}

/// Copies bytes until either side closes, and passes the close on (a server that stops
/// closes its clients' connections); drops them once the network was cut after this
/// connection was opened, and then passes nothing on, not even the close.
fn relay(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    born: u64,
    generation: &AtomicU64,
    delay_ms: &AtomicU64,
) {
    use std::io::{Read, Write};
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf) {
        std::thread::sleep(Duration::from_millis(delay_ms.load(SeqCst)));
        if generation.load(SeqCst) == born && to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    if generation.load(SeqCst) == born {
        let _ = to.shutdown(std::net::Shutdown::Write);
    }
}

// ---------------------------------------------------------------------------------------
// The service

/// Environment for the service, pointing at the given servers.
pub struct Env {
    pub vars: HashMap<String, String>,
    _password_dir: TempDir,
}

impl Env {
    pub fn new(redis_url: &str, database_url: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let pw = dir.path().join("db_password");
        std::fs::write(&pw, format!("{DB_PASSWORD}\n")).expect("password file");
        let mut vars = HashMap::new();
        vars.insert("REDIS_URL".into(), redis_url.into());
        vars.insert("DATABASE_URL".into(), database_url.into());
        vars.insert(
            "DATABASE_PASSWORD_FILE".into(),
            pw.to_str().expect("utf-8 path").into(),
        );
        vars.insert("DEPENDENCY_TIMEOUT_MS".into(), "500".into());
        Self {
            vars,
            _password_dir: dir,
        }
    }

    pub fn for_servers(redis: &Redis, pg: &Postgres) -> Self {
        Self::new(&redis.url(), &pg.url())
    }

    /// Dependencies that refuse every connection (closed loopback ports): for what never
    /// needs them, or must do without them.
    pub fn unreachable() -> Self {
        Self::new(
            &format!("redis://127.0.0.1:{}/0", free_port()),
            &format!("postgres://admin@127.0.0.1:{}/desafio3", free_port()),
        )
    }

    pub fn set(mut self, key: &str, value: &str) -> Self {
        self.vars.insert(key.into(), value.into());
        self
    }

    pub fn config(&self) -> Config {
        let mut config = Config::from_lookup(|k| self.vars.get(k).map(OsString::from))
            .expect("test configuration parses");
        config.port = 0;
        config.admin_port = 0;
        config
    }
}

pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

/// The app running in-process on a random port; stops when dropped.
pub struct TestApp {
    pub address: String,
    /// The admin listener: `/readyz`, `/metrics`.
    pub admin_address: String,
    pub client: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _env: Env,
}

impl TestApp {
    pub async fn spawn(env: Env) -> Self {
        let app = Application::build(env.config(), metrics())
            .await
            .expect("app builds");
        let address = format!("http://127.0.0.1:{}", app.port());
        let admin_address = format!("http://127.0.0.1:{}", app.admin_port());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        Self {
            address,
            admin_address,
            client: http_client(),
            stop: Some(stop),
            task: Some(task),
            _env: env,
        }
    }

    /// Starts the app and waits until both dependencies have been reached.
    pub async fn spawn_ready(env: Env) -> Self {
        let app = Self::spawn(env).await;
        app.wait_ready(Duration::from_secs(10)).await;
        app
    }

    pub async fn wait_ready(&self, timeout: Duration) {
        wait_ready(&self.client, &self.admin_address, timeout).await;
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.address))
            .send()
            .await
            .expect("request reaches the app")
    }

    /// A request to the admin listener.
    pub async fn get_admin(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.admin_address))
            .send()
            .await
            .expect("request reaches the admin listener")
    }

    /// `GET /`, as status code and parsed body.
    pub async fn visit(&self) -> (u16, Value) {
        get_page(&self.client, &self.address).await
    }

    /// Graceful stop, as on SIGTERM; returns once the app has shut down (queued visits answered,
    /// background tasks joined).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("app task").expect("app stops cleanly");
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Polls `/readyz` until it answers 200: both dependencies reached, schema in place.
pub async fn wait_ready(client: &reqwest::Client, base: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let ready = client.get(format!("{base}/readyz")).send().await;
        if ready.is_ok_and(|r| r.status() == 200) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{base} not ready after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn get_page(client: &reqwest::Client, base: &str) -> (u16, Value) {
    try_get_page(client, base)
        .await
        .expect("request reaches the app, and it answers JSON")
}

/// `GET /`, for callers that expect the app to be gone or cut off at times.
pub async fn try_get_page(
    client: &reqwest::Client,
    base: &str,
) -> Result<(u16, Value), reqwest::Error> {
    let response = client.get(format!("{base}/")).send().await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await?))
}

/// The count a page carries, if any (it is a JSON string, by contract).
pub fn count_of(page: &Value) -> Option<i64> {
    page["visitas_cache"]
        .as_str()
        .map(|s| s.parse().expect("numeric count"))
}

/// The counting invariant over every count handed out in a run (README, "never loses or
/// repeats a count"), for the tests that count through faults.
pub struct Counted {
    /// Counts handed out, each once.
    pub distinct: usize,
    pub highest: i64,
    /// The counter of record at the end.
    pub record: i64,
    /// Numbers of record never handed out.
    pub gaps: i64,
    /// Counts handed out more than once.
    pub repeated: Vec<i64>,
}

impl Counted {
    pub fn of(counts: impl IntoIterator<Item = i64>, record: i64) -> Self {
        let mut seen = std::collections::HashSet::new();
        let repeated: Vec<i64> = counts.into_iter().filter(|c| !seen.insert(*c)).collect();
        let highest = seen.iter().copied().max().unwrap_or(0);
        Self {
            distinct: seen.len(),
            highest,
            record,
            gaps: record - seen.len() as i64,
            repeated,
        }
    }

    /// What breaks the invariant, a line each: a count handed out twice, a counter of record
    /// below a count handed out, more gaps than the requests that can explain them.
    pub fn violations(&self, gap_bound: i64) -> Vec<String> {
        let mut v = Vec::new();
        if !self.repeated.is_empty() {
            let some = &self.repeated[..self.repeated.len().min(8)];
            v.push(format!(
                "{} counts handed out twice, e.g. {some:?}",
                self.repeated.len()
            ));
        }
        if self.record < self.highest {
            v.push(format!(
                "counter of record {} < highest count handed out {}",
                self.record, self.highest
            ));
        }
        if self.gaps > gap_bound {
            v.push(format!(
                "{} gaps > {gap_bound} requests in flight at the faults",
                self.gaps
            ));
        }
        v
    }
}

/// The real binary, for what only a process shows: signals, exit codes, logs, replicas.
pub struct WebProcess {
    pub port: u16,
    pub admin_port: u16,
    pub child: Child,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    _logs: TempDir,
    _env: Env,
}

impl WebProcess {
    pub fn spawn(env: Env) -> Self {
        Self::spawn_with_stdout(env, None)
    }

    /// As `spawn`, with stdout sent to `to` (say, a pipe nobody reads) instead of the file
    /// that `logs` reads.
    pub fn spawn_with_stdout(env: Env, to: Option<Stdio>) -> Self {
        let (port, admin_port) = (free_port(), free_port());
        let logs = tempfile::tempdir().expect("log dir");
        let stdout = logs.path().join("stdout");
        let stderr = logs.path().join("stderr");
        let child = Command::new(env!("CARGO_BIN_EXE_web"))
            .env_clear()
            .envs(&env.vars)
            .env("PORT", port.to_string())
            .env("ADMIN_PORT", admin_port.to_string())
            .stdout(
                to.unwrap_or_else(|| std::fs::File::create(&stdout).expect("stdout file").into()),
            )
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("starting web");
        Self {
            port,
            admin_port,
            child,
            stdout,
            stderr,
            _logs: logs,
            _env: env,
        }
    }

    pub fn address(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn admin_address(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    /// The process's `/metrics`, as Prometheus would scrape it.
    pub async fn metrics_text(&self) -> String {
        let url = format!("{}/metrics", self.admin_address());
        let answer = http_client().get(url).send().await.expect("GET /metrics");
        answer.text().await.expect("/metrics body")
    }

    pub async fn wait_ready(&self, timeout: Duration) {
        wait_ready(&http_client(), &self.admin_address(), timeout).await;
    }

    /// SIGKILL, and the process reaped: no drain.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn signal(&self, signal: Signal) {
        send_signal(
            i32::try_from(self.child.id()).expect("pid fits i32"),
            signal,
        );
    }

    /// Waits for the process to exit; returns its exit code and how long that took.
    pub fn wait_exit(&mut self, timeout: Duration) -> (Option<i32>, Duration) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return (status.code(), started.elapsed());
            }
            if started.elapsed() > timeout {
                let _ = self.child.kill();
                panic!("web did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn logs(&self) -> (String, String) {
        (
            std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            std::fs::read_to_string(&self.stderr).unwrap_or_default(),
        )
    }
}

impl Drop for WebProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}
