//! The one error type of dependency calls, and how a driver's error becomes a few public words.
//!
//! The words come from the error's type, found by walking its chain of causes and downcasting
//! each: `redis::RedisError::kind()`, `tokio_postgres::Error::code()` (the SQLSTATE),
//! `std::io::ErrorKind`, rustls' certificate errors. Matching the text instead breaks on a new
//! driver version's wording, and matches where it should not (a server message that happens
//! to contain "tls", a table named `eof`).

use std::error::Error as StdError;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::CertificateError;
use tokio_postgres::error::SqlState;

/// Why a dependency call gave no answer. The `Display` is a few words, safe to show to
/// anyone (the page's `erros`, `/readyz`): never a user name, SQL, script or server message.
/// [`DepError::detail`] has the driver's full text, for the logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DepError {
    /// No answer within the dependency timeout.
    #[error("timeout")]
    Timeout(Duration),
    /// Failing fast while the dependency is down; says what brought it down.
    #[error("unavailable ({0})")]
    Unavailable(&'static str),
    /// The call failed: `summary` is public, `detail` is for the logs.
    #[error("{summary}")]
    Failed {
        summary: &'static str,
        detail: String,
    },
    /// The dependency answered, with a value this service refuses (a counter out of range).
    /// Not an outage: the dependency stays up, and the value goes no further.
    #[error("invalid counter value")]
    Invalid(String),
    /// Redis counted, but PostgreSQL no longer names that Redis as the counter: the counts
    /// may not be new, so they are withheld (`docs/counting.md`). Not an outage either.
    #[error("count withheld: counter changing hands")]
    Unconfirmed,
}

impl DepError {
    /// A driver error and its causes: classified by type for the public text, kept whole (on
    /// one line) for the logs. Drivers repeat themselves along the chain (the pool's error
    /// quotes the client's, which quotes the server's), so a cause already quoted is not
    /// appended.
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
        let summary = error
            .chain()
            .filter_map(classify)
            .min()
            .map_or("error", Kind::summary);
        Self::Failed {
            summary,
            detail: text.split_whitespace().collect::<Vec<_>>().join(" "),
        }
    }

    /// The full story, for the logs only.
    pub fn detail(&self) -> String {
        match self {
            Self::Timeout(after) => format!("timed out after {} ms", after.as_millis()),
            Self::Failed { detail, .. } | Self::Invalid(detail) => detail.clone(),
            Self::Unavailable(_) | Self::Unconfirmed => self.to_string(),
        }
    }

    /// The answer while the dependency is down: what brought it down, in public words.
    pub(super) fn as_unavailable(&self) -> Self {
        match self {
            Self::Timeout(_) => Self::Unavailable("timeout"),
            Self::Failed { summary, .. } => Self::Unavailable(summary),
            Self::Invalid(_) => Self::Unavailable("invalid counter value"),
            Self::Unconfirmed => Self::Unavailable("count withheld: counter changing hands"),
            Self::Unavailable(summary) => Self::Unavailable(summary),
        }
    }
}

/// Redis answered without this service's counting functions: they are not loaded (yet, or
/// any more, its data having been replaced). Its loader is the cache healthcheck.
#[derive(Debug, thiserror::Error)]
#[error("Redis does not hold the desafio3 functions (the cache healthcheck loads them)")]
pub struct FunctionsMissing(#[source] pub redis::RedisError);

/// What went wrong, as far as the types tell. When causes along one chain disagree, the most
/// specific wins: the declaration order (a TLS failure is also a connection that closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Authentication,
    Permission,
    CertificateNotTrusted,
    CertificateName,
    TlsNotOffered,
    Tls,
    Refused,
    FunctionsMissing,
    NotReady,
    Timeout,
    Lost,
}

impl Kind {
    fn summary(self) -> &'static str {
        match self {
            Self::Authentication => "authentication failed",
            Self::Permission => "permission denied",
            Self::CertificateNotTrusted => "tls: certificate not trusted",
            Self::CertificateName => "tls: certificate name mismatch",
            Self::TlsNotOffered => "tls: not offered by the server",
            Self::Tls => "tls: handshake failed",
            Self::Refused => "connection refused",
            Self::FunctionsMissing => "functions not loaded",
            Self::NotReady => "server not ready",
            Self::Timeout => "timeout",
            Self::Lost => "connection lost",
        }
    }
}

