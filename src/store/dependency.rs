//! Health state of one dependency, shared by every request and by its watcher task.
//!
//! A failed call marks the dependency down; while it is down, callers get an immediate
//! [`DepError::Unavailable`] instead of each waiting out the timeout, and a watcher task probes
//! it with backoff until it answers again. This is what keeps a blackholed dependency from
//! stacking up requests or exhausting the pool.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;

/// First and longest pause between probes of a dependency that is down. The ceiling keeps
/// recovery under two seconds after the dependency returns.
const PROBE_BACKOFF_MIN: Duration = Duration::from_millis(50);
const PROBE_BACKOFF_MAX: Duration = Duration::from_millis(1000);

/// Why a dependency call gave no answer. The `Display` is one line, safe to show to clients.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DepError {
    #[error("timed out after {} ms", .0.as_millis())]
    Timeout(Duration),
    #[error("unavailable ({0})")]
    Unavailable(String),
    #[error("{0}")]
    Failed(String),
}

impl DepError {
    /// One line for a driver error and its causes. Drivers repeat themselves along the chain
    /// (the pool's error quotes the client's, which quotes the server's), so a cause already
    /// quoted is not appended again; PostgreSQL details and Redis replies can span lines.
    pub fn failed(error: impl Into<anyhow::Error>) -> Self {
        let error = error.into();
        let mut text = String::new();
        for cause in error.chain() {
            let cause = cause.to_string();
            if !text.contains(&cause) {
                if !text.is_empty() {
                    text.push_str(": ");
                }
                text.push_str(&cause);
            }
        }
        Self::Failed(text.split_whitespace().collect::<Vec<_>>().join(" "))
    }
}

pub struct Dependency {
    name: &'static str,
    up: watch::Sender<bool>,
    last_error: Mutex<String>,
    timeout: Duration,
}

impl Dependency {
    /// A dependency starts down: nothing is known about it until its watcher reaches it.
    pub fn new(name: &'static str, timeout: Duration) -> Self {
        Self {
            name,
            up: watch::Sender::new(false),
            last_error: Mutex::new("not connected yet".into()),
            timeout,
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    /// Runs one call against the dependency, bounded by the configured timeout, and keeps the
    /// health state in step with the outcome. Fails fast while the dependency is down.
    pub async fn call<T, E: Into<anyhow::Error>>(
        &self,
        call: impl Future<Output = Result<T, E>>,
    ) -> Result<T, DepError> {
        if !self.is_up() {
            return Err(self.unavailable());
        }
        self.attempt(call).await
    }

    /// Like [`call`](Self::call) but tries even when the dependency is marked down: for
    /// probes and readiness checks, whose job is to find out.
    pub async fn attempt<T, E: Into<anyhow::Error>>(
        &self,
        call: impl Future<Output = Result<T, E>>,
    ) -> Result<T, DepError> {
        let result = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(DepError::failed(e)),
            Err(_) => Err(DepError::Timeout(self.timeout)),
        };
        match &result {
            Ok(_) => self.mark_up(),
            Err(e) => self.mark_down(e),
        }
        result
    }

    pub fn unavailable(&self) -> DepError {
        let last = self
            .last_error
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default();
        DepError::Unavailable(last)
    }

    fn mark_up(&self) {
        if !self.up.send_replace(true) {
            tracing::info!(
                dependency = self.name,
                state = "up",
                "dependency state changed"
            );
        }
    }

    pub fn mark_down(&self, error: &DepError) {
        metrics::counter!("dependency_errors_total", "dependency" => self.name).increment(1);
        if let Ok(mut last) = self.last_error.lock() {
            *last = error.to_string();
        }
        if self.up.send_replace(false) {
            tracing::warn!(
                dependency = self.name,
                state = "down",
                reason = %error,
                "dependency state changed"
            );
        }
    }

    /// Runs `probe` with backoff whenever the dependency is down, for the life of the
    /// process. The probe goes through [`attempt`](Self::attempt), which marks it up again.
    pub async fn watch<F, Fut>(&self, mut probe: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), DepError>>,
    {
        let mut state = self.up.subscribe();
        let mut backoff = PROBE_BACKOFF_MIN;
        let mut first_attempt = true;
        loop {
            if *state.borrow_and_update() {
                backoff = PROBE_BACKOFF_MIN;
                if state.changed().await.is_err() {
                    return;
                }
                continue;
            }
            if let Err(e) = probe().await {
                if std::mem::take(&mut first_attempt) {
                    tracing::warn!(dependency = self.name, state = "down", reason = %e, "dependency not reachable yet, retrying");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(PROBE_BACKOFF_MAX);
            }
        }
    }
}
