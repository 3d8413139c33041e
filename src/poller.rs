//! The per-stream poll loop: checkpoint → window → pages → store.
//!
//! Each poll reads one window (v2) or a run of whole UTC days (v1), stores
//! its pages as they arrive (a v2 window's pages in groups of those that
//! follow each other closely, one transaction a group; a v1 day in one),
//! and only when the whole window is stored moves the
//! watermark. A failed poll leaves the
//! checkpoint where it was, so the next poll asks for the same span again;
//! dedup makes that harmless. Polls of one stream never overlap: one task
//! runs them one after another.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::{StreamConfig, StreamKind};
use crate::opsera::{ApiError, Client, CountMeaning, Record};
use crate::store::{IngestStats, PageIn, Store, StoreError};
use crate::window::{self, MINUTE, Window, fmt_date, fmt_rfc3339, fmt_time, now_ms};

/// The v1 endpoints return at most this many records a call.
pub const V1_CAP: usize = 1000;
/// How paging a window ended.
enum Paged {
    /// Every page read and stored; the newest `createdAt` stored.
    Complete(PollReport, Option<i64>),
    /// The window is to be polled in narrower spans (what was read is stored).
    Narrow(PollReport, Narrow),
}

/// Why a window is polled in narrower spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Narrow {
    /// It has more than `max_pages` pages.
    TooManyPages,
    /// Paged twice, the unique records received differed from the server's
    /// count both times (records served twice and others skipped across
    /// pages: an order that is not stable between requests).
    Unsettled,
}

/// Pages fetched ahead (queued, or being fetched) while an earlier one is
/// stored. The storer adds each page to a group as it takes it and holds
/// none of them (see `Store::ingest_stream`), so one ahead keeps it busy in
/// a backfill; two ahead held about 1.6 MB more at the peak, past the bound
/// of 20 % over a small backfill's.
const QUEUED_PAGES: usize = 1;

#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cancelled")]
    Cancelled,
}

impl PollError {
    /// True when the token is the problem (exit 77 rather than 75).
    pub fn is_auth(&self) -> bool {
        matches!(self, PollError::Api(ApiError::Auth { .. }))
    }
}

/// What one poll did.
#[derive(Debug, Default, Clone, Copy)]
pub struct PollReport {
    pub requests: u32,
    pub fetched: u64,
    pub new: u64,
    pub duplicate: u64,
    pub truncated_days: u32,
    pub watermark: Option<i64>,
}

impl PollReport {
    /// Add what a part of the poll did (the watermark is set by the caller).
    fn add(&mut self, part: &PollReport) {
        self.requests += part.requests;
        self.fetched += part.fetched;
        self.new += part.new;
        self.duplicate += part.duplicate;
        self.truncated_days += part.truncated_days;
    }

    /// Log the finished poll.
    fn done(self, stream: &str) -> Self {
        info!(
            stream,
            requests = self.requests,
            fetched = self.fetched,
            new = self.new,
            duplicate = self.duplicate,
            watermark = %self.watermark.map(fmt_rfc3339).unwrap_or_else(|| "none".into()),
            "Poll complete."
        );
        self
    }
}

/// A record id's hash, to compare a page with the one before it.
fn id_hash(id: &str) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(id)
}

/// Records whose `createdAt` lies outside the window they were returned
/// for are stored (their `_id` is what dedup trusts) but reported: a
/// future time means the API's clock is ahead of this host's or the data
/// is wrong; an earlier one, a server that does not honour its bounds.
fn warn_out_of_window(records: &[Record], from: i64, to: i64, now: i64) {
    let future = records.iter().filter(|r| r.created > now + 5 * MINUTE).map(|r| r.created).max();
    if let Some(latest) = future {
        warn!(
            latest = %fmt_rfc3339(latest),
            "The API returned records created in the future (is this host's clock behind the API's?); they are kept, \
             and the watermark does not pass the polled window."
        );
    }
    let outside = records
        .iter()
        .filter(|r| r.created < from - MINUTE || (r.created >= to + MINUTE && r.created <= now + 5 * MINUTE))
        .count();
    if outside > 0 {
        warn!(
            records = outside,
            from = %fmt_rfc3339(from),
            to = %fmt_rfc3339(to),
            "The API returned records created outside the requested window; they are kept and deduplicated by _id."
        );
    }
}

/// `n` records of `stream` were stored, with these results: counted, and
/// the poll's progress noted.
fn stored(stream: &str, n: u64, st: &IngestStats) {
    crate::health::Health::get().poll_progress(stream);
    let m = crate::metrics::get();
    let label = crate::metrics::stream(stream);
    m.records_fetched.get_or_create(&label).inc_by(n);
    m.records_stored.get_or_create(&label).inc_by(st.new);
    m.records_duplicate.get_or_create(&label).inc_by(st.duplicate);
}

