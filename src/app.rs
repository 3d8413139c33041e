//! The commands: wiring config, store, client, pollers and dispatchers into
//! `run` (the daemon), `once` (one cycle), `demo`, and the small state
//! commands. Each returns a sysexits-style exit code.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::cli::DeadLetterAction;
use crate::config::{self, Config, ConfigError, LoadOptions};
use crate::dispatch::{Dispatcher, Exit};
use crate::opsera::Client;
use crate::poller::{Limits, PollError, Poller};
use crate::simulator::{SimOptions, Simulator};
use crate::sink;
use crate::store::{Store, StoreError, WriterLock};
use crate::window;

/// Exit codes (sysexits.h).
pub mod exit {
    pub const OK: u8 = 0;
    pub const USAGE: u8 = 64;
    pub const DATAERR: u8 = 65;
    pub const SOFTWARE: u8 = 70;
    pub const CANTCREAT: u8 = 73;
    pub const IOERR: u8 = 74;
    pub const TEMPFAIL: u8 = 75;
    pub const NOPERM: u8 = 77;
    pub const CONFIG: u8 = 78;
}

/// A failure that ends a command, with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("config error: {0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("sink {sink}: {message}")]
    Sink { sink: String, message: String },
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Locked(StoreError),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl AppError {
    pub fn exit_code(&self) -> u8 {
        match self {
            AppError::Config(_) => exit::CONFIG,
            AppError::Store(_) => exit::IOERR,
            AppError::Sink { .. } => exit::CANTCREAT,
            AppError::Usage(_) => exit::USAGE,
            AppError::Locked(_) => exit::TEMPFAIL,
            AppError::Other(_) => exit::SOFTWARE,
        }
    }
}

/// The demo's config, also shipped as `config/demo.toml`.
pub const DEMO_TOML: &str = include_str!("../config/demo.toml");

/// Everything a pipeline run needs, built from config.
struct Pipeline {
    cfg: Config,
    store: Store,
    client: Client,
    _lock: WriterLock,
}

impl Pipeline {
    async fn build(cfg: Config) -> Result<Self, AppError> {
        let lock = WriterLock::acquire(&cfg.state.path).map_err(AppError::Locked)?;
        let store = open_store(&cfg.state.path, true).await?;
        let token = cfg.api.token.clone().ok_or_else(|| {
            AppError::Config(ConfigError { file: cfg.source.display().to_string(), message: "no API token".into() })
        })?;
        let client = Client::new(&cfg.api, token).map_err(|e| {
            AppError::Config(ConfigError {
                file: cfg.source.display().to_string(),
                message: format!("api: cannot build the HTTP client: {e}"),
            })
        })?;
        Ok(Self { cfg, store, client, _lock: lock })
    }

    fn pollers(&self) -> Vec<Poller> {
        let limits =
            Limits { max_records: self.cfg.state.max_buffered_records, max_bytes: self.cfg.state.max_buffered_bytes };
        self.cfg
            .enabled_streams()
            .map(|s| Poller::new(s.clone(), self.client.clone(), self.store.clone(), limits))
            .collect()
    }

    async fn dispatchers(&self) -> Result<Vec<Dispatcher>, AppError> {
        self.store.register_sinks(self.cfg.sinks.iter().map(|s| s.name.clone()).collect()).await?;
        let mut out = Vec::new();
        for s in &self.cfg.sinks {
            let cur = self.store.sink_cursor(&s.name).await?;
            let built = sink::build(s, cur.file)
                .await
                .map_err(|e| AppError::Sink { sink: s.name.clone(), message: e.to_string() })?;
            out.push(Dispatcher::new(s.name.clone(), s.streams.clone(), self.store.clone(), built, cur.delivered_seq));
        }
        Ok(out)
    }
}

/// Open the store for writing (the caller holds the [`WriterLock`]), or
/// only to read state beside a running daemon (`writer = false`).
async fn open_store(path: &Path, writer: bool) -> Result<Store, AppError> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || if writer { Store::open(&p) } else { Store::open_read(&p) })
        .await
        .map_err(|e| AppError::Other(anyhow::anyhow!("opening the store: {e}")))?
        .map_err(AppError::from)
}

