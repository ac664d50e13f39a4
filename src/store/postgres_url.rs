//! `DATABASE_URL` read as libpq reads it, in one place: the connection settings for
//! tokio-postgres, `sslmode` with libpq's meaning, and where the trust roots come from.
//!
//! tokio-postgres knows only `disable`/`prefer`/`require` and no `sslrootcert`, so both are
//! taken out of the string here and applied by the TLS connector ([`super::tls`]). Reading
//! files and the environment is not done here: [`PostgresUrl::roots`] says which roots are
//! needed, `config` reads them (it knows which variable to blame) and hands them to
//! [`PostgresUrl::into_parts`].

use std::str::FromStr;

use super::tls::{PostgresTls, SslMode, TrustRoots};

/// Why a `DATABASE_URL` cannot be used. Never quotes the value: it may hold a password, and a
/// malformed URL can put part of one anywhere (even in `sslmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PostgresUrlError {
    #[error(
        "not a valid postgres:// URL or key=value string (value not shown: it may hold a password)"
    )]
    Malformed,
    #[error("names no host")]
    NoHost,
    #[error("sslmode=allow is not supported (use disable or prefer)")]
    AllowUnsupported,
    #[error("sslmode must be disable, prefer, require, verify-ca or verify-full")]
    BadSslMode,
    #[error("sslrootcert=system needs sslmode=verify-full (as in libpq)")]
    SystemRootsNeedVerifyFull,
}

/// Where the CA certificates PostgreSQL must chain to come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootsSource {
    /// Nothing is verified: no roots needed.
    None,
    /// The system bundle: `sslrootcert=system`, or `verify-ca`/`verify-full` without a file
    /// (libpq would look for `~/.postgresql/root.crt`, which a container does not have).
    System,
    /// The PEM file `sslrootcert` names.
    File(String),
}

/// A parsed `DATABASE_URL`: what tokio-postgres is given, and the TLS it cannot express.
#[derive(Debug)]
pub struct PostgresUrl {
    config: tokio_postgres::Config,
    mode: SslMode,
    roots: RootsSource,
}

impl PostgresUrl {
    /// libpq's rules: `prefer` when no `sslmode` is given (`verify-full` with
    /// `sslrootcert=system`); `allow` is refused rather than read as something else.
    pub fn parse(conninfo: &str) -> Result<Self, PostgresUrlError> {
        let (rest, params) = take_ssl_params(conninfo);
        let mut config =
            tokio_postgres::Config::from_str(&rest).map_err(|_| PostgresUrlError::Malformed)?;
        if config.get_hosts().is_empty() {
            return Err(PostgresUrlError::NoHost);
        }
        let system = params.rootcert.as_deref() == Some("system");
        let mode = match params.mode.as_deref() {
            None if system => SslMode::VerifyFull,
            None => SslMode::Prefer,
            Some("disable") => SslMode::Disable,
            Some("prefer") => SslMode::Prefer,
            Some("require") => SslMode::Require,
            Some("verify-ca") => SslMode::VerifyCa,
            Some("verify-full") => SslMode::VerifyFull,
            Some("allow") => return Err(PostgresUrlError::AllowUnsupported),
            Some(_) => return Err(PostgresUrlError::BadSslMode),
        };
        let roots = match params.rootcert {
            Some(_) if system && mode != SslMode::VerifyFull => {
                return Err(PostgresUrlError::SystemRootsNeedVerifyFull);
            }
            Some(_) if system => RootsSource::System,
            Some(path) => RootsSource::File(path),
            None if mode.verifies() => RootsSource::System,
            None => RootsSource::None,
        };
        config.ssl_mode(mode.driver_mode());
        Ok(Self {
            config,
            mode,
            roots,
        })
    }

    /// The trust roots [`Self::into_parts`] needs.
    pub fn roots(&self) -> &RootsSource {
        &self.roots
    }

    /// The settings for tokio-postgres and the TLS for its connector. `roots` must be what
    /// [`Self::roots`] asked for (`None` exactly when it asked for none).
    pub fn into_parts(self, roots: Option<TrustRoots>) -> (tokio_postgres::Config, PostgresTls) {
        debug_assert_eq!(roots.is_none(), self.roots == RootsSource::None);
        (
            self.config,
            PostgresTls {
                mode: self.mode,
                roots,
            },
        )
    }
}

/// `sslmode` and `sslrootcert` as written in `DATABASE_URL`, not yet interpreted.
#[derive(Debug, Default, PartialEq, Eq)]
struct SslParams {
    mode: Option<String>,
    rootcert: Option<String>,
}

/// Removes `sslmode` and `sslrootcert` from a `postgres://` URL's query or from a libpq
/// key=value string, reading them as tokio-postgres reads the rest (the last one wins).
/// Anything it cannot read is left in place, for tokio-postgres to reject.
fn take_ssl_params(conninfo: &str) -> (String, SslParams) {
    if ["postgres://", "postgresql://"]
        .iter()
        .any(|prefix| conninfo.starts_with(prefix))
    {
        take_ssl_params_from_url(conninfo)
    } else {
        take_ssl_params_from_key_values(conninfo)
            .unwrap_or_else(|| (conninfo.to_owned(), SslParams::default()))
    }
}

