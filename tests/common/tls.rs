//! Test certificates: a CA, a server certificate for localhost/127.0.0.1
//! and a client certificate, as PEM files (for rsyslog and HTTPS
//! receivers); a TLS acceptor for them; and a TLS-terminating proxy that
//! puts the simulated API (plain HTTP) behind HTTPS.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// A TLS acceptor for `server` (a certificate for localhost/127.0.0.1);
/// with `client_ca`, client certificates signed by it are required.
pub fn acceptor(server: &TlsFiles, client_ca: Option<&std::path::Path>) -> tokio_rustls::TlsAcceptor {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let certs = CertificateDer::pem_file_iter(&server.cert).unwrap().collect::<Result<Vec<_>, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_file(&server.key).unwrap();
    let builder =
        rustls::ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions().unwrap();
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca).unwrap() {
                roots.add(cert.unwrap()).unwrap();
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build().unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(certs, key).unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// Listen on loopback for TLS with `server`'s certificate and pass each
/// connection's bytes to and from `upstream` (plain TCP); the address.
pub async fn tls_proxy(upstream: SocketAddr, server: &TlsFiles) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = acceptor(server, None);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let (Ok(mut tls), Ok(mut up)) =
                    (acceptor.accept(tcp).await, tokio::net::TcpStream::connect(upstream).await)
                else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    addr
}
