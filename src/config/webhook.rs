//! Config of the webhook sink (`type = "webhook"`): raw keys and their
//! validation. Secrets come from files (re-readable, for rotation), the
//! environment overlay, or the config; header values may reference the
//! environment as `${NAME}`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{Secret, SecretSource, bytes_key, check_http_url, duration_key, read_secret_file, resolve};
use crate::lenient;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWebhookSink {
    url: Option<String>,
    encoding: Option<String>,
    compression: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    batch_max_records: Option<u64>,
    batch_max_bytes: Option<String>,
    batch_timeout: Option<String>,
    timeout: Option<String>,
    max_backoff: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "lenient::opt_list")]
    pub(super) streams: Option<Vec<String>>,
    pub(super) stream_field: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    allow_insecure_http: Option<bool>,
    #[serde(default)]
    auth: RawAuth,
    signing: Option<RawSigning>,
    #[serde(default)]
    tls: RawTls,
    #[serde(default)]
    splunk: RawSplunk,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    bearer_token_file: Option<PathBuf>,
    bearer_token: Option<String>,
    basic_user: Option<String>,
    basic_password_file: Option<PathBuf>,
    basic_password: Option<String>,
    splunk_token_file: Option<PathBuf>,
    splunk_token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSigning {
    secret_file: Option<PathBuf>,
    secret: Option<String>,
    header: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSplunk {
    index: Option<String>,
    source: Option<String>,
    sourcetype: Option<String>,
    host: Option<String>,
    assume_prefix_indexed: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Ndjson,
    JsonArray,
    SplunkHec,
}

#[derive(Debug, Clone)]
pub enum WebhookAuth {
    None,
    Bearer(SecretSource),
    Basic { user: String, password: SecretSource },
    Splunk(SecretSource),
}

#[derive(Debug, Clone)]
pub struct Signing {
    pub secret: SecretSource,
    pub header: String,
}

#[derive(Debug, Clone)]
pub struct SplunkMeta {
    pub index: Option<String>,
    pub source: String,
    /// `None`: `opsera:<stream>`.
    pub sourcetype: Option<String>,
    pub host: String,
    /// The receiver is Splunk itself, which indexes the events of a refused
    /// batch before the one its `invalid-event-number` names: those are
    /// not sent again. Off by default: other HEC receivers (the
    /// OpenTelemetry Collector's) keep nothing of a refused batch.
    pub assume_prefix_indexed: bool,
}

/// The validated webhook sink.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub url: String,
    pub encoding: Encoding,
    pub gzip: bool,
    pub batch_max_records: usize,
    pub batch_max_bytes: usize,
    pub batch_timeout: Duration,
    pub timeout: Duration,
    pub max_backoff: Duration,
    /// Extra headers; values may hold secrets (from `${NAME}`), so they are never printed.
    pub headers: Vec<(String, Secret)>,
    pub auth: WebhookAuth,
    pub signing: Option<Signing>,
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate and key, PEM, concatenated.
    pub identity_pem: Option<Vec<u8>>,
    pub tls_files: Vec<PathBuf>,
    /// The client key's file, when there is one (checked for loose permissions).
    pub key_file: Option<PathBuf>,
    pub splunk: SplunkMeta,
}

impl WebhookConfig {
    /// The credential and the signing secret, each with the key of the file
    /// it is read from (relative to `sinks.NAME.`).
    pub fn secrets(&self) -> impl Iterator<Item = (&'static str, &SecretSource)> {
        let auth = match &self.auth {
            WebhookAuth::Bearer(x) => Some(("auth.bearer_token_file", x)),
            WebhookAuth::Basic { password, .. } => Some(("auth.basic_password_file", password)),
            WebhookAuth::Splunk(x) => Some(("auth.splunk_token_file", x)),
            WebhookAuth::None => None,
        };
        auth.into_iter().chain(self.signing.as_ref().map(|g| ("signing.secret_file", &g.secret)))
    }
}