/// `once`: poll every enabled stream up to now, deliver everything, exit.
pub async fn once(cfg: Config, sink_timeout: Duration) -> Result<u8, AppError> {
    let p = Pipeline::build(cfg).await?;
    let dispatchers = p.dispatchers().await?;
    let cancel = CancellationToken::new();
    spawn_signal_handler(cancel.clone(), None);
    let (drain_tx, drain_rx) = watch::channel(None);
    let (_reopen_tx, reopen_rx) = watch::channel(0u64);
    let handles: Vec<(String, JoinHandle<Result<Exit, StoreError>>)> = dispatchers
        .into_iter()
        .zip(p.cfg.sinks.iter())
        .map(|(d, s)| (s.name.clone(), tokio::spawn(d.run(cancel.clone(), drain_rx.clone(), reopen_rx.clone()))))
        .collect();

    let polls = futures_util::future::join_all(p.pollers().into_iter().map(|poller| {
        let cancel = cancel.clone();
        let store = p.store.clone();
        async move {
            let name = poller.stream().name.clone();
            let r = poller.poll_once(&cancel).await;
            if let Err(e) = &r
                && !matches!(e, PollError::Cancelled)
            {
                error!(stream = %name, error = %e, "Poll failed.");
                let _ = store.record_poll_error(&name, window::now_ms(), e.to_string()).await;
            }
            r
        }
    }))
    .await;
    let mut code = exit::OK;
    for r in &polls {
        match r {
            Ok(_) => {}
            Err(e) if e.is_auth() => code = exit::NOPERM,
            Err(_) if code == exit::OK => code = exit::TEMPFAIL,
            Err(_) => {}
        }
    }

    let high = p.store.high_seq().await?;
    let _ = drain_tx.send(Some(high));
    let deadline = tokio::time::Instant::now() + sink_timeout;
    for (name, h) in handles {
        let outcome = tokio::select! {
            r = h => Some(r),
            _ = tokio::time::sleep_until(deadline) => None,
        };
        match outcome {
            Some(Ok(Ok(Exit::Drained))) => {}
            Some(Ok(Ok(Exit::Cancelled))) => {
                if code == exit::OK {
                    code = exit::TEMPFAIL;
                }
            }
            Some(Ok(Err(e))) => return Err(e.into()),
            Some(Err(e)) => {
                return Err(AppError::Other(anyhow::anyhow!("sink {name} task failed: {e}")));
            }
            None => {
                cancel.cancel();
                let (records, _) = p.store.backlog();
                error!(
                    sink = %name,
                    timeout = %humantime::format_duration(sink_timeout),
                    journal_records = records,
                    "Sink could not deliver in time; its records stay in the journal for the next run."
                );
                if code != exit::NOPERM {
                    code = exit::TEMPFAIL;
                }
            }
        }
    }
    cancel.cancel();
    Ok(code)
}

