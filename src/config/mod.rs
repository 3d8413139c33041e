//! Configuration: the TOML file plus the `OPSERA_SHIPPER__…` environment
//! overlay, parsed into raw serde structs (what the user wrote) and then
//! validated into the types the program runs on.
//!
//! Validation touches no network. It does read the files the config names
//! (token, CA certificate), so `check-config` catches a missing secret before
//! the daemon starts. Secrets never reach a `Debug` or `Display` output.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::lenient;

mod secret;
mod syslog;
mod webhook;
pub use secret::SecretSource;
pub use syslog::{Framing, SyslogConfig, SyslogFormat, Transport};
pub use webhook::{Encoding, Signing, SplunkMeta, WebhookAuth, WebhookConfig, hostname};

/// Where the config is read from when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/opsera-shipper/config.toml";
/// Prefix of environment variables that override config keys.
pub const ENV_PREFIX: &str = "OPSERA_SHIPPER";
/// Opsera's hosted API.
pub const DEFAULT_BASE_URL: &str = "https://app.opsera.io";
/// The streams this build knows how to poll.
pub const KNOWN_STREAMS: [&str; 2] = ["user_activity", "token_activity"];

/// A configuration problem: always names the file and, where there is one, the key.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub message: String,
}

impl ConfigError {
    fn new(file: &Path, message: impl Into<String>) -> Self {
        Self { file: file.display().to_string(), message: message.into() }
    }
}

/// A secret string: compared and used, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

// ---------------------------------------------------------------------------
// Raw config: exactly what the file and environment say.
// ---------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    api: RawApi,
    #[serde(default)]
    state: RawState,
    #[serde(default)]
    streams: BTreeMap<String, RawStream>,
    #[serde(default)]
    sinks: BTreeMap<String, RawSink>,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    runtime: RawRuntime,
    #[serde(default)]
    server: RawServer,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    base_url: Option<String>,
    token: Option<String>,
    token_file: Option<PathBuf>,
    timeout: Option<String>,
    ca_file: Option<PathBuf>,
    proxy: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    allow_insecure_http: Option<bool>,
    max_response_bytes: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    max_retries: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    path: Option<PathBuf>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    max_buffered_records: Option<u64>,
    max_buffered_bytes: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStream {
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    enabled: Option<bool>,
    api: Option<String>,
    interval: Option<String>,
    overlap: Option<String>,
    initial_lookback: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    page_size: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    max_pages: Option<u64>,
    #[serde(rename = "type")]
    type_: Option<String>,
    action: Option<String>,
    secondary_action: Option<String>,
    user_id: Option<String>,
    user_email: Option<String>,
    target_id: Option<String>,
    scope: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum RawSink {
    File(RawFileSink),
    Stdout(RawStdoutSink),
    Webhook(Box<webhook::RawWebhookSink>),
    Syslog(Box<syslog::RawSyslogSink>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFileSink {
    path: Option<PathBuf>,
    #[serde(default, deserialize_with = "lenient::opt_list")]
    streams: Option<Vec<String>>,
    stream_field: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStdoutSink {
    #[serde(default, deserialize_with = "lenient::opt_list")]
    streams: Option<Vec<String>>,
    stream_field: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    shutdown_timeout: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    worker_threads: Option<u64>,
}

// ---------------------------------------------------------------------------
// Validated config: what the program runs on.
// ---------------------------------------------------------------------------

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (for messages).
    pub source: PathBuf,
    pub api: ApiConfig,
    pub state: StateConfig,
    /// Every known stream, enabled or not, in a fixed order.
    pub streams: Vec<StreamConfig>,
    pub sinks: Vec<SinkConfig>,
    pub log: LogConfig,
    pub runtime: RuntimeConfig,
    /// Address of the ops endpoints; `None`: disabled.
    pub server_listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Base URL without a trailing slash.
    pub base_url: String,
    /// `None` only when the caller said no token is needed (status, reset);
    /// read again from its file, if it has one, when the file changes.
    pub token: Option<SecretSource>,
    /// Where the token came from, for check-config (never the token itself).
    pub token_source: String,
    pub timeout: Duration,
    pub ca_file: Option<PathBuf>,
    pub ca_pem: Option<Vec<u8>>,
    pub proxy: Option<String>,
    pub allow_insecure_http: bool,
    pub max_response_bytes: u64,
    pub max_retries: u32,
}

#[derive(Debug, Clone)]
pub struct StateConfig {
    pub path: PathBuf,
    pub max_buffered_records: u64,
    pub max_buffered_bytes: u64,
}

/// Which endpoint a stream reads, and so how its windows are shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// `GET /api/v2/logs/audit/user`: paged, minute-granular windows.
    UserActivityV2,
    /// `GET /api/v1/logs/user/actions`: whole UTC days, at most 1000 a day.
    UserActivityV1,
    /// `GET /api/v1/logs/user/tokens`: whole UTC days, at most 1000 a day.
    TokenActivityV1,
}

impl StreamKind {
    /// True for the day-by-day v1 endpoints.
    pub fn is_daily(self) -> bool {
        !matches!(self, StreamKind::UserActivityV2)
    }
    /// The endpoint path below the base URL.
    pub fn path(self) -> &'static str {
        match self {
            StreamKind::UserActivityV2 => "/api/v2/logs/audit/user",
            StreamKind::UserActivityV1 => "/api/v1/logs/user/actions",
            StreamKind::TokenActivityV1 => "/api/v1/logs/user/tokens",
        }
    }
}

#[derive(Debug, Clone)]
pub struct StreamConfig {
    pub name: String,
    pub kind: StreamKind,
    pub enabled: bool,
    pub interval: Duration,
    pub overlap: Duration,
    pub initial_lookback: Duration,
    pub page_size: u32,
    /// Pages read from one query window at most; a window with more is
    /// polled again in narrower spans (v2 only).
    pub max_pages: u32,
    /// Query filters passed to the API as they are (`type`, `action`, …).
    pub filters: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct SinkConfig {
    pub name: String,
    /// The streams this sink receives.
    pub streams: Vec<String>,
    /// When set, each record gets this field holding the stream's name.
    pub stream_field: Option<String>,
    pub kind: SinkKind,
}

#[derive(Debug, Clone)]
pub enum SinkKind {
    File { path: PathBuf },
    Stdout,
    Webhook(Box<WebhookConfig>),
    Syslog(Box<SyslogConfig>),
}

impl SinkKind {
    pub fn type_name(&self) -> &'static str {
        match self {
            SinkKind::File { .. } => "file",
            SinkKind::Stdout => "stdout",
            SinkKind::Webhook(_) => "webhook",
            SinkKind::Syslog(_) => "syslog",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub shutdown_timeout: Duration,
    /// Async worker threads (1 by default).
    pub worker_threads: usize,
}

/// What the caller needs of the config.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Fail when no API token can be found (every command that polls).
    pub require_token: bool,
    /// Use this map instead of the process environment (tests).
    pub env: Option<HashMap<String, String>>,
}

/// Read, overlay and validate the config file at `path`.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<Config, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| ConfigError::new(path, format!("cannot read config file: {e}")))?;
    load_str(&text, path, opts)
}

/// Parse and validate config text; `path` names it in messages.
pub fn load_str(text: &str, path: &Path, opts: &LoadOptions) -> Result<Config, ConfigError> {
    let env = match &opts.env {
        Some(map) => map.clone(),
        None => std::env::vars().collect(),
    };
    let overlay = env_overlay(&env);
    let raw: RawConfig = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .ignore_empty(true)
                .try_parsing(false)
                .source(Some(overlay)),
        )
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| ConfigError::new(path, describe_config_error(e)))?;
    validate(raw, path, opts, &env)
}

