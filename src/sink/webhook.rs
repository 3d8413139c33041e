//! The webhook sink: batches of records POSTed to an HTTP endpoint as
//! NDJSON, a JSON array, or Splunk HEC events; optionally gzipped and
//! signed with HMAC-SHA256 over the exact bytes sent.
//!
//! It classifies every reply and leaves the decisions to the dispatcher:
//! 2xx confirms the batch; throttling, outages, refused credentials and
//! endpoint errors are retryable (records are never condemned for them);
//! 400/413/422 and other data errors are rejections, which the dispatcher
//! narrows down to the refused record(s). Delivery is at least once: after a
//! crash the batch in flight may arrive again, so receivers should dedup by
//! `_id`.

use std::io::Write;
use std::time::Duration;

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER};
use sha2::Sha256;

use super::{Batching, LineFormat, Sink, SinkError};
use crate::config::{Encoding, WebhookAuth, WebhookConfig};
use crate::http::{describe_reqwest, parse_retry_after, with_tls};
use crate::opsera::snippet;
use crate::store::{FilePos, JournalRow};

/// The longest wait a receiver's `Retry-After` can impose.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

pub struct WebhookSink {
    name: String,
    cfg: WebhookConfig,
    lines: LineFormat,
    client: reqwest::Client,
}

impl WebhookSink {
    pub fn new(name: &str, cfg: WebhookConfig, lines: LineFormat) -> Result<Self, SinkError> {
        let b = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(10)))
            .retry(reqwest::retry::never())
            // A redirected POST may turn into a GET: treat 3xx as a misconfigured URL instead.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("opsera-shipper/", env!("CARGO_PKG_VERSION")));
        let b = crate::http::direct_to_loopback(b, &cfg.url);
        let client = with_tls(b, cfg.ca_pem.as_deref(), cfg.identity_pem.as_deref())
            .and_then(|b| b.build())
            .map_err(|e| SinkError::retry(format!("building the HTTP client: {}", describe_reqwest(&e))))?;
        Ok(Self { name: name.to_string(), cfg, lines, client })
    }

    /// The request body (before compression) for `rows`.
    pub fn encode(&self, rows: &[JournalRow]) -> Vec<u8> {
        let mut out =
            String::with_capacity(rows.iter().map(|r| r.body.len() + self.record_overhead()).sum::<usize>() + 2);
        match self.cfg.encoding {
            Encoding::Ndjson => out.push_str(&self.lines.render(rows)),
            Encoding::JsonArray => {
                out.push('[');
                for (i, r) in rows.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    self.lines.push_line(r, &mut out);
                    out.pop(); // the line's newline
                }
                out.push(']');
            }
            Encoding::SplunkHec => {
                let sp = &self.cfg.splunk;
                for r in rows {
                    out.push_str("{\"time\":");
                    out.push_str(&format!("{}.{:03}", r.created.div_euclid(1000), r.created.rem_euclid(1000)));
                    out.push_str(",\"host\":");
                    out.push_str(&json_str(&sp.host));
                    out.push_str(",\"source\":");
                    out.push_str(&json_str(&sp.source));
                    out.push_str(",\"sourcetype\":");
                    match &sp.sourcetype {
                        Some(st) => out.push_str(&json_str(st)),
                        None => out.push_str(&json_str(&format!("opsera:{}", r.stream))),
                    }
                    if let Some(ix) = &sp.index {
                        out.push_str(",\"index\":");
                        out.push_str(&json_str(ix));
                    }
                    out.push_str(",\"event\":");
                    self.lines.push_line(r, &mut out);
                    out.pop();
                    out.push_str("}\n");
                }
            }
        }
        out.into_bytes()
    }

    fn headers(&self, body: &[u8]) -> Result<Vec<(HeaderName, HeaderValue)>, SinkError> {
        let mut h = Vec::new();
        let ct = if self.cfg.encoding == Encoding::Ndjson { "application/x-ndjson" } else { "application/json" };
        h.push((CONTENT_TYPE, HeaderValue::from_static(ct)));
        if self.cfg.gzip {
            h.push((CONTENT_ENCODING, HeaderValue::from_static("gzip")));
        }
        let bad = |what: &str| SinkError::retry(format!("{what} holds characters that cannot go in an HTTP header"));
        for (k, v) in &self.cfg.headers {
            let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| bad("a header name"))?;
            let mut value = HeaderValue::from_str(v.expose()).map_err(|_| bad("a header value"))?;
            value.set_sensitive(true);
            h.push((name, value));
        }
        let auth = match &self.cfg.auth {
            WebhookAuth::None => None,
            WebhookAuth::Bearer(s) => Some(format!("Bearer {}", s.current().expose())),
            WebhookAuth::Splunk(s) => Some(format!("Splunk {}", s.current().expose())),
            WebhookAuth::Basic { user, password } => {
                use base64_lite::encode;
                Some(format!("Basic {}", encode(format!("{user}:{}", password.current().expose()).as_bytes())))
            }
        };
        if let Some(a) = auth {
            let mut v = HeaderValue::from_str(&a).map_err(|_| bad("the credential"))?;
            v.set_sensitive(true);
            h.push((AUTHORIZATION, v));
        }
        if let Some(sig) = &self.cfg.signing {
            let t = crate::window::now_ms() / 1000;
            let value = signature(sig.secret.current().expose().as_bytes(), t, body);
            let name = HeaderName::from_bytes(sig.header.as_bytes()).map_err(|_| bad("the signing header"))?;
            h.push((name, HeaderValue::from_str(&value).map_err(|_| bad("the signature"))?));
        }
        Ok(h)
    }

    fn classify(&self, status: StatusCode, retry_after: Option<Duration>, body: &[u8]) -> SinkError {
        let code = status.as_u16();
        let what = format!("{} answered HTTP {code}: {}", self.cfg.url, snippet(body));
        match code {
            408 | 429 | 500..=599 => SinkError::Retryable { reason: what, retry_after },
            401 | 403 => {
                crate::health::Health::get().sink_credentials_refused(&self.name, &what);
                // Read the secret files again for the retry, even if their
                // time says unchanged (rewritten within one tick of its clock).
                self.cfg.secrets().for_each(|(_, s)| _ = s.reload());
                SinkError::retry(format!(
                    "{what}; the receiver refused sinks.{}.auth credentials (secret files are read again after a refusal and whenever they change)",
                    self.name
                ))
            }
            300..=399 | 404 | 405 | 407 | 410 | 411 | 414 | 415 | 421 | 426 => {
                SinkError::retry(format!("{what}; check sinks.{}.url and the receiver's setup", self.name))
            }
            _ => {
                let bad_index = hec_invalid_event(body);
                let kept_before = bad_index.is_some()
                    && self.cfg.encoding == Encoding::SplunkHec
                    && self.cfg.splunk.assume_prefix_indexed;
                SinkError::Rejected { reason: what, status: Some(code), bad_index, kept_before }
            }
        }
    }
}

