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
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use tracing::{info, warn};

use super::{LineFormat, Sink, SinkError};
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
    use std::os::unix::fs::DirBuilderExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(|e| SinkError::retry(format!("creating directory {}: {e}", dir.display())))?;
    }
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
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

/// Append `buf` and fsync; on failure cut the file back to where it was.
fn append_durably(path: &std::path::Path, f: &File, buf: &[u8]) -> Result<FilePos, SinkError> {
    let stat = |f: &File| f.metadata().map_err(|e| SinkError::retry(format!("stat {}: {e}", path.display())));
    let before = stat(f)?.len();
    let mut w: &File = f;
    let written = w.write_all(buf).and_then(|()| f.sync_data());
    if let Err(e) = written {
        // Never leave a partial line behind: cut back (best effort) and retry later.
        let _ = f.set_len(before);
        return Err(SinkError::retry(format!("writing {}: {e}", path.display())));
    }
    let m = stat(f)?;
    Ok(FilePos { dev: m.dev(), ino: m.ino(), offset: m.len() })
}

#[async_trait]
impl Sink for FileSink {
    async fn deliver(&mut self, rows: &[JournalRow]) -> Result<Option<FilePos>, SinkError> {
        let buf = self.lines.render(rows);
        let path = self.path.clone();
        let current = self.file.clone();
        let (file, pos) = tokio::task::spawn_blocking(move || -> Result<(Arc<File>, FilePos), SinkError> {
            let f = match current {
                Some(f) => f,
                None => Arc::new(open_append(&path)?),
            };
            let pos = append_durably(&path, &f, buf.as_bytes())?;
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