/// The environment variables that overlay config keys. Keys are matched
/// lower-cased (the `config` crate lower-cases them), so sink names that are
/// to be overridden from the environment must be lower-case.
fn env_overlay(env: &HashMap<String, String>) -> HashMap<String, String> {
    let prefix = format!("{ENV_PREFIX}__");
    env.iter().filter(|(k, v)| k.starts_with(&prefix) && !v.is_empty()).map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn describe_config_error(e: config::ConfigError) -> String {
    // The config crate's messages name the key ("unknown field `x` ... for key `api`");
    // keep them, and say how to fix the usual one.
    let msg = e.to_string();
    if msg.contains("unknown field") {
        format!("{msg} (unknown keys are errors: check the spelling against config/opsera-shipper.toml)")
    } else {
        msg
    }
}

fn validate(
    raw: RawConfig,
    path: &Path,
    opts: &LoadOptions,
    env: &HashMap<String, String>,
) -> Result<Config, ConfigError> {
    let err = |m: String| ConfigError::new(path, m);
    let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();

    // [api]
    let allow_insecure_http = raw.api.allow_insecure_http.unwrap_or(false);
    let base_url = validate_base_url(raw.api.base_url.as_deref().unwrap_or(DEFAULT_BASE_URL), allow_insecure_http)
        .map_err(|m| err(format!("api.base_url: {m}")))?;
    let (token, token_source) = resolve_token(&raw.api, &base_dir, env).map_err(err)?;
    if token.is_none() && opts.require_token {
        return Err(err(
            "no API token: set api.token_file (preferred), put it in $CREDENTIALS_DIRECTORY/opsera-token, \
             set OPSERA_SHIPPER__API__TOKEN, or set api.token"
                .into(),
        ));
    }
    let timeout = duration_key("api.timeout", raw.api.timeout.as_deref(), "30s").map_err(&err)?;
    if timeout.is_zero() {
        return Err(err("api.timeout: must be greater than zero".into()));
    }
    let ca_file = raw.api.ca_file.map(|p| resolve(&base_dir, p));
    let ca_pem = match &ca_file {
        Some(p) => {
            let pem = std::fs::read(p).map_err(|e| err(format!("api.ca_file: cannot read {}: {e}", p.display())))?;
            reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| err(format!("api.ca_file: {} is not a PEM certificate bundle: {e}", p.display())))?;
            Some(pem)
        }
        None => None,
    };
    if let Some(proxy) = &raw.api.proxy {
        reqwest::Proxy::all(proxy.as_str()).map_err(|e| err(format!("api.proxy: invalid proxy URL: {e}")))?;
    }
    let max_response_bytes =
        bytes_key("api.max_response_bytes", raw.api.max_response_bytes.as_deref(), "64MiB").map_err(&err)?;
    if max_response_bytes < 1024 {
        return Err(err("api.max_response_bytes: must be at least 1KiB".into()));
    }
    let max_retries = raw.api.max_retries.unwrap_or(5);
    let max_retries = u32::try_from(max_retries)
        .ok()
        .filter(|n| *n <= 100)
        .ok_or_else(|| err("api.max_retries: must be between 0 and 100".into()))?;

    // [state]
    let state = StateConfig {
        path: resolve(&base_dir, raw.state.path.unwrap_or_else(|| PathBuf::from("/var/lib/opsera-shipper/state.db"))),
        max_buffered_records: raw.state.max_buffered_records.unwrap_or(1_000_000),
        max_buffered_bytes: bytes_key("state.max_buffered_bytes", raw.state.max_buffered_bytes.as_deref(), "1GiB")
            .map_err(&err)?,
    };
    if state.max_buffered_records == 0 || state.max_buffered_bytes == 0 {
        return Err(err("state.max_buffered_records and state.max_buffered_bytes must be greater than zero".into()));
    }

    // [streams.*]
    let mut raw_streams = raw.streams;
    for name in raw_streams.keys() {
        if !KNOWN_STREAMS.contains(&name.as_str()) {
            return Err(err(format!("streams.{name}: unknown stream; known streams are {}", KNOWN_STREAMS.join(", "))));
        }
    }
    let mut streams = Vec::new();
    for name in KNOWN_STREAMS {
        let rs = raw_streams.remove(name).unwrap_or_default();
        streams.push(validate_stream(name, rs).map_err(&err)?);
    }
    if !streams.iter().any(|s| s.enabled) {
        return Err(err("streams: every stream is disabled; enable at least one".into()));
    }

    // [sinks.*]
    if raw.sinks.is_empty() {
        return Err(err("sinks: no sink configured; add e.g. [sinks.archive] type = \"file\"".into()));
    }
    let mut sinks = Vec::new();
    for (name, rs) in raw.sinks {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(err(format!("sinks.{name}: sink names may hold only letters, digits, '_' and '-'")));
        }
        let (streams_opt, stream_field, kind) = match rs {
            RawSink::File(f) => {
                let p = f.path.ok_or_else(|| err(format!("sinks.{name}.path: required for a file sink")))?;
                (f.streams, f.stream_field, SinkKind::File { path: resolve(&base_dir, p) })
            }
            RawSink::Stdout(s) => (s.streams, s.stream_field, SinkKind::Stdout),
            RawSink::Webhook(mut w) => {
                let (streams, field) = (w.streams.take(), w.stream_field.take());
                (
                    streams,
                    field,
                    SinkKind::Webhook(Box::new(webhook::validate(&name, *w, &base_dir, env).map_err(&err)?)),
                )
            }
            RawSink::Syslog(mut w) => {
                let (streams, field) = (w.streams.take(), w.stream_field.take());
                (streams, field, SinkKind::Syslog(Box::new(syslog::validate(&name, *w, &base_dir).map_err(&err)?)))
            }
        };
        let sink_streams = match streams_opt {
            None => streams.iter().filter(|s| s.enabled).map(|s| s.name.clone()).collect(),
            Some(list) => {
                for s in &list {
                    if !KNOWN_STREAMS.contains(&s.as_str()) {
                        return Err(err(format!(
                            "sinks.{name}.streams: unknown stream '{s}'; known streams are {}",
                            KNOWN_STREAMS.join(", ")
                        )));
                    }
                }
                if list.is_empty() {
                    return Err(err(format!(
                        "sinks.{name}.streams: empty; name at least one stream or leave it out for all"
                    )));
                }
                list
            }
        };
        if let Some(f) = &stream_field
            && (f.is_empty() || f.contains(['"', '\\']) || f.chars().any(char::is_control))
        {
            return Err(err(format!("sinks.{name}.stream_field: must be a plain, non-empty field name")));
        }
        sinks.push(SinkConfig { name, streams: sink_streams, stream_field, kind });
    }
    let stdout_sinks = sinks.iter().filter(|s| matches!(s.kind, SinkKind::Stdout)).count();
    if stdout_sinks > 1 {
        return Err(err("sinks: at most one stdout sink may be configured".into()));
    }

    // [log]
    let level = raw.log.level.unwrap_or_else(|| "info".into());
    tracing_subscriber::EnvFilter::try_new(&level)
        .map_err(|e| err(format!("log.level: '{level}' is not a level or filter directive: {e}")))?;
    let format = match raw.log.format.as_deref().unwrap_or("text") {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            return Err(err(format!("log.format: '{other}' is not one of text, json")));
        }
    };

    // [runtime]
    let shutdown_timeout =
        duration_key("runtime.shutdown_timeout", raw.runtime.shutdown_timeout.as_deref(), "20s").map_err(&err)?;
    let worker_threads = raw.runtime.worker_threads.unwrap_or(1);
    if !(1..=64).contains(&worker_threads) {
        return Err(err(format!("runtime.worker_threads: {worker_threads} is not between 1 and 64")));
    }

    let server_listen = match raw.server.listen.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        None => None,
        Some(l) => {
            Some(l.parse().map_err(|_| err(format!("server.listen: '{l}' is not an address such as 127.0.0.1:9464")))?)
        }
    };

    Ok(Config {
        server_listen,
        source: path.to_path_buf(),
        api: ApiConfig {
            base_url,
            token,
            token_source,
            timeout,
            ca_file,
            ca_pem,
            proxy: raw.api.proxy,
            allow_insecure_http,
            max_response_bytes,
            max_retries,
        },
        state,
        streams,
        sinks,
        log: LogConfig { level, format },
        runtime: RuntimeConfig { shutdown_timeout, worker_threads: worker_threads as usize },
    })
}

