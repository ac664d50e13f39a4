//! All configuration comes from the environment and is parsed here, once, at start-up.
//!
//! A bad value stops the process before it binds a port: `main` prints the one-line
//! [`ConfigError`] (which names the variable) and exits with code 2. Values that may carry a
//! secret (`REDIS_URL`, `DATABASE_URL`, password files) are never echoed back in errors.

use std::ffi::OsString;
use std::time::Duration;

use crate::store::{
    self,
    postgres_url::{PostgresUrl, RootsSource},
    tls::{RedisTls, SYSTEM_CA_BUNDLE, TrustRoots},
};

/// Everything the service needs to run. Fields are public so tests can adjust a parsed config
/// (for instance `port = 0` to let the OS pick a free port). No secret is printed by `Debug`:
/// the URLs and passwords are in [`store::Settings`], whose `Debug` redacts them.
#[derive(Clone, Debug)]
pub struct Config {
    /// TCP port of the public listener (`/`, `/healthz`), on every interface.
    pub port: u16,
    /// TCP port of the admin listener (`/metrics`, `/readyz`): for probes and scrapers,
    /// never published.
    pub admin_port: u16,
    /// Connections served at once, per listener; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Connections served at once for one client address, per listener.
    pub max_connections_per_address: usize,
    /// A client must send a whole request head within this time, also between the requests
    /// of a kept-alive connection, or the connection is closed.
    pub http_header_timeout: Duration,
    /// An answer that makes no write progress for this long closes its connection.
    pub http_write_timeout: Duration,
    /// A connection is closed after this long, once its request in flight is answered.
    pub http_connection_max_age: Duration,
    /// Redis and PostgreSQL: URLs, passwords, TLS, time zone, the dependency timeout.
    pub store: store::Settings,
    /// `tracing` filter directives (the `RUST_LOG` syntax).
    pub log_filter: String,
    /// Variables in the environment that look like `web`'s but are not read (see
    /// [`unknown_variables`]): logged as warnings once logging is up, since logging itself
    /// is configured from this `Config`.
    pub unknown_variables: Vec<String>,
}

/// A configuration variable that could not be used. Its `Display` is the single line that
/// `main` prints before exiting with code 2.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {var}: {reason}")]
pub struct ConfigError {
    /// The environment variable at fault.
    pub var: &'static str,
    /// Why it was rejected; never contains a secret.
    pub reason: String,
}

impl ConfigError {
    fn new(var: &'static str, reason: impl Into<String>) -> Self {
        Self {
            var,
            reason: reason.into(),
        }
    }
}

