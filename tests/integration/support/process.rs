//! The real `web` binary as a child process.

use super::*;

/// The real binary, for what only a process shows: signals, exit codes, logs, replicas.
pub struct WebProcess {
    pub port: u16,
    pub admin_port: u16,
    pub child: Child,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    /// The stdout pipe nobody reads any more (`spawn_with_stdout_unread`).
    _unread: Option<std::io::BufReader<std::process::ChildStdout>>,
    _logs: TempDir,
    _env: Env,
}

impl WebProcess {
    /// Starts `web` on ports the system picks (`PORT=0`, no race between picking and binding),
    /// and learns them from its start-up log line.
    pub fn spawn(env: Env) -> Self {
        Self::start(env, false)
    }

    /// As `spawn`, with stdout a pipe that is read up to the start-up line and never again:
    /// once the pipe is full, the service's log writer blocks.
    pub fn spawn_with_stdout_unread(env: Env) -> Self {
        Self::start(env, true)
    }

    fn start(env: Env, unread: bool) -> Self {
        let logs = tempfile::tempdir().expect("log dir");
        let stdout = logs.path().join("stdout");
        let stderr = logs.path().join("stderr");
        let mut child = Command::new(env!("CARGO_BIN_EXE_web"))
            .env_clear()
            .envs(&env.vars)
            .env("PORT", "0")
            .env("ADMIN_PORT", "0")
            .stdout(if unread {
                Stdio::piped()
            } else {
                std::fs::File::create(&stdout).expect("stdout file").into()
            })
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("starting web");
        let (ports, pipe) = match child.stdout.take() {
            Some(pipe) => {
                let mut pipe = std::io::BufReader::new(pipe);
                let ports = std::io::BufRead::lines(&mut pipe)
                    .map_while(Result::ok)
                    .find_map(|line| listening(&line));
                (ports, Some(pipe))
            }
            None => (ports_from_file(&stdout, &mut child), None),
        };
        // A process that stopped before listening (bad configuration) has no ports.
        let (port, admin_port) = ports.unwrap_or((0, 0));
        Self {
            port,
            admin_port,
            child,
            stdout,
            stderr,
            _unread: pipe,
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

/// The ports in the start-up log line (`"message":"listening"`), if `line` is that line.
fn listening(line: &str) -> Option<(u16, u16)> {
    let line: Value = serde_json::from_str(line).ok()?;
    if line["message"] != "listening" {
        return None;
    }
    let port = |key: &str| u16::try_from(line[key].as_u64()?).ok();
    Some((port("port")?, port("admin_port")?))
}

/// Waits (10 s at most) for the start-up line in the stdout file, or for the process to exit.
fn ports_from_file(stdout: &Path, child: &mut Child) -> Option<(u16, u16)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(stdout).unwrap_or_default();
        if let Some(ports) = text.lines().find_map(listening) {
            return Some(ports);
        }
        if child.try_wait().expect("try_wait").is_some() {
            return None;
        }
        assert!(
            Instant::now() < deadline,
            "web never logged its ports:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `web healthcheck` against the admin port `port`: exit code, how long it took, stderr.
pub fn healthcheck(port: u16) -> (Option<i32>, Duration, String) {
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_web"))
        .arg("healthcheck")
        .env_clear()
        .env("ADMIN_PORT", port.to_string())
        .output()
        .expect("running web healthcheck");
    (
        output.status.code(),
        started.elapsed(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