pub(super) fn validate(
    name: &str,
    raw: RawWebhookSink,
    base_dir: &Path,
    env: &HashMap<String, String>,
) -> Result<WebhookConfig, String> {
    let key = |k: &str| format!("sinks.{name}.{k}");
    let url = raw.url.ok_or_else(|| format!("{}: required for a webhook sink", key("url")))?;
    check_http_url(&url, raw.allow_insecure_http.unwrap_or(false)).map_err(|m| format!("{}: {m}", key("url")))?;
    let encoding = match raw.encoding.as_deref().unwrap_or("ndjson") {
        "ndjson" => Encoding::Ndjson,
        "json_array" => Encoding::JsonArray,
        "splunk_hec" => Encoding::SplunkHec,
        other => return Err(format!("{}: '{other}' is not one of ndjson, json_array, splunk_hec", key("encoding"))),
    };
    let gzip = match raw.compression.as_deref().unwrap_or("none") {
        "none" => false,
        "gzip" => true,
        other => return Err(format!("{}: '{other}' is not one of none, gzip", key("compression"))),
    };
    let batch_max_records = raw.batch_max_records.unwrap_or(500);
    if !(1..=10_000).contains(&batch_max_records) {
        return Err(format!("{}: must be between 1 and 10000", key("batch_max_records")));
    }
    let batch_max_bytes = bytes_key(&key("batch_max_bytes"), raw.batch_max_bytes.as_deref(), "1MiB")?;
    if !(1024..=(256 << 20)).contains(&batch_max_bytes) {
        return Err(format!("{}: must be between 1KiB and 256MiB", key("batch_max_bytes")));
    }
    let batch_timeout = duration_key(&key("batch_timeout"), raw.batch_timeout.as_deref(), "1s")?;
    let timeout = duration_key(&key("timeout"), raw.timeout.as_deref(), "30s")?;
    if timeout.is_zero() {
        return Err(format!("{}: must be greater than zero", key("timeout")));
    }
    let max_backoff = duration_key(&key("max_backoff"), raw.max_backoff.as_deref(), "60s")?;
    if max_backoff < Duration::from_millis(100) {
        return Err(format!("{}: must be at least 100ms", key("max_backoff")));
    }
    let mut headers = Vec::new();
    for (h, v) in raw.headers {
        reqwest::header::HeaderName::from_bytes(h.as_bytes())
            .map_err(|_| format!("{}: '{h}' is not a valid header name", key("headers")))?;
        let expanded = expand_env(&v, env).map_err(|m| format!("{}: {m}", key(&format!("headers.{h}"))))?;
        reqwest::header::HeaderValue::from_str(&expanded)
            .map_err(|_| format!("{}: not a valid header value", key(&format!("headers.{h}"))))?;
        headers.push((h, Secret::new(expanded)));
    }
    let secret = |file: Option<PathBuf>, inline: Option<String>, k: &str| -> Result<Option<SecretSource>, String> {
        if let Some(p) = file {
            let p = resolve(base_dir, p);
            let value = read_secret_file(&p).map_err(|m| format!("{}: {m}", key(&format!("{k}_file"))))?;
            return Ok(Some(SecretSource::new(value, Some(p))));
        }
        Ok(inline
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .map(|s| SecretSource::new(Secret::new(s), None)))
    };
    let a = raw.auth;
    let bearer = secret(a.bearer_token_file, a.bearer_token, "auth.bearer_token")?;
    let basic_pw = secret(a.basic_password_file, a.basic_password, "auth.basic_password")?;
    let splunk_tok = secret(a.splunk_token_file, a.splunk_token, "auth.splunk_token")?;
    let auth = match (bearer, a.basic_user, basic_pw, splunk_tok) {
        (None, None, None, None) => WebhookAuth::None,
        (Some(b), None, None, None) => WebhookAuth::Bearer(b),
        (None, Some(user), Some(password), None) => WebhookAuth::Basic { user, password },
        (None, Some(_), None, None) | (None, None, Some(_), None) => {
            return Err(format!("{}: basic auth needs both basic_user and basic_password_file", key("auth")));
        }
        (None, None, None, Some(t)) => WebhookAuth::Splunk(t),
        _ => return Err(format!("{}: set at most one of bearer, basic or splunk credentials", key("auth"))),
    };
    if matches!(auth, WebhookAuth::Splunk(_)) && encoding != Encoding::SplunkHec {
        return Err(format!("{}: splunk_token goes with encoding = \"splunk_hec\"", key("auth")));
    }
    let signing = match raw.signing {
        None => None,
        Some(s) => {
            let secret = secret(s.secret_file, s.secret, "signing.secret")?
                .ok_or_else(|| format!("{}: needs secret_file (or secret)", key("signing")))?;
            let header = s.header.unwrap_or_else(|| "X-Opsera-Signature".into());
            reqwest::header::HeaderName::from_bytes(header.as_bytes())
                .map_err(|_| format!("{}: '{header}' is not a valid header name", key("signing.header")))?;
            Some(Signing { secret, header })
        }
    };
    let read = |p: &PathBuf, k: &str| -> Result<Vec<u8>, String> {
        std::fs::read(p).map_err(|e| format!("{}: cannot read {}: {e}", key(k), p.display()))
    };
    let mut tls_files = Vec::new();
    let ca_pem = match raw.tls.ca_file.map(|p| resolve(base_dir, p)) {
        Some(p) => {
            let pem = read(&p, "tls.ca_file")?;
            reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("{}: {} is not a PEM certificate bundle: {e}", key("tls.ca_file"), p.display()))?;
            tls_files.push(p);
            Some(pem)
        }
        None => None,
    };
    let mut key_file = None;
    let identity_pem =
        match (raw.tls.cert_file.map(|p| resolve(base_dir, p)), raw.tls.key_file.map(|p| resolve(base_dir, p))) {
            (None, None) => None,
            (Some(c), Some(k)) => {
                let mut pem = read(&c, "tls.cert_file")?;
                pem.push(b'\n');
                pem.extend(read(&k, "tls.key_file")?);
                reqwest::Identity::from_pem(&pem)
                    .map_err(|e| format!("{}: the client certificate and key do not load: {e}", key("tls")))?;
                key_file = Some(k.clone());
                tls_files.extend([c, k]);
                Some(pem)
            }
            _ => return Err(format!("{}: cert_file and key_file go together", key("tls"))),
        };
    let splunk = SplunkMeta {
        index: raw.splunk.index,
        source: raw.splunk.source.unwrap_or_else(|| "opsera-shipper".into()),
        sourcetype: raw.splunk.sourcetype,
        host: raw.splunk.host.unwrap_or_else(hostname),
        assume_prefix_indexed: raw.splunk.assume_prefix_indexed.unwrap_or(false),
    };
    Ok(WebhookConfig {
        url,
        encoding,
        gzip,
        batch_max_records: batch_max_records as usize,
        batch_max_bytes: batch_max_bytes as usize,
        batch_timeout,
        timeout,
        max_backoff,
        headers,
        auth,
        signing,
        ca_pem,
        identity_pem,
        tls_files,
        key_file,
        splunk,
    })
}

