//! TLS to Redis and PostgreSQL: rustls, its crypto provider, the trust roots, and libpq's
//! `sslmode` turned into certificate verification. `postgres_url` decides which roots
//! PostgreSQL needs and [`RedisTls`] which Redis needs; `config` reads the variables and files;
//! this module builds clients from what it found.
//!
//! **Crypto provider: ring**, deliberately, and only ring (`cargo tree -e features -i rustls`
//! shows no `aws_lc_rs`). rustls' default, aws-lc-rs, builds a large C/assembly library with
//! CMake (and, for some targets, needs bindgen/libclang): heavier to build for the static musl
//! target in both images and slower to compile on small machines. ring needs only a C
//! compiler for the target, which both builds already have, and covers everything these two
//! connections use (TLS 1.2/1.3, ECDSA/RSA/Ed25519 certificates). FIPS, the main reason to
//! prefer aws-lc-rs, is not a requirement here.

use std::fmt;
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres_rustls::MakeRustlsConnect;

/// The system's CA bundle, as the image ships it (Debian and Alpine keep it there too).
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// ring, installed once as the process default as well: the redis crate builds its rustls
/// configuration with `ClientConfig::builder()`, which takes the process default. Our own
/// configurations get the provider passed explicitly.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            // An error only says a default is already installed: with ring the only provider
            // compiled in, that one is ring too.
            let _ = rustls::crypto::ring::default_provider().install_default();
            Arc::new(rustls::crypto::ring::default_provider())
        })
        .clone()
}

/// CA certificates a server must chain to, from a PEM file (`sslrootcert`, `REDIS_CA_FILE`)
/// or the system bundle. Parsed once, at start.
#[derive(Clone)]
pub struct TrustRoots {
    /// As read: the redis crate wants PEM.
    pem: Arc<Vec<u8>>,
    store: Arc<RootCertStore>,
}

impl TrustRoots {
    /// Every certificate in `pem`; an error (one line, no file contents) when there is none or
    /// one cannot serve as a trust anchor. Other PEM sections (keys) are ignored.
    pub fn from_pem(pem: Vec<u8>) -> Result<Self, String> {
        let mut store = RootCertStore::empty();
        for (i, cert) in CertificateDer::pem_slice_iter(&pem).enumerate() {
            let cert = cert.map_err(|e| format!("certificate {} is not valid PEM: {e}", i + 1))?;
            store
                .add(cert)
                .map_err(|e| format!("certificate {} is not a usable CA: {e}", i + 1))?;
        }
        if store.is_empty() {
            return Err("holds no PEM certificate".into());
        }
        Ok(Self {
            pem: Arc::new(pem),
            store: Arc::new(store),
        })
    }

    pub fn len(&self) -> usize {
        self.store.len()
    }

    pub fn is_empty(&self) -> bool {
        self.store.is_empty()
    }
}

impl fmt::Debug for TrustRoots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustRoots({} certificates)", self.len())
    }
}

/// libpq's `sslmode`, with libpq's meaning (`allow` is not supported).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP only.
    Disable,
    /// TLS if the server offers it, else plain TCP (libpq's default).
    Prefer,
    /// TLS or nothing; the certificate is not verified unless `sslrootcert` is given.
    Require,
    /// TLS, the chain verified against the trust roots; the host name is not checked.
    VerifyCa,
    /// TLS, the chain and the host name verified.
    VerifyFull,
}

impl SslMode {
    /// Whether the server's certificate is verified even without `sslrootcert` (then against
    /// the system bundle).
    pub fn verifies(self) -> bool {
        matches!(self, Self::VerifyCa | Self::VerifyFull)
    }

    /// What tokio-postgres is told: it knows only whether to ask for TLS and whether to
    /// insist; verification is the connector's job.
    pub fn driver_mode(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Driver;
        match self {
            Self::Disable => Driver::Disable,
            Self::Prefer => Driver::Prefer,
            Self::Require | Self::VerifyCa | Self::VerifyFull => Driver::Require,
        }
    }
}

/// TLS to PostgreSQL: `sslmode` and the trust roots (`sslrootcert`, or the system bundle for
/// `verify-ca`/`verify-full` without one; `None` means nothing is verified). Made by
/// [`super::postgres_url::PostgresUrl::into_parts`], which applies libpq's rules.
#[derive(Debug, Clone)]
pub struct PostgresTls {
    pub mode: SslMode,
    pub roots: Option<TrustRoots>,
}

