//! The ops endpoints: `/healthz` (alive), `/readyz` (ready, or 503 with
//! the reasons as JSON) and `/metrics` (Prometheus/OpenMetrics text). Bound
//! to `[server] listen`; never serves records or secrets.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::metrics;
use crate::store::{SinkStreams, Store};

#[derive(Clone)]
struct Ctx {
    store: Store,
    sinks: Vec<SinkStreams>,
    streams: Vec<String>,
}

/// Bind `listen` now (so a bad address fails at start), then serve until `stop`.
pub async fn start(
    listen: SocketAddr,
    store: Store,
    sinks: Vec<SinkStreams>,
    streams: Vec<String>,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(Ctx { store, sinks, streams });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
    });
    Ok(addr)
}

fn json(code: StatusCode, body: serde_json::Value) -> Response {
    (code, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

async fn healthz() -> Response {
    match Health::get().alive() {
        Ok(()) => json(StatusCode::OK, serde_json::json!({"alive": true})),
        Err(problems) => {
            json(StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({"alive": false, "reasons": problems}))
        }
    }
}

async fn readyz() -> Response {
    match Health::get().ready() {
        Ok(()) => json(StatusCode::OK, serde_json::json!({"ready": true})),
        Err(reasons) => json(StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({"ready": false, "reasons": reasons})),
    }
}

async fn metrics_text(State(ctx): State<Ctx>) -> Response {
    let m = metrics::get();
    let (records, bytes) = ctx.store.backlog();
    m.journal_records.set(records as i64);
    m.journal_bytes.set(bytes as i64);
    if let Ok(scrape) = ctx.store.scrape(ctx.sinks.clone(), ctx.streams.clone()).await {
        let now = crate::window::now_ms();
        for s in scrape.sinks {
            let l = metrics::sink(&s.name);
            m.sink_lag_records.get_or_create(&l).set(s.lag_records);
            m.sink_lag_seconds
                .get_or_create(&l)
                .set(s.oldest_created.map_or(0.0, |c| (now - c).max(0) as f64 / 1000.0));
            m.dead_letters_stored.get_or_create(&l).set(s.dead_letters);
        }
        for (stream, wm) in scrape.watermarks {
            if let Some(w) = wm {
                m.watermark_age_seconds.get_or_create(&metrics::stream(&stream)).set((now - w).max(0) as f64 / 1000.0);
            }
        }
    }
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], m.encode())
        .into_response()
}
