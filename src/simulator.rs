//! A simulated Opsera API on loopback, for the demo and the tests.
//!
//! It implements the three audit endpoints as `opsera-api.md` describes them
//! (bearer auth, v2 paging with date/time bounds and filters, v1 whole-day
//! reads capped at 1000, `count`), newest first, over generated records, and
//! has knobs for what a real server may do: late records, records arriving
//! while a client pages, 429 with `Retry-After`, 5xx, slow or malformed
//! responses, a capped page size, pretty-printed bodies and clock skew. It
//! is a test double: it never touches state outside its own memory.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::window::{DAY, MINUTE, fmt_rfc3339, now_ms};

/// How the server reads `end_date`/`end_time` (the real API's choice is unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndBound {
    /// Records up to the end of the named minute (`createdAt < end + 1 min`).
    MinuteInclusive,
    /// Records strictly before the named minute (`createdAt < end`).
    Exclusive,
}

/// How the server answers a `page` past the last one (the real API's choice is unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PastEnd {
    /// An empty page.
    Empty,
    /// The last page again.
    LastPage,
    /// `404` with an error body.
    NotFound,
}

/// A one-shot misbehaviour, applied to the next request (any endpoint).
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer with this status and an unknown-shaped body.
    Status { code: u16, retry_after: Option<u64> },
    /// Answer 200 with a body that is not JSON.
    Garbage,
    /// Answer 200 with a record lacking `_id`.
    MissingId,
    /// Answer 200 with a record whose `createdAt` is unparsable.
    BadCreatedAt,
    /// Answer normally after this delay.
    Delay(Duration),
    /// Answer 200 with a JSON-looking body of this many bytes, streamed
    /// without a length (a body that never ends, as far as a client knows).
    Huge(u64),
    /// Answer 200 and send a valid empty page one byte a second.
    Slow,
    /// Accept the request and not answer for an hour.
    Hang,
    /// Answer 200 with exactly this body.
    Raw(String),
}

/// Start-up settings.
#[derive(Debug, Clone)]
pub struct SimOptions {
    pub token: String,
    pub seed: u64,
    /// User-activity records spread over `backlog_span` before now.
    pub user_backlog: usize,
    /// Token-activity records spread over `backlog_span` before now.
    pub token_backlog: usize,
    pub backlog_span: Duration,
    /// The backlog ends this long before now. Records of the current minute
    /// are only fetched once the minute is over, so tests that expect the
    /// whole backlog in one run keep it a few minutes in the past.
    pub backlog_age: Duration,
    pub end_bound: EndBound,
    /// Serve at most this many records a page, whatever `page_size` says.
    pub page_cap: Option<usize>,
    /// Pretty-print bodies (records span several lines).
    pub pretty: bool,
    /// Added to the server's clock, in ms (positive: server ahead of us).
    pub skew_ms: i64,
    /// Per-request delay, for slow-server tests.
    pub latency: Duration,
    /// Serve the first page whatever `page` asks for (a broken server).
    pub ignore_page: bool,
    /// How a `page` past the last is answered (the real API's choice is unknown).
    pub past_end: PastEnd,
    /// An order that is not stable between requests: on every other
    /// request, the records on either side of each page boundary trade
    /// places, so paging serves one of them twice and skips the other.
    pub unstable_order: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            token: "sim-token-0123456789".into(),
            seed: 42,
            user_backlog: 0,
            token_backlog: 0,
            backlog_span: Duration::from_secs(3 * 86_400),
            backlog_age: Duration::from_secs(180),
            end_bound: EndBound::MinuteInclusive,
            page_cap: None,
            pretty: false,
            skew_ms: 0,
            latency: Duration::ZERO,
            ignore_page: false,
            past_end: PastEnd::Empty,
            unstable_order: false,
        }
    }
}