/// `run`: poll and deliver until `stop` is cancelled or a signal arrives.
pub async fn run(cfg: Config, stop: CancellationToken) -> Result<u8, AppError> {
    let shutdown_timeout = cfg.runtime.shutdown_timeout;
    let p = Pipeline::build(cfg).await?;
    let dispatchers = p.dispatchers().await?;
    let (reopen_tx, reopen_rx) = watch::channel(0u64);
    spawn_signal_handler(stop.clone(), Some(reopen_tx));
    let (_drain_tx, drain_rx) = watch::channel(None);
    crate::metrics::init_series(
        p.cfg.enabled_streams().map(|s| s.name.as_str()),
        p.cfg.sinks.iter().map(|s| s.name.as_str()),
    );
    let health = crate::health::Health::get();
    for s in p.cfg.enabled_streams() {
        health.register_stream(&s.name, s.interval);
    }
    if let Some(listen) = p.cfg.server_listen {
        let sinks = p.cfg.sinks.iter().map(|s| (s.name.clone(), s.streams.clone())).collect();
        let streams = p.cfg.enabled_streams().map(|s| s.name.clone()).collect();
        let addr = crate::server::start(listen, p.store.clone(), sinks, streams, stop.clone())
            .await
            .map_err(|e| AppError::Other(anyhow::anyhow!("server.listen: cannot listen on {listen}: {e}")))?;
        info!(%addr, "Serving /healthz, /readyz and /metrics.");
    }
    let tracker = TaskTracker::new();
    // Pollers stop at once on shutdown; dispatchers finish the batch in flight.
    for poller in p.pollers() {
        let (stop, name) = (stop.clone(), format!("poller {}", poller.stream().name));
        tracker.spawn(async move {
            poller.run(stop.clone()).await;
            if !stop.is_cancelled() {
                crate::health::Health::get().exited(&name);
            }
        });
    }
    for (d, s) in dispatchers.into_iter().zip(p.cfg.sinks.iter()) {
        let (stop, drain, reopen) = (stop.clone(), drain_rx.clone(), reopen_rx.clone());
        let name = format!("sink {}", s.name);
        tracker.spawn(async move {
            let r = d.run(stop.clone(), drain, reopen).await;
            if !stop.is_cancelled() {
                error!(loop_name = %name, result = ?r.map(|_| ()), "A delivery loop stopped.");
                crate::health::Health::get().exited(&name);
            }
        });
    }
    tracker.close();
    // systemd: ready once the store is open and every sink is built; watchdog
    // pings only while no loop is wedged. Harmless outside systemd.
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    if let Some(period) = sd_notify::watchdog_enabled() {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period / 2);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                match crate::health::Health::get().alive() {
                    Ok(()) => {
                        let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                    }
                    Err(problems) => warn!(?problems, "A loop is wedged: withholding the systemd watchdog ping."),
                }
            }
        });
    }
    info!(
        streams = ?p.cfg.enabled_streams().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        sinks = ?p.cfg.sinks.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        state = %p.cfg.state.path.display(),
        "opsera-shipper running."
    );
    stop.cancelled().await;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    info!(timeout = %humantime::format_duration(shutdown_timeout), "Shutting down: polling stopped, finishing batches in flight.");
    if tokio::time::timeout(shutdown_timeout, tracker.wait()).await.is_err() {
        warn!("Shutdown timeout reached; batches still in flight are delivered again on the next start.");
    }
    info!("Stopped.");
    Ok(exit::OK)
}

/// SIGTERM/SIGINT cancel `stop` (a second one exits at once); SIGHUP bumps `reopen`.
fn spawn_signal_handler(stop: CancellationToken, reopen: Option<watch::Sender<u64>>) {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let signals = match signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "Cannot install signal handlers.");
            return;
        }
    };
    tokio::spawn(async move {
        let mut signals = signals;
        while let Some(sig) = signals.next().await {
            match sig {
                SIGHUP => match &reopen {
                    Some(tx) => {
                        info!("SIGHUP: reopening output files.");
                        tx.send_modify(|g| *g += 1);
                    }
                    None => info!("SIGHUP ignored (nothing to reopen in this command)."),
                },
                _ if stop.is_cancelled() => {
                    warn!(
                        "Second signal: exiting now; state is consistent and the batch in flight is delivered again next time."
                    );
                    std::process::exit(exit::OK as i32);
                }
                _ => {
                    info!(signal = sig, "Signal received; shutting down.");
                    stop.cancel();
                }
            }
        }
    });
}

