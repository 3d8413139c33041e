//! The file sink: JSON lines appended to one file, fsynced before the
//! cursor moves.
//!
//! Exactly once across crashes: the file's length after each delivered
//! batch is committed with the sink's cursor (with the file's device and
//! inode). On start, bytes past the committed length in *that same file*
//! were written by a batch whose commit never happened; they are cut off
//! and the batch is written again, so nothing is doubled and no line is
//! torn. A file with another identity (logrotate moved ours away) is never
//! cut. A failed write is also cut back before it is retried.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use tracing::{info, warn};

use super::{Batching, LineFormat, Sink, SinkError, off_workers, write_lines};
use crate::store::{FilePos, JournalRow};

pub struct FileSink {
    name: String,
    path: PathBuf,
    lines: LineFormat,
    file: Option<Arc<File>>,
}

impl FileSink {
    /// Open (creating, mode 0640, with its directory) the file at `path` and
    /// reconcile it with the last committed position.
    pub async fn open(
        name: &str,
        path: PathBuf,
        lines: LineFormat,
        committed: Option<FilePos>,
    ) -> Result<Self, SinkError> {
        let p = path.clone();
        let sink_name = name.to_string();
        let file = tokio::task::spawn_blocking(move || -> Result<File, SinkError> {
            let f = open_append(&p)?;
            reconcile(&sink_name, &p, &f, committed)?;
            Ok(f)
        })
        .await
        .map_err(|e| SinkError::retry(format!("file sink task failed: {e}")))??;
        Ok(Self { name: name.to_string(), path, lines, file: Some(Arc::new(file)) })
    }
}

fn open_append(path: &std::path::Path) -> Result<File, SinkError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::fsutil::create_private_dir(dir)
            .map_err(|e| SinkError::retry(format!("creating directory {}: {e}", dir.display())))?;
    }
    crate::fsutil::open_handing_over(OpenOptions::new().append(true).create(true).mode(0o640), path)
        .map_err(|e| SinkError::retry(format!("opening {}: {e}", path.display())))
}

/// Cut bytes written after the last commit, if the file is the one committed.
fn reconcile(sink: &str, path: &std::path::Path, f: &File, committed: Option<FilePos>) -> Result<(), SinkError> {
    let Some(c) = committed else { return Ok(()) };
    let m = f.metadata().map_err(|e| SinkError::retry(format!("stat {}: {e}", path.display())))?;
    if m.dev() != c.dev || m.ino() != c.ino {
        return Ok(());
    }
    if m.len() > c.offset {
        warn!(
            sink,
            path = %path.display(),
            bytes = m.len() - c.offset,
            "Cutting output written after the last commit (an interrupted batch); it is written again."
        );
        f.set_len(c.offset).map_err(|e| SinkError::retry(format!("truncating {}: {e}", path.display())))?;
        f.sync_all().map_err(|e| SinkError::retry(format!("fsync {}: {e}", path.display())))?;
    } else if m.len() < c.offset {
        warn!(sink, path = %path.display(), "The file is shorter than committed: was it truncated by hand?");
    }
    Ok(())
}

/// Append `rows` as lines and fsync; on failure cut the file back to where it was.
fn append_durably(
    path: &std::path::Path,
    f: &File,
    lines: &LineFormat,
    rows: &[JournalRow],
) -> Result<FilePos, SinkError> {
    let before = position_of(path, f)?.offset;
    let mut w: &File = f;
    // Each piece starts on its way to the disk as soon as it is written, so
    // the fsync mostly finds it there.
    let mut at = before;
    let start_writeback = |n| {
        crate::fsutil::start_writeback(f, at, n);
        at += n;
    };
    let written = write_lines(&mut w, lines, rows, start_writeback).and_then(|()| f.sync_data());
    if let Err(e) = written {
        // Never leave a partial line behind: cut back (best effort) and retry later.
        let _ = f.set_len(before);
        return Err(SinkError::retry(format!("writing {}: {e}", path.display())));
    }
    position_of(path, f)
}

/// Where `f` (at `path`) ends.
fn position_of(path: &std::path::Path, f: &File) -> Result<FilePos, SinkError> {
    let m = f.metadata().map_err(|e| SinkError::retry(format!("stat {}: {e}", path.display())))?;
    Ok(FilePos { dev: m.dev(), ino: m.ino(), offset: m.len() })
}

/// `file`, or the file at `path` opened for appending when it is not open.
fn open_or(path: &std::path::Path, file: Option<Arc<File>>) -> Result<Arc<File>, SinkError> {
    match file {
        Some(f) => Ok(f),
        None => open_append(path).map(Arc::new),
    }
}

/// Append `rows` durably to `file`, opening the file first when it is not open.
fn write_batch(
    path: &std::path::Path,
    file: Option<Arc<File>>,
    lines: &LineFormat,
    rows: &[JournalRow],
) -> Result<(Arc<File>, FilePos), SinkError> {
    let f = open_or(path, file)?;
    let pos = append_durably(path, &f, lines, rows)?;
    Ok((f, pos))
}

#[async_trait]
impl Sink for FileSink {
    async fn deliver(&mut self, rows: &[JournalRow]) -> Result<Option<FilePos>, SinkError> {
        let (path, file, lines) = (self.path.clone(), self.file.clone(), self.lines.clone());
        let (file, pos) = off_workers(rows, move |rows| write_batch(&path, file, &lines, rows)).await?;
        self.file = Some(file);
        Ok(Some(pos))
    }

    /// Batches of up to 2000 records (4 MiB): each batch costs an fsync of
    /// the file and of the state database, so a backfill pays the disk's
    /// latency once per 2000 records, not per 1000. (4000 gained little
    /// more and held more memory.)
    fn batching(&self) -> Batching {
        Batching { max_records: 2000, ..Batching::default() }
    }

    fn undoes_uncommitted(&self) -> bool {
        true
    }

    async fn position(&mut self) -> Result<Option<FilePos>, SinkError> {
        let (path, file) = (self.path.clone(), self.file.clone());
        let (file, pos) = tokio::task::spawn_blocking(move || -> Result<_, SinkError> {
            let f = open_or(&path, file)?;
            let pos = position_of(&path, &f)?;
            Ok((f, pos))
        })
        .await
        .map_err(|e| SinkError::retry(format!("file sink task failed: {e}")))??;
        self.file = Some(file);
        Ok(Some(pos))
    }

    async fn reopen(&mut self) -> Result<(), SinkError> {
        info!(sink = %self.name, path = %self.path.display(), "Reopening output file.");
        self.file = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_of_several_writes_is_written_whole_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let mut sink = FileSink::open("f", path.clone(), LineFormat::default(), None).await.unwrap();
        let rows: Vec<JournalRow> = (0..3000)
            .map(|i| JournalRow {
                seq: i,
                stream: "user_activity".into(),
                id: format!("{i:024}").into(),
                created: 0,
                // Every seventh record spans lines, so its line is a new string.
                body: if i % 7 == 0 {
                    format!("{{\n  \"_id\": \"{i:024}\"\n}}")
                } else {
                    format!(r#"{{"_id":"{i:024}","pad":"{}"}}"#, "x".repeat(200))
                }
                .into(),
            })
            .collect();
        assert!(rows.len() > 2 * crate::sink::LINES_PER_WRITE);
        let pos = sink.deliver(&rows).await.unwrap().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, LineFormat::default().render(&rows));
        assert_eq!(text.lines().count(), rows.len());
        assert_eq!(pos.offset, text.len() as u64);
    }
}