impl PostgresTls {
    /// The connector for the pool. Under `prefer`, tokio-postgres falls back to plain TCP only
    /// when the server answers that it has no TLS; a handshake that fails (an untrusted
    /// certificate) is an error, never a silent downgrade. Under `disable` it is never used.
    pub fn connector(&self) -> anyhow::Result<MakeRustlsConnect> {
        let provider = crypto_provider();
        let (chain, check_name) = match (&self.roots, self.mode) {
            (_, SslMode::Disable) | (None, SslMode::Prefer | SslMode::Require) => (None, false),
            (Some(roots), SslMode::VerifyFull) => (Some(webpki(roots, &provider)?), true),
            // libpq: with a root certificate file, `require` (and `prefer`) verify the chain
            // like `verify-ca`.
            (Some(roots), SslMode::Prefer | SslMode::Require | SslMode::VerifyCa) => {
                (Some(webpki(roots, &provider)?), false)
            }
            // `PostgresUrl` always asks for roots in these modes: a bug, said rather than hidden.
            (None, SslMode::VerifyCa | SslMode::VerifyFull) => {
                anyhow::bail!("sslmode {:?} needs trust roots", self.mode)
            }
        };
        let verifier = Arc::new(PostgresVerifier {
            chain,
            check_name,
            provider: provider.clone(),
        });
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(MakeRustlsConnect::new(config))
    }
}

fn webpki(
    roots: &TrustRoots,
    provider: &Arc<CryptoProvider>,
) -> anyhow::Result<Arc<WebPkiServerVerifier>> {
    WebPkiServerVerifier::builder_with_provider(roots.store.clone(), provider.clone())
        .build()
        .context("building the certificate verifier")
}

/// The server's certificate as libpq's `sslmode` asks, with rustls' own verifier doing the
/// work:
/// - `verify-full`: the chain and the host name (`check_name`);
/// - `verify-ca`, or `prefer`/`require` with `sslrootcert`: the chain, and only the host-name
///   verdict ignored. rustls checks the chain (issuer, signatures, validity dates, key usage)
///   first and the name last, so a `NotValidForName` error means everything else passed;
/// - `prefer`/`require` without `sslrootcert` (`chain` is `None`), as libpq: encryption
///   without authentication of the server.
///
/// In every mode the handshake signatures are checked, so the server does hold the key of the
/// certificate it shows (which SCRAM channel binding relies on).
#[derive(Debug)]
struct PostgresVerifier {
    chain: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PostgresVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    /// What `WebPkiServerVerifier` does too, with the same provider's algorithms.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What a `REDIS_URL` asks of TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisTls {
    /// `redis://`: plain TCP.
    Plain,
    /// `rediss://`: the server verified against trust roots (`REDIS_CA_FILE`, else the
    /// system bundle).
    Verified,
    /// `rediss://…#insecure`: encrypted, nothing verified.
    Insecure,
}

impl RedisTls {
    /// `Plain` also for a URL the redis crate cannot read (`config` rejects it anyway).
    pub fn of(url: &str) -> Self {
        match redis::IntoConnectionInfo::into_connection_info(url).map(|info| info.addr().clone()) {
            Ok(redis::ConnectionAddr::TcpTls { insecure: true, .. }) => Self::Insecure,
            Ok(redis::ConnectionAddr::TcpTls { .. }) => Self::Verified,
            _ => Self::Plain,
        }
    }
}

/// The Redis client for `info` (from `REDIS_URL`). `rediss://` verifies the server against
/// `roots`; `rediss://…#insecure` (`roots` is then `None`) verifies nothing, and says so in the
/// log; `redis://` is plain TCP.
pub fn redis_client(
    info: redis::ConnectionInfo,
    roots: Option<&TrustRoots>,
) -> redis::RedisResult<redis::Client> {
    crypto_provider();
    let client = match roots {
        Some(roots) => redis::Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(roots.pem.to_vec()),
            },
        )?,
        None => redis::Client::open(info)?,
    };
    if let redis::ConnectionAddr::TcpTls { insecure: true, .. } =
        client.get_connection_info().addr()
    {
        tracing::warn!(
            "REDIS_URL ends in #insecure: TLS to Redis without verifying the server's certificate; \
             anyone on the path can read and change the traffic"
        );
    }
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_provider_is_compiled_in_and_installed() {
        let provider = crypto_provider();
        let default = CryptoProvider::get_default().expect("installed as the process default");
        assert_eq!(
            default.cipher_suites.len(),
            provider.cipher_suites.len(),
            "the default is ring"
        );
    }

    #[test]
    fn trust_roots_need_a_certificate() {
        assert!(TrustRoots::from_pem(b"not a certificate".to_vec()).is_err());
        assert!(TrustRoots::from_pem(Vec::new()).is_err());
    }
}
