//! When the dispatcher commits a sink's cursor, seen from inside the sink:
//! most sinks never receive a batch before the previous batch's cursor has
//! landed; a sink that undoes uncommitted deliveries (the file sink) may run
//! a bounded number of batches ahead, but only once a commit holding its
//! position has landed; a drain, an idle sink and a shutdown land every
//! commit. (A crash is the reliability tests' part.)

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use opsera_shipper::dispatch::{Dispatcher, Exit};
use opsera_shipper::sink::{Batching, Sink, SinkError};
use opsera_shipper::store::{FilePos, JournalRow, Store};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

mod common;

const RECORDS: usize = 6_000;
const BATCH: usize = 50;

/// Records, for each batch, the cursor it starts after and the cursor
/// committed in the state database when it arrives.
struct Probe {
    store: Store,
    undoes: bool,
    seen: Arc<Mutex<Vec<(i64, i64)>>>,
    db: std::path::PathBuf,
    /// Once this many batches are delivered, another connection holds the
    /// state database's write lock for a while, so cursor commits stay in
    /// flight and the next ones queue behind them.
    hold_after: Option<usize>,
    /// Shut down once this many batches are delivered.
    stop_after: Option<(usize, CancellationToken)>,
}

#[async_trait]
impl Sink for Probe {
    async fn deliver(&mut self, rows: &[JournalRow]) -> Result<Option<FilePos>, SinkError> {
        let committed = self.store.sink_cursor("t").await.unwrap().delivered_seq;
        let delivered = {
            let mut seen = self.seen.lock().unwrap();
            seen.push((rows[0].seq - 1, committed));
            seen.len()
        };
        if self.hold_after == Some(delivered) {
            let other = rusqlite::Connection::open(&self.db).unwrap();
            other.execute_batch("BEGIN IMMEDIATE").unwrap();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                other.execute_batch("COMMIT").unwrap();
            });
        }
        if let Some((n, cancel)) = &self.stop_after
            && delivered == *n
        {
            cancel.cancel();
        }
        let offset = rows.last().map_or(0, |r| r.seq as u64);
        Ok(Some(FilePos { dev: 1, ino: 1, offset }))
    }
    fn batching(&self) -> Batching {
        Batching { max_records: BATCH, timeout: Duration::ZERO, ..Batching::default() }
    }
    fn undoes_uncommitted(&self) -> bool {
        self.undoes
    }
}

struct Run {
    dir: tempfile::TempDir,
    store: Store,
    seen: Arc<Mutex<Vec<(i64, i64)>>>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<Exit>,
}

async fn start(undoes: bool, drain: Option<i64>, hold_after: Option<usize>, stop_after: Option<usize>) -> Run {
    let (dir, store) = common::journal_of(RECORDS).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let cancel = CancellationToken::new();
    let stop_after = stop_after.map(|n| (n, cancel.clone()));
    let db = dir.path().join("s.db");
    let sink = Probe { store: store.clone(), undoes, seen: seen.clone(), db, hold_after, stop_after };
    let d = Dispatcher::new("t".into(), vec!["user_activity".into()], store.clone(), Box::new(sink), 0);
    let (dtx, drx) = watch::channel(drain);
    let (rtx, rrx) = watch::channel(0u64);
    let c = cancel.clone();
    let task = tokio::spawn(async move {
        let _keep = (dtx, rtx);
        d.run(c, drx, rrx).await.unwrap()
    });
    Run { dir, store, seen, cancel, task }
}

/// How many batches each delivery ran ahead of the committed cursor.
fn ahead(seen: &[(i64, i64)]) -> Vec<i64> {
    seen.iter().map(|(after, committed)| (after - committed) / BATCH as i64).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_cannot_undo_gets_a_batch_only_after_the_last_one_committed() {
    let run = start(false, Some(RECORDS as i64), None, None).await;
    assert_eq!(run.task.await.unwrap(), Exit::Drained);
    let seen = run.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), RECORDS / BATCH);
    assert!(ahead(&seen).iter().all(|a| *a == 0), "delivered ahead of the committed cursor: {:?}", ahead(&seen));
    assert_eq!(run.store.sink_cursor("t").await.unwrap().delivered_seq, RECORDS as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_undoes_runs_ahead_within_the_bound_and_a_drain_lands_every_commit() {
    let run = start(true, Some(RECORDS as i64), None, None).await;
    assert_eq!(run.task.await.unwrap(), Exit::Drained);
    // Drained means committed: nothing is left in flight.
    assert_eq!(run.store.sink_cursor("t").await.unwrap().delivered_seq, RECORDS as i64);
    let seen = run.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), RECORDS / BATCH);
    let ahead = ahead(&seen);
    // The first batch of a run goes out with nothing uncommitted, and the
    // second only once the first batch's position has landed.
    assert_eq!(&ahead[..2], &[0, 0], "{ahead:?}");
    // At most 4 batches past the last commit that landed.
    assert!(ahead.iter().all(|a| (0..=4).contains(a)), "{ahead:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_mid_stream_lands_the_commits_of_everything_delivered() {
    let stop = RECORDS / BATCH / 2;
    let run = start(true, None, Some(stop), Some(stop)).await;
    assert_eq!(run.task.await.unwrap(), Exit::Cancelled);
    let seen = run.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), stop, "nothing is delivered after the shutdown began");
    assert_eq!(committed(run.dir.path()), (stop * BATCH) as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_sink_lands_the_commits_queued_behind_one_in_flight() {
    let batches = RECORDS / BATCH;
    let run = start(true, None, Some(batches - 1), None).await;
    let mut at = 0;
    for _ in 0..500 {
        at = committed(run.dir.path());
        if at == RECORDS as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(run.seen.lock().unwrap().len(), batches);
    assert_eq!(at, RECORDS as i64, "the last batch's cursor was left uncommitted");
    run.cancel.cancel();
    assert_eq!(run.task.await.unwrap(), Exit::Cancelled);
}

/// The committed cursor, read on a connection of its own (the store's would
/// wait for a commit in flight).
fn committed(dir: &std::path::Path) -> i64 {
    let db = rusqlite::Connection::open(dir.join("s.db")).unwrap();
    db.query_row("SELECT delivered_seq FROM sink_cursors WHERE sink = 't'", [], |r| r.get(0)).unwrap()
}