pub const DEFAULT_PORT: u16 = 5000;
pub const DEFAULT_ADMIN_PORT: u16 = 9090;
const DEFAULT_MAX_CONNECTIONS: u64 = 512;
const DEFAULT_HTTP_HEADER_TIMEOUT_MS: u64 = 5000;
const DEFAULT_HTTP_WRITE_TIMEOUT_MS: u64 = 10_000;
const DEFAULT_HTTP_CONNECTION_MAX_AGE_MS: u64 = 600_000;
pub const DEFAULT_REDIS_URL: &str = "redis://web@cache:6379/0";
pub const DEFAULT_DATABASE_URL: &str = "postgres://web@db:5432/desafio3";
const DEFAULT_TIMEZONE: &str = "UTC";
const DEFAULT_DEPENDENCY_TIMEOUT_MS: u64 = 1000;
/// The shutdown budget is a multiple of this timeout and must fit Docker's 10 s grace period
/// (see `ShutdownBudget`); a dependency that needs longer than a second per call is down.
pub const MAX_DEPENDENCY_TIMEOUT_MS: u64 = 1000;
const DEFAULT_LOG_FILTER: &str = "info";

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        let mut config = Self::from_lookup(|name| std::env::var_os(name))?;
        config.unknown_variables = unknown_variables(std::env::vars_os());
        Ok(config)
    }

    /// Parses configuration from any variable lookup, so tests need not touch the process
    /// environment. An empty value counts as unset, which is what Compose's `${VAR:-}` gives.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<OsString>) -> Result<Self, ConfigError> {
        let env = Env(&lookup);
        // 0: a free port chosen by the system, reported in the start-up log line (`listening`).
        let port = env.number("PORT", DEFAULT_PORT.into(), 0..=65_535)? as u16;
        let admin_port = env.number("ADMIN_PORT", DEFAULT_ADMIN_PORT.into(), 0..=65_535)? as u16;
        if admin_port == port && port != 0 {
            return Err(ConfigError::new(
                "ADMIN_PORT",
                format!("must differ from PORT ({port})"),
            ));
        }
        let max_connections =
            env.number("MAX_CONNECTIONS", DEFAULT_MAX_CONNECTIONS, 1..=65_536)? as usize;
        // A quarter of the slots by default: one address cannot take them all, and a load
        // balancer or a benchmark from one address still gets many.
        let max_connections_per_address = env.number(
            "MAX_CONNECTIONS_PER_ADDRESS",
            (max_connections as u64 / 4).max(1),
            1..=max_connections as u64,
        )? as usize;
        let http_header_timeout = Duration::from_millis(env.number(
            "HTTP_HEADER_TIMEOUT_MS",
            DEFAULT_HTTP_HEADER_TIMEOUT_MS,
            100..=60_000,
        )?);
        let http_write_timeout = Duration::from_millis(env.number(
            "HTTP_WRITE_TIMEOUT_MS",
            DEFAULT_HTTP_WRITE_TIMEOUT_MS,
            100..=600_000,
        )?);
        let http_connection_max_age = Duration::from_millis(env.number(
            "HTTP_CONNECTION_MAX_AGE_MS",
            DEFAULT_HTTP_CONNECTION_MAX_AGE_MS,
            1000..=86_400_000,
        )?);

        let redis_url = env
            .get("REDIS_URL")?
            .unwrap_or_else(|| DEFAULT_REDIS_URL.into());
        redis::Client::open(redis_url.as_str()).map_err(|_| {
            ConfigError::new(
                "REDIS_URL",
                "not a valid redis:// or rediss:// URL (value not shown: it may hold a password)",
            )
        })?;
        let redis_roots = redis_trust_roots(&env, &redis_url)?;

        let redis_password = env
            .get("REDIS_PASSWORD_FILE")?
            .map(|path| read_password_file("REDIS_PASSWORD_FILE", &path))
            .transpose()?;

        let database_url = env
            .get("DATABASE_URL")?
            .unwrap_or_else(|| DEFAULT_DATABASE_URL.into());
        let database_url = PostgresUrl::parse(&database_url)
            .map_err(|e| ConfigError::new("DATABASE_URL", e.to_string()))?;
        let roots = match database_url.roots() {
            RootsSource::None => None,
            RootsSource::System => Some(system_trust_roots(&env, "DATABASE_URL")?),
            RootsSource::File(path) => {
                Some(read_trust_roots("DATABASE_URL", "sslrootcert ", path)?)
            }
        };
        let (mut database, database_tls) = database_url.into_parts(roots);
        for var in ["DATABASE_PASSWORD_FILE", "POSTGRES_PASSWORD_FILE"] {
            if let Some(path) = env.get(var)? {
                database.password(read_password_file(var, &path)?);
                break;
            }
        }

        let db_timezone = match env.get("DB_TIMEZONE")? {
            None => DEFAULT_TIMEZONE.to_owned(),
            Some(name) => chrono_tz::Tz::from_str_insensitive(&name)
                .map(|tz| tz.name().to_owned())
                .map_err(|_| {
                    ConfigError::new(
                        "DB_TIMEZONE",
                        format!(
                            "{name:?} is not an IANA time zone name (e.g. UTC, America/Sao_Paulo)"
                        ),
                    )
                })?,
        };

        let dependency_timeout = Duration::from_millis(env.number(
            "DEPENDENCY_TIMEOUT_MS",
            DEFAULT_DEPENDENCY_TIMEOUT_MS,
            1..=MAX_DEPENDENCY_TIMEOUT_MS,
        )?);

        let log_filter = env
            .get("RUST_LOG")?
            .unwrap_or_else(|| DEFAULT_LOG_FILTER.into());
        tracing_subscriber::EnvFilter::try_new(&log_filter)
            .map_err(|e| ConfigError::new("RUST_LOG", format!("{log_filter:?}: {e}")))?;

        Ok(Self {
            port,
            admin_port,
            max_connections,
            max_connections_per_address,
            http_header_timeout,
            http_write_timeout,
            http_connection_max_age,
            store: store::Settings {
                redis_url,
                redis_password,
                redis_roots,
                database,
                database_tls,
                db_timezone,
                dependency_timeout,
            },
            log_filter,
            unknown_variables: Vec::new(),
        })
    }
}