/// `demo`: the real pipeline against the simulated API, into `dir`.
pub async fn demo(dir: PathBuf, duration: Option<Duration>) -> Result<u8, AppError> {
    std::fs::create_dir_all(&dir)
        .map_err(|e| AppError::Other(anyhow::anyhow!("cannot create demo directory {}: {e}", dir.display())))?;
    let dir = dir.canonicalize().unwrap_or(dir);
    let sim = Simulator::start(SimOptions {
        user_backlog: 2500,
        token_backlog: 400,
        backlog_span: Duration::from_secs(2 * 86_400),
        backlog_age: Duration::ZERO,
        ..SimOptions::default()
    })
    .await?;
    let _trickle = sim.start_trickle(Duration::from_secs(2), 3);
    sim.set_fail_every(40, 503);
    let out = dir.join("audit.jsonl");
    let env: HashMap<String, String> = [
        ("OPSERA_SHIPPER__API__BASE_URL", sim.base_url()),
        ("OPSERA_SHIPPER__API__TOKEN", sim.token().to_string()),
        ("OPSERA_SHIPPER__STATE__PATH", dir.join("state.db").display().to_string()),
        ("OPSERA_SHIPPER__SINKS__ARCHIVE__PATH", out.display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let cfg = config::load_str(
        DEMO_TOML,
        Path::new("config/demo.toml"),
        &LoadOptions { require_token: true, env: Some(env) },
    )?;
    info!(
        api = %sim.base_url(),
        output = %out.display(),
        state = %cfg.state.path.display(),
        "Demo: a simulated Opsera API with a 2-day backlog and new activity every 2s (and an occasional 503, to show retries). \
         Press Ctrl-C to stop; run again to see it resume from its checkpoint."
    );
    let stop = CancellationToken::new();
    if let Some(d) = duration {
        let s = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            s.cancel();
        });
    }
    let code = run(cfg, stop).await?;
    sim.shutdown();
    let lines = std::fs::read_to_string(&out).map(|t| t.lines().count()).unwrap_or(0);
    eprintln!(
        "\nDemo finished: {lines} audit records in {} (one JSON object per line). Try:\n  tail -n 3 {}\n",
        out.display(),
        out.display()
    );
    Ok(code)
}

/// `status`: watermarks, last polls and errors, sink lag.
pub async fn status(cfg: Config, json: bool) -> Result<u8, AppError> {
    if !cfg.state.path.exists() {
        if json {
            println!(
                "{{\"path\":{},\"exists\":false}}",
                serde_json::to_string(&cfg.state.path.display().to_string()).unwrap_or_default()
            );
        } else {
            println!(
                "No state database at {} yet: the shipper has not run with this config.",
                cfg.state.path.display()
            );
        }
        return Ok(exit::OK);
    }
    let store = open_store(&cfg.state.path, false).await?;
    let st = store.status(cfg.sinks.iter().map(|s| (s.name.clone(), s.streams.clone())).collect()).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&st).map_err(|e| AppError::Other(e.into()))?);
        return Ok(exit::OK);
    }
    println!(
        "State: {} (schema {}), journal: {} records, {} bytes",
        st.path, st.schema_version, st.journal_records, st.journal_bytes
    );
    println!();
    println!(
        "{:<16} {:<26} {:<26} {:<26} {:<9} LAST ERROR",
        "STREAM", "WATERMARK", "LAST POLL", "LAST SUCCESS", "TRUNC."
    );
    for s in cfg.streams.iter() {
        let row = st.streams.iter().find(|r| r.name == s.name);
        let dash = || "-".to_string();
        let enabled = if s.enabled { "" } else { " (disabled)" };
        println!(
            "{:<16} {:<26} {:<26} {:<26} {:<9} {}{}",
            s.name,
            row.and_then(|r| r.watermark.clone()).unwrap_or_else(dash),
            row.and_then(|r| r.last_poll.clone()).unwrap_or_else(dash),
            row.and_then(|r| r.last_success.clone()).unwrap_or_else(dash),
            row.map(|r| r.truncated_days).unwrap_or(0),
            row.and_then(|r| r.last_error.clone()).unwrap_or_else(dash),
            enabled
        );
    }
    println!();
    println!(
        "{:<16} {:<14} {:<12} {:<13} {:<26} LAST ERROR",
        "SINK", "DELIVERED SEQ", "LAG", "DEAD LETTERS", "LAST DELIVERY"
    );
    for s in &st.sinks {
        println!(
            "{:<16} {:<14} {:<12} {:<13} {:<26} {}",
            s.name,
            s.delivered_seq,
            s.lag_records,
            s.dead_letters,
            s.last_delivery.clone().unwrap_or_else(|| "-".into()),
            s.last_error.clone().unwrap_or_else(|| "-".into())
        );
    }
    Ok(exit::OK)
}

