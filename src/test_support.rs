//! What unit tests share: a store whose dependencies refuse connections (closed loopback
//! ports: real refusals, no servers needed) and the metrics recorder.
use std::sync::{Arc, OnceLock};

use metrics_exporter_prometheus::PrometheusHandle;

use crate::config::Config;
use crate::store::Store;

fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub fn unreachable_config() -> Config {
    let (redis_port, pg_port) = (closed_port(), closed_port());
    Config::from_lookup(|name| match name {
        "REDIS_URL" => Some(format!("redis://127.0.0.1:{redis_port}/0").into()),
        "DATABASE_URL" => Some(format!("postgres://u@127.0.0.1:{pg_port}/d").into()),
        "DEPENDENCY_TIMEOUT_MS" => Some("300".into()),
        _ => None,
    })
    .expect("config")
}

pub fn unreachable_store() -> Arc<Store> {
    Store::new(&unreachable_config().store).expect("store")
}

pub fn metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| crate::telemetry::install_metrics().expect("one recorder"))
        .clone()
}