/// Replace `${NAME}` with the environment variable's value; a missing one is an error.
fn expand_env(v: &str, env: &HashMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = v;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let end = after.find('}').ok_or_else(|| format!("unclosed '${{' in {v:?}"))?;
        let name = &after[..end];
        let val = env.get(name).ok_or_else(|| format!("environment variable {name} is not set"))?;
        out.push_str(val);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// This host's name, for Splunk's `host` field and syslog's HOSTNAME: from
/// `gethostname`, which works where `/proc/sys` is hidden (the systemd
/// unit's `ProcSubset=pid`), else `$HOSTNAME`, else `localhost`.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let name =
        ok.then(|| String::from_utf8_lossy(buf.split(|b| *b == 0).next().unwrap_or_default()).trim().to_string());
    name.filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_name_is_the_kernel_s() {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert_eq!(hostname(), kernel.trim());
    }

    #[test]
    fn env_references_expand_or_fail() {
        let env: HashMap<String, String> = [("TOK".to_string(), "abc".to_string())].into();
        assert_eq!(expand_env("Bearer ${TOK}!", &env).unwrap(), "Bearer abc!");
        assert!(expand_env("${NOPE}", &env).unwrap_err().contains("NOPE"));
        assert!(expand_env("${TOK", &env).is_err());
        assert_eq!(expand_env("plain", &env).unwrap(), "plain");
    }
}
