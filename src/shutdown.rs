//! The signals that stop the service.

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
