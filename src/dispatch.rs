//! The per-sink delivery loop: read the journal after the sink's cursor,
//! deliver a batch, and only then move the cursor.
//!
//! One task per sink, so a sink that is down holds back only itself; its
//! records wait in the journal. Retryable failures are retried with capped,
//! jittered backoff, forever (the journal's bounds make pollers wait
//! meanwhile), honouring a receiver's `Retry-After`. When a receiver refuses
//! the data, the batch is split until the refused record(s) are found; only
//! those go to dead letters, with the reason, and everything else is
//! delivered. Dead letters marked for retry (`dead-letters retry`) are sent
//! again by their sink.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::sink::{Batching, Sink, SinkError};
use crate::store::{FilePos, JournalRow, Store, StoreError};
use crate::window::now_ms;

/// How often an idle sink looks for dead letters marked for retry.
const RETRY_CHECK: Duration = Duration::from_secs(5);

/// How the dispatcher ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The drain target was reached.
    Drained,
    /// Cancelled (shutdown, or `once` ran out of time).
    Cancelled,
}

pub struct Dispatcher {
    name: String,
    streams: Arc<[String]>,
    store: Store,
    sink: Box<dyn Sink>,
    cursor: i64,
    batching: Batching,
    overhead: usize,
    min_delay: Duration,
    /// The reopen generation (SIGHUP count) last acted on.
    reopened: u64,
    /// Cursor commits that have not landed yet (see `commit`).
    unsaved: Unsaved,
}

/// Cursor commits not landed yet, for a sink that undoes uncommitted
/// deliveries (see `Dispatcher::commit`).
#[derive(Default)]
struct Unsaved {
    /// The commit in flight.
    in_flight: Option<InFlight>,
    /// Delivered since that commit started: the cursor and file position to commit next.
    next: Option<(i64, Option<FilePos>)>,
    /// How many batches `next` covers.
    batches: usize,
    /// The last commit that landed holds the sink's position in its current
    /// file, so the sink would undo what was delivered after it.
    position_landed: bool,
}

struct InFlight {
    task: tokio::task::JoinHandle<Option<()>>,
    /// It holds a file position.
    has_position: bool,
    /// How many batches it covers.
    batches: usize,
}

/// At most this many batches are delivered past the last commit that
/// landed: all that a crash can make the file sink cut and write again.
const MAX_UNSAVED_BATCHES: usize = 4;

/// What delivering a set of rows came to.
enum Delivered {
    /// Everything not listed in `refused` is delivered.
    Done {
        pos: Option<FilePos>,
        refused: Vec<(usize, String, Option<u16>)>,
    },
    Cancelled,
}

impl Dispatcher {
    /// A dispatcher starting after `cursor`.
    pub fn new(name: String, streams: Vec<String>, store: Store, sink: Box<dyn Sink>, cursor: i64) -> Self {
        let batching = sink.batching();
        let overhead = sink.record_overhead();
        Self {
            name,
            streams: Arc::from(streams),
            store,
            sink,
            cursor,
            batching,
            overhead,
            min_delay: Duration::from_millis(200),
            reopened: 0,
            unsaved: Unsaved::default(),
        }
    }

