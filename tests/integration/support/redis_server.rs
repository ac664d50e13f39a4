//! Throwaway Redis servers: started, killed, restarted with their data, older data or none.

use super::*;

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

/// The harness's Redis user that loads the counting functions, and its password.
const LOADER: &str = "operator";
const ADMIN_PASSWORD: &str = "operator-Xk4-test";

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
        let redis = Self {
            port,
            dir: tempfile::tempdir().expect("temp dir for redis"),
            child: None,
            tls,
            persistent,
        };
        std::fs::write(redis.admin_password_file(), ADMIN_PASSWORD).expect("admin password file");
        redis
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
            // `default` keeps every right (the harness's own helpers use it); the loader of the
            // counting functions is named otherwise than the stack's `admin`, as a managed
            // Redis's administrator may be (REDIS_ADMIN_USER).
            .args([
                "--user",
                LOADER,
                "on",
                &format!(">{ADMIN_PASSWORD}"),
                "~*",
                "&*",
                "+@all",
            ])
            .args(["--save", "", "--protected-mode", "no"])
            .args(["--appendonly", if self.persistent { "yes" } else { "no" }])
            .args(["--appendfsync", "everysec"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_file())
            .args(self.tls_args())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server (is it installed and on PATH?)");
        self.child = Some(child);
        // A server loading its data file accepts connections and answers LOADING meanwhile;
        // the harness's own helpers (plain TCP only) wait until it answers.
        wait_until("redis", Duration::from_secs(10), || {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "redis-server on port {} exited ({status}): {}",
                    self.port,
                    self.log()
                );
            }
            accepts_connections(self.port) && (self.tls || self.answers())
        });
        self.load_functions();
    }

    /// Runs the stack's cache healthcheck against this server, which loads the counting
    /// functions as `admin` when they are missing or out of date, as the stack's does within
    /// one healthcheck interval. `launch` runs it (a stack's cache is not healthy without them).
    pub fn load_functions(&self) {
        let mut connection = vec!["-p".to_string(), self.port.to_string()];
        if self.tls {
            let ca = self.dir.path().join("ca.crt");
            connection.extend(["--tls".into(), "--cacert".into(), ca.display().to_string()]);
        }
        let output = Command::new("sh")
            .arg(repo_file(
                "deploy/kubernetes/base/cache/functions/healthcheck.sh",
            ))
            .args(&connection)
            .env("REDIS_ADMIN_USER", LOADER)
            .env("REDIS_ADMIN_PASSWORD_FILE", self.admin_password_file())
            .output()
            .expect("running the cache healthcheck");
        assert!(
            output.status.success(),
            "the cache healthcheck failed on port {}: {}{}",
            self.port,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Gives the server the users of an ACL file (`web secrets`): `web` (its keys
    /// and the counting functions), `admin`, and `default` (PING only), applied last, after
    /// which the harness's own helpers stop working.
    pub fn apply_acl(&self, acl_file: &Path) {
        let acl = std::fs::read_to_string(acl_file).expect("ACL file");
        let mut conn = self.client();
        let mut lines: Vec<&str> = acl.lines().filter(|l| l.starts_with("user ")).collect();
        lines.sort_by_key(|l| l.starts_with("user default "));
        for line in lines {
            let mut cmd = redis::cmd("ACL");
            cmd.arg("SETUSER");
            for word in line.split_whitespace().skip(1) {
                cmd.arg(word);
            }
            let () = cmd.query(&mut conn).expect("ACL SETUSER");
        }
    }

    /// Removes the counting functions, as a Redis whose data was replaced lacks them.
    pub fn flush_functions(&self) {
        let _: () = redis::cmd("FUNCTION")
            .arg("FLUSH")
            .query(&mut self.client())
            .expect("FUNCTION FLUSH");
    }

    fn admin_password_file(&self) -> PathBuf {
        self.dir.path().join("admin_password")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// What the server logged, for a failure's message.
    fn log(&self) -> String {
        std::fs::read_to_string(self.log_file()).unwrap_or_default()
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

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
