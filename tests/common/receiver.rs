//! A real HTTP receiver on loopback for webhook tests: records every
//! request, decodes gzip, checks credentials, parses each encoding, can
//! refuse a poison record (HEC-style), answer scripted statuses, and be
//! stopped and restarted on the same port; over plain HTTP or HTTPS
//! (optionally requiring a client certificate).
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Ndjson,
    JsonArray,
    Hec,
}

#[derive(Debug, Clone)]
pub struct Request {
    pub headers: HeaderMap,
    /// The body as sent (maybe gzipped).
    pub raw: Vec<u8>,
    /// The body decoded.
    pub body: Vec<u8>,
    pub at: Instant,
    pub status: u16,
    pub records: usize,
}

#[derive(Default)]
pub struct RecvState {
    pub requests: Vec<Request>,
    /// Accepted records as they arrived: the record's JSON text (for HEC, the event re-serialized).
    pub accepted: Vec<String>,
    /// HEC: accepted event envelopes.
    pub envelopes: Vec<serde_json::Value>,
    /// Replies to send instead of accepting, in order: (status, Retry-After).
    pub script: VecDeque<(u16, Option<u64>)>,
    /// Refuse any request holding a record with this `_id`.
    pub poison: Option<String>,
    /// When refusing it, keep the records before it, as Splunk does (the
    /// OpenTelemetry Collector's HEC receiver, like the default here, keeps none).
    pub keeps_prefix: bool,
    /// Where the poison record sat in each request refused for it.
    pub refused_at: Vec<usize>,
    /// Required `Authorization` header value.
    pub auth: Option<String>,
}

#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    pub mode: Mode,
    pub state: Arc<Mutex<RecvState>>,
    stop: Arc<Mutex<CancellationToken>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// A TCP listener that completes a TLS handshake before handing a
/// connection to axum; failed handshakes are dropped.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else { continue };
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

#[derive(Clone)]
struct Ctx {
    mode: Mode,
    state: Arc<Mutex<RecvState>>,
}

impl Receiver {
    pub async fn start(mode: Mode) -> Receiver {
        let state = Arc::new(Mutex::new(RecvState::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let r = Receiver { addr, mode, state, stop: Arc::new(Mutex::new(CancellationToken::new())), tls: None };
        r.serve(listener);
        r
    }

    /// An HTTPS receiver with `server`'s certificate; with `client_ca`, it
    /// requires a client certificate signed by that CA.
    pub async fn start_tls(mode: Mode, server: &super::tls::TlsFiles, client_ca: Option<&std::path::Path>) -> Receiver {
        let state = Arc::new(Mutex::new(RecvState::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tls = Some(super::tls::acceptor(server, client_ca));
        let r = Receiver { addr, mode, state, stop: Arc::new(Mutex::new(CancellationToken::new())), tls };
        r.serve(listener);
        r
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let app =
            Router::new().route("/ingest", post(handle)).with_state(Ctx { mode: self.mode, state: self.state.clone() });
        let token = self.stop.lock().unwrap().clone();
        let tls = self.tls.clone();
        tokio::spawn(async move {
            let stopped = token.cancelled_owned();
            let _ = match tls {
                Some(acceptor) => {
                    axum::serve(TlsListener { tcp: listener, acceptor }, app).with_graceful_shutdown(stopped).await
                }
                None => axum::serve(listener, app).with_graceful_shutdown(stopped).await,
            };
        });
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}/ingest", self.addr)
    }

    pub fn st(&self) -> MutexGuard<'_, RecvState> {
        self.state.lock().unwrap()
    }

    /// Stop listening (connections are refused until `restart`).
    pub async fn stop(&self) {
        let t = std::mem::replace(&mut *self.stop.lock().unwrap(), CancellationToken::new());
        t.cancel();
        // Wait until the port refuses connections.
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(self.addr).await.is_err() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    pub async fn restart(&self) {
        for _ in 0..100 {
            if let Ok(l) = tokio::net::TcpListener::bind(self.addr).await {
                self.serve(l);
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("could not rebind {}", self.addr);
    }
}

fn gunzip(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(b).read_to_end(&mut out).expect("valid gzip body");
    out
}

/// The records of a body: (record `_id`, record text), and HEC envelopes.
pub fn parse(mode: Mode, body: &[u8]) -> (Vec<(String, String)>, Vec<serde_json::Value>) {
    let id = |t: &str| serde_json::from_str::<serde_json::Value>(t).unwrap()["_id"].as_str().unwrap().to_string();
    match mode {
        Mode::Ndjson => {
            let text = std::str::from_utf8(body).unwrap();
            assert!(text.ends_with('\n'), "ndjson body ends with a newline");
            (text.lines().map(|l| (id(l), l.to_string())).collect(), vec![])
        }
        Mode::JsonArray => {
            let items: Vec<&serde_json::value::RawValue> = serde_json::from_slice(body).expect("a JSON array");
            (items.iter().map(|r| (id(r.get()), r.get().to_string())).collect(), vec![])
        }
        Mode::Hec => {
            let mut recs = Vec::new();
            let mut envs = Vec::new();
            for v in serde_json::Deserializer::from_slice(body).into_iter::<serde_json::Value>() {
                let v = v.expect("concatenated HEC event objects");
                let ev = serde_json::to_string(&v["event"]).unwrap();
                recs.push((id(&ev), ev));
                envs.push(v);
            }
            (recs, envs)
        }
    }
}

async fn handle(State(ctx): State<Ctx>, headers: HeaderMap, raw: Bytes) -> Response {
    let gz = headers.get("content-encoding").is_some_and(|v| v == "gzip");
    let body = if gz { gunzip(&raw) } else { raw.to_vec() };
    let mut st = ctx.state.lock().unwrap();
    let mut req = Request {
        headers: headers.clone(),
        raw: raw.to_vec(),
        body: body.clone(),
        at: Instant::now(),
        status: 200,
        records: 0,
    };
    let reply = |st: &mut RecvState, mut req: Request, code: u16, text: String, ra: Option<u64>| -> Response {
        req.status = code;
        st.requests.push(req);
        let mut r = (StatusCode::from_u16(code).unwrap(), text).into_response();
        if let Some(s) = ra {
            r.headers_mut().insert("retry-after", s.to_string().parse().unwrap());
        }
        r
    };
    if let Some((code, ra)) = st.script.pop_front() {
        return reply(&mut st, req, code, "{\"text\":\"scripted\"}".into(), ra);
    }
    if let Some(want) = st.auth.clone()
        && headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(want.as_str())
    {
        return reply(&mut st, req, 401, "{\"text\":\"Invalid token\",\"code\":4}".into(), None);
    }
    let (recs, envs) = parse(ctx.mode, &body);
    req.records = recs.len();
    if let Some(p) = st.poison.clone()
        && let Some(i) = recs.iter().position(|(id, _)| *id == p)
    {
        let text = format!("{{\"text\":\"Invalid data format\",\"code\":6,\"invalid-event-number\":{i}}}");
        st.refused_at.push(i);
        if st.keeps_prefix {
            st.accepted.extend(recs[..i].iter().map(|(_, t)| t.clone()));
            st.envelopes.extend(envs.into_iter().take(i));
        }
        return reply(&mut st, req, 400, text, None);
    }
    st.accepted.extend(recs.into_iter().map(|(_, t)| t));
    st.envelopes.extend(envs);
    reply(&mut st, req, 200, "{\"text\":\"Success\",\"code\":0}".into(), None)
}