/// `health`: exit 0 when `/readyz` answers 200, 1 otherwise.
pub async fn health(url: Option<String>, cfg: Option<Config>) -> Result<u8, AppError> {
    let base = match (url, cfg.and_then(|c| c.server_listen)) {
        (Some(u), _) => u.trim_end_matches('/').to_string(),
        (None, Some(addr)) => {
            let host = if addr.ip().is_unspecified() { "127.0.0.1".to_string() } else { addr.ip().to_string() };
            let host = if host.contains(':') { format!("[{host}]") } else { host };
            format!("http://{host}:{}", addr.port())
        }
        (None, None) => {
            return Err(AppError::Usage("no [server] listen in the config; pass --url http://HOST:PORT".into()));
        }
    };
    let url = format!("{base}/readyz");
    // This host's own endpoints: never through a proxy.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .no_proxy()
        .build()
        .map_err(|e| AppError::Other(anyhow::anyhow!("HTTP client: {e}")))?;
    match client.get(&url).send().await {
        Ok(r) => {
            let ok = r.status().is_success();
            let body = r.text().await.unwrap_or_default();
            println!("{body}");
            Ok(if ok { exit::OK } else { 1 })
        }
        Err(e) => {
            println!("{url}: {}", crate::http::describe_reqwest(&e));
            Ok(1)
        }
    }
}

/// `dead-letters list|retry|purge`.
pub async fn dead_letters(cfg: Config, action: DeadLetterAction) -> Result<u8, AppError> {
    let check_sink = |s: &Option<String>| -> Result<(), AppError> {
        match s {
            Some(name) if !cfg.sinks.iter().any(|k| &k.name == name) => {
                Err(AppError::Usage(format!("unknown sink '{name}' (not in {})", cfg.source.display())))
            }
            _ => Ok(()),
        }
    };
    if !cfg.state.path.exists() {
        println!("No state database at {} yet.", cfg.state.path.display());
        return Ok(exit::OK);
    }
    let store = open_store(&cfg.state.path, false).await?;
    match action {
        DeadLetterAction::List { sink, json } => {
            check_sink(&sink)?;
            let list = store.dead_letters(sink).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list).map_err(|e| AppError::Other(e.into()))?);
            } else if list.is_empty() {
                println!("No dead letters.");
            } else {
                for d in list {
                    let status = d.status.map_or("-".to_string(), |s| s.to_string());
                    let retry = if d.retry_requested { " (retry requested)" } else { "" };
                    println!("{}\t{}\t{}\t{}\t{}\t{}{}", d.sink, d.record_id, d.stream, status, d.at, d.reason, retry);
                }
            }
        }
        DeadLetterAction::Retry(sel) | DeadLetterAction::Purge(sel)
            if !sel.all && sel.sink.is_none() && sel.ids.is_empty() =>
        {
            return Err(AppError::Usage("name --sink, --id, or --all".into()));
        }
        DeadLetterAction::Retry(sel) => {
            check_sink(&sel.sink)?;
            let n = store.select_dead_letters(sel.sink, sel.ids, false).await?;
            println!("{n} dead letter(s) marked for retry: the running daemon (or the next `once`) sends them again.");
        }
        DeadLetterAction::Purge(sel) => {
            check_sink(&sel.sink)?;
            let n = store.select_dead_letters(sel.sink, sel.ids, true).await?;
            println!("{n} dead letter(s) deleted.");
        }
    }
    Ok(exit::OK)
}

/// `repair`: check every journal page against its segment file and,
/// unless `dry_run`, drop the pages whose records cannot be read back, so
/// that the daemon starts and its sinks deliver past them.
pub async fn repair(cfg: Config, dry_run: bool, json: bool) -> Result<u8, AppError> {
    let lock = WriterLock::acquire(&cfg.state.path).map_err(AppError::Locked)?;
    let path = cfg.state.path.clone();
    let (pages, damaged) = tokio::task::spawn_blocking(move || Store::repair_journal(&path, !dry_run, &lock))
        .await
        .map_err(|e| AppError::Other(anyhow::anyhow!("repairing the journal: {e}")))??;
    let report = RepairReport::new(pages, &damaged, !dry_run);
    if json {
        println!("{}", serde_json::to_string_pretty(&report).map_err(|e| AppError::Other(e.into()))?);
    } else {
        report.print();
    }
    Ok(if dry_run && !damaged.is_empty() { exit::DATAERR } else { exit::OK })
}