/// One generated record: fields as (name, raw JSON value) in order.
#[derive(Debug, Clone)]
struct SimRecord {
    id: String,
    created: i64,
    fields: Vec<(&'static str, String)>,
}

impl SimRecord {
    fn compact(&self) -> String {
        let parts: Vec<String> = self.fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        format!("{{{}}}", parts.join(","))
    }
    fn pretty(&self) -> String {
        let parts: Vec<String> = self.fields.iter().map(|(k, v)| format!("      \"{k}\": {v}")).collect();
        format!("{{\n{}\n    }}", parts.join(",\n"))
    }
    fn field(&self, name: &str) -> Option<String> {
        self.fields.iter().find(|(k, _)| *k == name).and_then(|(_, v)| serde_json::from_str::<String>(v).ok())
    }
}

struct SimState {
    opts: SimOptions,
    rng: u64,
    counter: u64,
    /// Sorted by `created` ascending.
    user: Vec<SimRecord>,
    tokens: Vec<SimRecord>,
    faults: VecDeque<Fault>,
    /// After each v2 page served, add this many user records aged this many ms.
    insert_while_paging: Option<(usize, i64)>,
    /// Every n-th request fails with this status (demo noise).
    fail_every: Option<(u64, u16)>,
    requests: u64,
    /// Raw records appended to every first v2 page (a server that ignores its own bounds).
    extra: Vec<String>,
}

/// A running simulator; dropping it does not stop it, `shutdown` does.
#[derive(Clone)]
pub struct Simulator {
    addr: SocketAddr,
    state: Arc<Mutex<SimState>>,
    cancel: CancellationToken,
    token: String,
    app: Router,
    /// Cancels the current listener (see `go_down`).
    listening: Arc<Mutex<CancellationToken>>,
}

#[derive(Clone)]
struct AppState(Arc<Mutex<SimState>>);

impl Simulator {
    /// Start serving on `127.0.0.1:0`.
    pub async fn start(opts: SimOptions) -> anyhow::Result<Simulator> {
        Self::start_on("127.0.0.1:0".parse()?, opts).await
    }

    /// Start serving on `addr`.
    pub async fn start_on(addr: SocketAddr, opts: SimOptions) -> anyhow::Result<Simulator> {
        let token = opts.token.clone();
        let mut st = SimState {
            rng: opts.seed ^ 0x9E37_79B9_7F4A_7C15,
            counter: 0,
            user: Vec::new(),
            tokens: Vec::new(),
            faults: VecDeque::new(),
            insert_while_paging: None,
            fail_every: None,
            requests: 0,
            extra: Vec::new(),
            opts,
        };
        let now = st.now() - st.opts.backlog_age.as_millis() as i64;
        let span = st.opts.backlog_span.as_millis() as i64;
        for i in 0..st.opts.user_backlog {
            let created = now - span + (span * i as i64) / st.opts.user_backlog.max(1) as i64;
            let r = st.gen_user(created);
            st.user.push(r);
        }
        for i in 0..st.opts.token_backlog {
            let created = now - span + (span * i as i64) / st.opts.token_backlog.max(1) as i64;
            let r = st.gen_token(created);
            st.tokens.push(r);
        }
        st.user.sort_by_key(|r| r.created);
        st.tokens.sort_by_key(|r| r.created);
        let state = Arc::new(Mutex::new(st));
        let app = Router::new()
            .route("/api/v2/logs/audit/user", get(v2_user))
            .route("/api/v1/logs/user/actions", get(v1_actions))
            .route("/api/v1/logs/user/tokens", get(v1_tokens))
            .with_state(AppState(state.clone()));
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let cancel = CancellationToken::new();
        let listening = cancel.child_token();
        serve(listener, app.clone(), listening.clone());
        Ok(Simulator { addr, state, cancel, token, app, listening: Arc::new(Mutex::new(listening)) })
    }

    /// Close the listening socket and every open connection: clients get
    /// "connection refused" until `come_back`.
    pub fn go_down(&self) {
        self.listening.lock().unwrap_or_else(|p| p.into_inner()).cancel();
    }

