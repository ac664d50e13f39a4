//! Throwaway PostgreSQL servers, copied from one template cluster, and their counter of record.

use super::*;

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
                .args(["-p", &self.port.to_string(), "-k"])
                .arg(self.dir.path()) // the local socket (`local_command`); its path < 108 bytes
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

    /// `program` (`psql`, or a script that runs it) reaching this server over its local
    /// socket, as `docker exec db psql -U admin` and the official image's init scripts reach
    /// the compose stack's: `PGHOST` is the socket's directory, where `pg_hba.conf` trusts
    /// every user without a password (initdb's `--auth-local=trust`, as in the image); the
    /// server's own client programs come first on `PATH`. Pass `-U` (or `PGUSER`) and `-d`.
    pub fn local_command(&self, program: &str) -> Command {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let path =
            std::iter::once(postgres_bin_dir().to_path_buf()).chain(std::env::split_paths(&path));
        let mut cmd = Command::new(program);
        cmd.env("PATH", std::env::join_paths(path).expect("PATH"))
            .env("PGHOST", self.dir.path())
            .env("PGPORT", self.port.to_string())
            .env_remove("PGPASSWORD")
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

    /// The first column of the first row `sql` returns, as text, queried as the superuser;
    /// `None` for no row or NULL, or while the server is out.
    pub fn query_text(&self, sql: &str) -> Option<String> {
        let sql = sql.to_owned();
        with_client(self.port, move |client| async move {
            let row = client.query_opt(&sql, &[]).await?;
            row.map(|row| row.try_get::<_, Option<String>>(0))
                .transpose()
        })
        .flatten()
        .flatten()
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
