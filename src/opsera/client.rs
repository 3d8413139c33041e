//! HTTP requests to the Opsera API with bounded, jittered retries.
//!
//! Retried: connection errors, timeouts, 5xx and 429 (waiting at least as
//! long as `Retry-After` asks, capped). Not retried: 401/403 (a token
//! problem that waiting will not fix), other 4xx, and bodies that fail
//! validation (the poll fails and the next poll tries again; nothing of the
//! bad page is stored). reqwest's own retries are switched off so that the
//! policy lives in one place.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, HeaderValue, RETRY_AFTER};
use tokio_util::sync::CancellationToken;

use super::page::{CountMeaning, Page, parse_page, snippet};
use crate::config::{ApiConfig, SecretSource};
use crate::http::{describe_reqwest, parse_retry_after, with_tls};

/// The longest wait a `Retry-After` header can impose.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Why a request failed. `Display` always names the URL.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "{url}: HTTP {status}: the API token is missing, invalid or expired, or lacks the \"API Access\" / \
         \"Security Logs (Read Only)\" scope (and the Opsera Administrator, Auditor or Security Manager role); \
         create or fix it in Opsera's API token management page"
    )]
    Auth { url: String, status: u16 },
    #[error("{url}: HTTP {status}: the API refused the request: {body}")]
    Rejected { url: String, status: u16, body: String },
    #[error("{url}: API unavailable after {attempts} attempts: {reason}")]
    Unavailable { url: String, attempts: u32, reason: String },
    #[error("{url}: bad response: {reason}; nothing of it was stored")]
    BadResponse { url: String, reason: String },
    #[error("cancelled")]
    Cancelled,
}

impl ApiError {
    /// A short label for logs and status.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::Auth { .. } => "auth",
            ApiError::Rejected { .. } => "rejected",
            ApiError::Unavailable { .. } => "unavailable",
            ApiError::BadResponse { .. } => "bad_response",
            ApiError::Cancelled => "cancelled",
        }
    }
}

/// A client for one Opsera tenant.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base_url: String,
    /// Re-read from its file when the file changes.
    token: SecretSource,
    max_response_bytes: u64,
    max_retries: u32,
    min_delay: Duration,
    max_delay: Duration,
}