    /// Listen again on the same address after `go_down`.
    pub async fn come_back(&self) -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind(self.addr).await?;
        let token = self.cancel.child_token();
        *self.listening.lock().unwrap_or_else(|p| p.into_inner()) = token.clone();
        serve(listener, self.app.clone(), token);
        Ok(())
    }

    /// Append these raw records to every first page of v2 user activity,
    /// whatever the query's bounds (empty: stop).
    pub fn set_extra(&self, records: Vec<String>) {
        self.st().extra = records;
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    pub fn shutdown(&self) {
        self.cancel.cancel();
    }

    fn st(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Add `n` user-activity records created at `created` (ms); returns their ids.
    pub fn add_user_at(&self, n: usize, created: i64) -> Vec<String> {
        let mut st = self.st();
        (0..n).map(|_| st.insert_user(created)).collect()
    }

    /// Add a user-activity record created at `created` whose fields named in
    /// `overrides` take the given raw JSON values (added when new); returns its id.
    pub fn add_user_with(&self, created: i64, overrides: &[(&'static str, String)]) -> String {
        let mut st = self.st();
        let mut r = st.gen_user(created);
        for (k, v) in overrides {
            match r.fields.iter_mut().find(|(f, _)| f == k) {
                Some(slot) => slot.1 = v.clone(),
                None => r.fields.push((k, v.clone())),
            }
        }
        let id = r.id.clone();
        let pos = st.user.partition_point(|x| x.created <= created);
        st.user.insert(pos, r);
        id
    }

    /// Add `n` token-activity records created at `created` (ms); returns their ids.
    pub fn add_token_at(&self, n: usize, created: i64) -> Vec<String> {
        let mut st = self.st();
        (0..n).map(|_| st.insert_token(created)).collect()
    }

    /// The server's clock, in ms.
    pub fn now(&self) -> i64 {
        self.st().now()
    }

    /// Queue a one-shot fault for the next request.
    pub fn push_fault(&self, f: Fault) {
        self.st().faults.push_back(f);
    }

    /// Drop every queued fault.
    pub fn clear_faults(&self) {
        self.st().faults.clear();
    }

    /// After each v2 page served, add `n` user records created `age_ms` before now.
    pub fn set_insert_while_paging(&self, n: usize, age_ms: i64) {
        self.st().insert_while_paging = (n > 0).then_some((n, age_ms));
    }

    /// Make every `n`-th request fail with `status`.
    pub fn set_fail_every(&self, n: u64, status: u16) {
        self.st().fail_every = (n > 0).then_some((n, status));
    }

    /// Accept only this token from now on (token rotation).
    pub fn set_token(&self, token: &str) {
        self.st().opts.token = token.to_string();
    }

    pub fn set_end_bound(&self, b: EndBound) {
        self.st().opts.end_bound = b;
    }

    pub fn set_skew_ms(&self, ms: i64) {
        self.st().opts.skew_ms = ms;
    }

    /// Serve the first page whatever `page` asks for, or stop doing so.
    pub fn set_ignore_page(&self, on: bool) {
        self.st().opts.ignore_page = on;
    }

    /// Requests served so far.
    pub fn requests(&self) -> u64 {
        self.st().requests
    }

    /// Every user-activity record as (id, compact JSON text).
    pub fn user_records(&self) -> Vec<(String, String)> {
        self.st().user.iter().map(|r| (r.id.clone(), r.compact())).collect()
    }

    /// Every token-activity record as (id, compact JSON text).
    pub fn token_records(&self) -> Vec<(String, String)> {
        self.st().tokens.iter().map(|r| (r.id.clone(), r.compact())).collect()
    }

    /// Add `per_tick` user records (and a token record every few ticks)
    /// every `every`, until shutdown or until the returned token is cancelled.
    pub fn start_trickle(&self, every: Duration, per_tick: usize) -> CancellationToken {
        let sim = self.clone();
        let stop = self.cancel.child_token();
        let done = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            let mut n = 0u64;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let now = sim.now();
                sim.add_user_at(per_tick, now);
                if n.is_multiple_of(3) {
                    sim.add_token_at(1, now);
                }
                n += 1;
            }
        });
        done
    }
}

const USERS: [(&str, &str); 6] = [
    ("5e1cbf251c26d68f7ce6361e", "support@opsera.io"),
    ("5f0a1b2c3d4e5f6071829304", "alice.nguyen@example.com"),
    ("5f0a1b2c3d4e5f6071829305", "bob.okafor@example.com"),
    ("5f0a1b2c3d4e5f6071829306", "carla.rossi@example.com"),
    ("5f0a1b2c3d4e5f6071829307", "dmitri.ivanov@example.com"),
    ("5f0a1b2c3d4e5f6071829308", "eve.security@example.com"),
];
const TYPES: [&str; 6] = ["pipeline", "tool", "task", "dashboard", "user", "token"];
const ACTIONS: [&str; 6] = ["create", "update", "delete", "run", "login", "view"];
const SECONDARY: [&str; 4] = ["user_profile", "settings", "access_roles", "workflow"];
const SCOPES: [&str; 3] = ["api", "pipeline", "security_logs"];
const TARGETS: [&str; 4] = ["/v1/logs/user/tokens", "/v2/logs/audit/user", "/v1/logs/user/actions", "/v2/pipelines"];

impl SimState {
    fn now(&self) -> i64 {
        now_ms() + self.opts.skew_ms
    }

