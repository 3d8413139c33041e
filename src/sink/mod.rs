//! Sinks: where records go. Every sink implements [`Sink`]; the dispatcher
//! drives it. Adding a sink means one new file here, a variant in
//! `config::SinkKind`, and one arm in [`build`].

mod file;
mod stdout;
pub mod syslog;
pub mod syslog_format;
mod webhook;

use std::borrow::Cow;
use std::io::{IoSlice, Write};
use std::time::Duration;

use async_trait::async_trait;

pub use file::FileSink;
pub use stdout::StdoutSink;
pub use syslog::SyslogSink;
pub use webhook::WebhookSink;

use crate::config::{SinkConfig, SinkKind};
use crate::store::{FilePos, JournalRow};

/// Why a delivery failed, and so what the dispatcher does next.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Try the same batch again later (disk full, receiver down or
    /// throttling, credentials refused, endpoint misconfigured): the
    /// records stay in the journal; nothing is condemned.
    #[error("{reason}")]
    Retryable { reason: String, retry_after: Option<Duration> },
    /// The receiver refused the data itself (HTTP 400/413/422...). The
    /// dispatcher splits the batch to find the refused record(s); `bad_index`
    /// names one when the receiver said which. A single refused record goes
    /// to dead letters.
    #[error("{reason}")]
    Rejected {
        reason: String,
        status: Option<u16>,
        bad_index: Option<usize>,
        /// The receiver kept the records before `bad_index`: they are
        /// delivered, not sent again.
        kept_before: bool,
    },
}

impl SinkError {
    /// A retryable failure without a server-given delay.
    pub fn retry(reason: impl Into<String>) -> Self {
        SinkError::Retryable { reason: reason.into(), retry_after: None }
    }
}

/// A destination for records.
#[async_trait]
pub trait Sink: Send {
    /// Deliver `rows` in order and return once they are durably accepted
    /// (written and flushed, or acknowledged). The returned position, if
    /// any, is committed together with the sink's cursor.
    async fn deliver(&mut self, rows: &[JournalRow]) -> Result<Option<FilePos>, SinkError>;
    /// Reopen output files (SIGHUP, after logrotate moved them).
    async fn reopen(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
    /// Extra bytes each record takes in a request beyond its own text
    /// (framing, envelopes), so batches can respect a byte budget.
    fn record_overhead(&self) -> usize {
        1
    }
    /// How the dispatcher should batch for this sink.
    fn batching(&self) -> Batching {
        Batching::default()
    }
    /// Whether a delivery whose cursor never committed is undone when the
    /// sink is built again after a crash (the file sink cuts its file back
    /// to the committed length). Such a sink may deliver the next batch
    /// while the last one's cursor is still being committed.
    fn undoes_uncommitted(&self) -> bool {
        false
    }
    /// Where the next delivery would go (the file sink opens its file if it
    /// is not open), so that it can be committed before the first delivery
    /// into a file: only a committed position lets a crash be undone.
    async fn position(&mut self) -> Result<Option<FilePos>, SinkError> {
        Ok(None)
    }
}

/// Build the sink `cfg` describes; `committed` is its last committed file position.
pub async fn build(cfg: &SinkConfig, committed: Option<FilePos>) -> Result<Box<dyn Sink>, SinkError> {
    let lines = LineFormat { stream_field: cfg.stream_field.clone() };
    Ok(match &cfg.kind {
        SinkKind::File { path } => Box::new(FileSink::open(&cfg.name, path.clone(), lines, committed).await?),
        SinkKind::Stdout => Box::new(StdoutSink::new(lines)),
        SinkKind::Webhook(w) => Box::new(WebhookSink::new(&cfg.name, (**w).clone(), lines)?),
        SinkKind::Syslog(y) => Box::new(SyslogSink::new(&cfg.name, (**y).clone(), lines)?),
    })
}

/// Batch limits a sink asks the dispatcher for.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    pub max_records: usize,
    pub max_bytes: usize,
    /// How long a partial batch may wait for more records.
    pub timeout: Duration,
    /// Cap of the retry backoff.
    pub max_backoff: Duration,
}