    /// Deliver until cancelled, or until the cursor reaches the `drain` target
    /// once one is set. `reopen` changes ask the sink to reopen its files.
    pub async fn run(
        mut self,
        cancel: CancellationToken,
        mut drain: watch::Receiver<Option<i64>>,
        mut reopen: watch::Receiver<u64>,
    ) -> Result<Exit, StoreError> {
        // A state database error (disk full, I/O) pauses delivery and is retried;
        // the loop starts again from the last committed cursor.
        let mut delay = Duration::from_millis(200);
        loop {
            let result = self.deliver_loop(&cancel, &mut drain, &mut reopen).await;
            if self.settle(&cancel).await.is_none() {
                return Ok(Exit::Cancelled);
            }
            match result {
                Ok(exit) => return Ok(exit),
                Err(error) => {
                    error!(sink = %self.name, %error, "State database error; delivery pauses and retries.");
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(Exit::Cancelled),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    async fn deliver_loop(
        &mut self,
        cancel: &CancellationToken,
        drain: &mut watch::Receiver<Option<i64>>,
        reopen: &mut watch::Receiver<u64>,
    ) -> Result<Exit, StoreError> {
        let cancel = cancel.clone();
        let mut partial_since: Option<tokio::time::Instant> = None;
        // Dead letters marked for retry are looked for first, then every RETRY_CHECK.
        let mut retry_check = tokio::time::Instant::now();
        loop {
            if cancel.is_cancelled() {
                return Ok(Exit::Cancelled);
            }
            // Compare generations: the idle wait below may already have marked the change as seen.
            let generation = *reopen.borrow_and_update();
            if generation != self.reopened {
                if self.settle(&cancel).await.is_none() {
                    return Ok(Exit::Cancelled);
                }
                // The reopened file's position is committed before its first batch (commit_position).
                self.unsaved.position_landed = false;
                self.reopened = generation;
                if let Err(e) = self.sink.reopen().await {
                    warn!(sink = %self.name, error = %e, "Reopen failed; retrying at the next delivery.");
                }
            }
            if tokio::time::Instant::now() >= retry_check {
                if self.retry_dead_letters(&cancel).await? == Exit::Cancelled {
                    return Ok(Exit::Cancelled);
                }
                retry_check = tokio::time::Instant::now() + RETRY_CHECK;
            }
            let store = self.store.clone();
            let grew = store.journal_grew();
            tokio::pin!(grew);
            grew.as_mut().enable();
            let b = self.batching;
            let batch = self
                .store
                .read_batch(self.cursor, self.streams.clone(), b.max_records, b.max_bytes, self.overhead)
                .await?;
            let target = *drain.borrow_and_update();
            let health = crate::health::Health::get();
            let loop_name = format!("sink {}", self.name);
            if batch.last_seq == self.cursor {
                if self.settle(&cancel).await.is_none() {
                    return Ok(Exit::Cancelled);
                }
                health.idle(&loop_name);
                if target.is_some_and(|t| self.cursor >= t) {
                    return Ok(Exit::Drained);
                }
                partial_since = None;
                // Nothing to deliver: wait for the journal to grow (only this
                // process writes it), a drain target or a reopen; every few
                // seconds, look for dead letters that `dead-letters retry`
                // (another process) marked. An idle sink costs a query per
                // RETRY_CHECK, nothing more.
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(Exit::Cancelled),
                        _ = &mut grew => break,
                        _ = drain.changed() => break,
                        _ = reopen.changed() => break,
                        _ = tokio::time::sleep_until(retry_check) => {
                            if !self.store.retry_requests(&self.name, 1).await?.is_empty() {
                                retry_check = tokio::time::Instant::now();
                                break;
                            }
                            retry_check = tokio::time::Instant::now() + RETRY_CHECK;
                        }
                    }
                }
                continue;
            }
            // A partial batch may wait up to batch_timeout for more records,
            // unless `once` is draining and nothing more is coming.
            let bytes: usize = batch.rows.iter().map(|r| r.body.len() + self.overhead).sum();
            let partial = !batch.rows.is_empty()
                && batch.rows.len() < b.max_records
                && bytes + 4096 < b.max_bytes
                && !b.timeout.is_zero()
                && target.is_none_or(|t| batch.last_seq < t);
            if partial {
                let deadline = *partial_since.get_or_insert_with(tokio::time::Instant::now) + b.timeout;
                if tokio::time::Instant::now() < deadline {
                    if self.settle(&cancel).await.is_none() {
                        return Ok(Exit::Cancelled);
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(Exit::Cancelled),
                        _ = &mut grew => {}
                        _ = drain.changed() => {}
                        _ = tokio::time::sleep_until(deadline) => {}
                    }
                    continue;
                }
            }
            partial_since = None;
            health.busy(&loop_name);
            let mut pos = None;
            if !batch.rows.is_empty() {
                if self.commit_position(&cancel).await.is_none() {
                    return Ok(Exit::Cancelled);
                }
                match self.deliver(&batch.rows, &cancel).await {
                    Delivered::Cancelled => return Ok(Exit::Cancelled),
                    Delivered::Done { pos: p, refused } => {
                        pos = p;
                        let m = crate::metrics::get();
                        let label = crate::metrics::sink(&self.name);
                        m.records_delivered.get_or_create(&label).inc_by((batch.rows.len() - refused.len()) as u64);
                        m.dead_letters.get_or_create(&label).inc_by(refused.len() as u64);
                        for (i, reason, status) in refused {
                            let row = &batch.rows[i];
                            error!(sink = %self.name, record = %row.id, %reason, "Receiver refused a record; it is kept in dead letters.");
                            let kept = persist(&self.name, &cancel, "a dead letter", || {
                                self.store.dead_letter(&self.name, row.clone(), reason.clone(), status, now_ms())
                            })
                            .await;
                            if kept.is_none() {
                                return Ok(Exit::Cancelled);
                            }
                        }
                    }
                }
                info!(sink = %self.name, records = batch.rows.len(), through_seq = batch.last_seq, "Delivered batch.");
            }
            // Keep the committed file position when nothing was written (rows of other streams only).
            if pos.is_none() {
                if self.settle(&cancel).await.is_none() {
                    return Ok(Exit::Cancelled);
                }
                pos = self.store.sink_cursor(&self.name).await?.file;
            }
            fault_delay_after_delivery().await;
            // Delivered: the cursor must now move, or the batch would be delivered twice.
            if self.commit(batch.last_seq, pos, &cancel).await.is_none() {
                return Ok(Exit::Cancelled);
            }
        }
    }

    /// Move the cursor to `seq` (with the sink's file position `pos`) after a
    /// delivery; `None` when cancelled first.
    ///
    /// Most sinks wait here until the commit lands, so a crash repeats at
    /// most the one batch whose commit it interrupted. A sink that undoes
    /// uncommitted deliveries (the file sink cuts its file back to the
    /// committed length on start) does not wait: while one commit is in
    /// flight the next batches are read and delivered, and the commit after
    /// it takes the newest cursor and position. Commits stay in order, and
    /// at most `MAX_UNSAVED_BATCHES` are delivered past the last that
    /// landed. That holds only while the last commit that landed has the
    /// position in the sink's current file (see `commit_position`);
    /// otherwise the batch waits for its commit.
    async fn commit(&mut self, seq: i64, pos: Option<FilePos>, cancel: &CancellationToken) -> Option<()> {
        self.cursor = seq;
        self.unsaved.next = Some((seq, pos));
        self.unsaved.batches += 1;
        let pipelined = self.sink.undoes_uncommitted() && self.unsaved.position_landed;
        let in_flight = self.unsaved.in_flight.as_ref().filter(|f| !f.task.is_finished()).map_or(0, |f| f.batches);
        if pipelined && in_flight > 0 && in_flight + self.unsaved.batches <= MAX_UNSAVED_BATCHES {
            return Some(());
        }
        self.land().await?;
        self.start_commit(cancel);
        if !pipelined {
            self.land().await?;
        }
        Some(())
    }

    /// Before the first delivery of a run, or the first after a reopen, into
    /// a sink that undoes uncommitted deliveries: commit where its file
    /// stands, so that a crash before the batch's own commit lands is cut
    /// off on start (with no position committed, or one in another file,
    /// nothing would be, and the batch would be written twice). A file that
    /// does not open is retried like a failed delivery. `None` when cancelled.
    async fn commit_position(&mut self, cancel: &CancellationToken) -> Option<()> {
        if !self.sink.undoes_uncommitted() || self.unsaved.position_landed {
            return Some(());
        }
        self.settle(cancel).await?;
        let mut delay = self.min_delay;
        let pos = loop {
            match self.sink.position().await {
                Ok(pos) => break pos,
                Err(e) => {
                    warn!(sink = %self.name, error = %e, delay_ms = delay.as_millis() as u64, "Output not ready; retrying.");
                    tokio::select! {
                        _ = cancel.cancelled() => return None,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        };
        if pos.is_some() {
            self.unsaved.next = Some((self.cursor, pos));
            self.settle(cancel).await?;
        }
        Some(())
    }

    /// Start committing what was delivered since the last commit started.
    fn start_commit(&mut self, cancel: &CancellationToken) {
        let Some((seq, pos)) = self.unsaved.next.take() else { return };
        let batches = std::mem::take(&mut self.unsaved.batches);
        let (store, name, cancel) = (self.store.clone(), self.name.clone(), cancel.clone());
        let task = tokio::spawn(async move {
            let moved = persist(&name, &cancel, "the cursor", || store.commit_cursor(&name, seq, pos, now_ms())).await;
            debug!(sink = %name, cursor = seq, "Cursor moved.");
            moved
        });
        self.unsaved.in_flight = Some(InFlight { task, has_position: pos.is_some(), batches });
    }

    /// Wait for the commit in flight, if any; `None` when cancelled.
    async fn land(&mut self) -> Option<()> {
        let Some(InFlight { task, has_position, .. }) = self.unsaved.in_flight.take() else { return Some(()) };
        match task.await {
            Ok(moved) => {
                self.unsaved.position_landed = has_position;
                moved
            }
            Err(e) => {
                error!(sink = %self.name, error = %e, "The cursor commit task failed.");
                None
            }
        }
    }

    /// Commit everything delivered so far and wait for it; `None` when cancelled.
    async fn settle(&mut self, cancel: &CancellationToken) -> Option<()> {
        self.land().await?;
        if self.unsaved.next.is_some() {
            self.start_commit(cancel);
            self.land().await?;
        }
        Some(())
    }

    /// Send dead letters marked for retry; delivered ones are deleted, refused ones stay.
    async fn retry_dead_letters(&mut self, cancel: &CancellationToken) -> Result<Exit, StoreError> {
        loop {
            let pending = self.store.retry_requests(&self.name, self.batching.max_records).await?;
            if pending.is_empty() {
                return Ok(Exit::Drained);
            }
            // The batch before must have landed: these rows leave dead letters once delivered.
            if self.settle(cancel).await.is_none() {
                return Ok(Exit::Cancelled);
            }
            if self.commit_position(cancel).await.is_none() {
                return Ok(Exit::Cancelled);
            }
            let rows: Vec<JournalRow> = pending.iter().map(|(_, r)| r.clone()).collect();
            match self.deliver(&rows, cancel).await {
                Delivered::Cancelled => return Ok(Exit::Cancelled),
                Delivered::Done { pos, refused } => {
                    let mut outcomes = Vec::with_capacity(pending.len());
                    for (i, (dl, row)) in pending.iter().enumerate() {
                        let again = refused.iter().find(|(j, _, _)| *j == i).map(|(_, r, s)| (r.clone(), *s));
                        match &again {
                            None => info!(sink = %self.name, record = %row.id, "Dead letter delivered on retry."),
                            Some((reason, _)) => {
                                warn!(sink = %self.name, record = %row.id, %reason, "Dead letter refused again.")
                            }
                        }
                        outcomes.push((*dl, again));
                    }
                    // The file's new position and the dead letters' fate
                    // commit together: apart, a crash between them would cut
                    // delivered rows no longer kept anywhere, or send them again.
                    let seq = self.cursor;
                    if persist(&self.name, cancel, "retried dead letters", || {
                        self.store.settle_retries(&self.name, seq, pos, outcomes.clone(), now_ms())
                    })
                    .await
                    .is_none()
                    {
                        return Ok(Exit::Cancelled);
                    }
                }
            }
        }
    }

    /// Deliver `rows`, splitting around refused records.
    async fn deliver(&mut self, rows: &[JournalRow], cancel: &CancellationToken) -> Delivered {
        let mut work: VecDeque<Range<usize>> = VecDeque::new();
        work.push_back(0..rows.len());
        let mut refused = Vec::new();
        let mut pos = None;
        while let Some(r) = work.pop_front() {
            match self.deliver_with_retry(&rows[r.clone()], cancel).await {
                Attempt::Cancelled => return Delivered::Cancelled,
                Attempt::Done(p) => pos = p.or(pos),
                Attempt::Rejected { reason, status, bad_index, kept_before } => {
                    if r.len() == 1 {
                        refused.push((r.start, reason, status));
                        continue;
                    }
                    warn!(sink = %self.name, records = r.len(), %reason, "Receiver refused the batch; splitting it to find the refused record(s).");
                    match bad_index.filter(|i| *i < r.len()) {
                        Some(i) => {
                            let (a, b) = (r.start + i, r.start + i + 1);
                            // What the receiver kept is delivered (Splunk, with
                            // splunk.assume_prefix_indexed); else it goes again.
                            let before = if kept_before { a..a } else { r.start..a };
                            for part in [b..r.end, a..b, before] {
                                if !part.is_empty() {
                                    work.push_front(part);
                                }
                            }
                        }
                        None => {
                            let mid = r.start + r.len() / 2;
                            work.push_front(mid..r.end);
                            work.push_front(r.start..mid);
                        }
                    }
                }
            }
        }
        Delivered::Done { pos, refused }
    }

    fn count_error(&self, kind: &str) {
        let labels = crate::metrics::SinkErrorLabels { sink: self.name.clone(), kind: kind.into() };
        crate::metrics::get().sink_errors.get_or_create(&labels).inc();
    }

    async fn deliver_with_retry(&mut self, rows: &[JournalRow], cancel: &CancellationToken) -> Attempt {
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.batching.max_backoff)
            .with_jitter()
            .without_max_times()
            .build();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match self.sink.deliver(rows).await {
                Ok(pos) => {
                    if attempt > 1 {
                        info!(sink = %self.name, attempt, "Delivery recovered.");
                        if let Err(e) = self.store.record_sink_error(&self.name, None).await {
                            warn!(sink = %self.name, error = %e, "Could not clear the sink error.");
                        }
                    }
                    return Attempt::Done(pos);
                }
                Err(SinkError::Rejected { reason, status, bad_index, kept_before }) => {
                    self.count_error("rejected");
                    return Attempt::Rejected { reason, status, bad_index, kept_before };
                }
                Err(SinkError::Retryable { reason, retry_after }) => {
                    self.count_error("retryable");
                    crate::health::Health::get().busy(&format!("sink {}", self.name));
                    let backoff = delays.next().unwrap_or(self.batching.max_backoff);
                    let delay = retry_after.map_or(backoff, |ra| ra.max(backoff));
                    warn!(sink = %self.name, attempt, %reason, delay_ms = delay.as_millis() as u64, "Delivery failed; retrying.");
                    if attempt == 1
                        && let Err(e) = self.store.record_sink_error(&self.name, Some(reason.clone())).await
                    {
                        warn!(sink = %self.name, error = %e, "Could not record the sink error.");
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return Attempt::Cancelled,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}

enum Attempt {
    Done(Option<FilePos>),
    Rejected { reason: String, status: Option<u16>, bad_index: Option<usize>, kept_before: bool },
    Cancelled,
}

/// Retry a state write that follows a delivery until it succeeds (or
/// `None` on cancellation): the delivery itself is never repeated for it.
async fn persist<T, Fut>(sink: &str, cancel: &CancellationToken, what: &str, mut f: impl FnMut() -> Fut) -> Option<T>
where
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut delay = Duration::from_millis(200);
    loop {
        match f().await {
            Ok(v) => return Some(v),
            Err(error) => {
                error!(%sink, %error, "Could not record {what} in the state database; retrying.");
                tokio::select! {
                    _ = cancel.cancelled() => return None,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Testing only: `OPSERA_SHIPPER_TEST_DELAY_AFTER_DELIVERY_MS` widens the
/// gap between a delivery and its cursor commit, so crash tests can kill
/// the process inside it. Unset in production: no delay.
async fn fault_delay_after_delivery() {
    static DELAY: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    let d = DELAY.get_or_init(|| {
        std::env::var("OPSERA_SHIPPER_TEST_DELAY_AFTER_DELIVERY_MS").ok()?.parse().ok().map(Duration::from_millis)
    });
    if let Some(d) = d {
        tokio::time::sleep(*d).await;
    }
}
