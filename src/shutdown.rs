//! What stops the service, and how long stopping may take: the signals, and the budget of
//! each shutdown step.

use std::time::Duration;

/// Completes on SIGTERM (Docker, Kubernetes) or SIGINT (Ctrl-C). Handlers are installed
/// explicitly because, as PID 1 in a container without an init, the kernel would otherwise
/// ignore both signals.
pub async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the service with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "signal received"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "signal received"),
    }
}

/// What Docker waits between SIGTERM and SIGKILL (`stop_grace_period` in docker-compose.yml;
/// Kubernetes' `terminationGracePeriodSeconds` is longer). The whole shutdown must fit in it,
/// for every dependency timeout `Config` accepts.
pub const STOP_GRACE_PERIOD: Duration = Duration::from_secs(10);

/// How long each step of the shutdown may take, all derived from the dependency timeout `t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownBudget {
    /// Longest a request may take (its answer is then a 503): a first request waits for the
    /// connection attempt in flight (`t`), then Redis's count (`t`), then PostgreSQL's
    /// confirmation and clock, or its own count in place of a failed Redis (`t`).
    pub request: Duration,
    /// In-flight requests finish within `request`; the margin lets their answers go out.
    pub drain: Duration,
    /// The batch still running after the drain, if requests timed out on it: at worst a count
    /// (`t`), a fencing (`2t`), a second count and its confirmation (`2t`).
    pub batch: Duration,
}

impl ShutdownBudget {
    pub fn for_timeout(t: Duration) -> Self {
        Self {
            request: 3 * t,
            drain: 3 * t + Duration::from_millis(250),
            batch: 5 * t,
        }
    }

    pub fn total(&self) -> Duration {
        self.drain + self.batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MAX_DEPENDENCY_TIMEOUT_MS;

    #[test]
    fn shutdown_fits_the_grace_period_for_every_accepted_timeout() {
        let longest = Duration::from_millis(MAX_DEPENDENCY_TIMEOUT_MS);
        let budget = ShutdownBudget::for_timeout(longest);
        assert!(
            budget.total() < STOP_GRACE_PERIOD,
            "{budget:?} totals {:?}",
            budget.total()
        );
    }

    #[test]
    fn the_compose_file_gives_web_the_grace_period_the_budget_assumes() {
        let compose = include_str!("../docker-compose.yml");
        let web = compose
            .split("\n  cache:")
            .next()
            .expect("the web service comes first");
        let expected = format!("stop_grace_period: {}s", STOP_GRACE_PERIOD.as_secs());
        assert!(web.contains(&expected), "web lacks {expected}");
    }
}