    fn next(&mut self) -> u64 {
        // splitmix64
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[(self.next() % xs.len() as u64) as usize]
    }

    fn object_id(&mut self, created: i64) -> String {
        self.counter += 1;
        let secs = (created / 1000).clamp(0, u32::MAX as i64) as u32;
        format!("{secs:08x}{:08x}{:08x}", (self.next() as u32), self.counter as u32)
    }

    fn gen_user(&mut self, created: i64) -> SimRecord {
        let id = self.object_id(created);
        let (uid, email) = self.pick(&USERS);
        let ty = self.pick(&TYPES);
        let action = self.pick(&ACTIONS);
        let secondary = self.pick(&SECONDARY);
        let target = self.object_id(created);
        let ts = json_str(&fmt_rfc3339(created));
        let mut fields = vec![
            ("_id", json_str(&id)),
            ("user_id", json_str(uid)),
            ("user_email", json_str(email)),
            ("type", json_str(ty)),
            ("action", json_str(action)),
            ("secondary_action", json_str(secondary)),
            ("target_id", json_str(&target)),
            ("account", json_str("org-opsera-dnd-acc0")),
            ("createdAt", ts.clone()),
            ("updatedAt", ts),
            ("__v", "0".into()),
        ];
        match self.counter % 13 {
            3 => fields.push(("details", json_str("changed \"name\"\nfrom C:\\old to ✓ ümlaut\ttab"))),
            7 => fields.push(("ratio", "1.50".into())),
            11 => fields.push(("description", json_str(&"long value ".repeat(40)))),
            _ => {}
        }
        SimRecord { id, created, fields }
    }

    fn gen_token(&mut self, created: i64) -> SimRecord {
        let id = self.object_id(created);
        let token_id = self.object_id(created);
        let (uid, _) = self.pick(&USERS);
        let scope = self.pick(&SCOPES);
        let target = self.pick(&TARGETS);
        let ts = json_str(&fmt_rfc3339(created));
        let fields = vec![
            ("_id", json_str(&id)),
            ("token_id", json_str(&token_id)),
            ("scope", json_str(scope)),
            ("target", json_str(target)),
            ("user_id", json_str(uid)),
            ("account", json_str("org-opsera-dnd-acc0")),
            ("createdAt", ts.clone()),
            ("updatedAt", ts),
            ("__v", "0".into()),
        ];
        SimRecord { id, created, fields }
    }

    fn insert_user(&mut self, created: i64) -> String {
        let r = self.gen_user(created);
        let id = r.id.clone();
        let pos = self.user.partition_point(|x| x.created <= created);
        self.user.insert(pos, r);
        id
    }