/// `ADMIN_PORT` alone, for the `healthcheck` and `metrics` subcommands, which must not
/// depend on password files or URLs being readable.
pub fn admin_port_from_env() -> Result<u16, ConfigError> {
    admin_port(&Env(&|name| std::env::var_os(name)))
}

fn admin_port(env: &Env<'_>) -> Result<u16, ConfigError> {
    Ok(env.number("ADMIN_PORT", DEFAULT_ADMIN_PORT.into(), 1..=65_535)? as u16)
}

/// Every variable `web` reads. The parser reads only names from this list (`Env::get` checks,
/// in debug builds and so in every test), and [`unknown_variables`] warns about the names that
/// look like ours but are missing from it: one list for both, so they cannot drift apart.
pub const VARIABLES: &[&str] = &[
    "PORT",
    "ADMIN_PORT",
    "MAX_CONNECTIONS",
    "MAX_CONNECTIONS_PER_ADDRESS",
    "HTTP_HEADER_TIMEOUT_MS",
    "HTTP_WRITE_TIMEOUT_MS",
    "HTTP_CONNECTION_MAX_AGE_MS",
    "REDIS_URL",
    "REDIS_PASSWORD_FILE",
    "REDIS_CA_FILE",
    "DATABASE_URL",
    "DATABASE_PASSWORD_FILE",
    "POSTGRES_PASSWORD_FILE",
    "SSL_CERT_FILE",
    "DB_TIMEZONE",
    "DEPENDENCY_TIMEOUT_MS",
    "RUST_LOG",
];

/// Names that look like ours: a typo of one of them (`DEPENDENCY_TIMEOUT`) or a variable
/// meant for `web` that it does not have (`REDIS_PASSWORD`) would otherwise change nothing and
/// say nothing.
const OUR_NAMES: &[&str] = &["PORT", "ADMIN_PORT"];
const OUR_PREFIXES: &[&str] = &["REDIS_", "DATABASE_", "DB_", "DEPENDENCY_", "HTTP_", "MAX_"];
/// Variables `web` read once and no longer does: setting one is a mistake worth a line.
const RETIRED: &[&str] = &["FLUSH_INTERVAL_MS"];

/// The names among `vars` that look like `web`'s (or were once) but that `web` does not read,
/// sorted. Never their values: one could be a password. Left out, although they match a
/// prefix: the proxy variable `HTTP_PROXY`, read by HTTP clients everywhere; and Kubernetes'
/// service links (`DB_SERVICE_HOST`, `DB_PORT=tcp://…`, `DB_PORT_5432_TCP_ADDR`), which a
/// Service named `db` puts into every pod of its namespace.
pub fn unknown_variables(vars: impl IntoIterator<Item = (OsString, OsString)>) -> Vec<String> {
    let mut unknown: Vec<String> = vars
        .into_iter()
        .filter_map(|(name, value)| {
            let name = name.into_string().ok()?;
            let ours = OUR_NAMES.contains(&name.as_str())
                || OUR_PREFIXES.iter().any(|prefix| name.starts_with(prefix))
                || RETIRED.contains(&name.as_str());
            let service_link = name.contains("_SERVICE_")
                || name.contains("_PORT_")
                || (name.ends_with("_PORT") && value.to_str().is_some_and(|v| v.contains("://")));
            let unread = !VARIABLES.contains(&name.as_str());
            (ours && unread && !service_link && name != "HTTP_PROXY").then_some(name)
        })
        .collect();
    unknown.sort();
    unknown
}