fn validate_stream(name: &str, rs: RawStream) -> Result<StreamConfig, String> {
    let key = |k: &str| format!("streams.{name}.{k}");
    let kind = match (name, rs.api.as_deref()) {
        ("user_activity", None | Some("v2")) => StreamKind::UserActivityV2,
        ("user_activity", Some("v1")) => StreamKind::UserActivityV1,
        ("token_activity", None | Some("v1")) => StreamKind::TokenActivityV1,
        ("token_activity", Some(other)) => {
            return Err(format!("{}: token activity has only a v1 endpoint, not '{other}'", key("api")));
        }
        (_, Some(other)) => return Err(format!("{}: '{other}' is not one of v1, v2", key("api"))),
        _ => unreachable!("stream names are checked against KNOWN_STREAMS first"),
    };
    let default_interval = if kind == StreamKind::TokenActivityV1 { "5m" } else { "1m" };
    let interval = duration_key(&key("interval"), rs.interval.as_deref(), default_interval)?;
    if interval < Duration::from_secs(1) {
        return Err(format!("{}: must be at least 1s", key("interval")));
    }
    let overlap = duration_key(&key("overlap"), rs.overlap.as_deref(), "5m")?;
    let initial_lookback = duration_key(&key("initial_lookback"), rs.initial_lookback.as_deref(), "7d")?;
    if initial_lookback.is_zero() {
        return Err(format!("{}: must be greater than zero", key("initial_lookback")));
    }
    let page_size = rs.page_size.unwrap_or(1000);
    if !(1..=1000).contains(&page_size) {
        return Err(format!("{}: must be between 1 and 1000 (the API's limit)", key("page_size")));
    }
    let max_pages = rs.max_pages.unwrap_or(100_000);
    if !(2..=u64::from(u32::MAX)).contains(&max_pages) {
        return Err(format!("{}: must be between 2 and {}", key("max_pages"), u32::MAX));
    }
    let mut filters = Vec::new();
    let candidates = [
        ("type", rs.type_),
        ("action", rs.action),
        ("secondary_action", rs.secondary_action),
        ("user_id", rs.user_id),
        ("user_email", rs.user_email),
        ("target_id", rs.target_id),
        ("scope", rs.scope),
    ];
    for (k, v) in candidates {
        let Some(v) = v else { continue };
        let allowed = match kind {
            StreamKind::UserActivityV2 => k != "scope",
            StreamKind::UserActivityV1 => k == "type",
            StreamKind::TokenActivityV1 => k == "scope",
        };
        if !allowed {
            let which = match kind {
                StreamKind::UserActivityV2 => "type, action, secondary_action, user_id, user_email, target_id",
                StreamKind::UserActivityV1 => "type (the v1 endpoint has no other filter)",
                StreamKind::TokenActivityV1 => "scope",
            };
            return Err(format!("{}: not a filter of this endpoint; it takes {which}", key(k)));
        }
        filters.push((k.to_string(), v));
    }
    Ok(StreamConfig {
        name: name.to_string(),
        kind,
        enabled: rs.enabled.unwrap_or(true),
        interval,
        overlap,
        initial_lookback,
        page_size: page_size as u32,
        max_pages: max_pages as u32,
        filters,
    })
}