    fn insert_token(&mut self, created: i64) -> String {
        let r = self.gen_token(created);
        let id = r.id.clone();
        let pos = self.tokens.partition_point(|x| x.created <= created);
        self.tokens.insert(pos, r);
        id
    }

    fn render(&self, count: usize, records: &[&SimRecord]) -> String {
        if self.opts.pretty {
            let items: Vec<String> = records.iter().map(|r| format!("    {}", r.pretty())).collect();
            format!("{{\n  \"count\": {count},\n  \"data\": [\n{}\n  ]\n}}\n", items.join(",\n"))
        } else {
            let items: Vec<String> = records.iter().map(|r| r.compact()).collect();
            format!("{{\"count\":{count},\"data\":[{}]}}", items.join(","))
        }
    }
}

fn serve(listener: tokio::net::TcpListener, app: Router, stop: CancellationToken) {
    tokio::spawn(async move {
        // On `stop` the listener closes and idle connections are closed.
        let _ = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
    });
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

type Params = Query<Vec<(String, String)>>;

fn param<'a>(p: &'a [(String, String)], k: &str) -> Option<&'a str> {
    p.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str())
}

fn json_error(code: StatusCode, msg: &str) -> Response {
    (code, [(header::CONTENT_TYPE, "application/json")], format!("{{\"message\":{}}}", json_str(msg))).into_response()
}

fn ok_json(body: String) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Auth, request counting and one-shot faults: `Err` is the response to send instead.
async fn gate(state: &AppState, headers: &HeaderMap) -> Result<(), Response> {
    let (delay, fault, token) = {
        let mut st = state.0.lock().unwrap_or_else(|p| p.into_inner());
        st.requests += 1;
        let mut fault = st.faults.pop_front();
        if fault.is_none()
            && let Some((n, code)) = st.fail_every
            && st.requests.is_multiple_of(n)
        {
            fault = Some(Fault::Status { code, retry_after: (code == 429).then_some(1) });
        }
        (st.opts.latency, fault, st.opts.token.clone())
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let want = format!("Bearer {token}");
    if headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) != Some(want.as_str()) {
        return Err(json_error(StatusCode::UNAUTHORIZED, "Unauthorized: invalid or missing API token"));
    }
    match fault {
        None => Ok(()),
        Some(Fault::Delay(d)) => {
            tokio::time::sleep(d).await;
            Ok(())
        }
        Some(Fault::Status { code, retry_after }) => {
            let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut resp = (code, "upstream trouble").into_response();
            if let Some(s) = retry_after
                && let Ok(v) = HeaderValue::from_str(&s.to_string())
            {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
            Err(resp)
        }
        Some(Fault::Garbage) => Err(ok_json("<html><body>502 Bad Gateway</body></html>".into())),
        Some(Fault::MissingId) => Err(ok_json(
            r#"{"count":2,"data":[{"_id":"61042540e1d666c9ded178c4","createdAt":"2021-07-30T16:13:52.109Z"},{"createdAt":"2021-07-30T16:13:52.109Z"}]}"#.into(),
        )),
        Some(Fault::Huge(total)) => {
            let chunk = axum::body::Bytes::from(vec![b'a'; 64 * 1024]);
            let head = axum::body::Bytes::from_static(b"{\"count\":1,\"data\":[{\"_id\":\"x\",\"note\":\"");
            let n = total / chunk.len() as u64;
            let body = futures_util::stream::iter(
                std::iter::once(head).chain((0..n).map(move |_| chunk.clone())).map(Ok::<_, std::io::Error>),
            );
            Err(([(header::CONTENT_TYPE, "application/json")], axum::body::Body::from_stream(body)).into_response())
        }
        Some(Fault::Slow) => {
            let body = futures_util::stream::unfold(0usize, |i| async move {
                let text = b"{\"count\":0,\"data\":[]}";
                if i >= text.len() {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Some((Ok::<_, std::io::Error>(axum::body::Bytes::copy_from_slice(&text[i..=i])), i + 1))
            });
            Err(([(header::CONTENT_TYPE, "application/json")], axum::body::Body::from_stream(body)).into_response())
        }
        Some(Fault::Hang) => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Err(json_error(StatusCode::GATEWAY_TIMEOUT, "hung"))
        }
        Some(Fault::Raw(body)) => Err(ok_json(body)),
        Some(Fault::BadCreatedAt) => Err(ok_json(
            r#"{"count":1,"data":[{"_id":"61042540e1d666c9ded178c5","createdAt":"not a time"}]}"#.into(),
        )),
    }
}

fn parse_date(s: &str) -> Option<i64> {
    if s.len() != 10 {
        return None;
    }
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc().timestamp_millis())
}

