//! The real `web` binary as a child process.

use super::*;

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
