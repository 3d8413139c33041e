//! Config of the syslog sink (`type = "syslog"`): raw keys and validation.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{bytes_key, duration_key, resolve};
use crate::lenient;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSyslogSink {
    address: Option<String>,
    transport: Option<String>,
    framing: Option<String>,
    format: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    facility: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    severity: Option<String>,
    app_name: Option<String>,
    hostname: Option<String>,
    sd_id: Option<String>,
    max_message_bytes: Option<String>,
    timeout: Option<String>,
    max_backoff: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_list")]
    pub(super) streams: Option<Vec<String>>,
    pub(super) stream_field: Option<String>,
    #[serde(default)]
    tls: RawSyslogTls,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSyslogTls {
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    server_name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// RFC 6587/5425: `LEN SP MSG`.
    OctetCounting,
    /// One message per line.
    Lf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyslogFormat {
    Rfc5424,
    Rfc3164,
    Cef,
}

/// The validated syslog sink.
#[derive(Debug, Clone)]
pub struct SyslogConfig {
    /// `host:port`.
    pub address: String,
    pub host: String,
    pub transport: Transport,
    pub framing: Framing,
    pub format: SyslogFormat,
    pub facility: u8,
    pub severity: u8,
    pub app_name: String,
    pub hostname: String,
    pub sd_id: String,
    pub max_message_bytes: usize,
    pub timeout: Duration,
    pub max_backoff: Duration,
    pub ca_pem: Option<Vec<u8>>,
    pub cert_pem: Option<Vec<u8>>,
    pub key_pem: Option<Vec<u8>>,
    /// Where `key_pem` came from (checked for loose permissions).
    pub key_file: Option<PathBuf>,
    pub server_name: String,
}

const FACILITIES: [(&str, u8); 26] = [
    ("kern", 0),
    ("user", 1),
    ("mail", 2),
    ("daemon", 3),
    ("auth", 4),
    ("syslog", 5),
    ("lpr", 6),
    ("news", 7),
    ("uucp", 8),
    ("cron", 9),
    ("authpriv", 10),
    ("ftp", 11),
    ("ntp", 12),
    ("audit", 13),
    ("security", 13),
    ("alert", 14),
    ("clock", 15),
    ("local0", 16),
    ("local1", 17),
    ("local2", 18),
    ("local3", 19),
    ("local4", 20),
    ("local5", 21),
    ("local6", 22),
    ("local7", 23),
    ("logaudit", 13),
];

const SEVERITIES: [(&str, u8); 11] = [
    ("emerg", 0),
    ("emergency", 0),
    ("alert", 1),
    ("crit", 2),
    ("critical", 2),
    ("err", 3),
    ("error", 3),
    ("warning", 4),
    ("warn", 4),
    ("notice", 5),
    ("info", 6),
];

fn named(v: &str, table: &[(&str, u8)], max: u8) -> Option<u8> {
    if let Ok(n) = v.trim().parse::<u8>() {
        return (n <= max).then_some(n);
    }
    let v = v.trim().to_ascii_lowercase();
    if v == "debug" && max == 7 {
        return Some(7);
    }
    table.iter().find(|(k, _)| *k == v).map(|(_, n)| *n)
}

/// PRINTUSASCII (33..=126) without the characters an SD-NAME may not hold.
fn is_sd_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes().all(|b| (33..=126).contains(&b) && !matches!(b, b'=' | b']' | b'"' | b' '))
}

pub(super) fn validate(name: &str, raw: RawSyslogSink, base_dir: &Path) -> Result<SyslogConfig, String> {
    let key = |k: &str| format!("sinks.{name}.{k}");
    let address = raw.address.ok_or_else(|| format!("{}: required for a syslog sink (host:port)", key("address")))?;
    let (host, port) = address
        .rsplit_once(':')
        .filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
        .ok_or_else(|| format!("{}: '{address}' is not host:port", key("address")))?;
    let _ = port;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let transport = match raw.transport.as_deref().unwrap_or("tcp") {
        "udp" => Transport::Udp,
        "tcp" => Transport::Tcp,
        "tls" => Transport::Tls,
        other => return Err(format!("{}: '{other}' is not one of udp, tcp, tls", key("transport"))),
    };
    let framing = match (transport, raw.framing.as_deref()) {
        (Transport::Udp, None) => Framing::Lf, // unused: one message per datagram
        (Transport::Udp, Some(_)) => {
            return Err(format!(
                "{}: framing applies to tcp and tls only (UDP sends one message per datagram)",
                key("framing")
            ));
        }
        (_, None | Some("octet-counting")) => Framing::OctetCounting,
        (_, Some("lf")) => Framing::Lf,
        (_, Some(other)) => return Err(format!("{}: '{other}' is not one of octet-counting, lf", key("framing"))),
    };
    let format = match raw.format.as_deref().unwrap_or("rfc5424") {
        "rfc5424" => SyslogFormat::Rfc5424,
        "rfc3164" => SyslogFormat::Rfc3164,
        "cef" => SyslogFormat::Cef,
        other => return Err(format!("{}: '{other}' is not one of rfc5424, rfc3164, cef", key("format"))),
    };
    let facility = named(raw.facility.as_deref().unwrap_or("local4"), &FACILITIES, 23).ok_or_else(|| {
        format!("{}: not a facility name (kern..local7, auth, authpriv, audit) or a number 0-23", key("facility"))
    })?;
    let severity = named(raw.severity.as_deref().unwrap_or("info"), &SEVERITIES, 7)
        .ok_or_else(|| format!("{}: not a severity name (emerg..debug) or a number 0-7", key("severity")))?;
    let app_name = raw.app_name.unwrap_or_else(|| "opsera-shipper".into());
    if app_name.is_empty() || app_name.len() > 48 || !app_name.bytes().all(|b| (33..=126).contains(&b)) {
        return Err(format!("{}: 1 to 48 printable ASCII characters, no spaces", key("app_name")));
    }
    if format != SyslogFormat::Rfc5424
        && !app_name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(format!("{}: RFC 3164 tags hold letters, digits, '-', '_' and '.' only", key("app_name")));
    }
    let hostname = raw.hostname.unwrap_or_else(super::hostname);
    if hostname.is_empty() || hostname.len() > 255 || !hostname.bytes().all(|b| (33..=126).contains(&b)) {
        return Err(format!("{}: 1 to 255 printable ASCII characters, no spaces", key("hostname")));
    }
    let sd_id = raw.sd_id.unwrap_or_else(|| "opsera@32473".into());
    if !is_sd_name(&sd_id) || !sd_id.contains('@') {
        return Err(format!(
            "{}: an SD-ID is NAME@ENTERPRISE-NUMBER, at most 32 printable ASCII characters without '=', ']', '\"' or spaces",
            key("sd_id")
        ));
    }
    let default_max = if transport == Transport::Udp { "2048" } else { "65536" };
    let max_message_bytes = bytes_key(&key("max_message_bytes"), raw.max_message_bytes.as_deref(), default_max)?;
    if !(480..=(16 << 20)).contains(&max_message_bytes) {
        return Err(format!("{}: must be between 480 and 16MiB", key("max_message_bytes")));
    }
    if transport == Transport::Udp && max_message_bytes > 65_000 {
        return Err(format!("{}: a UDP datagram holds at most about 65000 bytes", key("max_message_bytes")));
    }
    let timeout = duration_key(&key("timeout"), raw.timeout.as_deref(), "10s")?;
    let max_backoff = duration_key(&key("max_backoff"), raw.max_backoff.as_deref(), "30s")?;
    if timeout.is_zero() || max_backoff < Duration::from_millis(100) {
        return Err(format!("{}: timeout must be positive and max_backoff at least 100ms", key("timeout")));
    }
    let read = |p: Option<PathBuf>, k: &str| -> Result<Option<Vec<u8>>, String> {
        match p.map(|p| resolve(base_dir, p)) {
            None => Ok(None),
            Some(p) => std::fs::read(&p).map(Some).map_err(|e| format!("{}: cannot read {}: {e}", key(k), p.display())),
        }
    };
    let t = raw.tls;
    let has_tls_keys = t.ca_file.is_some() || t.cert_file.is_some() || t.key_file.is_some() || t.server_name.is_some();
    if has_tls_keys && transport != Transport::Tls {
        return Err(format!("{}: TLS settings need transport = \"tls\"", key("tls")));
    }
    let ca_pem = read(t.ca_file, "tls.ca_file")?;
    let cert_pem = read(t.cert_file, "tls.cert_file")?;
    let key_file = t.key_file.map(|p| resolve(base_dir, p));
    let key_pem = read(key_file.clone(), "tls.key_file")?;
    if cert_pem.is_some() != key_pem.is_some() {
        return Err(format!("{}: cert_file and key_file go together", key("tls")));
    }
    let server_name = t.server_name.unwrap_or_else(|| host.clone());
    let cfg = SyslogConfig {
        address,
        host,
        transport,
        framing,
        format,
        facility,
        severity,
        app_name,
        hostname,
        sd_id,
        max_message_bytes: max_message_bytes as usize,
        timeout,
        max_backoff,
        ca_pem,
        cert_pem,
        key_pem,
        key_file,
        server_name,
    };
    if transport == Transport::Tls {
        crate::sink::syslog::tls_config(&cfg).map_err(|m| format!("{}: {m}", key("tls")))?;
    }
    Ok(cfg)
}
