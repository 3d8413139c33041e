//! The stdout sink: one JSON line per record on standard output, for
//! container log collection. Logs never go to stdout (they go to stderr),
//! so the stream stays machine-readable. Lines are written straight from
//! their journal pages, as the file sink writes them.

use std::io::Write;

use async_trait::async_trait;

use super::{LineFormat, Sink, SinkError, off_workers, write_lines};
use crate::store::{FilePos, JournalRow};

pub struct StdoutSink {
    lines: LineFormat,
}

impl StdoutSink {
    pub fn new(lines: LineFormat) -> Self {
        Self { lines }
    }
}

#[async_trait]
impl Sink for StdoutSink {
    async fn deliver(&mut self, rows: &[JournalRow]) -> Result<Option<FilePos>, SinkError> {
        let lines = self.lines.clone();
        off_workers(rows, move |rows| {
            let mut out = std::io::stdout().lock();
            write_lines(&mut out, &lines, rows, |_| ())
                .and_then(|()| out.flush())
                .map_err(|e| SinkError::retry(format!("writing to stdout: {e}")))
        })
        .await?;
        Ok(None)
    }
}