/// `HH:mm` per `^([01]?[0-9]|2[0-3]):[0-5][0-9]$`, as ms after midnight.
fn parse_hhmm(s: &str) -> Option<i64> {
    let (h, m) = s.split_once(':')?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 || !h.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
    (h <= 23 && m <= 59).then_some(h * 60 * MINUTE + m * MINUTE)
}

fn bound(p: &[(String, String)], date_key: &str, time_key: &str, default_time: i64) -> Result<Option<i64>, String> {
    let date = match param(p, date_key) {
        None => {
            if param(p, time_key).is_some() {
                return Err(format!("{time_key} needs {date_key}"));
            }
            return Ok(None);
        }
        Some(d) => parse_date(d).ok_or_else(|| format!("{date_key} must be YYYY-MM-DD"))?,
    };
    let time = match param(p, time_key) {
        None => default_time,
        Some(t) => parse_hhmm(t).ok_or_else(|| format!("{time_key} must be HH:mm"))?,
    };
    Ok(Some(date + time))
}

async fn v2_user(State(state): State<AppState>, headers: HeaderMap, Query(p): Params) -> Response {
    if let Err(r) = gate(&state, &headers).await {
        return r;
    }
    let page: usize = match param(&p, "page").map(str::parse) {
        None => 1,
        Some(Ok(n)) if n >= 1 => n,
        _ => return json_error(StatusCode::BAD_REQUEST, "page must be an integer >= 1"),
    };
    let page_size: usize = match param(&p, "page_size").map(str::parse) {
        None => 100,
        Some(Ok(n)) if (1..=1000).contains(&n) => n,
        _ => {
            return json_error(StatusCode::BAD_REQUEST, "page_size must be an integer from 1 to 1000");
        }
    };
    let start = match bound(&p, "start_date", "start_time", 0) {
        Ok(v) => v,
        Err(m) => return json_error(StatusCode::BAD_REQUEST, &m),
    };
    let end = match bound(&p, "end_date", "end_time", DAY - MINUTE) {
        Ok(v) => v,
        Err(m) => return json_error(StatusCode::BAD_REQUEST, &m),
    };
    let filters: Vec<(&str, &str)> = ["type", "action", "secondary_action", "user_id", "user_email", "target_id"]
        .into_iter()
        .filter_map(|k| param(&p, k).map(|v| (k, v)))
        .collect();
    let mut st = state.0.lock().unwrap_or_else(|p| p.into_inner());
    let end_excl = end.map(|e| match st.opts.end_bound {
        EndBound::MinuteInclusive => e + MINUTE,
        EndBound::Exclusive => e,
    });
    let mut matching: Vec<&SimRecord> = st
        .user
        .iter()
        .rev()
        .filter(|r| start.is_none_or(|s| r.created >= s) && end_excl.is_none_or(|e| r.created < e))
        .filter(|r| filters.iter().all(|(k, v)| r.field(k).as_deref() == Some(*v)))
        .collect();
    let size = st.opts.page_cap.map_or(page_size, |c| c.min(page_size));
    if st.opts.unstable_order && st.requests % 2 == 1 {
        for edge in (size..matching.len()).step_by(size) {
            matching.swap(edge - 1, edge);
        }
    }
    let page = if st.opts.ignore_page { 1 } else { page };
    let mut from = (page - 1).saturating_mul(size).min(matching.len());
    if from == matching.len() && page > 1 {
        match st.opts.past_end {
            PastEnd::Empty => {}
            PastEnd::LastPage => from = from.saturating_sub(1) / size * size,
            PastEnd::NotFound => return json_error(StatusCode::NOT_FOUND, "page out of range"),
        }
    }
    let to = (from + size).min(matching.len());
    let extra: &[String] = if page == 1 { &st.extra } else { &[] };
    let body = with_extra(st.render(matching.len() + extra.len(), &matching[from..to]), extra);
    if let Some((n, age)) = st.insert_while_paging {
        let at = st.now() - age;
        for _ in 0..n {
            st.insert_user(at);
        }
    }
    ok_json(body)
}