/// Bounds on the journal; pollers wait while it is over either.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_records: u64,
    pub max_bytes: u64,
}

/// Polls one stream.
pub struct Poller {
    stream: StreamConfig,
    client: Client,
    store: Store,
    limits: Limits,
}

impl Poller {
    pub fn new(stream: StreamConfig, client: Client, store: Store, limits: Limits) -> Self {
        Self { stream, client, store, limits }
    }

    pub fn stream(&self) -> &StreamConfig {
        &self.stream
    }

    /// Poll until cancelled, one poll per interval; failures are logged,
    /// recorded in the store, and retried at the next interval.
    pub async fn run(self, cancel: CancellationToken) {
        let interval = self.stream.interval;
        let health = crate::health::Health::get();
        let loop_name = format!("poller {}", self.stream.name);
        loop {
            let started = tokio::time::Instant::now();
            health.busy(&loop_name);
            let result = self.poll_once(&cancel).await;
            health.idle(&loop_name);
            match result {
                Ok(_) | Err(PollError::Cancelled) => {}
                Err(error) => {
                    warn!(stream = %self.stream.name, %error, "Poll failed; the next poll retries the same span.");
                    if let Err(e) = self.store.record_poll_error(&self.stream.name, now_ms(), error.to_string()).await {
                        warn!(stream = %self.stream.name, error = %e, "Could not record the poll error.");
                    }
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep_until(started + interval) => {}
            }
        }
    }

    /// One poll of the stream up to now (recorded in metrics and health).
    pub async fn poll_once(&self, cancel: &CancellationToken) -> Result<PollReport, PollError> {
        let started = std::time::Instant::now();
        let label = crate::metrics::stream(&self.stream.name);
        let m = crate::metrics::get();
        let result = self.poll_inner(cancel).await;
        m.poll_duration.get_or_create(&label).observe(started.elapsed().as_secs_f64());
        let health = crate::health::Health::get();
        match &result {
            Ok(_) => {
                m.polls.get_or_create(&label).inc();
                health.poll_ok(&self.stream.name);
            }
            Err(PollError::Cancelled) => {}
            Err(e) => {
                m.poll_errors.get_or_create(&label).inc();
                health.poll_failed(&self.stream.name, &e.to_string(), e.is_auth());
            }
        }
        result
    }

    async fn poll_inner(&self, cancel: &CancellationToken) -> Result<PollReport, PollError> {
        let cp = self.store.checkpoint(&self.stream.name).await?;
        let span = info_span!(
            "poll",
            stream = %self.stream.name,
            watermark = %cp.watermark.map(fmt_rfc3339).unwrap_or_else(|| "none".into()),
        );
        let result = async {
            if self.stream.kind.is_daily() {
                self.poll_days(cp, cancel).await
            } else {
                self.poll_window(cp, cancel).await
            }
        }
        .instrument(span)
        .await;
        match result {
            Err(PollError::Api(ApiError::Cancelled)) => Err(PollError::Cancelled),
            other => other,
        }
    }

    fn ms(d: Duration) -> i64 {
        i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
    }

    /// Poll the v2 window from the checkpoint to the last whole minute. A
    /// window with more than `max_pages` pages, or one whose records did not
    /// add up to the server's count in two passes, is polled in narrower
    /// spans (halved until one fits, doubled again after each that did), one
    /// after the other, each completed (its watermark committed) before the
    /// next: completing it would move the watermark past the pages never read
    /// (the order is unknown), or past records skipped while paging.
    async fn poll_window(&self, cp: window::Checkpoint, cancel: &CancellationToken) -> Result<PollReport, PollError> {
        let s = &self.stream;
        let now = now_ms();
        let (overlap, lookback) = (Self::ms(s.overlap), Self::ms(s.initial_lookback));
        let whole = window::v2_window(cp, overlap, lookback, now);
        let mut report = PollReport::default();
        let (mut start, mut span) = (whole.start, None::<i64>);
        loop {
            let end = span.map_or(whole.end, |span| start.saturating_add(span).min(whole.end));
            let w = Window { start, end };
            // Spans of two minutes at least, so that each moves on by one.
            let narrower = window::floor_to((w.end - w.start) / 2, MINUTE).max(2 * MINUTE);
            let can_narrow = w.end - w.start > 2 * MINUTE;
            match self.page_window(w, now, can_narrow, cancel).await? {
                Paged::Complete(part, max_created) => {
                    report.add(&part);
                    report.watermark = self.complete(max_created, w.end, now).await?;
                    if w.end >= whole.end {
                        break;
                    }
                    // Whether the API's bounds are inclusive is unknown: the
                    // next span starts a minute before this one ended.
                    start = w.end - MINUTE;
                    // Spans grow again past a busy stretch.
                    span = span.map(|span| span.saturating_mul(2).min(whole.end - whole.start));
                }
                Paged::Narrow(part, why) => {
                    report.add(&part);
                    if !can_narrow {
                        return Err(PollError::Api(ApiError::BadResponse {
                            url: self.client.url(s.kind.path(), &self.query(w)),
                            reason: format!(
                                "more than {} pages (streams.{}.max_pages) in a window of a few minutes: the \
                                 server does not end the window, or the bound is too low; the checkpoint stays where \
                                 it is",
                                s.max_pages, s.name
                            ),
                        }));
                    }
                    let because = match why {
                        Narrow::TooManyPages => format!("it has more pages than streams.{}.max_pages", s.name),
                        Narrow::Unsettled => "its records did not add up to the server's count twice".to_string(),
                    };
                    warn!(
                        stream = %s.name,
                        from = %fmt_rfc3339(w.start),
                        to = %fmt_rfc3339(w.end),
                        span = %humantime::format_duration(Duration::from_millis(narrower as u64)),
                        "Polling the window in narrower spans: {because}."
                    );
                    span = Some(narrower);
                }
            }
        }
        Ok(report.done(&s.name))
    }

    /// The query for `w`, without `page`.
    fn query(&self, w: Window) -> Vec<(String, String)> {
        let s = &self.stream;
        let mut q: Vec<(String, String)> = vec![
            ("start_date".into(), fmt_date(w.start)),
            ("start_time".into(), fmt_time(w.start)),
            ("end_date".into(), fmt_date(w.end)),
            ("end_time".into(), fmt_time(w.end)),
            ("page_size".into(), s.page_size.to_string()),
        ];
        q.extend(s.filters.iter().cloned());
        q
    }

    /// Page the window `w` and store its records; its watermark is not
    /// moved. `can_narrow`: a window whose records do not add up may be
    /// polled in narrower spans (else it is completed with a warning).
    async fn page_window(
        &self,
        w: Window,
        now: i64,
        can_narrow: bool,
        cancel: &CancellationToken,
    ) -> Result<Paged, PollError> {
        let s = &self.stream;
        let base = self.query(w);
        let page_size = s.page_size as usize;
        let fetch = |page: u32| {
            let mut q = base.clone();
            q.push(("page".into(), page.to_string()));
            async move { self.client.fetch(s.kind.path(), &q, CountMeaning::Total, cancel).await }
        };
        // Pages go to a storer while the next ones are fetched; the storer
        // stores pages that follow each other closely as one group (one
        // transaction, one fsync of each file), so a backfill pays the
        // disk's latency a group at a time, not a page at a time. A page
        // takes a place in the queue before it is fetched, and gives it back
        // when the storer takes it.
        let places = Arc::new(tokio::sync::Semaphore::new(QUEUED_PAGES));
        let (queue, pages) = std::sync::mpsc::channel::<(PageIn, tokio::sync::OwnedSemaphorePermit)>();
        let unstored = Arc::new(AtomicU64::new(0));
        let window = (w.start, w.end + MINUTE);
        let storing = self.store_pages(pages, unstored.clone());
        // Page the window. Records shifting between pages (one written while
        // paging, or an order that is not stable between requests) change
        // the server's count or serve a record twice and skip another, so a
        // count that moved, or one that differs from the unique records
        // received, pages the window once more, and narrower after that.
        // Only the previous page's ids are kept (hashed), so memory does not
        // grow with the window. Why to narrow, if paging stopped early.
        let paging = async {
            let queue = queue;
            let mut requests = 0u32;
            for pass in 0..2 {
                let (mut received, mut unique) = (0u64, 0u64);
                let mut prev_ids: HashSet<u64> = HashSet::new();
                let (mut first_count, mut count, mut count_moved) = (None::<u64>, None::<u64>, false);
                let mut page = 1u32;
                loop {
                    self.wait_for_room(&unstored, cancel).await?;
                    // A place in the queue first: a page is not fetched
                    // only to be held until the storer takes it.
                    let slot = places.clone().acquire_owned().await.expect("the queue's places are never closed");
                    let current = match fetch(page).await {
                        Ok(current) => current,
                        // A server that refuses a page past the end, once
                        // every record it counted has arrived: the window is complete.
                        Err(ApiError::Rejected { status: 400 | 404 | 416, url, .. })
                            if page > 1 && count.is_some_and(|c| received >= c) =>
                        {
                            debug!(%url, "A page past the end was refused; the window is complete.");
                            requests += 1;
                            break;
                        }
                        Err(e) => return Err(e.into()),
                    };
                    requests += 1;
                    let n = current.records.len();
                    if let Some(c) = current.count {
                        count_moved |= first_count.is_some_and(|f| f != c);
                        first_count.get_or_insert(c);
                        count = Some(c);
                    }
                    received += n as u64;
                    // The page's ids, hashed: the same as the page before's (a
                    // server that ignores `page`), and how many are new since.
                    let ids: HashSet<u64> = current.records.iter().map(|r| id_hash(&r.id)).collect();
                    if n > 0 && ids == prev_ids {
                        // A server that answers a page past the end with its
                        // last page again: every record counted has arrived.
                        if count.is_some_and(|c| received - n as u64 >= c) {
                            received -= n as u64;
                            break;
                        }
                        // Completing the window would move the watermark past
                        // records never fetched: fail the poll instead, loudly.
                        return Err(PollError::Api(ApiError::BadResponse {
                            url: self.client.url(s.kind.path(), &base),
                            reason: format!(
                                "page {page} is the same as page {}: the server does not honour `page`, so the rest \
                                 of the window cannot be fetched; the checkpoint stays where it is",
                                page - 1
                            ),
                        }));
                    }
                    unique += ids.difference(&prev_ids).count() as u64;
                    prev_ids = ids;
                    let last = n == 0 || (n < page_size && count.is_none_or(|c| received >= c));
                    if n > 0 {
                        warn_out_of_window(&current.records, window.0, window.1, now);
                        unstored.fetch_add(n as u64, Ordering::Relaxed);
                        if queue.send((PageIn { records: current.records, window }, slot)).is_err() {
                            // The storer stopped, which only an error does: that error is the one reported.
                            return Ok((requests, None));
                        }
                    }
                    if last {
                        break;
                    }
                    // A count of more than the pages allowed can hold is
                    // known from the first page; a server that sends no
                    // count, or a wrong one, is stopped at the last page allowed.
                    let too_many = count.is_some_and(|c| c > u64::from(s.max_pages) * page_size as u64);
                    if page >= s.max_pages || (page == 1 && too_many) {
                        return Ok((requests, Some(Narrow::TooManyPages)));
                    }
                    page += 1;
                }
                let moved = count_moved || count.is_some_and(|c| c != unique);
                if moved {
                    if pass == 0 {
                        info!(count = ?count, received, unique, "Records moved while paging; paging the window again.");
                        continue;
                    }
                    // A window of one page cannot be read differently in parts.
                    if can_narrow && page > 1 {
                        return Ok((requests, Some(Narrow::Unsettled)));
                    }
                    warn!(
                        count = ?count,
                        received,
                        unique,
                        "Records received still differ from the server's count; the next poll's overlap picks up what was missed."
                    );
                }
                break;
            }
            Ok((requests, None))
        };
        // Whichever fails first ends the poll (a storer's error is the one
        // reported: paging just stops when it finds the queue closed); the
        // storer finishes once paging ends and closes the queue.
        let ((requests, narrow), (mut report, max_created)) = tokio::try_join!(paging, storing)?;
        report.requests = requests;
        Ok(match narrow {
            Some(why) => Paged::Narrow(report, why),
            None => Paged::Complete(report, max_created),
        })
    }

    async fn poll_days(&self, cp: window::Checkpoint, cancel: &CancellationToken) -> Result<PollReport, PollError> {
        let s = &self.stream;
        let now = now_ms();
        let (overlap, lookback) = (Self::ms(s.overlap), Self::ms(s.initial_lookback));
        let mut report = PollReport::default();
        let mut max_created: Option<i64> = None;
        for day in window::v1_days(cp, overlap, lookback, now) {
            self.wait_for_room(&AtomicU64::new(0), cancel).await?;
            let mut q: Vec<(String, String)> = vec![("date".into(), fmt_date(day))];
            if s.kind == StreamKind::UserActivityV1 {
                q.push(("count".into(), V1_CAP.to_string()));
            }
            q.extend(s.filters.iter().cloned());
            let p = self.client.fetch(s.kind.path(), &q, CountMeaning::Returned, cancel).await?;
            report.requests += 1;
            if p.records.len() >= V1_CAP {
                report.truncated_days += 1;
                warn!(
                    day = %fmt_date(day),
                    records = p.records.len(),
                    "TRUNCATED: the v1 endpoint returned its {V1_CAP}-record cap for this day, so records of it may be \
                     missing and cannot be fetched through v1{}.",
                    if s.kind == StreamKind::UserActivityV1 { " (use api = \"v2\" for user activity)" } else { "" }
                );
                self.store.count_truncated_day(&s.name).await?;
                crate::metrics::get().truncated_days.get_or_create(&crate::metrics::stream(&s.name)).inc();
            }
            self.ingest(p.records, (day, day + window::DAY), now, &mut report, &mut max_created).await?;
        }
        report.watermark = self.complete(max_created, window::floor_to(now, MINUTE) - MINUTE, now).await?;
        Ok(report.done(&s.name))
    }

    /// Store the pages sent on `pages` (see `Store::ingest_stream`); what
    /// was stored, and the newest `createdAt`. `unstored` counts the
    /// records sent and not yet stored.
    async fn store_pages(
        &self,
        pages: std::sync::mpsc::Receiver<(PageIn, tokio::sync::OwnedSemaphorePermit)>,
        unstored: Arc<AtomicU64>,
    ) -> Result<(PollReport, Option<i64>), PollError> {
        let name = self.stream.name.clone();
        let st = self
            .store
            .ingest_stream(&self.stream.name, pages, move |n, st| {
                unstored.fetch_sub(n, Ordering::Relaxed);
                stored(&name, n, st);
            })
            .await?;
        let report =
            PollReport { fetched: st.new + st.duplicate, new: st.new, duplicate: st.duplicate, ..Default::default() };
        Ok((report, st.max_created))
    }

    /// Store one page that answered a query for `[from, to)`.
    async fn ingest(
        &self,
        records: Vec<Record>,
        (from, to): (i64, i64),
        now: i64,
        report: &mut PollReport,
        max: &mut Option<i64>,
    ) -> Result<(), PollError> {
        let n = records.len() as u64;
        report.fetched += n;
        if n == 0 {
            return Ok(());
        }
        warn_out_of_window(&records, from, to, now);
        let st = self.store.ingest(&self.stream.name, records, (from, to)).await?;
        stored(&self.stream.name, n, &st);
        report.new += st.new;
        report.duplicate += st.duplicate;
        *max = (*max).max(st.max_created);
        Ok(())
    }

    /// A window is fully stored: commit its watermark (the newest
    /// `createdAt` stored, capped at `polled_until`); the new watermark.
    async fn complete(&self, max_created: Option<i64>, polled_until: i64, now: i64) -> Result<Option<i64>, PollError> {
        let s = &self.stream;
        // A record stamped after the window (the API's clock ahead, or bad
        // data) must not carry the watermark past what was polled. The next
        // window starts at min(watermark, polled_until) either way; the cap
        // keeps the reported watermark honest.
        let max_created = max_created.map(|m| m.min(polled_until));
        let (daily, overlap, lookback) = (s.kind.is_daily(), Self::ms(s.overlap), Self::ms(s.initial_lookback));
        let cp = self
            .store
            .complete_window(&s.name, max_created, polled_until, now, move |cp| {
                window::prune_before(daily, cp, overlap, lookback, now)
            })
            .await?;
        Ok(cp.watermark)
    }

    /// Wait while the journal, plus `pending` records fetched but not yet
    /// stored (queued, or in a group not committed yet), is over its bounds
    /// (sinks are behind). With nothing in the journal or pending, a page
    /// may always come in, however large.
    async fn wait_for_room(&self, pending: &AtomicU64, cancel: &CancellationToken) -> Result<(), PollError> {
        let mut warned = false;
        loop {
            // Waking when the journal grows, too: a group committed turns pending records into journaled ones.
            let grew = self.store.journal_grew();
            let pending = pending.load(Ordering::Relaxed);
            let (records, bytes) = self.store.backlog();
            let max = self.limits.max_records;
            let fits = records + pending == 0 || if pending == 0 { records < max } else { records + pending <= max };
            if fits && bytes < self.limits.max_bytes {
                return Ok(());
            }
            if !warned {
                warn!(
                    stream = %self.stream.name,
                    records,
                    bytes,
                    pending,
                    "Journal is full (state.max_buffered_records / max_buffered_bytes); polling waits for the sinks to catch up."
                );
                warned = true;
            }
            tokio::select! {
                _ = cancel.cancelled() => return Err(PollError::Cancelled),
                _ = self.store.journal_shrank() => {}
                _ = grew => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}