/// Find the API token in order of preference: `token_file`, then systemd's
/// `$CREDENTIALS_DIRECTORY/opsera-token`, then `api.token` (which the
/// environment variable `OPSERA_SHIPPER__API__TOKEN` overrides).
type TokenFound = (Option<SecretSource>, String);

fn resolve_token(api: &RawApi, base_dir: &Path, env: &HashMap<String, String>) -> Result<TokenFound, String> {
    if let Some(p) = &api.token_file {
        // Relative to the config's directory, as every path in it is.
        let p = resolve(base_dir, p.clone());
        let t = read_secret_file(&p).map_err(|m| format!("api.token_file: {m}"))?;
        let source = format!("file {}", p.display());
        return Ok((Some(SecretSource::new(t, Some(p))), source));
    }
    if let Some(dir) = env.get("CREDENTIALS_DIRECTORY").filter(|d| !d.is_empty()) {
        let p = Path::new(dir).join("opsera-token");
        if p.exists() {
            let t = read_secret_file(&p).map_err(|m| format!("$CREDENTIALS_DIRECTORY/opsera-token: {m}"))?;
            let source = format!("systemd credential {}", p.display());
            return Ok((Some(SecretSource::new(t, Some(p))), source));
        }
    }
    if let Some(t) = api.token.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
        let from_env = env.get(&format!("{ENV_PREFIX}__API__TOKEN")).is_some_and(|v| !v.is_empty());
        let source = if from_env { "environment OPSERA_SHIPPER__API__TOKEN" } else { "api.token" };
        return Ok((Some(SecretSource::new(Secret::new(t), None)), source.into()));
    }
    Ok((None, "none".into()))
}