/// `body` (a rendered page whose count already includes them) with `extra`
/// raw records added at the end of `data`.
fn with_extra(body: String, extra: &[String]) -> String {
    if extra.is_empty() {
        return body;
    }
    let (Some(close), Some(open)) = (body.rfind(']'), body.find('[')) else { return body };
    let sep = if body[open + 1..close].trim().is_empty() { "" } else { "," };
    format!("{}{sep}{}{}", &body[..close], extra.join(","), &body[close..])
}

fn v1_day(p: &[(String, String)], now: i64) -> Result<(i64, i64), String> {
    match param(p, "date") {
        Some(d) => parse_date(d).map(|s| (s, s + DAY)).ok_or_else(|| "date must be YYYY-MM-DD".to_string()),
        None => Ok((now - 7 * DAY, i64::MAX)),
    }
}

async fn v1_actions(State(state): State<AppState>, headers: HeaderMap, Query(p): Params) -> Response {
    if let Err(r) = gate(&state, &headers).await {
        return r;
    }
    let cap: usize = match param(&p, "count").map(str::parse::<usize>) {
        None => 1000,
        Some(Ok(n)) if n >= 1 => n.min(1000),
        _ => return json_error(StatusCode::BAD_REQUEST, "count must be a positive integer"),
    };
    let st = state.0.lock().unwrap_or_else(|p| p.into_inner());
    let (from, to) = match v1_day(&p, st.now()) {
        Ok(v) => v,
        Err(m) => return json_error(StatusCode::BAD_REQUEST, &m),
    };
    let ty = param(&p, "type");
    let out: Vec<&SimRecord> = st
        .user
        .iter()
        .rev()
        .filter(|r| r.created >= from && r.created < to)
        .filter(|r| ty.is_none_or(|t| r.field("type").as_deref() == Some(t)))
        .take(cap)
        .collect();
    ok_json(st.render(out.len(), &out))
}

async fn v1_tokens(State(state): State<AppState>, headers: HeaderMap, Query(p): Params) -> Response {
    if let Err(r) = gate(&state, &headers).await {
        return r;
    }
    let st = state.0.lock().unwrap_or_else(|p| p.into_inner());
    let (from, to) = match v1_day(&p, st.now()) {
        Ok(v) => v,
        Err(m) => return json_error(StatusCode::BAD_REQUEST, &m),
    };
    let scope = param(&p, "scope");
    let out: Vec<&SimRecord> = st
        .tokens
        .iter()
        .rev()
        .filter(|r| r.created >= from && r.created < to)
        .filter(|r| scope.is_none_or(|s| r.field("scope").as_deref() == Some(s)))
        .take(1000)
        .collect();
    ok_json(st.render(out.len(), &out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hhmm_follows_the_documented_pattern() {
        assert_eq!(parse_hhmm("00:00"), Some(0));
        assert_eq!(parse_hhmm("9:05"), Some(9 * 60 * MINUTE + 5 * MINUTE));
        assert_eq!(parse_hhmm("23:59"), Some(23 * 60 * MINUTE + 59 * MINUTE));
        assert_eq!(parse_hhmm("24:00"), None);
        assert_eq!(parse_hhmm("12:5"), None);
        assert_eq!(parse_hhmm("ab:cd"), None);
    }
}
