//! The syslog sink: UDP, TCP or TLS to a syslog receiver (rsyslog,
//! syslog-ng, a SIEM's collector), in RFC 5424, RFC 3164 or CEF.
//!
//! TCP/TLS: a batch counts as delivered once its bytes are written and
//! flushed. Before each batch the connection is checked for a receiver
//! that closed it (a restarted rsyslog), so a batch is not written into a
//! dead socket; on any error the connection is dropped and the batch is
//! sent again on a new one. That is at least once: after a crash or a
//! receiver restart, the batch in flight may arrive twice (dedup by `_id`).
//! UDP is fire-and-forget: a datagram the network or the receiver drops is
//! lost without notice. Prefer TCP or TLS for audit data.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::FutureExt;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tracing::{info, warn};

use super::syslog_format::{Formatter, frame_lf, frame_octet};
use super::{Batching, LineFormat, Sink, SinkError};
use crate::config::{Framing, SyslogConfig, Transport};
use crate::store::{FilePos, JournalRow};

trait Stream: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Stream for T {}

enum Conn {
    Udp(UdpSocket),
    Stream(Box<dyn Stream>),
}

pub struct SyslogSink {
    name: String,
    cfg: SyslogConfig,
    fmt: Formatter,
    tls: Option<Arc<ClientConfig>>,
    conn: Option<Conn>,
    truncated: u64,
}

impl SyslogSink {
    pub fn new(name: &str, cfg: SyslogConfig, lines: LineFormat) -> Result<Self, SinkError> {
        let tls = match cfg.transport {
            Transport::Tls => Some(tls_config(&cfg).map_err(|m| SinkError::retry(format!("TLS setup: {m}")))?),
            _ => None,
        };
        let fmt = Formatter::new(&cfg, lines);
        Ok(Self { name: name.to_string(), cfg, fmt, tls, conn: None, truncated: 0 })
    }

    async fn connect(&self) -> Result<Conn, String> {
        let addr = &self.cfg.address;
        let t = self.cfg.timeout;
        if self.cfg.transport == Transport::Udp {
            let target = tokio::net::lookup_host(addr.as_str())
                .await
                .map_err(|e| format!("resolving {addr}: {e}"))?
                .next()
                .ok_or_else(|| format!("{addr} resolves to no address"))?;
            let local = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            let sock = UdpSocket::bind(local).await.map_err(|e| format!("UDP socket: {e}"))?;
            sock.connect(target).await.map_err(|e| format!("UDP {addr}: {e}"))?;
            return Ok(Conn::Udp(sock));
        }
        let tcp = tokio::time::timeout(t, TcpStream::connect(addr.as_str()))
            .await
            .map_err(|_| format!("connecting to {addr} timed out"))?
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &self.tls else {
            return Ok(Conn::Stream(Box::new(tcp)));
        };
        let name = ServerName::try_from(self.cfg.server_name.clone())
            .map_err(|_| format!("'{}' is not a valid TLS server name", self.cfg.server_name))?;
        let stream = tokio::time::timeout(t, TlsConnector::from(tls.clone()).connect(name, tcp))
            .await
            .map_err(|_| format!("TLS handshake with {addr} timed out"))?
            .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
        Ok(Conn::Stream(Box::new(stream)))
    }

    async fn send(&mut self, rows: &[JournalRow]) -> Result<(), String> {
        if let Some(Conn::Stream(s)) = &mut self.conn
            && peer_closed(s.as_mut())
        {
            info!(sink = %self.name, "The receiver closed the connection; reconnecting.");
            self.conn = None;
        }
        if self.conn.is_none() {
            self.conn = Some(self.connect().await?);
            info!(sink = %self.name, address = %self.cfg.address, transport = ?self.cfg.transport, "Connected.");
        }
        let mut buf = Vec::with_capacity(rows.iter().map(|r| r.body.len() + 200).sum());
        let mut datagrams = Vec::new();
        for r in rows {
            let m = self.fmt.format(r);
            if m.truncated {
                self.truncated += 1;
                crate::metrics::get().syslog_truncated.get_or_create(&crate::metrics::sink(&self.name)).inc();
                warn!(
                    sink = %self.name,
                    record = %r.id,
                    limit = self.cfg.max_message_bytes,
                    truncated_total = self.truncated,
                    "Message over max_message_bytes: cut with a visible marker (the _id stays in the structured data)."
                );
            }
            match (&self.conn, self.cfg.framing) {
                (Some(Conn::Udp(_)), _) => datagrams.push(m.bytes),
                (_, Framing::OctetCounting) => frame_octet(&m.bytes, &mut buf),
                (_, Framing::Lf) => frame_lf(&m.bytes, &mut buf),
            }
        }
        let t = self.cfg.timeout;
        let addr = self.cfg.address.clone();
        match &mut self.conn {
            Some(Conn::Udp(sock)) => {
                for d in &datagrams {
                    sock.send(d).await.map_err(|e| format!("UDP send to {addr}: {e}"))?;
                }
            }
            Some(Conn::Stream(s)) => {
                tokio::time::timeout(t, async {
                    s.write_all(&buf).await?;
                    s.flush().await
                })
                .await
                .map_err(|_| format!("writing to {addr} timed out"))?
                .map_err(|e| format!("writing to {addr}: {e}"))?;
            }
            None => return Err("not connected".into()),
        }
        Ok(())
    }
}

/// True when the receiver has closed (or reset) the connection. Receivers
/// never send syslog clients data, so anything readable is EOF, an error,
/// or TLS housekeeping (session tickets), which is read and ignored.
fn peer_closed(s: &mut dyn Stream) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf).now_or_never() {
            None => return false,
            Some(Ok(0)) | Some(Err(_)) => return true,
            Some(Ok(_)) => continue,
        }
    }
}

#[async_trait]
impl Sink for SyslogSink {
    async fn deliver(&mut self, rows: &[JournalRow]) -> Result<Option<FilePos>, SinkError> {
        match self.send(rows).await {
            Ok(()) => Ok(None),
            Err(reason) => {
                self.conn = None;
                Err(SinkError::retry(reason))
            }
        }
    }

    fn record_overhead(&self) -> usize {
        400
    }

    fn batching(&self) -> Batching {
        Batching { max_records: 500, max_bytes: 4 << 20, timeout: Duration::ZERO, max_backoff: self.cfg.max_backoff }
    }
}

/// The TLS client config: the CA file's certificates (or the OS trust
/// store), host-name verification on, and a client certificate when given.
pub fn tls_config(cfg: &SyslogConfig) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    match &cfg.ca_pem {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| format!("ca_file is not PEM: {e}"))?;
                roots.add(cert).map_err(|e| format!("ca_file holds an unusable certificate: {e}"))?;
            }
            if roots.is_empty() {
                return Err("ca_file holds no certificate".into());
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err("the OS trust store is empty; set tls.ca_file".into());
            }
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let config = match (&cfg.cert_pem, &cfg.key_pem) {
        (Some(c), Some(k)) => {
            let certs = CertificateDer::pem_slice_iter(c)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("cert_file is not PEM: {e}"))?;
            if certs.is_empty() {
                return Err("cert_file holds no certificate".into());
            }
            let key =
                PrivateKeyDer::from_pem_slice(k).map_err(|e| format!("key_file holds no usable private key: {e}"))?;
            builder.with_client_auth_cert(certs, key).map_err(|e| format!("client certificate and key: {e}"))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}