/// Read a secret from a file, trimming surrounding whitespace and the trailing newline.
pub fn read_secret_file(path: &Path) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let t = text.trim();
    if t.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(Secret::new(t))
}

fn validate_base_url(url: &str, allow_insecure_http: bool) -> Result<String, String> {
    check_http_url(url, allow_insecure_http)?;
    if url.contains(['?', '#']) {
        return Err(format!("'{url}' must not carry a query or fragment"));
    }
    Ok(url.trim_end_matches('/').to_string())
}

/// An http(s) URL with a host; plain http only to loopback unless allowed.
fn check_http_url(url: &str, allow_insecure_http: bool) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("'{url}' is not a URL: {e}"))?;
    match parsed.scheme() {
        "https" => {}
        "http" => {
            if !allow_insecure_http && !crate::http::is_loopback(&parsed) {
                return Err(format!(
                    "'{url}' is plain http to a non-loopback host; use https, or set api.allow_insecure_http = true"
                ));
            }
        }
        other => return Err(format!("'{url}' has scheme '{other}'; use https")),
    }
    if parsed.host_str().is_none() {
        return Err(format!("'{url}' has no host"));
    }
    Ok(())
}

fn resolve(base: &Path, p: PathBuf) -> PathBuf {
    if p.is_absolute() || base.as_os_str().is_empty() { p } else { base.join(p) }
}

fn duration_key(key: &str, value: Option<&str>, default: &str) -> Result<Duration, String> {
    let v = value.unwrap_or(default);
    parse_duration(v).map_err(|e| format!("{key}: '{v}' is not a duration ({e}); write e.g. \"30s\", \"5m\", \"7d\""))
}

fn bytes_key(key: &str, value: Option<&str>, default: &str) -> Result<u64, String> {
    let v = value.unwrap_or(default);
    parse_bytes(v).ok_or_else(|| format!("{key}: '{v}' is not a size; write e.g. \"512MiB\", \"1GiB\", \"65536\""))
}

/// Parse a human duration such as `30s`, `5m`, `7d`, `1h 30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| e.to_string())
}

/// Parse a byte size: a plain number, or a number with B, KB, MB, GB, KiB, MiB, GiB.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1000,
        "mb" | "m" => 1000 * 1000,
        "gb" | "g" => 1000 * 1000 * 1000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

impl Config {
    /// The streams that are enabled, in a fixed order.
    pub fn enabled_streams(&self) -> impl Iterator<Item = &StreamConfig> {
        self.streams.iter().filter(|s| s.enabled)
    }

    /// The effective config as TOML-like text with secrets masked, for `check-config`.
    /// Every file this config reads a secret from, with the key naming it.
    pub fn secret_files(&self) -> Vec<(String, PathBuf)> {
        let mut out = Vec::new();
        if let Some(p) = self.api.token.as_ref().and_then(SecretSource::file) {
            out.push(("api.token_file".to_string(), p.to_path_buf()));
        }
        for s in &self.sinks {
            let key = |k: &str| format!("sinks.{}.{k}", s.name);
            match &s.kind {
                SinkKind::Webhook(w) => {
                    for (k, src) in w.secrets() {
                        if let Some(p) = src.file() {
                            out.push((key(k), p.to_path_buf()));
                        }
                    }
                    if let Some(p) = &w.key_file {
                        out.push((key("tls.key_file"), p.clone()));
                    }
                }
                SinkKind::Syslog(c) => {
                    if let Some(p) = &c.key_file {
                        out.push((key("tls.key_file"), p.clone()));
                    }
                }
                SinkKind::File { .. } | SinkKind::Stdout => {}
            }
        }
        out
    }

