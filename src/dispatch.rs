//! The per-sink delivery loop: read the journal after the sink's cursor,
//! deliver a batch, and only then move the cursor.
//!
//! One task per sink, so a sink that is down holds back only itself; its
//! records wait in the journal. Retryable failures are retried with capped
//! backoff, forever (the journal's bounds make pollers wait meanwhile). A
//! permanent failure sends the batch to dead letters with the reason, so
//! nothing is dropped silently.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::sink::{Sink, SinkError};
use crate::store::{Store, StoreError};
use crate::window::now_ms;

/// Records per batch read from the journal.
pub const BATCH_RECORDS: usize = 1000;
/// About this many bytes per batch.
pub const BATCH_BYTES: usize = 4 << 20;

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
    min_delay: Duration,
    max_delay: Duration,
}

impl Dispatcher {
    /// A dispatcher starting after `cursor`.
    pub fn new(name: String, streams: Vec<String>, store: Store, sink: Box<dyn Sink>, cursor: i64) -> Self {
        Self {
            name,
            streams: Arc::from(streams),
            store,
            sink,
            cursor,
            min_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(30),
        }
    }

    /// Shorten the retry backoff (tests and the demo).
    pub fn with_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_delay = min;
        self.max_delay = max;
        self
    }

    /// Deliver until cancelled, or until the cursor reaches the `drain` target
    /// once one is set. `reopen` changes ask the sink to reopen its files.
    pub async fn run(
        mut self,
        cancel: CancellationToken,
        mut drain: watch::Receiver<Option<i64>>,
        mut reopen: watch::Receiver<u64>,
    ) -> Result<Exit, StoreError> {
        loop {
            if cancel.is_cancelled() {
                return Ok(Exit::Cancelled);
            }
            if reopen.has_changed().unwrap_or(false) {
                reopen.borrow_and_update();
                if let Err(e) = self.sink.reopen().await {
                    warn!(sink = %self.name, error = %e, "Reopen failed; retrying at the next delivery.");
                }
            }
            let store = self.store.clone();
            let grew = store.journal_grew();
            tokio::pin!(grew);
            grew.as_mut().enable();
            let batch = self.store.read_batch(self.cursor, self.streams.clone(), BATCH_RECORDS, BATCH_BYTES).await?;
            if batch.last_seq == self.cursor {
                let target = *drain.borrow_and_update();
                if target.is_some_and(|t| self.cursor >= t) {
                    return Ok(Exit::Drained);
                }
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(Exit::Cancelled),
                    _ = &mut grew => {}
                    _ = drain.changed() => {}
                    _ = reopen.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
            let mut pos = None;
            if !batch.rows.is_empty() {
                match self.deliver_with_retry(&batch.rows, &cancel).await {
                    Delivery::Done(p) => pos = p,
                    Delivery::Cancelled => return Ok(Exit::Cancelled),
                    Delivery::Refused(reason) => {
                        error!(sink = %self.name, records = batch.rows.len(), %reason, "Sink refused the batch permanently; it goes to dead letters.");
                        for row in batch.rows.iter().cloned() {
                            self.store.dead_letter(&self.name, row, reason.clone(), now_ms()).await?;
                        }
                    }
                }
                info!(sink = %self.name, records = batch.rows.len(), through_seq = batch.last_seq, "Delivered batch.");
            }
            // Keep the committed file position when nothing was written (rows of other streams only).
            if pos.is_none() && batch.rows.is_empty() {
                pos = self.store.sink_cursor(&self.name).await?.file;
            }
            self.store.commit_cursor(&self.name, batch.last_seq, pos, now_ms()).await?;
            debug!(sink = %self.name, cursor = batch.last_seq, "Cursor moved.");
            self.cursor = batch.last_seq;
        }
    }

    async fn deliver_with_retry(&mut self, rows: &[crate::store::JournalRow], cancel: &CancellationToken) -> Delivery {
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_jitter()
            .without_max_times()
            .build();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match self.sink.deliver(rows).await {
                Ok(pos) => return Delivery::Done(pos),
                Err(SinkError::Permanent(reason)) => return Delivery::Refused(reason),
                Err(SinkError::Retryable(reason)) => {
                    let delay = delays.next().unwrap_or(self.max_delay);
                    warn!(sink = %self.name, attempt, %reason, delay_ms = delay.as_millis() as u64, "Delivery failed; retrying.");
                    tokio::select! {
                        _ = cancel.cancelled() => return Delivery::Cancelled,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}

enum Delivery {
    Done(Option<crate::store::FilePos>),
    Refused(String),
    Cancelled,
}