struct Env<'a>(&'a dyn Fn(&str) -> Option<OsString>);

impl Env<'_> {
    fn get(&self, var: &'static str) -> Result<Option<String>, ConfigError> {
        debug_assert!(
            VARIABLES.contains(&var),
            "{var} is read but not in VARIABLES"
        );
        match (self.0)(var) {
            None => Ok(None),
            Some(value) if value.is_empty() => Ok(None),
            Some(value) => value
                .into_string()
                .map(Some)
                .map_err(|_| ConfigError::new(var, "is not valid UTF-8")),
        }
    }

    fn number(
        &self,
        var: &'static str,
        default: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<u64, ConfigError> {
        let Some(raw) = self.get(var)? else {
            return Ok(default);
        };
        match raw.trim().parse::<u64>() {
            Ok(n) if range.contains(&n) => Ok(n),
            _ => Err(ConfigError::new(
                var,
                format!(
                    "expected a whole number from {} to {}, got {raw:?}",
                    range.start(),
                    range.end()
                ),
            )),
        }
    }
}

/// A file `var` names that cannot be read; `what` says what it is, if the variable does not.
fn unreadable(var: &'static str, what: &str, path: &str, e: &std::io::Error) -> ConfigError {
    let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
        " (the image runs web as uid 65532: the file must be readable by it)"
    } else {
        ""
    };
    ConfigError::new(var, format!("cannot read {what}{path:?}: {e}{hint}"))
}

/// Docker secrets end with a newline more often than not; it is not part of the password.
fn read_password_file(var: &'static str, path: &str) -> Result<String, ConfigError> {
    let content = std::fs::read_to_string(path).map_err(|e| unreadable(var, "", path, &e))?;
    let password = content.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        return Err(ConfigError::new(var, format!("{path:?} is empty")));
    }
    Ok(password.to_owned())
}

/// `rediss://` verifies against `REDIS_CA_FILE` or the system bundle; `#insecure` and
/// `redis://` need no roots. `REDIS_CA_FILE` is read whenever it is set, so a wrong path
/// shows at start, not on the day TLS is switched on.
fn redis_trust_roots(env: &Env<'_>, url: &str) -> Result<Option<TrustRoots>, ConfigError> {
    let ca_file = match env.get("REDIS_CA_FILE")? {
        Some(path) => Some(read_trust_roots("REDIS_CA_FILE", "", &path)?),
        None => None,
    };
    let tls = RedisTls::of(url);
    // The redis crate loads the platform's certificates on every TLS connection (with
    // rustls-native-certs, which reads SSL_CERT_FILE), even when given its roots, and fails
    // the connection if that file cannot be read: better said once, at start.
    if tls != RedisTls::Plain && env.get("SSL_CERT_FILE")?.is_some() {
        system_trust_roots(env, "REDIS_URL")?;
    }
    match (tls, ca_file) {
        (RedisTls::Plain | RedisTls::Insecure, _) => Ok(None),
        (RedisTls::Verified, Some(roots)) => Ok(Some(roots)),
        (RedisTls::Verified, None) => system_trust_roots(env, "REDIS_URL").map(Some),
    }
}