    /// Security warnings: a secret file readable by others, or by a group
    /// other than the process's own (a Kubernetes secret volume with
    /// `fsGroup` is readable by the pod's group whatever its `defaultMode`
    /// says), secrets written inline in a config file that anyone can read,
    /// and plain http to a non-loopback host (allowed only by an explicit
    /// `allow_insecure_http`; TLS verification itself cannot be turned off).
    pub fn security_warnings(&self) -> Vec<String> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let mode = |p: &Path| std::fs::metadata(p).ok().map(|m| m.permissions().mode() & 0o777);
        // SAFETY: getegid cannot fail and touches no memory.
        let own_group = unsafe { libc::getegid() };
        let mut out = Vec::new();
        for (key, p) in self.secret_files() {
            let Ok(meta) = std::fs::metadata(&p) else { continue };
            let m = meta.permissions().mode() & 0o777;
            let by = if m & 0o004 != 0 {
                "every user"
            } else if m & 0o040 != 0 && meta.gid() != own_group {
                "another group"
            } else {
                continue;
            };
            out.push(format!(
                "{key}: {} is readable by {by} (mode {m:04o}, group {}); make it 0600 or 0400 (chmod go-rwx)",
                p.display(),
                meta.gid()
            ));
        }
        let inline = self.api.token_source == "api.token"
            || self.sinks.iter().any(|s| match &s.kind {
                SinkKind::Webhook(w) => w.secrets().any(|(_, x)| x.file().is_none()),
                _ => false,
            });
        if inline && let Some(m) = mode(&self.source).filter(|m| m & 0o004 != 0) {
            out.push(format!(
                "{} holds secrets inline and is readable by every user (mode {m:04o}); chmod o-rwx it, or move \
                 the secrets to files (api.token_file, *_file keys)",
                self.source.display()
            ));
        }
        let urls = std::iter::once(("api.base_url".to_string(), self.api.base_url.as_str())).chain(
            self.sinks.iter().filter_map(|s| match &s.kind {
                SinkKind::Webhook(w) => Some((format!("sinks.{}.url", s.name), w.url.as_str())),
                _ => None,
            }),
        );
        for (key, url) in urls {
            if let Ok(u) = reqwest::Url::parse(url)
                && u.scheme() == "http"
                && !crate::http::is_loopback(&u)
            {
                out.push(format!(
                    "{key}: '{url}' is plain http (allow_insecure_http = true): the token and the records cross the network unencrypted"
                ));
            }
        }
        out
    }

    pub fn render_masked(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let a = &self.api;
        let _ = writeln!(o, "[api]");
        let _ = writeln!(o, "base_url = {:?}", a.base_url);
        let _ = writeln!(o, "token = \"***\"  # from {}", a.token_source);
        let _ = writeln!(o, "timeout = {:?}", humantime::format_duration(a.timeout).to_string());
        if let Some(p) = &a.ca_file {
            let _ = writeln!(o, "ca_file = {:?}", p.display().to_string());
        }
        if let Some(p) = &a.proxy {
            let _ = writeln!(o, "proxy = {:?}", mask_url_password(p));
        }
        let _ = writeln!(o, "allow_insecure_http = {}", a.allow_insecure_http);
        let _ = writeln!(o, "max_response_bytes = {}", a.max_response_bytes);
        let _ = writeln!(o, "max_retries = {}", a.max_retries);
        let _ = writeln!(o, "\n[state]");
        let _ = writeln!(o, "path = {:?}", self.state.path.display().to_string());
        let _ = writeln!(o, "max_buffered_records = {}", self.state.max_buffered_records);
        let _ = writeln!(o, "max_buffered_bytes = {}", self.state.max_buffered_bytes);
        for s in &self.streams {
            let _ = writeln!(o, "\n[streams.{}]", s.name);
            let _ = writeln!(o, "enabled = {}", s.enabled);
            let api = if s.kind == StreamKind::UserActivityV2 { "v2" } else { "v1" };
            let _ = writeln!(o, "api = {api:?}  # {}", s.kind.path());
            let _ = writeln!(o, "interval = {:?}", humantime::format_duration(s.interval).to_string());
            let _ = writeln!(o, "overlap = {:?}", humantime::format_duration(s.overlap).to_string());
            let _ = writeln!(o, "initial_lookback = {:?}", humantime::format_duration(s.initial_lookback).to_string());
            if s.kind == StreamKind::UserActivityV2 {
                let _ = writeln!(o, "page_size = {}", s.page_size);
                let _ = writeln!(o, "max_pages = {}", s.max_pages);
            }
            for (k, v) in &s.filters {
                let _ = writeln!(o, "{k} = {v:?}");
            }
        }
        for s in &self.sinks {
            let _ = writeln!(o, "\n[sinks.{}]", s.name);
            let _ = writeln!(o, "type = {:?}", s.kind.type_name());
            match &s.kind {
                SinkKind::File { path } => {
                    let _ = writeln!(o, "path = {:?}", path.display().to_string());
                }
                SinkKind::Webhook(w) => render_webhook(&mut o, w),
                SinkKind::Syslog(y) => {
                    let _ = writeln!(o, "address = {:?}", y.address);
                    let _ = writeln!(
                        o,
                        "# transport={:?} framing={:?} format={:?} facility={} severity={} app_name={} hostname={} sd_id={} max_message_bytes={}",
                        y.transport,
                        y.framing,
                        y.format,
                        y.facility,
                        y.severity,
                        y.app_name,
                        y.hostname,
                        y.sd_id,
                        y.max_message_bytes
                    );
                }
                SinkKind::Stdout => {}
            }
            let _ = writeln!(o, "streams = {:?}", s.streams);
            if let Some(f) = &s.stream_field {
                let _ = writeln!(o, "stream_field = {f:?}");
            }
        }
        let _ = writeln!(o, "\n[log]");
        let _ = writeln!(o, "level = {:?}", self.log.level);
        let fmt = if self.log.format == LogFormat::Json { "json" } else { "text" };
        let _ = writeln!(o, "format = {fmt:?}");
        if let Some(l) = &self.server_listen {
            let _ = writeln!(o, "\n[server]\nlisten = {:?}", l.to_string());
        }
        let _ = writeln!(o, "\n[runtime]");
        let _ = writeln!(
            o,
            "shutdown_timeout = {:?}",
            humantime::format_duration(self.runtime.shutdown_timeout).to_string()
        );
        let _ = writeln!(o, "worker_threads = {}", self.runtime.worker_threads);
        o
    }
}

