//! Batch timing of the dispatcher, on paused tokio time: a partial batch
//! waits `batch_timeout` for more records; a full one goes at once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use opsera_shipper::dispatch::Dispatcher;
use opsera_shipper::sink::{Batching, Sink, SinkError};
use opsera_shipper::store::{FilePos, JournalRow};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

mod common;

struct Recording {
    batches: Arc<Mutex<Vec<(Instant, usize)>>>,
    batching: Batching,
}

#[async_trait]
impl Sink for Recording {
    async fn deliver(&mut self, rows: &[JournalRow]) -> Result<Option<FilePos>, SinkError> {
        self.batches.lock().unwrap().push((Instant::now(), rows.len()));
        Ok(None)
    }
    fn batching(&self) -> Batching {
        self.batching
    }
}

async fn setup(
    n: usize,
    batching: Batching,
) -> (tempfile::TempDir, Arc<Mutex<Vec<(Instant, usize)>>>, CancellationToken, Instant) {
    let (dir, store) = common::journal_of(n).await;
    let batches = Arc::new(Mutex::new(Vec::new()));
    let sink = Recording { batches: batches.clone(), batching };
    let d = Dispatcher::new("t".into(), vec!["user_activity".into()], store, Box::new(sink), 0);
    let cancel = CancellationToken::new();
    let (_dtx, drx) = watch::channel(None);
    let (_rtx, rrx) = watch::channel(0u64);
    let start = Instant::now();
    let c = cancel.clone();
    tokio::spawn(async move {
        let _keep = (_dtx, _rtx);
        d.run(c, drx, rrx).await
    });
    (dir, batches, cancel, start)
}

async fn first_batch(b: &Arc<Mutex<Vec<(Instant, usize)>>>) -> (Instant, usize) {
    for _ in 0..100_000 {
        if let Some(x) = b.lock().unwrap().first().copied() {
            return x;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no batch delivered");
}

#[tokio::test(start_paused = true)]
async fn partial_batch_waits_for_batch_timeout() {
    let batching = Batching { max_records: 100, timeout: Duration::from_secs(5), ..Batching::default() };
    let (_dir, batches, cancel, start) = setup(3, batching).await;
    let (at, n) = first_batch(&batches).await;
    assert_eq!(n, 3);
    assert!(at - start >= Duration::from_secs(5), "a partial batch went out after {:?}", at - start);
    cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn full_batch_goes_out_without_waiting() {
    let batching = Batching { max_records: 3, timeout: Duration::from_secs(3600), ..Batching::default() };
    let (_dir, batches, cancel, start) = setup(7, batching).await;
    let (at, n) = first_batch(&batches).await;
    assert_eq!(n, 3);
    assert!(at - start < Duration::from_secs(3600), "a full batch waited for the timeout");
    cancel.cancel();
}
