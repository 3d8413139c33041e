//! Test certificates: a CA, a server certificate for localhost/127.0.0.1
//! and a client certificate, as PEM files (for rsyslog and HTTPS receivers).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA, a server certificate for localhost/127.0.0.1 and a client
/// certificate, written as PEM files into `dir`.
pub fn make_certs(dir: &Path, prefix: &str) -> (TlsFiles, TlsFiles) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, format!("{prefix} test CA"));
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>, cn: &str| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        let cert = p.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(vec!["localhost".into(), "127.0.0.1".into()], "localhost");
    let (client_cert, client_key) = leaf(vec!["opsera-shipper.test".into()], "opsera-shipper");
    let w = |name: &str, text: &str| {
        let p = dir.join(format!("{prefix}-{name}"));
        std::fs::write(&p, text).unwrap();
        p
    };
    let ca_path = w("ca.pem", &ca.pem());
    let server =
        TlsFiles { ca: ca_path.clone(), cert: w("server.pem", &server_cert), key: w("server.key", &server_key) };
    let client = TlsFiles { ca: ca_path, cert: w("client.pem", &client_cert), key: w("client.key", &client_key) };
    (server, client)
}