fn render_webhook(o: &mut String, w: &WebhookConfig) {
    use std::fmt::Write;
    let _ = writeln!(o, "url = {:?}", mask_url_password(&w.url));
    let enc = match w.encoding {
        Encoding::Ndjson => "ndjson",
        Encoding::JsonArray => "json_array",
        Encoding::SplunkHec => "splunk_hec",
    };
    let _ = writeln!(o, "encoding = {enc:?}");
    let _ = writeln!(o, "compression = {:?}", if w.gzip { "gzip" } else { "none" });
    let _ = writeln!(o, "batch_max_records = {}", w.batch_max_records);
    let _ = writeln!(o, "batch_max_bytes = {}", w.batch_max_bytes);
    let _ = writeln!(o, "batch_timeout = {:?}", humantime::format_duration(w.batch_timeout).to_string());
    let _ = writeln!(o, "timeout = {:?}", humantime::format_duration(w.timeout).to_string());
    let _ = writeln!(o, "max_backoff = {:?}", humantime::format_duration(w.max_backoff).to_string());
    for (h, _) in &w.headers {
        let _ = writeln!(o, "headers.{h} = \"***\"");
    }
    let auth = match &w.auth {
        WebhookAuth::None => "none".to_string(),
        WebhookAuth::Bearer(_) => "bearer ***".to_string(),
        WebhookAuth::Basic { user, .. } => format!("basic {user}:***"),
        WebhookAuth::Splunk(_) => "splunk ***".to_string(),
    };
    let _ = writeln!(o, "# auth: {auth}");
    if let Some(s) = &w.signing {
        let _ = writeln!(o, "# signing: HMAC-SHA256 in header {} (secret ***)", s.header);
    }
    for f in &w.tls_files {
        let _ = writeln!(o, "# tls file: {}", f.display());
    }
    if w.encoding == Encoding::SplunkHec {
        let sp = &w.splunk;
        let _ = writeln!(
            o,
            "# splunk: index={:?} source={:?} sourcetype={:?} host={:?} assume_prefix_indexed={}",
            sp.index.as_deref().unwrap_or("(receiver default)"),
            sp.source,
            sp.sourcetype.as_deref().unwrap_or("opsera:<stream>"),
            sp.host,
            sp.assume_prefix_indexed
        );
    }
}

