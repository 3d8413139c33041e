//! Prometheus metrics (OpenMetrics text via `prometheus-client`), names
//! prefixed `opsera_shipper_`. Counters live in this process only and start
//! at zero on every start; the gauges marked "from the store" are read from
//! the state database at scrape time, so they survive restarts.

use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabel {
    pub stream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabel {
    pub sink: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkErrorLabels {
    pub sink: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    pub endpoint: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
}

fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

/// Every metric the shipper exports.
pub struct Metrics {
    pub records_fetched: Family<StreamLabel, Counter>,
    pub records_duplicate: Family<StreamLabel, Counter>,
    pub records_stored: Family<StreamLabel, Counter>,
    pub polls: Family<StreamLabel, Counter>,
    pub poll_errors: Family<StreamLabel, Counter>,
    pub truncated_days: Family<StreamLabel, Counter>,
    pub poll_duration: Family<StreamLabel, Histogram, fn() -> Histogram>,
    pub records_delivered: Family<SinkLabel, Counter>,
    pub sink_errors: Family<SinkErrorLabels, Counter>,
    pub dead_letters: Family<SinkLabel, Counter>,
    pub syslog_truncated: Family<SinkLabel, Counter>,
    pub api_requests: Family<ApiLabels, Counter>,
    pub api_duration: Family<EndpointLabel, Histogram, fn() -> Histogram>,
    /// From the store, set at scrape time.
    pub journal_records: Gauge,
    pub journal_bytes: Gauge,
    pub sink_lag_records: Family<SinkLabel, Gauge>,
    pub sink_lag_seconds: Family<SinkLabel, Gauge<f64, AtomicU64>>,
    pub dead_letters_stored: Family<SinkLabel, Gauge>,
    pub watermark_age_seconds: Family<StreamLabel, Gauge<f64, AtomicU64>>,
    pub start_time: Gauge<f64, AtomicU64>,
    pub build_info: Family<BuildLabels, Gauge>,
    registry: Registry,
}

impl Metrics {
    fn new() -> Self {
        let mut m = Metrics {
            records_fetched: Family::default(),
            records_duplicate: Family::default(),
            records_stored: Family::default(),
            polls: Family::default(),
            poll_errors: Family::default(),
            truncated_days: Family::default(),
            poll_duration: Family::new_with_constructor(seconds_histogram),
            records_delivered: Family::default(),
            sink_errors: Family::default(),
            dead_letters: Family::default(),
            syslog_truncated: Family::default(),
            api_requests: Family::default(),
            api_duration: Family::new_with_constructor(seconds_histogram),
            journal_records: Gauge::default(),
            journal_bytes: Gauge::default(),
            sink_lag_records: Family::default(),
            sink_lag_seconds: Family::default(),
            dead_letters_stored: Family::default(),
            watermark_age_seconds: Family::default(),
            start_time: Gauge::default(),
            build_info: Family::default(),
            registry: Registry::with_prefix("opsera_shipper"),
        };
        let r = &mut m.registry;
        r.register("records_fetched", "Records received from the API", m.records_fetched.clone());
        r.register("records_duplicate", "Records received again (removed by _id)", m.records_duplicate.clone());
        r.register("records_stored", "New records stored in the journal", m.records_stored.clone());
        r.register("polls", "Completed polls", m.polls.clone());
        r.register("poll_errors", "Failed polls", m.poll_errors.clone());
        r.register("v1_truncated_days", "v1 days that came back at the 1000-record cap", m.truncated_days.clone());
        r.register("poll_duration_seconds", "Time per poll", m.poll_duration.clone());
        r.register("records_delivered", "Records delivered to a sink", m.records_delivered.clone());
        r.register("sink_errors", "Failed delivery attempts, by kind", m.sink_errors.clone());
        r.register("dead_letters", "Records a sink refused (since start)", m.dead_letters.clone());
        r.register("syslog_truncated_messages", "Syslog messages cut to max_message_bytes", m.syslog_truncated.clone());
        r.register("api_requests", "API requests by endpoint and HTTP status", m.api_requests.clone());
        r.register("api_request_duration_seconds", "API request time", m.api_duration.clone());
        r.register("journal_records", "Records in the journal (from the store)", m.journal_records.clone());
        r.register("journal_bytes", "Bytes of record text in the journal (from the store)", m.journal_bytes.clone());
        r.register(
            "sink_lag_records",
            "Journal records a sink has not passed yet (from the store)",
            m.sink_lag_records.clone(),
        );
        r.register(
            "sink_lag_seconds",
            "Age of the oldest record a sink has not delivered yet (from the store)",
            m.sink_lag_seconds.clone(),
        );
        r.register(
            "dead_letters_stored",
            "Dead letters kept in the store (from the store)",
            m.dead_letters_stored.clone(),
        );
        r.register(
            "watermark_age_seconds",
            "Time since the newest stored record of a stream (from the store)",
            m.watermark_age_seconds.clone(),
        );
        r.register("process_start_time_seconds", "Start time of the process, Unix seconds", m.start_time.clone());
        r.register("build_info", "Build information", m.build_info.clone());
        m.start_time.set(crate::window::now_ms() as f64 / 1000.0);
        m.build_info.get_or_create(&BuildLabels { version: env!("CARGO_PKG_VERSION").into() }).set(1);
        m
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Create every per-stream and per-sink series at zero, so dashboards and
/// `rate()` see them before the first event.
pub fn init_series<'a>(streams: impl Iterator<Item = &'a str>, sinks: impl Iterator<Item = &'a str>) {
    let m = get();
    for s in streams {
        let l = stream(s);
        for f in
            [&m.records_fetched, &m.records_duplicate, &m.records_stored, &m.polls, &m.poll_errors, &m.truncated_days]
        {
            let _ = f.get_or_create(&l);
        }
    }
    for s in sinks {
        let l = sink(s);
        for f in [&m.records_delivered, &m.dead_letters] {
            let _ = f.get_or_create(&l);
        }
        for kind in ["retryable", "rejected"] {
            let _ = m.sink_errors.get_or_create(&SinkErrorLabels { sink: s.to_string(), kind: kind.into() });
        }
    }
}

/// The process's metrics.
pub fn get() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::new)
}

pub fn stream(s: &str) -> StreamLabel {
    StreamLabel { stream: s.to_string() }
}

pub fn sink(s: &str) -> SinkLabel {
    SinkLabel { sink: s.to_string() }
}