/// The query is split by hand, not by `url::Url`: a WHATWG URL ends its authority at the first
/// `?`, so a password holding one would swallow the query, while tokio-postgres ends the
/// credentials at the first `@`. Keys and values are decoded with `percent-encoding`, as
/// tokio-postgres decodes them (no `+` for a space).
fn take_ssl_params_from_url(url: &str) -> (String, SslParams) {
    let mut params = SslParams::default();
    let after_credentials = url.find('@').map_or(0, |i| i + 1);
    let Some(query) = url[after_credentials..]
        .find('?')
        .map(|i| i + after_credentials)
    else {
        return (url.to_owned(), params);
    };
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .ok()
            .map(String::from)
    };
    let kept: Vec<&str> = url[query + 1..]
        .split('&')
        .filter(|pair| {
            let Some((key, value)) = pair.split_once('=') else {
                return true;
            };
            let slot = match decode(key).as_deref() {
                Some("sslmode") => &mut params.mode,
                Some("sslrootcert") => &mut params.rootcert,
                _ => return true,
            };
            match decode(value) {
                Some(value) => {
                    *slot = Some(value);
                    false
                }
                None => true,
            }
        })
        .collect();
    let mut rest = url[..query].to_owned();
    if !kept.is_empty() {
        rest.push('?');
        rest.push_str(&kept.join("&"));
    }
    (rest, params)
}

/// `None` when the string is not well formed (tokio-postgres then says so).
fn take_ssl_params_from_key_values(conninfo: &str) -> Option<(String, SslParams)> {
    let mut params = SslParams::default();
    let mut rest = String::new();
    let mut copied = 0;
    let mut chars = conninfo.char_indices().peekable();
    let position = |chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>| {
        chars.peek().map_or(conninfo.len(), |&(i, _)| i)
    };
    let skip_whitespace = |chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>| {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_whitespace(&mut chars);
        let start = position(&mut chars);
        while chars
            .next_if(|&(_, c)| !c.is_whitespace() && c != '=')
            .is_some()
        {}
        let key = &conninfo[start..position(&mut chars)];
        if key.is_empty() {
            break;
        }
        skip_whitespace(&mut chars);
        chars.next_if(|&(_, c)| c == '=')?;
        skip_whitespace(&mut chars);
        let quoted = chars.next_if(|&(_, c)| c == '\'').is_some();
        let mut value = String::new();
        loop {
            match chars.peek().copied() {
                None if quoted => return None,
                None => break,
                Some((_, '\'')) if quoted => {
                    chars.next();
                    break;
                }
                Some((_, c)) if c.is_whitespace() && !quoted => break,
                Some((_, '\\')) => {
                    chars.next();
                    if let Some((_, escaped)) = chars.next() {
                        value.push(escaped);
                    }
                }
                Some((_, c)) => {
                    chars.next();
                    value.push(c);
                }
            }
        }
        let slot = match key {
            "sslmode" => &mut params.mode,
            "sslrootcert" => &mut params.rootcert,
            _ => continue,
        };
        *slot = Some(value);
        rest.push_str(&conninfo[copied..start]);
        copied = position(&mut chars);
    }
    rest.push_str(&conninfo[copied..]);
    Some((rest, params))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssl_params_are_taken_out_and_the_rest_is_kept_verbatim() {
        let (rest, params) =
            take_ssl_params("postgres://u:p?w@h/db?a=1&sslmode=require&sslrootcert=%2Fca&b=%41");
        assert_eq!(rest, "postgres://u:p?w@h/db?a=1&b=%41");
        assert_eq!(params.mode.as_deref(), Some("require"));
        assert_eq!(params.rootcert.as_deref(), Some("/ca"));

        let (rest, params) = take_ssl_params("host=h sslmode='verify-ca' dbname=db");
        assert_eq!(rest, "host=h  dbname=db");
        assert_eq!(params.mode.as_deref(), Some("verify-ca"));
    }

    #[test]
    fn roots_follow_libpq() {
        let roots = |conninfo: &str| PostgresUrl::parse(conninfo).unwrap().roots;
        assert_eq!(roots("postgres://h/db"), RootsSource::None);
        assert_eq!(roots("postgres://h/db?sslmode=require"), RootsSource::None);
        assert_eq!(
            roots("postgres://h/db?sslmode=verify-ca"),
            RootsSource::System
        );
        assert_eq!(
            roots("postgres://h/db?sslrootcert=system"),
            RootsSource::System
        );
        assert_eq!(
            roots("postgres://h/db?sslrootcert=/ca.pem"),
            RootsSource::File("/ca.pem".into())
        );
        assert_eq!(
            PostgresUrl::parse("postgres://h/db?sslrootcert=system&sslmode=verify-ca").unwrap_err(),
            PostgresUrlError::SystemRootsNeedVerifyFull
        );
        assert_eq!(
            PostgresUrl::parse("postgres:///db").unwrap_err(),
            PostgresUrlError::NoHost
        );
    }
}