/// Replace the password of a URL (a proxy's) with `***`.
fn mask_url_password(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(env: &[(&str, &str)]) -> LoadOptions {
        LoadOptions {
            require_token: true,
            env: Some(env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
        }
    }

    const MINIMAL: &str = r#"
        [api]
        base_url = "http://127.0.0.1:8080"
        token = "t0k"
        [state]
        path = "/tmp/x.db"
        [sinks.archive]
        type = "file"
        path = "/tmp/out.jsonl"
    "#;

    #[test]
    fn plain_http_off_loopback_is_allowed_only_explicitly_and_then_warned() {
        let remote = MINIMAL.replace("http://127.0.0.1:8080", "http://opsera.internal:8080");
        let e = load_str(&remote, Path::new("c.toml"), &opts(&[])).unwrap_err().to_string();
        assert!(e.contains("api.base_url") && e.contains("allow_insecure_http"), "{e}");
        let allowed = remote.replace("[api]", "[api]\nallow_insecure_http = true");
        let c = load_str(&allowed, Path::new("c.toml"), &opts(&[])).unwrap();
        let w = c.security_warnings();
        assert!(w.iter().any(|w| w.starts_with("api.base_url:") && w.contains("plain http")), "{w:?}");
        let c = load_str(MINIMAL, Path::new("c.toml"), &opts(&[])).unwrap();
        assert!(c.security_warnings().is_empty(), "loopback http is fine");
    }

    #[test]
    fn a_secret_file_readable_by_others_or_another_group_is_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "t\n").unwrap();
        let text = MINIMAL.replace("[api]", &format!("[api]\ntoken_file = {:?}", token.display().to_string()));
        let warned = |m: u32| {
            std::fs::set_permissions(&token, std::fs::Permissions::from_mode(m)).unwrap();
            let c = load_str(&text, Path::new("c.toml"), &opts(&[])).unwrap();
            c.security_warnings().into_iter().find(|w| w.starts_with("api.token_file:"))
        };
        assert_eq!(warned(0o600), None);
        assert!(warned(0o644).unwrap().contains("every user"));
        // The process's own group (as a Kubernetes secret volume with fsGroup makes it): fine.
        assert_eq!(warned(0o640), None);
        // Another group (only root can hand the file to one).
        // SAFETY: geteuid cannot fail and touches no memory.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(&token, None, Some(54_321)).unwrap();
            assert!(warned(0o640).unwrap().contains("another group (mode 0640, group 54321)"));
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = load_str(MINIMAL, Path::new("c.toml"), &opts(&[])).unwrap();
        assert_eq!(c.streams.len(), 2);
        assert!(c.streams.iter().all(|s| s.enabled));
        assert_eq!(c.streams[0].interval, Duration::from_secs(60));
        assert_eq!(c.streams[1].interval, Duration::from_secs(300));
        assert_eq!(c.streams[0].max_pages, 100_000);
        assert_eq!(c.streams[0].initial_lookback, Duration::from_secs(7 * 86400));
        assert_eq!(c.sinks[0].streams, vec!["user_activity", "token_activity"]);
        assert_eq!(c.state.max_buffered_bytes, 1 << 30);
    }

    #[test]
    fn env_overrides_keys_and_keeps_strings_as_strings() {
        let c = load_str(
            MINIMAL,
            Path::new("c.toml"),
            &opts(&[
                ("OPSERA_SHIPPER__API__TOKEN", "00123"),
                ("OPSERA_SHIPPER__STREAMS__USER_ACTIVITY__PAGE_SIZE", "250"),
                ("OPSERA_SHIPPER__STREAMS__TOKEN_ACTIVITY__ENABLED", "false"),
                ("OPSERA_SHIPPER__SINKS__ARCHIVE__STREAMS", "user_activity"),
                ("OPSERA_SHIPPER__API__TIMEOUT", ""),
            ]),
        )
        .unwrap();
        assert_eq!(c.api.token.as_ref().unwrap().current().expose(), "00123");
        assert_eq!(c.streams[0].page_size, 250);
        assert!(!c.streams[1].enabled);
        assert_eq!(c.sinks[0].streams, vec!["user_activity"]);
        // An empty variable does not override.
        assert_eq!(c.api.timeout, Duration::from_secs(30));
    }

    #[test]
    fn unknown_key_is_named() {
        let text = MINIMAL.replace("[state]", "[state]\nmax_bufered_records = 3");
        let e = load_str(&text, Path::new("c.toml"), &opts(&[])).unwrap_err().to_string();
        assert!(e.contains("max_bufered_records"), "{e}");
        assert!(e.contains("c.toml"), "{e}");
    }

    #[test]
    fn plain_http_to_remote_host_is_refused() {
        let text = MINIMAL.replace("http://127.0.0.1:8080", "http://opsera.example.com");
        let e = load_str(&text, Path::new("c.toml"), &opts(&[])).unwrap_err().to_string();
        assert!(e.contains("api.base_url"), "{e}");
        let text = text.replace("token = \"t0k\"", "token = \"t0k\"\nallow_insecure_http = true");
        load_str(&text, Path::new("c.toml"), &opts(&[])).unwrap();
    }

    #[test]
    fn secret_never_prints() {
        let c = load_str(MINIMAL, Path::new("c.toml"), &opts(&[])).unwrap();
        assert!(!format!("{c:?}").contains("t0k"));
        assert!(!c.render_masked().contains("t0k"));
    }

    #[test]
    fn byte_sizes_parse() {
        assert_eq!(parse_bytes("1GiB"), Some(1 << 30));
        assert_eq!(parse_bytes("512 MiB"), Some(512 << 20));
        assert_eq!(parse_bytes("1000"), Some(1000));
        assert_eq!(parse_bytes("1MB"), Some(1_000_000));
        assert_eq!(parse_bytes("lots"), None);
        assert_eq!(parse_bytes("-1"), None);
    }

    #[test]
    fn v1_stream_rejects_v2_only_filters() {
        let text = format!("{MINIMAL}\n[streams.user_activity]\napi = \"v1\"\naction = \"update\"\n");
        let e = load_str(&text, Path::new("c.toml"), &opts(&[])).unwrap_err().to_string();
        assert!(e.contains("streams.user_activity.action"), "{e}");
    }
}