impl Client {
    /// Build a client from validated config, with its `token`.
    pub fn new(cfg: &ApiConfig, token: SecretSource) -> anyhow::Result<Self> {
        let mut b = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(10)))
            .retry(reqwest::retry::never())
            .user_agent(concat!("opsera-shipper/", env!("CARGO_PKG_VERSION")))
            .gzip(true);
        b = with_tls(b, cfg.ca_pem.as_deref(), None)?;
        b = crate::http::direct_to_loopback(b, &cfg.base_url);
        if let Some(p) = &cfg.proxy {
            b = b.proxy(reqwest::Proxy::all(p.as_str())?);
        }
        Ok(Self {
            http: b.build()?,
            base_url: cfg.base_url.clone(),
            token,
            max_response_bytes: cfg.max_response_bytes,
            max_retries: cfg.max_retries,
            min_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(60),
        })
    }

    /// The full URL of `path` with `query`, as shown in messages.
    pub fn url(&self, path: &str, query: &[(String, String)]) -> String {
        let mut u = format!("{}{}", self.base_url, path);
        if !query.is_empty() {
            let q: Vec<String> = query.iter().map(|(k, v)| format!("{k}={}", urlencode(v))).collect();
            u.push('?');
            u.push_str(&q.join("&"));
        }
        u
    }

    /// GET one page of `path`, retrying what is worth retrying.
    pub async fn fetch(
        &self,
        path: &str,
        query: &[(String, String)],
        meaning: CountMeaning,
        cancel: &CancellationToken,
    ) -> Result<Page, ApiError> {
        let url = self.url(path, query);
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_factor(2.0)
            .with_jitter()
            .with_max_times(self.max_retries as usize)
            .build();
        let mut attempts = 0u32;
        let mut reloaded = false;
        loop {
            attempts += 1;
            let started = std::time::Instant::now();
            let outcome = tokio::select! {
                _ = cancel.cancelled() => return Err(ApiError::Cancelled),
                r = self.attempt(&url, meaning) => r,
            };
            let m = crate::metrics::get();
            m.api_duration
                .get_or_create(&crate::metrics::EndpointLabel { endpoint: path.to_string() })
                .observe(started.elapsed().as_secs_f64());
            let status = match &outcome {
                Attempt::Done(_) => "200".to_string(),
                Attempt::Fatal(ApiError::Auth { status, .. } | ApiError::Rejected { status, .. }) => status.to_string(),
                Attempt::Fatal(_) => "bad_response".to_string(),
                Attempt::Retry { status, .. } => status.map_or_else(|| "error".to_string(), |s| s.to_string()),
            };
            m.api_requests.get_or_create(&crate::metrics::ApiLabels { endpoint: path.to_string(), status }).inc();
            let (reason, retry_after) = match outcome {
                Attempt::Done(page) => {
                    tracing::debug!(%url, records = page.records.len(), elapsed_ms = started.elapsed().as_millis() as u64, "Fetched page.");
                    return Ok(page);
                }
                Attempt::Fatal(ApiError::Auth { .. }) if !reloaded && self.token.reload() => {
                    // The token file was rotated: try once more with the new token.
                    reloaded = true;
                    tracing::info!(%url, "API refused the token; retrying with the rotated token from its file.");
                    continue;
                }
                Attempt::Fatal(e) => return Err(e),
                Attempt::Retry { reason, retry_after, .. } => (reason, retry_after),
            };
            let Some(backoff) = delays.next() else {
                return Err(ApiError::Unavailable { url, attempts, reason });
            };
            let delay = match retry_after {
                Some(ra) => backoff.max(ra),
                None => backoff,
            };
            tracing::warn!(%url, attempt = attempts, %reason, delay_ms = delay.as_millis() as u64, "API request failed; retrying.");
            tokio::select! {
                _ = cancel.cancelled() => return Err(ApiError::Cancelled),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn attempt(&self, url: &str, meaning: CountMeaning) -> Attempt {
        let mut auth = match HeaderValue::from_str(&format!("Bearer {}", self.token.current().expose())) {
            Ok(v) => v,
            Err(_) => {
                return Attempt::Fatal(ApiError::Rejected {
                    url: url.into(),
                    status: 0,
                    body: "the API token holds characters that cannot go in an HTTP header".into(),
                });
            }
        };
        auth.set_sensitive(true);
        let resp = match self.http.get(url).header(AUTHORIZATION, auth).send().await {
            Ok(r) => r,
            Err(e) => {
                return Attempt::Retry { reason: describe_reqwest(&e), retry_after: None, status: None };
            }
        };
        let status = resp.status();
        let retry_after = resp.headers().get(RETRY_AFTER).and_then(|v| parse_retry_after(v, MAX_RETRY_AFTER));
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Attempt::Fatal(ApiError::Auth { url: url.into(), status: status.as_u16() });
        }
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            return Attempt::Retry {
                reason: format!("HTTP {}", status.as_u16()),
                retry_after,
                status: Some(status.as_u16()),
            };
        }
        let body = match read_capped(resp, self.max_response_bytes).await {
            Ok(b) => b,
            Err(BodyError::TooLarge) => {
                return Attempt::Fatal(ApiError::BadResponse {
                    url: url.into(),
                    reason: format!("body larger than api.max_response_bytes ({} bytes)", self.max_response_bytes),
                });
            }
            Err(BodyError::Io(reason)) => {
                return Attempt::Retry { reason, retry_after: None, status: None };
            }
        };
        if !status.is_success() {
            return Attempt::Fatal(ApiError::Rejected {
                url: url.into(),
                status: status.as_u16(),
                body: snippet(&body),
            });
        }
        match parse_page(&bytes::Bytes::from(body), meaning) {
            Ok(p) => Attempt::Done(p),
            Err(reason) => Attempt::Fatal(ApiError::BadResponse { url: url.into(), reason }),
        }
    }
}

enum Attempt {
    Done(Page),
    Fatal(ApiError),
    Retry { reason: String, retry_after: Option<Duration>, status: Option<u16> },
}

enum BodyError {
    TooLarge,
    Io(String),
}

async fn read_capped(mut resp: reqwest::Response, cap: u64) -> Result<Vec<u8>, BodyError> {
    if resp.content_length().is_some_and(|n| n > cap) {
        return Err(BodyError::TooLarge);
    }
    let mut buf = Vec::with_capacity(resp.content_length().unwrap_or(64 * 1024).min(cap) as usize);
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                if buf.len() as u64 + c.len() as u64 > cap {
                    return Err(BodyError::TooLarge);
                }
                buf.extend_from_slice(&c);
            }
            Ok(None) => return Ok(buf),
            Err(e) => {
                return Err(BodyError::Io(format!("reading the body: {}", describe_reqwest(&e))));
            }
        }
    }
}

fn urlencode(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' => o.push(b as char),
            _ => o.push_str(&format!("%{b:02X}")),
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(urlencode("a b&c=d@e"), "a%20b%26c%3Dd%40e");
        assert_eq!(urlencode("16:05"), "16:05");
    }
}