/// One cause of the chain, by its type; `None` for a type that says nothing we name.
fn classify(cause: &(dyn StdError + 'static)) -> Option<Kind> {
    if cause.is::<FunctionsMissing>() {
        Some(Kind::FunctionsMissing)
    } else if let Some(e) = cause.downcast_ref::<redis::RedisError>() {
        redis_kind(e)
    } else if let Some(e) = cause.downcast_ref::<tokio_postgres::Error>() {
        postgres_kind(e)
    } else if let Some(e) = cause.downcast_ref::<deadpool_postgres::PoolError>() {
        matches!(e, deadpool_postgres::PoolError::Timeout(_)).then_some(Kind::Timeout)
    } else if let Some(e) = cause.downcast_ref::<rustls::Error>() {
        Some(tls_kind(e))
    } else if let Some(e) = cause.downcast_ref::<io::Error>() {
        io_kind(e)
    } else if let Some(shared) = cause.downcast_ref::<Arc<dyn StdError + Send + Sync>>() {
        // The redis crate keeps its I/O error behind an `Arc`, whose `source()` skips it.
        classify(&**shared)
    } else {
        None
    }
}

fn redis_kind(e: &redis::RedisError) -> Option<Kind> {
    use redis::{ErrorKind, ServerErrorKind};
    // WRONGPASS and NOAUTH are codes the crate has no kind for: the code is the server's
    // machine-readable word, not its message.
    match (e.kind(), e.code()) {
        (ErrorKind::AuthenticationFailed, _) | (_, Some("WRONGPASS" | "NOAUTH")) => {
            Some(Kind::Authentication)
        }
        (ErrorKind::Server(ServerErrorKind::NoPerm), _) => Some(Kind::Permission),
        (ErrorKind::Server(ServerErrorKind::BusyLoading), _) => Some(Kind::NotReady),
        // An I/O error's own kind is found further down the chain; this is the crate telling
        // that its connection is gone without one.
        _ if e.is_connection_dropped() => Some(Kind::Lost),
        _ => None,
    }
}

/// tokio-postgres says "server does not support TLS" with a bare string as the cause: the one
/// case no type tells, so it is matched by the crate's exact words.
const POSTGRES_NO_TLS: &str = "server does not support TLS";

fn postgres_kind(e: &tokio_postgres::Error) -> Option<Kind> {
    if let Some(code) = e.code() {
        return match code {
            c if *c == SqlState::INVALID_PASSWORD
                || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION =>
            {
                Some(Kind::Authentication)
            }
            c if *c == SqlState::INSUFFICIENT_PRIVILEGE => Some(Kind::Permission),
            // "the database system is starting up / shutting down / in recovery mode".
            c if *c == SqlState::CANNOT_CONNECT_NOW => Some(Kind::NotReady),
            // The session bounds `db` sets: statement, lock and idle-transaction timeouts.
            c if *c == SqlState::QUERY_CANCELED
                || *c == SqlState::LOCK_NOT_AVAILABLE
                || *c == SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT =>
            {
                Some(Kind::Timeout)
            }
            c if *c == SqlState::ADMIN_SHUTDOWN || *c == SqlState::CRASH_SHUTDOWN => {
                Some(Kind::Lost)
            }
            _ => None,
        };
    }
    if e.source().is_some_and(|c| c.to_string() == POSTGRES_NO_TLS) {
        Some(Kind::TlsNotOffered)
    } else if e.is_closed() {
        Some(Kind::Lost)
    } else {
        None
    }
}

fn tls_kind(e: &rustls::Error) -> Kind {
    match e {
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => Kind::CertificateNotTrusted,
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => Kind::CertificateName,
        _ => Kind::Tls,
    }
}

/// TLS errors travel inside an `io::Error` (tokio-rustls); its `source()` skips the error it
/// wraps, so that one is looked at here.
fn io_kind(e: &io::Error) -> Option<Kind> {
    if let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        return Some(tls_kind(tls));
    }
    match e.kind() {
        io::ErrorKind::ConnectionRefused => Some(Kind::Refused),
        io::ErrorKind::TimedOut => Some(Kind::Timeout),
        io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::NotConnected
        | io::ErrorKind::UnexpectedEof => Some(Kind::Lost),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_errors_become_one_line_without_repeats() {
        let chain = anyhow::anyhow!("connection refused").context("pool: connection refused");
        assert_eq!(DepError::failed(chain).detail(), "pool: connection refused");
        let multiline = anyhow::anyhow!("ERR script\n  line 3").context("script failed");
        assert_eq!(
            DepError::failed(multiline).detail(),
            "script failed: ERR script line 3"
        );
    }

    fn io(kind: io::ErrorKind) -> anyhow::Error {
        io::Error::from(kind).into()
    }

    fn in_io(tls: rustls::Error) -> anyhow::Error {
        io::Error::new(io::ErrorKind::InvalidData, tls).into()
    }

    fn redis_io(kind: io::ErrorKind) -> anyhow::Error {
        redis::RedisError::from(io::Error::from(kind)).into()
    }

    fn redis_error(kind: redis::ErrorKind) -> anyhow::Error {
        redis::RedisError::from((kind, "from the driver")).into()
    }

    #[test]
    fn the_public_text_comes_from_the_error_s_type() {
        use redis::{ErrorKind, ServerErrorKind};
        let cases = [
            (
                redis_error(ErrorKind::AuthenticationFailed),
                "authentication failed",
            ),
            (
                redis::make_extension_error("WRONGPASS".into(), Some("invalid pair".into())).into(),
                "authentication failed",
            ),
            (
                redis_error(ErrorKind::Server(ServerErrorKind::NoPerm)),
                "permission denied",
            ),
            (
                redis_error(ErrorKind::Server(ServerErrorKind::BusyLoading)),
                "server not ready",
            ),
            (
                in_io(rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer,
                )),
                "tls: certificate not trusted",
            ),
            (
                in_io(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName,
                ))
                .context("error performing TLS handshake"),
                "tls: certificate name mismatch",
            ),
            (
                in_io(rustls::Error::InvalidCertificate(CertificateError::Expired)),
                "tls: handshake failed",
            ),
            (
                redis_io(io::ErrorKind::ConnectionRefused),
                "connection refused",
            ),
            (
                io(io::ErrorKind::ConnectionRefused).context("pool"),
                "connection refused",
            ),
            (io(io::ErrorKind::BrokenPipe), "connection lost"),
            (io(io::ErrorKind::UnexpectedEof), "connection lost"),
            (redis_io(io::ErrorKind::ConnectionReset), "connection lost"),
            (io(io::ErrorKind::TimedOut), "timeout"),
            // Words alone classify nothing: a message is not a type.
            (
                anyhow::anyhow!(r#"FATAL: password authentication failed for user "admin""#),
                "error",
            ),
            (
                anyhow::anyhow!("relation \"tls_eof\" does not exist"),
                "error",
            ),
            (
                redis_error(ErrorKind::Server(ServerErrorKind::ResponseError)),
                "error",
            ),
        ];
        for (error, public) in cases {
            let detail = format!("{error:#}");
            let error = DepError::failed(error);
            assert_eq!(error.to_string(), public, "{detail}");
            assert_eq!(
                error.as_unavailable().to_string(),
                format!("unavailable ({public})")
            );
        }
        let timeout = DepError::Timeout(Duration::from_millis(500));
        assert_eq!(timeout.to_string(), "timeout");
        assert_eq!(timeout.detail(), "timed out after 500 ms");
    }

    #[test]
    fn the_logs_keep_the_driver_s_words() {
        let error = DepError::failed(
            anyhow::anyhow!("FATAL: the database system is shutting down").context("db error"),
        );
        assert_eq!(
            error.detail(),
            "db error: FATAL: the database system is shutting down"
        );
    }
}
