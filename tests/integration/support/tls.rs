//! Throwaway certificates for the TLS tests, made at test time (nothing is committed): a CA
//! that signs a server certificate for the DNS name `localhost` only (no IP address, so
//! reaching the server as `127.0.0.1` is a name mismatch), and a second CA that signs nothing
//! here (a client trusting only it must refuse the server).

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;

/// What a server needs to speak TLS, as PEM.
#[derive(Clone)]
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
    /// The CA that signed `cert_pem` (Redis wants one even when it asks no client for a
    /// certificate).
    pub ca_pem: String,
}

pub struct Pki {
    /// CA files for the client side: `ca` signed the server certificate, `other_ca` did not.
    pub ca: PathBuf,
    pub other_ca: PathBuf,
    pub server: ServerTls,
    _dir: TempDir,
}

fn ca(name: &str) -> (CertificateParams, KeyPair, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().expect("CA key");
    let pem = params.self_signed(&key).expect("CA certificate").pem();
    (params, key, pem)
}

impl Pki {
    pub fn new() -> Self {
        let (ca_params, ca_key, ca_pem) = ca("desafio3 test CA");
        let (_, _, other_ca_pem) = ca("desafio3 other test CA");

        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().expect("server key");
        let cert = params
            .signed_by(&key, &Issuer::new(ca_params, ca_key))
            .expect("server certificate");

        let dir = tempfile::tempdir().expect("temp dir for CA files");
        let (ca, other_ca) = (dir.path().join("ca.pem"), dir.path().join("other-ca.pem"));
        std::fs::write(&ca, &ca_pem).expect("CA file");
        std::fs::write(&other_ca, other_ca_pem).expect("other CA file");
        Self {
            ca,
            other_ca,
            server: ServerTls {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
                ca_pem,
            },
            _dir: dir,
        }
    }

    pub fn ca_path(&self) -> &str {
        self.ca.to_str().expect("utf-8 path")
    }

    pub fn other_ca_path(&self) -> &str {
        self.other_ca.to_str().expect("utf-8 path")
    }
}