/// The system bundle, or the file `SSL_CERT_FILE` names (the variable OpenSSL and most TLS
/// clients honour; tests and unusual systems use it).
fn system_trust_roots(env: &Env<'_>, needed_by: &'static str) -> Result<TrustRoots, ConfigError> {
    match env.get("SSL_CERT_FILE")? {
        Some(path) => read_trust_roots("SSL_CERT_FILE", "", &path),
        None => read_trust_roots(needed_by, "the system CA bundle ", SYSTEM_CA_BUNDLE),
    }
}

fn read_trust_roots(var: &'static str, what: &str, path: &str) -> Result<TrustRoots, ConfigError> {
    let pem = std::fs::read(path).map_err(|e| unreadable(var, what, path, &e))?;
    TrustRoots::from_pem(pem)
        .map_err(|reason| ConfigError::new(var, format!("{what}{path:?}: {reason}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tls::SslMode;
    use std::collections::HashMap;

    fn parse(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn port_zero_asks_the_system_for_a_free_port_for_either_listener() {
        let c = parse(&[("PORT", "0"), ("ADMIN_PORT", "0")]).expect("both 0");
        assert_eq!((c.port, c.admin_port), (0, 0));
        assert_eq!(
            parse(&[("ADMIN_PORT", "5000")]).expect_err("same port").var,
            "ADMIN_PORT"
        );
    }

    #[test]
    fn defaults_match_the_compose_stack() {
        let c = parse(&[]).expect("defaults parse");
        assert_eq!(c.port, 5000);
        assert_eq!(c.admin_port, 9090);
        assert_eq!(c.max_connections, 512);
        assert_eq!(c.max_connections_per_address, 128);
        assert_eq!(c.http_header_timeout, Duration::from_secs(5));
        assert_eq!(c.http_write_timeout, Duration::from_secs(10));
        assert_eq!(c.http_connection_max_age, Duration::from_secs(600));
        assert_eq!(c.store.redis_password, None);
        assert_eq!(c.store.redis_url, "redis://web@cache:6379/0");
        assert_eq!(c.store.database.get_user(), Some("web"));
        assert_eq!(c.store.database.get_dbname(), Some("desafio3"));
        assert_eq!(c.store.db_timezone, "UTC");
        assert_eq!(c.store.dependency_timeout, Duration::from_millis(1000));
    }

    #[test]
    fn each_bad_value_names_its_variable() {
        let cases = [
            ("PORT", "abc"),
            ("PORT", "70000"),
            ("ADMIN_PORT", "5000"),
            ("MAX_CONNECTIONS", "0"),
            ("HTTP_HEADER_TIMEOUT_MS", "5"),
            ("MAX_CONNECTIONS_PER_ADDRESS", "0"),
            ("MAX_CONNECTIONS_PER_ADDRESS", "513"),
            ("HTTP_WRITE_TIMEOUT_MS", "0"),
            ("HTTP_CONNECTION_MAX_AGE_MS", "10"),
            ("REDIS_PASSWORD_FILE", "/nonexistent/secret"),
            ("REDIS_URL", "http://nope"),
            ("DATABASE_URL", "postgres://a:b@h:notaport/db"),
            ("DB_TIMEZONE", "Mars/Olympus_Mons"),
            ("DEPENDENCY_TIMEOUT_MS", "0"),
            ("RUST_LOG", "info,[[["),
            ("DATABASE_PASSWORD_FILE", "/nonexistent/secret"),
            ("POSTGRES_PASSWORD_FILE", "/nonexistent/secret"),
        ];
        for (var, value) in cases {
            let err = parse(&[(var, value)]).expect_err(var);
            assert_eq!(err.var, var, "{value}");
            let line = err.to_string();
            assert!(line.contains(var) && !line.contains('\n'), "{line}");
        }
    }

    #[test]
    fn secrets_are_not_echoed() {
        let err = parse(&[("DATABASE_URL", "postgres://u:hunter2@h:xx/db")]).unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
        let err = parse(&[("REDIS_URL", "ftp://:hunter2@h")]).unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
        let c = parse(&[("DATABASE_URL", "postgres://u:hunter2@h/db")]).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn password_file_wins_and_loses_its_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\n").unwrap();
        let c = parse(&[("POSTGRES_PASSWORD_FILE", path.to_str().unwrap())]).unwrap();
        assert_eq!(c.store.database.get_password(), Some(&b"s3cret"[..]));

        std::fs::write(&path, "\n").unwrap();
        let err = parse(&[("DATABASE_PASSWORD_FILE", path.to_str().unwrap())]).unwrap_err();
        assert_eq!(err.var, "DATABASE_PASSWORD_FILE");
    }

    #[test]
    fn variables_that_look_like_ours_but_are_not_read_are_named() {
        let vars = [
            ("DEPENDENCY_TIMEOUT", "1000"),
            ("REDIS_PASSWORD", "hunter2"),
            ("FLUSH_INTERVAL_MS", "100"),
            ("MAX_CONECTIONS", "10"),
            ("DB_TZ", "UTC"),
            ("HTTP_TIMEOUT_MS", "5"),
            ("DB_PORT", "5432"),
            // Read, or not ours, or Kubernetes' and proxies':
            ("PORT", "5000"),
            ("REDIS_URL", "redis://h"),
            ("POSTGRES_PASSWORD_FILE", "/run/secrets/pw"),
            ("MAX_CONNECTIONS_PER_ADDRESS", "4"),
            ("PATH", "/bin"),
            ("POSTGRES_USER", "admin"),
            ("HTTP_PROXY", "http://proxy:3128"),
            ("DB_SERVICE_HOST", "10.0.0.1"),
            ("DB_SERVICE_PORT_POSTGRES", "5432"),
            ("DB_PORT", "tcp://10.0.0.1:5432"),
            ("DB_PORT_5432_TCP_ADDR", "10.0.0.1"),
        ]
        .map(|(name, value)| (OsString::from(name), OsString::from(value)));
        assert_eq!(
            unknown_variables(vars),
            [
                "DB_PORT",
                "DB_TZ",
                "DEPENDENCY_TIMEOUT",
                "FLUSH_INTERVAL_MS",
                "HTTP_TIMEOUT_MS",
                "MAX_CONECTIONS",
                "REDIS_PASSWORD",
            ]
        );
        // Every variable the parser reads is known, so none of them is ever warned about.
        let all = VARIABLES
            .iter()
            .map(|name| (OsString::from(name), OsString::from("x")));
        assert!(unknown_variables(all).is_empty());
    }

    #[test]
    fn timezone_spelling_is_canonicalised() {
        let c = parse(&[("DB_TIMEZONE", "america/sao_PAULO")]).unwrap();
        assert_eq!(c.store.db_timezone, "America/Sao_Paulo");
    }

    #[test]
    fn dependency_timeout_is_bounded_by_the_shutdown_budget() {
        let c = parse(&[("DEPENDENCY_TIMEOUT_MS", "1000")]).unwrap();
        assert_eq!(c.store.dependency_timeout, Duration::from_secs(1));
        let err = parse(&[("DEPENDENCY_TIMEOUT_MS", "1001")]).unwrap_err();
        assert_eq!(err.var, "DEPENDENCY_TIMEOUT_MS");
    }

    #[test]
    fn database_password_file_wins_over_postgres_password_file_and_the_url() {
        let dir = tempfile::tempdir().unwrap();
        let (ours, theirs) = (dir.path().join("ours"), dir.path().join("theirs"));
        std::fs::write(&ours, "from-database-file\n").unwrap();
        std::fs::write(&theirs, "from-postgres-file\n").unwrap();
        let c = parse(&[
            ("DATABASE_URL", "postgres://u:from-url@h/db"),
            ("DATABASE_PASSWORD_FILE", ours.to_str().unwrap()),
            ("POSTGRES_PASSWORD_FILE", theirs.to_str().unwrap()),
        ])
        .unwrap();
        assert_eq!(
            c.store.database.get_password(),
            Some(&b"from-database-file"[..])
        );
        let c = parse(&[
            ("DATABASE_URL", "postgres://u:from-url@h/db"),
            ("POSTGRES_PASSWORD_FILE", theirs.to_str().unwrap()),
        ])
        .unwrap();
        assert_eq!(
            c.store.database.get_password(),
            Some(&b"from-postgres-file"[..])
        );
        let c = parse(&[("DATABASE_URL", "postgres://u:from-url@h/db")]).unwrap();
        assert_eq!(c.store.database.get_password(), Some(&b"from-url"[..]));
    }

    /// A PEM file with one (self-signed) certificate, usable as a trust anchor.
    fn ca_file(dir: &tempfile::TempDir) -> String {
        let ca = rcgen::generate_simple_self_signed(vec!["test-ca".to_owned()]).unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, ca.cert.pem()).unwrap();
        path.to_str().unwrap().to_owned()
    }

    #[test]
    fn sslmode_has_libpqs_meaning_in_urls_and_key_values() {
        use tokio_postgres::config::SslMode as Driver;
        let dir = tempfile::tempdir().unwrap();
        let ca = ca_file(&dir);
        let cases = [
            ("", SslMode::Prefer, Driver::Prefer),
            ("sslmode=disable", SslMode::Disable, Driver::Disable),
            ("sslmode=prefer", SslMode::Prefer, Driver::Prefer),
            ("sslmode=require", SslMode::Require, Driver::Require),
            ("sslmode=verify-ca", SslMode::VerifyCa, Driver::Require),
            ("sslmode=verify-full", SslMode::VerifyFull, Driver::Require),
        ];
        for (param, mode, driver) in cases {
            let url = format!("postgres://u@h:5433/db?connect_timeout=5&{param}");
            let key_values = format!("host=h port=5433 {param} user=u dbname=db");
            for conninfo in [url, key_values] {
                let c = parse(&[("DATABASE_URL", &conninfo), ("SSL_CERT_FILE", &ca)])
                    .unwrap_or_else(|e| panic!("{conninfo}: {e}"));
                assert_eq!(c.store.database_tls.mode, mode, "{conninfo}");
                assert_eq!(c.store.database.get_ssl_mode(), driver, "{conninfo}");
                assert_eq!(c.store.database.get_dbname(), Some("db"), "{conninfo}");
                assert_eq!(c.store.database.get_ports(), [5433], "{conninfo}");
                // Only the verifying modes need trust roots; then the system bundle
                // (here SSL_CERT_FILE) gives them.
                let verifies = matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull);
                assert_eq!(c.store.database_tls.roots.is_some(), verifies, "{conninfo}");
            }
        }
    }

    #[test]
    fn sslrootcert_is_read_at_start_and_makes_require_verify_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca_file(&dir);
        // Percent-encoded in a URL, quoted and escaped in key=value form; the last one wins.
        let encoded = ca.replace('/', "%2F");
        let url = format!(
            "postgres://u:p?w@h/db?sslrootcert=/nope&sslmode=require&sslrootcert={encoded}"
        );
        let key_values = format!("host=h sslmode = require sslrootcert='{ca}' dbname=db");
        for conninfo in [url, key_values] {
            let c = parse(&[("DATABASE_URL", &conninfo)]).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(c.store.database_tls.mode, SslMode::Require);
            assert_eq!(
                c.store.database_tls.roots.as_ref().map(TrustRoots::len),
                Some(1)
            );
        }
        // The password keeps its `?`.
        let c = parse(&[(
            "DATABASE_URL",
            &format!("postgres://u:p?w@h/db?sslrootcert={encoded}"),
        )])
        .unwrap();
        assert_eq!(c.store.database.get_password(), Some(&b"p?w"[..]));

        for conninfo in [
            "postgres://u@h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
            "host=h sslrootcert=/nonexistent/ca.pem",
        ] {
            let err = parse(&[("DATABASE_URL", conninfo)]).unwrap_err();
            assert_eq!(err.var, "DATABASE_URL");
            assert!(err.reason.contains("sslrootcert"), "{err}");
        }
        let not_pem = dir.path().join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let err = parse(&[(
            "DATABASE_URL",
            &format!("postgres://u@h/db?sslrootcert={}", not_pem.display()),
        )])
        .unwrap_err();
        assert!(err.reason.contains("no PEM certificate"), "{err}");
    }

    #[test]
    fn a_bad_sslmode_names_database_url_and_echoes_nothing() {
        for conninfo in [
            "postgres://u:hunter2@h/db?sslmode=hunter2",
            "postgres://u:hunter2@h/db?sslmode=VERIFY-FULL",
            "host=h password=hunter2 sslmode=hunter2",
            "postgres://u:hunter2@h/db?sslmode=allow",
        ] {
            let err = parse(&[("DATABASE_URL", conninfo)]).unwrap_err();
            assert_eq!(err.var, "DATABASE_URL");
            assert!(err.reason.contains("sslmode"), "{err}");
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn verifying_without_a_ca_file_needs_the_system_bundle() {
        let err = parse(&[
            ("DATABASE_URL", "postgres://u@h/db?sslmode=verify-ca"),
            ("SSL_CERT_FILE", "/nonexistent/bundle.crt"),
        ])
        .unwrap_err();
        assert_eq!(err.var, "SSL_CERT_FILE");
        let err = parse(&[(
            "DATABASE_URL",
            "postgres://u@h/db?sslrootcert=system&sslmode=require",
        )])
        .unwrap_err();
        assert_eq!(err.var, "DATABASE_URL");
        let dir = tempfile::tempdir().unwrap();
        let ca = ca_file(&dir);
        let c = parse(&[
            ("DATABASE_URL", "postgres://u@h/db?sslrootcert=system"),
            ("SSL_CERT_FILE", &ca),
        ])
        .unwrap();
        assert_eq!(c.store.database_tls.mode, SslMode::VerifyFull);
    }

    #[test]
    fn rediss_verifies_against_redis_ca_file_or_the_system_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca_file(&dir);
        let roots = |vars: &[(&str, &str)]| parse(vars).unwrap().store.redis_roots.map(|r| r.len());
        assert_eq!(
            roots(&[("REDIS_URL", "rediss://h:6380/0"), ("REDIS_CA_FILE", &ca)]),
            Some(1)
        );
        assert_eq!(
            roots(&[("REDIS_URL", "rediss://h:6380/0"), ("SSL_CERT_FILE", &ca)]),
            Some(1)
        );
        assert_eq!(
            roots(&[
                ("REDIS_URL", "rediss://h:6380/0#insecure"),
                ("REDIS_CA_FILE", &ca)
            ]),
            None
        );
        assert_eq!(
            roots(&[("REDIS_URL", "redis://h:6379/0"), ("REDIS_CA_FILE", &ca)]),
            None
        );

        let err = parse(&[
            ("REDIS_URL", "rediss://h:6380/0#insecure"),
            ("SSL_CERT_FILE", "/nonexistent/bundle.crt"),
        ])
        .unwrap_err();
        assert_eq!(err.var, "SSL_CERT_FILE");

        // Read whenever it is set, even while REDIS_URL is still plain.
        for url in ["rediss://:hunter2@h/0", "redis://:hunter2@h/0"] {
            let err =
                parse(&[("REDIS_URL", url), ("REDIS_CA_FILE", "/nonexistent/ca.pem")]).unwrap_err();
            assert_eq!(err.var, "REDIS_CA_FILE");
            assert!(err.reason.contains("/nonexistent/ca.pem"), "{err}");
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
    }
}
