//! `web` serves the page; `web healthcheck [--ready]` probes a running `web` (for container
//! healthchecks, and readiness where the admin port is not reachable); `web metrics` prints
//! its `/metrics` from inside the container, where the admin port is reachable; `web secrets
//! DIR` writes the stack's passwords (src/secrets.rs), as the image has no shell to do it.

use std::io::Write;
use std::process::ExitCode;

use desafio3::config::{self, Config};
use desafio3::{Application, healthcheck, secrets, shutdown, telemetry};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    match (args.next().as_deref(), args.next()) {
        (None, _) => serve(),
        (Some("healthcheck"), None) => check_health(config::admin_port_from_env(), "/healthz"),
        (Some("healthcheck"), Some(flag)) if flag == "--ready" => {
            check_health(config::admin_port_from_env(), "/readyz")
        }
        (Some("metrics"), None) => print_metrics(config::admin_port_from_env()),
        (Some("secrets"), Some(dir)) if args.next().is_none() => write_secrets(&dir),
        (Some("--version" | "-V"), None) => {
            println!("web {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("usage: web [healthcheck [--ready] | metrics | secrets DIR | --version]");
            ExitCode::from(2)
        }
    }
}

fn serve() -> ExitCode {
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let _flush_logs_on_exit = telemetry::init_logging(&config.log_filter);
    let metrics = match telemetry::install_metrics() {
        Ok(metrics) => metrics,
        Err(e) => {
            eprintln!("web: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let served = runtime.block_on(async {
        Application::build(config, metrics)
            .await?
            .run_until(shutdown::signal())
            .await
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(reason = format!("{e:#}"), "web stopped");
            eprintln!("web: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_health(port: Result<u16, config::ConfigError>, path: &str) -> ExitCode {
    let result = port
        .map_err(|e| e.to_string())
        .and_then(|port| healthcheck::probe(port, path));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("unhealthy: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_metrics(admin_port: Result<u16, config::ConfigError>) -> ExitCode {
    let result = admin_port
        .map_err(|e| e.to_string())
        .and_then(|port| healthcheck::get(port, "/metrics"))
        .and_then(|body| {
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(&body)
                .and_then(|()| stdout.flush())
                .map_err(|e| format!("writing to stdout: {e}"))
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("metrics unavailable: {e}");
            ExitCode::FAILURE
        }
    }
}

fn write_secrets(dir: &str) -> ExitCode {
    match secrets::write(std::path::Path::new(dir)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("web secrets: {e:#}");
            ExitCode::FAILURE
        }
    }
}