/// What `repair` found, and did.
#[derive(serde::Serialize)]
struct RepairReport {
    pages_checked: usize,
    /// The damaged pages were dropped (not a dry run).
    dropped: bool,
    damaged: Vec<RepairedPage>,
    lost_records: i64,
    /// Per stream, the `reset` that fetches its lost records again.
    reset: Vec<ResetHint>,
}

#[derive(serde::Serialize)]
struct RepairedPage {
    first_seq: i64,
    last_seq: i64,
    stream: String,
    records: i64,
    oldest_created: String,
    reason: String,
}

#[derive(serde::Serialize)]
struct ResetHint {
    stream: String,
    since: String,
}

impl RepairReport {
    fn new(pages_checked: usize, damaged: &[crate::store::DamagedPage], dropped: bool) -> Self {
        let mut oldest = std::collections::BTreeMap::<&str, i64>::new();
        for d in damaged {
            let t = oldest.entry(&d.stream).or_insert(d.min_created);
            *t = (*t).min(d.min_created);
        }
        Self {
            pages_checked,
            dropped: dropped && !damaged.is_empty(),
            damaged: damaged
                .iter()
                .map(|d| RepairedPage {
                    first_seq: d.first_seq,
                    last_seq: d.first_seq + d.records - 1,
                    stream: d.stream.clone(),
                    records: d.records,
                    oldest_created: window::fmt_rfc3339(d.min_created),
                    reason: d.reason.clone(),
                })
                .collect(),
            lost_records: damaged.iter().map(|d| d.records).sum(),
            reset: oldest
                .into_iter()
                .map(|(stream, t)| ResetHint { stream: stream.to_string(), since: window::fmt_rfc3339(t) })
                .collect(),
        }
    }

    fn print(&self) {
        let pages = self.pages_checked;
        if self.damaged.is_empty() {
            println!("The journal is sound: {pages} pages checked, every record readable.");
            return;
        }
        for d in &self.damaged {
            println!(
                "seq {}–{} ({}, {} records, the oldest created {}): {}",
                d.first_seq, d.last_seq, d.stream, d.records, d.oldest_created, d.reason
            );
        }
        let (lost, n) = (self.lost_records, self.damaged.len());
        if !self.dropped {
            println!(
                "{lost} records in {n} of {pages} journal pages cannot be read back; `repair` (with the daemon \
                 stopped) drops those pages so that delivery goes on past them."
            );
            return;
        }
        println!("Dropped {n} of {pages} journal pages: their {lost} records cannot be delivered.");
        for ResetHint { stream, since } in &self.reset {
            println!(
                "To fetch them again while the API still has them: reset --stream {stream} --since {since} \
                 (every {stream} record since then is delivered again)."
            );
        }
    }
}

/// `reset`: poll a stream again from `since` (or its initial lookback).
pub async fn reset(cfg: Config, stream: &str, since: Option<&str>) -> Result<u8, AppError> {
    if !cfg.streams.iter().any(|s| s.name == stream) {
        return Err(AppError::Usage(format!(
            "unknown stream '{stream}'; known streams are {}",
            config::KNOWN_STREAMS.join(", ")
        )));
    }
    let since_ms = match since {
        None => None,
        Some(s) => Some(window::parse_since(s, window::now_ms()).ok_or_else(|| {
            AppError::Usage(format!(
                "--since '{s}' is not a time: use RFC 3339, YYYY-MM-DD, or a duration ago such as 2d"
            ))
        })?),
    };
    let _lock = WriterLock::acquire(&cfg.state.path).map_err(AppError::Locked)?;
    let store = open_store(&cfg.state.path, true).await?;
    store.reset_stream(stream, since_ms).await?;
    match since_ms {
        Some(t) => println!(
            "Stream {stream} is polled again from {} (minus its overlap); records from then on are delivered again.",
            window::fmt_rfc3339(t)
        ),
        None => println!(
            "Stream {stream} is reset: the next poll starts at its initial_lookback and delivers those records again."
        ),
    }
    Ok(exit::OK)
}
