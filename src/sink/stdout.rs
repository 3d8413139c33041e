//! The stdout sink: one JSON line per record on standard output, for
//! container log collection. Logs never go to stdout (they go to stderr),
//! so the stream stays machine-readable.

use async_trait::async_trait;
use tokio::io::AsyncWriteExt;

use super::{LineFormat, Sink, SinkError};
use crate::store::{FilePos, JournalRow};

pub struct StdoutSink {
    lines: LineFormat,
    out: tokio::io::Stdout,
}

impl StdoutSink {
    pub fn new(lines: LineFormat) -> Self {
        Self { lines, out: tokio::io::stdout() }
    }
}

#[async_trait]
impl Sink for StdoutSink {
    async fn deliver(&mut self, rows: &[JournalRow]) -> Result<Option<FilePos>, SinkError> {
        let buf = self.lines.render(rows);
        self.out.write_all(buf.as_bytes()).await.map_err(|e| SinkError::retry(format!("writing to stdout: {e}")))?;
        self.out.flush().await.map_err(|e| SinkError::retry(format!("flushing stdout: {e}")))?;
        Ok(None)
    }
}