#[async_trait]
impl Sink for WebhookSink {
    async fn deliver(&mut self, rows: &[JournalRow]) -> Result<Option<FilePos>, SinkError> {
        let raw = self.encode(rows);
        let body = if self.cfg.gzip { gzip(&raw).map_err(|e| SinkError::retry(format!("gzip: {e}")))? } else { raw };
        let mut req = self.client.post(&self.cfg.url);
        for (k, v) in self.headers(&body)? {
            req = req.header(k, v);
        }
        let resp = req
            .body(body)
            .send()
            .await
            .map_err(|e| SinkError::retry(format!("{}: {}", self.cfg.url, describe_reqwest(&e))))?;
        let status = resp.status();
        let retry_after = resp.headers().get(RETRY_AFTER).and_then(|v| parse_retry_after(v, MAX_RETRY_AFTER));
        // Read (a bounded part of) the reply, to name the problem and find HEC's bad event.
        let body = read_some(resp, 64 * 1024).await;
        if status.is_success() {
            crate::health::Health::get().sink_ok(&self.name);
            return Ok(None);
        }
        Err(self.classify(status, retry_after, &body))
    }

    fn record_overhead(&self) -> usize {
        match self.cfg.encoding {
            Encoding::Ndjson | Encoding::JsonArray => 1 + self.lines.stream_field.as_ref().map_or(0, |f| f.len() + 40),
            Encoding::SplunkHec => {
                let sp = &self.cfg.splunk;
                let st = sp.sourcetype.as_ref().map_or(40, |s| s.len());
                // keys, punctuation, a 14-digit time, and JSON escaping headroom
                120 + 2 * (sp.host.len() + sp.source.len() + st + sp.index.as_ref().map_or(0, |i| i.len()))
                    + self.lines.stream_field.as_ref().map_or(0, |f| f.len() + 40)
            }
        }
    }

    fn batching(&self) -> Batching {
        Batching {
            max_records: self.cfg.batch_max_records,
            // Room for json_array's brackets.
            max_bytes: self.cfg.batch_max_bytes.saturating_sub(2),
            timeout: self.cfg.batch_timeout,
            max_backoff: self.cfg.max_backoff,
        }
    }
}

async fn read_some(mut resp: reqwest::Response, cap: usize) -> Vec<u8> {
    let mut buf = Vec::new();
    while let Ok(Some(c)) = resp.chunk().await {
        buf.extend_from_slice(&c);
        if buf.len() >= cap {
            buf.truncate(cap);
            break;
        }
    }
    buf
}

/// `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
pub fn signature(secret: &[u8], t: i64, body: &[u8]) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

fn gzip(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut e = flate2::write::GzEncoder::new(Vec::with_capacity(data.len() / 4), flate2::Compression::fast());
    e.write_all(data)?;
    e.finish()
}

/// Splunk HEC's `{"code": 6, "invalid-event-number": N}`: the index of the refused event.
fn hec_invalid_event(body: &[u8]) -> Option<usize> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("invalid-event-number")?.as_u64().map(|n| n as usize)
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// Base64 for the Basic credential (standard alphabet, padded).
mod base64_lite {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    pub fn encode(data: &[u8]) -> String {
        let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
        for chunk in data.chunks(3) {
            let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foobar", "Zm9vYmFy")] {
            assert_eq!(base64_lite::encode(i.as_bytes()), o);
        }
    }

    #[test]
    fn signature_is_hmac_sha256_over_t_dot_body() {
        // RFC 4231-style check computed independently: HMAC-SHA256("key", "1.body").
        let s = signature(b"key", 1, b"body");
        assert!(s.starts_with("t=1,v1="));
        assert_eq!(s.len(), "t=1,v1=".len() + 64);
        assert_ne!(s, signature(b"other", 1, b"body"));
        assert_ne!(s, signature(b"key", 2, b"body"));
    }

    #[test]
    fn hec_error_names_the_event() {
        assert_eq!(hec_invalid_event(br#"{"text":"Invalid data format","code":6,"invalid-event-number":3}"#), Some(3));
        assert_eq!(hec_invalid_event(b"nope"), None);
    }
}
