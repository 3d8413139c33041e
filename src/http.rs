//! Small HTTP helpers shared by the API client and the webhook sink.

use std::time::Duration;

use reqwest::header::HeaderValue;

/// Whether `url`'s host is loopback (`localhost`, 127.0.0.0/8, `::1`).
pub fn is_loopback(url: &reqwest::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// A client for `url` takes no proxy from the environment (`HTTP_PROXY`,
/// `HTTPS_PROXY`, `ALL_PROXY`) when `url` is on this host: a proxy cannot
/// reach this host's loopback, and reqwest does not pass it by itself. (A
/// proxy set in the config still applies, added after this.)
pub fn direct_to_loopback(b: reqwest::ClientBuilder, url: &str) -> reqwest::ClientBuilder {
    match reqwest::Url::parse(url) {
        Ok(u) if is_loopback(&u) => b.no_proxy(),
        _ => b,
    }
}

/// `Retry-After` as seconds or an HTTP date, capped at `cap`.
pub fn parse_retry_after(v: &HeaderValue, cap: Duration) -> Option<Duration> {
    let s = v.to_str().ok()?.trim();
    let d = if let Ok(secs) = s.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let when = chrono::DateTime::parse_from_rfc2822(s).ok()?;
        let ms = when.timestamp_millis() - crate::window::now_ms();
        Duration::from_millis(ms.max(0) as u64)
    };
    Some(d.min(cap))
}

/// A reqwest error without its URL (callers name it) but with its cause chain.
pub fn describe_reqwest(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let mut msg = kind.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

/// Trust `ca_pem` (a PEM bundle) and present `identity_pem` (certificate + key), when given.
pub fn with_tls(
    mut b: reqwest::ClientBuilder,
    ca_pem: Option<&[u8]>,
    identity_pem: Option<&[u8]>,
) -> reqwest::Result<reqwest::ClientBuilder> {
    if let Some(pem) = ca_pem {
        for cert in reqwest::Certificate::from_pem_bundle(pem)? {
            b = b.add_root_certificate(cert);
        }
    }
    if let Some(pem) = identity_pem {
        b = b.identity(reqwest::Identity::from_pem(pem)?);
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        let cap = Duration::from_secs(300);
        assert_eq!(parse_retry_after(&HeaderValue::from_static("7"), cap), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(&HeaderValue::from_static("9999"), cap), Some(cap));
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"), cap),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after(&HeaderValue::from_static("soon"), cap), None);
    }
}