impl Default for Batching {
    fn default() -> Self {
        Self { max_records: 1000, max_bytes: 4 << 20, timeout: Duration::ZERO, max_backoff: Duration::from_secs(30) }
    }
}

/// Lines go out straight from their journal pages, this many to a `writev`
/// (two slices a line: the text and its newline, within Linux's limit of
/// 1024), so a batch is never copied into an output buffer first.
const LINES_PER_WRITE: usize = 512;

/// Write `rows` to `w` as JSON lines, straight from their journal pages;
/// `written` is told the length of each piece once it is written.
fn write_lines(
    w: &mut impl Write,
    lines: &LineFormat,
    rows: &[JournalRow],
    mut written: impl FnMut(u64),
) -> std::io::Result<()> {
    for piece in rows.chunks(LINES_PER_WRITE) {
        let texts: Vec<Cow<str>> = piece.iter().map(|r| lines.line(r)).collect();
        let mut slices: Vec<IoSlice> =
            texts.iter().flat_map(|t| [IoSlice::new(t.as_bytes()), IoSlice::new(b"\n")]).collect();
        write_all_vectored(w, &mut slices)?;
        written(texts.iter().map(|t| t.len() as u64 + 1).sum());
    }
    Ok(())
}

/// Write all of `slices`, however the kernel splits the writes.
fn write_all_vectored(w: &mut impl Write, mut slices: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    while !slices.is_empty() {
        match w.write_vectored(slices) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Run blocking output work `f` over `rows` off the async workers. On the
/// daemon's multi-threaded runtime that is this thread, its other tasks
/// handed to another worker meanwhile (`block_in_place`), so the rows need
/// not be copied; elsewhere (a single-threaded runtime, as in unit tests) a
/// blocking task gets a copy of the rows, which shares their journal pages'
/// buffers.
async fn off_workers<T: Send + 'static>(
    rows: &[JournalRow],
    f: impl FnOnce(&[JournalRow]) -> Result<T, SinkError> + Send + 'static,
) -> Result<T, SinkError> {
    match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(|| f(rows)),
        _ => {
            let rows = rows.to_vec();
            tokio::task::spawn_blocking(move || f(&rows))
                .await
                .map_err(|e| SinkError::retry(format!("sink task failed: {e}")))?
        }
    }
}

/// How a journal row becomes one output line (file and stdout sinks).
#[derive(Debug, Clone, Default)]
pub struct LineFormat {
    /// Add `"<field>":"<stream>"` to each record.
    pub stream_field: Option<String>,
}

impl LineFormat {
    /// All `rows` as JSON lines.
    pub fn render(&self, rows: &[JournalRow]) -> String {
        let mut buf = String::with_capacity(rows.iter().map(|r| r.body.len() + 1).sum());
        for r in rows {
            self.push_line(r, &mut buf);
        }
        buf
    }

    /// Append `row` as one JSON line (with the trailing newline) to `out`.
    /// The record's original text is kept; only whitespace outside strings
    /// is removed when the text spans several lines.
    pub fn push_line(&self, row: &JournalRow, out: &mut String) {
        out.push_str(&self.line(row));
        out.push('\n');
    }

    /// `row` as one line of JSON, without the newline; borrowed when the
    /// record's text is already that line.
    pub fn line<'a>(&self, row: &'a JournalRow) -> Cow<'a, str> {
        let body: Cow<str> = if memchr::memchr2(b'\n', b'\r', row.body.as_bytes()).is_some() {
            Cow::Owned(minify(&row.body))
        } else {
            Cow::Borrowed(&row.body)
        };
        match &self.stream_field {
            Some(f) if body.trim().starts_with('{') && !has_top_level_key(body.trim(), f) => {
                let body = body.trim();
                let mut out = String::with_capacity(body.len() + f.len() + row.stream.len() + 8);
                out.push_str("{\"");
                out.push_str(f);
                out.push_str("\":");
                out.push_str(&serde_json::to_string(&*row.stream).unwrap_or_default());
                let rest = body[1..].trim_start();
                if !rest.starts_with('}') {
                    out.push(',');
                }
                out.push_str(rest);
                Cow::Owned(out)
            }
            _ => match body {
                Cow::Borrowed(b) => Cow::Borrowed(b.trim()),
                Cow::Owned(o) if o.trim().len() == o.len() => Cow::Owned(o),
                Cow::Owned(o) => Cow::Owned(o.trim().to_string()),
            },
        }
    }
}

fn has_top_level_key(body: &str, key: &str) -> bool {
    serde_json::from_str::<std::collections::HashMap<Cow<str>, serde::de::IgnoredAny>>(body)
        .map(|m| m.contains_key(key))
        .unwrap_or(false)
}

/// Remove whitespace outside JSON strings, keeping every token as it is.
pub fn minify(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let (mut in_str, mut escaped) = (false, false);
    for c in json.chars() {
        if in_str {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
            }
        } else if c == '"' {
            in_str = true;
            out.push(c);
        } else if !matches!(c, ' ' | '\n' | '\r' | '\t') {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A writer that takes a few bytes a call, and is interrupted now and then.
    struct Trickle {
        out: Vec<u8>,
        calls: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.calls += 1;
            if self.calls.is_multiple_of(5) {
                return Err(std::io::ErrorKind::Interrupted.into());
            }
            let n = buf.len().min(7);
            self.out.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn short_and_interrupted_writes_still_write_every_line_once_in_order() {
        // More lines than one writev takes; every third spans lines, so its line is a new string.
        let rows: Vec<JournalRow> = (0..LINES_PER_WRITE + 40)
            .map(|i| {
                if i % 3 == 0 {
                    row(&format!("{{\n  \"_id\": \"{i}\",\n  \"pad\": \"{}\"\n}}", "y".repeat(i % 13)))
                } else {
                    row(&format!(r#"{{"_id":"{i}"}}"#))
                }
            })
            .collect();
        let mut w = Trickle { out: Vec::new(), calls: 0 };
        let mut pieces = Vec::new();
        write_lines(&mut w, &LineFormat::default(), &rows, |n| pieces.push(n)).unwrap();
        // Each piece's length is told, so the file sink's writeback hints follow the file.
        assert_eq!(pieces.len(), rows.len().div_ceil(LINES_PER_WRITE));
        assert_eq!(pieces.iter().sum::<u64>(), w.out.len() as u64);
        assert_eq!(String::from_utf8(w.out).unwrap(), LineFormat::default().render(&rows));
    }

    fn row(body: &str) -> JournalRow {
        JournalRow { seq: 1, stream: "user_activity".into(), id: "a".into(), created: 0, body: body.into() }
    }

    #[test]
    fn pretty_records_become_one_line_with_tokens_unchanged() {
        let mut out = String::new();
        LineFormat::default()
            .push_line(&row("{\n  \"_id\": \"a b\",\n  \"x\": 1.50,\n  \"s\": \"q\\\" \\n\"\n}"), &mut out);
        assert_eq!(out, "{\"_id\":\"a b\",\"x\":1.50,\"s\":\"q\\\" \\n\"}\n");
    }

    #[test]
    fn stream_field_is_added_once() {
        let f = LineFormat { stream_field: Some("opsera_stream".into()) };
        let mut out = String::new();
        f.push_line(&row(r#"{"_id":"a"}"#), &mut out);
        f.push_line(&row(r#"{"_id":"b","opsera_stream":"mine"}"#), &mut out);
        assert_eq!(
            out,
            "{\"opsera_stream\":\"user_activity\",\"_id\":\"a\"}\n{\"_id\":\"b\",\"opsera_stream\":\"mine\"}\n"
        );
    }

    proptest! {
        /// Minifying pretty-printed JSON gives back the same value.
        #[test]
        fn minify_preserves_values(v in any::<std::collections::BTreeMap<String, (String, i32, bool)>>()) {
            let pretty = serde_json::to_string_pretty(&v).unwrap();
            let compact = serde_json::to_string(&v).unwrap();
            prop_assert_eq!(minify(&pretty), compact);
        }
    }
}
