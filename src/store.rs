//! The store: the single owner of durable state, in one SQLite file (WAL,
//! `synchronous = FULL`, mode 0600).
//!
//! - `streams`: per stream the watermark (newest `createdAt` stored), the
//!   end of the last completed window, and the last poll's outcome.
//! - `seen`: ids already ingested, for dedup, per stream (`sid`, a small
//!   number from `stream_keys`); pruned once no later poll can return their
//!   record. An ObjectId is kept as its 12 bytes, complemented when the
//!   stream is served newest first (see `SeenId`).
//! - `journal_pages`: the journal, one row per stored page: its records'
//!   `seq` range (numbers are never reused after a trim), stream, and where
//!   in the segment files ([`crate::segments`]) their original JSON text is.
//!   (`journal`, the per-record table of schema versions 1–3, is converted
//!   at the first writable open and stays empty.)
//! - `sink_cursors`: per sink the last `seq` delivered (and, for file sinks,
//!   the file's committed length and identity).
//! - `dead_letters`: records a sink refused permanently, with the reason.
//!
//! Ingesting a group of pages is one transaction (seen + a journal row per
//! page), committed after their bodies are written and fsynced to the
//! current segment, so a crash keeps all of a group or none of it (see
//! `Group`; a poll's pages form groups as they arrive, `Store::ingest_stream`).
//! The watermark only moves in a later
//! transaction, after the whole window is stored. This module must never be
//! called on an async worker thread: every public async method runs its
//! SQLite work on the blocking pool.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use crate::opsera::Record;
use crate::segments::{self, Segments};
use crate::text::Text;
use crate::window::Checkpoint;

/// Schema migrations, applied in order; `PRAGMA user_version` is the count applied.
/// Append only: never edit a migration that has shipped.
const MIGRATIONS: &[&str] = &[
    // 1: initial schema
    "CREATE TABLE streams(
        name TEXT PRIMARY KEY,
        watermark INTEGER,
        polled_until INTEGER,
        last_poll INTEGER,
        last_success INTEGER,
        last_error TEXT,
        truncated_days INTEGER NOT NULL DEFAULT 0
     );
     CREATE TABLE seen(
        stream TEXT NOT NULL,
        id TEXT NOT NULL,
        created INTEGER NOT NULL,
        PRIMARY KEY(stream, id)
     ) WITHOUT ROWID;
     CREATE INDEX seen_by_created ON seen(stream, created);
     CREATE TABLE journal(
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        stream TEXT NOT NULL,
        id TEXT NOT NULL,
        created INTEGER NOT NULL,
        body TEXT NOT NULL
     );
     CREATE TABLE sink_cursors(
        sink TEXT PRIMARY KEY,
        delivered_seq INTEGER NOT NULL,
        file_dev INTEGER,
        file_ino INTEGER,
        file_offset INTEGER,
        updated INTEGER
     );
     CREATE TABLE dead_letters(
        id INTEGER PRIMARY KEY,
        sink TEXT NOT NULL,
        seq INTEGER NOT NULL,
        stream TEXT NOT NULL,
        record_id TEXT NOT NULL,
        body TEXT NOT NULL,
        reason TEXT NOT NULL,
        at INTEGER NOT NULL
     );",
    // 2: sink errors for status; dead-letter HTTP status and retry requests
    "ALTER TABLE sink_cursors ADD COLUMN last_error TEXT;
     ALTER TABLE dead_letters ADD COLUMN status INTEGER;
     ALTER TABLE dead_letters ADD COLUMN retry INTEGER NOT NULL DEFAULT 0;
     CREATE INDEX dead_letters_by_sink ON dead_letters(sink, retry);",
    // 3: body length kept with the row, so byte accounting never reads bodies
    "ALTER TABLE journal ADD COLUMN len INTEGER;",
    // 4: record bodies move to segment files; SQLite keeps one row per page
    "CREATE TABLE journal_pages(
        first_seq INTEGER PRIMARY KEY,
        records INTEGER NOT NULL,
        stream TEXT NOT NULL,
        segment INTEGER NOT NULL,
        offset INTEGER NOT NULL,
        len INTEGER NOT NULL,
        body_bytes INTEGER NOT NULL,
        min_created INTEGER NOT NULL
     );
     CREATE TABLE journal_seq(one INTEGER PRIMARY KEY CHECK (one = 1), high INTEGER NOT NULL);
     INSERT INTO journal_seq VALUES (1, coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'journal'), 0));
     CREATE TABLE stream_keys(sid INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
     INSERT INTO stream_keys(name) SELECT DISTINCT stream FROM seen;
     CREATE TABLE seen_keyed(
        sid INTEGER NOT NULL,
        id TEXT NOT NULL,
        created INTEGER NOT NULL,
        PRIMARY KEY(sid, id)
     ) WITHOUT ROWID;
     INSERT INTO seen_keyed SELECT k.sid, s.id, s.created FROM seen s JOIN stream_keys k ON k.name = s.stream;
     DROP TABLE seen;
     ALTER TABLE seen_keyed RENAME TO seen;",
    // 5: `seen` keyed by (id, sid): a text first key column lets SQLite
    // compare keys with its fast string comparator on every insert.
    "CREATE TABLE seen_by_id(
        id TEXT NOT NULL,
        sid INTEGER NOT NULL,
        created INTEGER NOT NULL,
        PRIMARY KEY(id, sid)
     ) WITHOUT ROWID;
     INSERT INTO seen_by_id SELECT id, sid, created FROM seen;
     DROP TABLE seen;
     ALTER TABLE seen_by_id RENAME TO seen;",
    // 6: an id that is an ObjectId (24 lowercase hex digits) is kept as its
    // 12 bytes; a stream's keys are complemented once it is known to be
    // served newest first (`newest_first`, decided at its first page). The
    // streams already here keep their ids' order (bytes sort as the text did).
    "ALTER TABLE stream_keys ADD COLUMN newest_first INTEGER;
     UPDATE stream_keys SET newest_first = 0;
     CREATE TABLE seen_packed(
        id NOT NULL,
        sid INTEGER NOT NULL,
        created INTEGER NOT NULL,
        PRIMARY KEY(id, sid)
     ) WITHOUT ROWID;
     INSERT INTO seen_packed
        SELECT CASE WHEN typeof(id) = 'text' AND length(id) = 24 AND id NOT GLOB '*[^0-9a-f]*'
                    THEN unhex(id) ELSE id END, sid, created
        FROM seen;
     DROP TABLE seen;
     ALTER TABLE seen_packed RENAME TO seen;",
];

/// `seen` has no index by `createdAt` (it would double the cost of every
/// insert), so pruning scans `seen`; it runs when the horizon
/// has moved this far (ms) since the last prune, and at the first window
/// after start. Keeping ids longer than needed is always safe.
const PRUNE_STEP: i64 = 10 * 60_000;

/// Old per-record journal rows are converted into pages of at most this many.
const CONVERT_PAGE: usize = 1000;

/// A store failure. Messages name the database file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database {path}: {source}")]
    Sqlite { path: String, source: rusqlite::Error },
    #[error("state database {path}: {message}")]
    Other { path: String, message: String },
}

/// One journal row as a sink sees it.
#[derive(Debug, Clone)]
pub struct JournalRow {
    pub seq: i64,
    /// A known stream's name is borrowed: rows copy no name.
    pub stream: Cow<'static, str>,
    /// `id` and `body` are slices of the journal page they were read from.
    pub id: Text,
    pub created: i64,
    pub body: Text,
}

/// Where a file sink's committed output ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FilePos {
    pub dev: u64,
    pub ino: u64,
    pub offset: u64,
}

/// A sink's delivery position.
#[derive(Debug, Clone, Copy, Default)]
pub struct SinkCursor {
    pub delivered_seq: i64,
    pub file: Option<FilePos>,
}

/// A page to store: its records, and the `(from, to)` window it answers.
#[derive(Debug)]
pub struct PageIn {
    pub records: Vec<Record>,
    pub window: (i64, i64),
}

/// What ingesting pages did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IngestStats {
    pub new: u64,
    pub duplicate: u64,
    /// Newest `createdAt` in the page, duplicates included.
    pub max_created: Option<i64>,
}

impl IngestStats {
    fn add(&mut self, other: &IngestStats) {
        self.new += other.new;
        self.duplicate += other.duplicate;
        self.max_created = self.max_created.max(other.max_created);
    }
}

/// A batch read for one sink.
#[derive(Debug, Default)]
pub struct Batch {
    /// Rows for the sink's streams, in order.
    pub rows: Vec<JournalRow>,
    /// The last `seq` scanned (rows of other streams included); the cursor
    /// moves here once `rows` are delivered.
    pub last_seq: i64,
}

/// Per-sink numbers for `/metrics`.
#[derive(Debug, Default)]
pub struct SinkScrape {
    pub name: String,
    pub lag_records: i64,
    pub oldest_created: Option<i64>,
    pub dead_letters: i64,
}

/// Store-derived gauges for `/metrics`.
#[derive(Debug, Default)]
pub struct Scrape {
    pub sinks: Vec<SinkScrape>,
    pub watermarks: Vec<(String, Option<i64>)>,
}

/// A record a sink refused, kept with the reason.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub sink: String,
    pub seq: i64,
    pub stream: String,
    pub record_id: String,
    pub status: Option<u16>,
    pub reason: String,
    pub at: String,
    pub retry_requested: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct StreamStatus {
    pub name: String,
    pub watermark: Option<String>,
    pub polled_until: Option<String>,
    pub last_poll: Option<String>,
    pub last_success: Option<String>,
    pub last_error: Option<String>,
    pub truncated_days: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SinkStatus {
    pub name: String,
    pub delivered_seq: i64,
    /// Records in the journal after the cursor (all streams).
    pub lag_records: i64,
    pub dead_letters: i64,
    pub last_delivery: Option<String>,
    pub last_error: Option<String>,
}

/// The stream name `repair` gives a journal page whose records are lost: no
/// sink receives it, so each passes over its seqs unread, and it is trimmed
/// like any page once they all have.
const LOST_PAGES: &str = "(lost)";

/// A journal page whose records cannot be read back (see `repair_journal`).
#[derive(Debug, Clone)]
pub struct DamagedPage {
    /// The page's first `seq`; it holds `records` from there on.
    pub first_seq: i64,
    pub records: i64,
    pub stream: String,
    /// The oldest `createdAt` (ms) among its records.
    pub min_created: i64,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub path: String,
    pub schema_version: i64,
    pub journal_records: i64,
    pub journal_bytes: i64,
    pub streams: Vec<StreamStatus>,
    pub sinks: Vec<SinkStatus>,
}

struct Inner {
    path: PathBuf,
    /// The writer connection. Fair when a group of pages lets it go: a
    /// waiting cursor commit goes next (see `Store::ingest_stream`).
    conn: parking_lot::Mutex<Connection>,
    /// Tasks waiting for `conn` (a group open that long commits early).
    waiting: AtomicUsize,
    /// A second, read-only connection for the sinks' reads, so that a sink
    /// reading the journal does not wait while a page group is synced and
    /// committed on `conn` (WAL lets readers run beside the writer).
    /// `None` for a read-only open (`status`).
    reader: Option<Mutex<Connection>>,
    /// The segment files, written under `conn`; `None` for a read-only open.
    segments: Mutex<Option<Segments>>,
    /// Where the segment files are.
    segments_dir: PathBuf,
    journal_records: AtomicU64,
    journal_bytes: AtomicU64,
    /// Per stream, the horizon of the last prune of `seen`.
    pruned: Mutex<std::collections::HashMap<String, i64>>,
    /// Sinks whose cursors hold back journal trimming.
    active_sinks: Mutex<Vec<String>>,
    /// Woken when the journal grows.
    grew: tokio::sync::Notify,
    /// Woken when the journal shrinks.
    shrank: tokio::sync::Notify,
}

impl Inner {
    /// The writer connection, once it is free; counted in `waiting` meanwhile.
    fn writer(&self) -> parking_lot::MutexGuard<'_, Connection> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let conn = self.conn.lock();
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        conn
    }
}

/// An exclusive lock on a state database, held for the life of the
/// process that writes it (`run`, `once`, `reset`): a second writer refuses
/// to start instead of racing the first on cursors and watermarks.
#[derive(Debug)]
pub struct WriterLock {
    _file: std::fs::File,
}

impl WriterLock {
    /// Take the lock beside `db` (`<db>.lock`), or say who holds it.
    pub fn acquire(db: &Path) -> Result<WriterLock, StoreError> {
        use std::io::{Read, Seek, Write};
        use std::os::unix::io::AsRawFd;
        let mut path = db.as_os_str().to_owned();
        path.push(".lock");
        let path = PathBuf::from(path);
        let err = |message: String| StoreError::Other { path: db.display().to_string(), message };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::fsutil::create_private_dir(dir)
                .map_err(|e| err(format!("cannot create directory {}: {e}", dir.display())))?;
        }
        let mut file = crate::fsutil::open_private(&path)
            .map_err(|e| err(format!("cannot open lock file {}: {e}", path.display())))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() { String::new() } else { format!(" (pid {holder})") };
            return Err(err(format!(
                "another opsera-shipper{who} is using this state database; only one may write it at a time \
                 (`status` works while it runs)"
            )));
        }
        let _ = file.set_len(0).and_then(|()| file.rewind()).and_then(|()| writeln!(file, "{}", std::process::id()));
        Ok(WriterLock { _file: file })
    }
}

/// Handle to the state database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl Store {
    /// Open (creating if needed) the state database at `path` and its
    /// journal segments for writing, applying migrations and cutting any
    /// uncommitted segment tail. Only the holder of the [`WriterLock`] may
    /// do this. Blocking: call before the runtime is busy, or from
    /// `spawn_blocking`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Self::open_with(path, true)
    }

    /// Open the state database for reading what `status` and
    /// `dead-letters` show while a daemon may be running: the segment files
    /// are not touched, and the journal cannot be read or written.
    pub fn open_read(path: &Path) -> Result<Store, StoreError> {
        Self::open_with(path, false)
    }

    /// Check every journal page against its segment file: present, long
    /// enough, and holding the records its row says. With `drop`, the pages
    /// that fail are marked lost (one transaction; see `LOST_PAGES`), so
    /// that the store opens and sinks pass over them: their records are
    /// lost, since their bytes are. How many pages were checked, and those
    /// that failed, in order. Blocking; `_lock` shows the caller holds the
    /// [`WriterLock`].
    pub fn repair_journal(
        path: &Path,
        drop: bool,
        _lock: &WriterLock,
    ) -> Result<(usize, Vec<DamagedPage>), StoreError> {
        let sq = |source| StoreError::Sqlite { path: path.display().to_string(), source };
        if !path.exists() {
            return Err(StoreError::Other { path: path.display().to_string(), message: "no such file".into() });
        }
        let (mut conn, version) = connect(path)?;
        if version == 0 {
            return Ok((0, Vec::new())); // a new, empty database: no journal yet
        }
        conn.execute_batch("PRAGMA synchronous = FULL;").map_err(sq)?;
        migrate(&mut conn, path)?;
        let dir = segments::dir_for(path);
        let (mut pages, mut damaged) = (0, Vec::new());
        {
            let mut st = conn
                .prepare(
                    "SELECT first_seq, records, stream, segment, offset, len, min_created FROM journal_pages
                     WHERE stream <> ?1 ORDER BY first_seq",
                )
                .map_err(sq)?;
            let mut rows = st.query([LOST_PAGES]).map_err(sq)?;
            while let Some(r) = rows.next().map_err(sq)? {
                pages += 1;
                let (first_seq, records, stream): (i64, i64, String) =
                    (r.get(0).map_err(sq)?, r.get(1).map_err(sq)?, r.get(2).map_err(sq)?);
                let (no, at, len, min_created): (i64, i64, i64, i64) =
                    (r.get(3).map_err(sq)?, r.get(4).map_err(sq)?, r.get(5).map_err(sq)?, r.get(6).map_err(sq)?);
                // Only a missing file, one too short, or bytes that do not
                // decode mean lost records. Any other error (permissions, I/O)
                // may pass: stop, and change nothing.
                let seg = segments::seg_path(&dir, no as u64);
                let abort = |e: String| StoreError::Other {
                    path: path.display().to_string(),
                    message: format!("{e}; repair stopped and changed nothing"),
                };
                let problem = match std::fs::metadata(&seg) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        Some(format!("journal segment {}: missing", seg.display()))
                    }
                    Err(e) => return Err(abort(format!("journal segment {}: {e}", seg.display()))),
                    Ok(m) if !m.is_file() => {
                        return Err(abort(format!("journal segment {}: not a regular file", seg.display())));
                    }
                    Ok(m) if m.len() < (at + len) as u64 => Some(format!(
                        "journal segment {}: {} bytes, but the page ends at byte {}",
                        seg.display(),
                        m.len(),
                        at + len
                    )),
                    Ok(_) => {
                        let buf = segments::read(&dir, no as u64, at as u64, len as usize).map_err(abort)?;
                        let mut frames = 0i64;
                        let mut bad = None;
                        for f in segments::decode(&buf) {
                            match f {
                                Ok(_) => frames += 1,
                                Err(e) => {
                                    bad = Some(e);
                                    break;
                                }
                            }
                        }
                        match bad {
                            Some(e) => Some(format!("journal segment {no}: {e}")),
                            None if frames != records => {
                                Some(format!("journal segment {no}: {frames} records where {records} should be"))
                            }
                            None => None,
                        }
                    }
                };
                if let Some(reason) = problem {
                    damaged.push(DamagedPage { first_seq, records, stream, min_created, reason });
                }
            }
        }
        if drop && !damaged.is_empty() {
            let tx = conn.transaction().map_err(sq)?;
            {
                // The row stays, its records' seqs passed over by every sink
                // as another stream's (see LOST_PAGES), until trimmed.
                let mut mark = tx
                    .prepare(
                        "UPDATE journal_pages SET stream = ?2, segment = 0, offset = 0, len = 0, body_bytes = 0
                         WHERE first_seq = ?1",
                    )
                    .map_err(sq)?;
                for d in &damaged {
                    mark.execute(params![d.first_seq, LOST_PAGES]).map_err(sq)?;
                }
            }
            tx.commit().map_err(sq)?;
        }
        Ok((pages, damaged))
    }

    fn open_with(path: &Path, writer: bool) -> Result<Store, StoreError> {
        let err = |message: String| StoreError::Other { path: path.display().to_string(), message };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::fsutil::create_private_dir(dir)
                .map_err(|e| err(format!("cannot create directory {}: {e}", dir.display())))?;
        }
        crate::fsutil::open_private(path).map_err(|e| err(format!("cannot create the file: {e}")))?;
        let sq = |source| StoreError::Sqlite { path: path.display().to_string(), source };
        let (mut conn, version) = connect(path)?;
        // A new database gets 16 KiB pages: a page holds ~30 records instead
        // of ~8, so each insert, delete and WAL frame does less work per byte.
        // (An existing database keeps its page size; it must be set before WAL.)
        if version == 0 {
            conn.execute_batch("PRAGMA page_size = 16384;").map_err(sq)?;
        }
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).map_err(sq)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(err(format!(
                "could not switch to WAL mode (got {mode}); is the file on a network filesystem?"
            )));
        }
        // synchronous = FULL: every commit is fsynced (see README, "Power
        // loss"). Checkpoints every 8 MiB of WAL: journal-page rows inserted
        // and trimmed between two checkpoints never reach the main file.
        // A 512 KiB page cache (SQLite's default is 2 MiB): with record bodies in
        // segment files, SQLite holds only ids and small rows, whose inserts
        // touch a few pages at the edge of each B-tree; a bigger cache only
        // fills up while pruning scans `seen`, and stays resident.
        conn.execute_batch(
            "PRAGMA synchronous = FULL; PRAGMA foreign_keys = OFF; PRAGMA wal_autocheckpoint = 512;
             PRAGMA cache_size = -512; PRAGMA temp_store = MEMORY;",
        )
        .map_err(sq)?;
        // Every statement this store runs stays prepared (rusqlite keeps 16).
        conn.set_prepared_statement_cache_capacity(64);
        // Only the writer upgrades the schema: `status` or `dead-letters`
        // run by a newer build must not change it under a running daemon.
        if !writer && version < MIGRATIONS.len() as i64 {
            return Err(err(format!(
                "schema version {version}, older than this build's {}: it is upgraded when the daemon (or \
                 `once`) starts with this build; until then use the running build's commands",
                MIGRATIONS.len()
            )));
        }
        migrate(&mut conn, path)?;
        let segments = if writer {
            let mut committed = std::collections::BTreeMap::new();
            let mut st = conn
                .prepare("SELECT segment, max(offset + len) FROM journal_pages WHERE stream <> ?1 GROUP BY segment")
                .map_err(sq)?;
            let rows = st
                .query_map([LOST_PAGES], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)))
                .map_err(sq)?;
            for row in rows {
                let (no, end) = row.map_err(sq)?;
                committed.insert(no, end);
            }
            drop(st);
            let mut segs = Segments::open(&segments::dir_for(path), &committed).map_err(err)?;
            convert_old_journal(&mut conn, &mut segs, path)?;
            Some(segs)
        } else {
            None
        };
        let reader = if writer {
            let r = Connection::open(path).map_err(sq)?;
            r.busy_timeout(std::time::Duration::from_secs(10)).map_err(sq)?;
            // It reads only `journal_pages`: a small cache does.
            r.execute_batch("PRAGMA query_only = ON; PRAGMA cache_size = -64;").map_err(sq)?;
            Some(Mutex::new(r))
        } else {
            None
        };
        let (records, bytes): (i64, i64) = conn
            .query_row("SELECT coalesce(sum(records), 0), coalesce(sum(body_bytes), 0) FROM journal_pages", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .map_err(sq)?;
        Ok(Store {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                conn: parking_lot::Mutex::new(conn),
                waiting: AtomicUsize::new(0),
                reader,
                segments: Mutex::new(segments),
                segments_dir: segments::dir_for(path),
                pruned: Mutex::new(std::collections::HashMap::new()),
                journal_records: AtomicU64::new(records as u64),
                journal_bytes: AtomicU64::new(bytes as u64),
                active_sinks: Mutex::new(Vec::new()),
                grew: tokio::sync::Notify::new(),
                shrank: tokio::sync::Notify::new(),
            }),
        })
    }

    /// Records and bytes in the journal now.
    pub fn backlog(&self) -> (u64, u64) {
        (self.inner.journal_records.load(Ordering::Relaxed), self.inner.journal_bytes.load(Ordering::Relaxed))
    }

    /// Resolves the next time the journal grows (`enable` it before
    /// checking, so a growth in between is not missed).
    pub fn journal_grew(&self) -> tokio::sync::futures::Notified<'_> {
        self.inner.grew.notified()
    }

    /// Resolves the next time the journal shrinks.
    pub fn journal_shrank(&self) -> tokio::sync::futures::Notified<'_> {
        self.inner.shrank.notified()
    }

    /// Run `f` on the blocking pool; a task that panicked is an error naming the store.
    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        let task = tokio::task::spawn_blocking(move || f(&inner));
        task.await.map_err(|e| other(&self.inner, format!("store task failed: {e}")))?
    }

    /// Run `f` on the writer connection, on the blocking pool.
    async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner, &mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.blocking(move |inner| f(inner, &mut inner.writer())).await
    }

    /// Like `run`, on the read-only connection (an error for a read-only open).
    async fn run_read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner, &Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.blocking(move |inner| {
            let reader = inner.reader.as_ref().ok_or_else(|| read_only(inner))?;
            f(inner, &lock(reader))
        })
        .await
    }

    /// Make these the sinks that hold back trimming. A sink seen for the
    /// first time receives every record still in the journal (records some
    /// sink has not delivered yet, so renaming a failing sink abandons
    /// nothing) and everything ingested from then on.
    pub async fn register_sinks(&self, names: Vec<String>) -> Result<(), StoreError> {
        self.run(move |inner, conn| {
            let tx = conn.transaction().map_err(|e| sq(inner, e))?;
            let start: i64 = tx
                .query_row(
                    "SELECT coalesce((SELECT min(first_seq) - 1 FROM journal_pages),
                                     (SELECT high FROM journal_seq), 0)",
                    [],
                    |r| r.get(0),
                )
                .map_err(|e| sq(inner, e))?;
            for n in &names {
                tx.execute(
                    "INSERT OR IGNORE INTO sink_cursors(sink, delivered_seq) VALUES (?1, ?2)",
                    params![n, start],
                )
                .map_err(|e| sq(inner, e))?;
            }
            tx.commit().map_err(|e| sq(inner, e))?;
            *lock(&inner.active_sinks) = names;
            trim(inner, conn)
        })
        .await
    }

    /// The stream's checkpoint (empty for a stream never polled).
    pub async fn checkpoint(&self, stream: &str) -> Result<Checkpoint, StoreError> {
        let stream = stream.to_string();
        self.run(move |inner, conn| {
            conn.query_row("SELECT watermark, polled_until FROM streams WHERE name = ?1", [&stream], |r| {
                Ok(Checkpoint { watermark: r.get(0)?, polled_until: r.get(1)? })
            })
            .optional()
            .map(Option::unwrap_or_default)
            .map_err(|e| sq(inner, e))
        })
        .await
    }

    /// Store one page that answered a query for `[from, to)`; see `ingest_pages`.
    pub async fn ingest(
        &self,
        stream: &str,
        records: Vec<Record>,
        window: (i64, i64),
    ) -> Result<IngestStats, StoreError> {
        self.ingest_pages(stream, vec![PageIn { records, window }]).await
    }

    /// Store pages of one stream in one transaction (see [`Group`]): a
    /// group of pages costs two fsyncs, not two a page. `window` is the
    /// `(from, to)` a page answers. The id of a record created before
    /// `from` (a server that ignores its bounds) is remembered as if
    /// created at `to`, and again each time it is served, so pruning cannot
    /// forget it while the server still returns it, and it is never
    /// delivered twice.
    pub async fn ingest_pages(&self, stream: &str, pages: Vec<PageIn>) -> Result<IngestStats, StoreError> {
        let stream = stream.to_string();
        let stats = self
            .run(move |inner, conn| {
                let mut segs = lock(&inner.segments);
                let mut group = Group::open(inner, conn, &mut segs, &stream)?;
                for page in &pages {
                    group.add(page)?;
                }
                group.commit()
            })
            .await?;
        Ok(stats)
    }

    /// Store the pages that arrive on `pages` until the sender hangs up, as
    /// `ingest_pages` does, a group at a time. Each page comes with its
    /// place in the sender's queue (`S`), given back as soon as the page is
    /// taken. A group takes pages as long as the next one arrives within
    /// `GROUP_WAIT`, up to `GROUP_TIME` and `GROUP_BYTES`, then commits; it
    /// holds only the page being stored, so a backfill's groups grow without
    /// its memory growing. `stored` is told of each group once committed
    /// (its records, and what storing them did); the sum is returned.
    pub async fn ingest_stream<S: Send + 'static>(
        &self,
        stream: &str,
        pages: std::sync::mpsc::Receiver<(PageIn, S)>,
        mut stored: impl FnMut(u64, &IngestStats) + Send + 'static,
    ) -> Result<IngestStats, StoreError> {
        use std::sync::mpsc::RecvTimeoutError;
        let stream = stream.to_string();
        self.blocking(move |inner| {
            let mut total = IngestStats::default();
            // Only a group holds the writer connection, not the wait for its first page.
            while let Ok((first, slot)) = pages.recv() {
                drop(slot);
                let (mut conn, mut segs) = (inner.writer(), lock(&inner.segments));
                let started = Instant::now();
                let mut group = Group::open(inner, &mut conn, &mut segs, &stream)?;
                let mut records = group.add(&first)?;
                drop(first);
                let mut open = true;
                while open && group.written() < GROUP_BYTES {
                    let age = started.elapsed();
                    if age >= GROUP_TIME || (age >= GROUP_SHARE && inner.waiting.load(Ordering::Relaxed) > 0) {
                        break;
                    }
                    match pages.recv_timeout(GROUP_WAIT) {
                        Ok((page, slot)) => {
                            drop(slot);
                            records += group.add(&page)?;
                        }
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => open = false,
                    }
                }
                let pages_in = group.pages;
                let stats = group.commit()?;
                drop(segs);
                // Whoever waits for the connection goes before the next group.
                parking_lot::MutexGuard::unlock_fair(conn);
                tracing::debug!(
                    stream = %stream,
                    pages = pages_in,
                    records,
                    new = stats.new,
                    held_ms = started.elapsed().as_millis() as u64,
                    "Stored a group of pages."
                );
                stored(records, &stats);
                total.add(&stats);
                if !open {
                    break;
                }
            }
            Ok(total)
        })
        .await
    }

    /// A window is fully stored: move the watermark to the newest
    /// `createdAt` seen (never backwards), record the window's end and a
    /// successful poll, then forget ids older than `horizon(new checkpoint)`.
    pub async fn complete_window<H>(
        &self,
        stream: &str,
        max_created: Option<i64>,
        polled_until: i64,
        now: i64,
        horizon: H,
    ) -> Result<Checkpoint, StoreError>
    where
        H: FnOnce(Checkpoint) -> i64 + Send + 'static,
    {
        let stream = stream.to_string();
        self.run(move |inner, conn| {
            let tx = conn.transaction().map_err(|e| sq(inner, e))?;
            tx.execute(
                "INSERT INTO streams(name, watermark, polled_until, last_poll, last_success, last_error)
                 VALUES (?1, ?2, ?3, ?4, ?4, NULL)
                 ON CONFLICT(name) DO UPDATE SET
                    watermark = CASE WHEN ?2 IS NULL THEN watermark
                                     WHEN watermark IS NULL OR ?2 > watermark THEN ?2 ELSE watermark END,
                    polled_until = CASE WHEN polled_until IS NULL OR ?3 > polled_until THEN ?3 ELSE polled_until END,
                    last_poll = ?4, last_success = ?4, last_error = NULL",
                params![stream, max_created, polled_until, now],
            )
            .map_err(|e| sq(inner, e))?;
            let cp = tx
                .query_row("SELECT watermark, polled_until FROM streams WHERE name = ?1", [&stream], |r| {
                    Ok(Checkpoint { watermark: r.get(0)?, polled_until: r.get(1)? })
                })
                .map_err(|e| sq(inner, e))?;
            let horizon = horizon(cp);
            let mut pruned = lock(&inner.pruned);
            let due = pruned.get(&stream).is_none_or(|last| horizon >= last + PRUNE_STEP);
            if due {
                tx.execute(
                    "DELETE FROM seen WHERE sid = (SELECT sid FROM stream_keys WHERE name = ?1) AND created < ?2",
                    params![stream, horizon],
                )
                .map_err(|e| sq(inner, e))?;
            }
            tx.commit().map_err(|e| sq(inner, e))?;
            if due {
                pruned.insert(stream, horizon);
            }
            Ok(cp)
        })
        .await
    }

    /// Record a failed poll (the checkpoint does not move).
    pub async fn record_poll_error(&self, stream: &str, now: i64, error: String) -> Result<(), StoreError> {
        let stream = stream.to_string();
        self.run(move |inner, conn| {
            conn.execute(
                "INSERT INTO streams(name, last_poll, last_error) VALUES (?1, ?2, ?3)
                 ON CONFLICT(name) DO UPDATE SET last_poll = ?2, last_error = ?3",
                params![stream, now, error],
            )
            .map(|_| ())
            .map_err(|e| sq(inner, e))
        })
        .await
    }

    /// Count a v1 day that came back at the record cap.
    pub async fn count_truncated_day(&self, stream: &str) -> Result<(), StoreError> {
        let stream = stream.to_string();
        self.run(move |inner, conn| {
            conn.execute(
                "INSERT INTO streams(name, truncated_days) VALUES (?1, 1)
                 ON CONFLICT(name) DO UPDATE SET truncated_days = truncated_days + 1",
                [stream],
            )
            .map(|_| ())
            .map_err(|e| sq(inner, e))
        })
        .await
    }

    /// The sink's position.
    pub async fn sink_cursor(&self, sink: &str) -> Result<SinkCursor, StoreError> {
        let sink = sink.to_string();
        self.run(move |inner, conn| {
            conn.query_row(
                "SELECT delivered_seq, file_dev, file_ino, file_offset FROM sink_cursors WHERE sink = ?1",
                [&sink],
                |r| {
                    let dev: Option<i64> = r.get(1)?;
                    let ino: Option<i64> = r.get(2)?;
                    let off: Option<i64> = r.get(3)?;
                    let file = match (dev, ino, off) {
                        (Some(d), Some(i), Some(o)) => Some(FilePos { dev: d as u64, ino: i as u64, offset: o as u64 }),
                        _ => None,
                    };
                    Ok(SinkCursor { delivered_seq: r.get(0)?, file })
                },
            )
            .optional()
            .map(Option::unwrap_or_default)
            .map_err(|e| sq(inner, e))
        })
        .await
    }

    /// Up to `limit` rows (and about `max_bytes`) after `after`, keeping only `streams`.
    pub async fn read_batch(
        &self,
        after: i64,
        streams: Arc<[String]>,
        limit: usize,
        max_bytes: usize,
        overhead: usize,
    ) -> Result<Batch, StoreError> {
        self.run_read(move |inner, conn| {
            // From the page holding `after + 1` (or the first after it) on.
            let mut stmt = conn
                .prepare_cached(
                    "SELECT first_seq, records, stream, segment, offset, len FROM journal_pages
                     WHERE first_seq >= coalesce((SELECT max(first_seq) FROM journal_pages WHERE first_seq <= ?1), 0)
                     ORDER BY first_seq",
                )
                .map_err(|e| sq(inner, e))?;
            let mut pages = stmt.query([after]).map_err(|e| sq(inner, e))?;
            let mut batch = Batch { rows: Vec::with_capacity(limit.min(8192)), last_seq: after };
            let (mut bytes, mut scanned) = (0usize, 0usize);
            'pages: while let Some(p) = pages.next().map_err(|e| sq(inner, e))? {
                let (first, records): (i64, i64) =
                    (p.get(0).map_err(|e| sq(inner, e))?, p.get(1).map_err(|e| sq(inner, e))?);
                let last = first + records - 1;
                if last <= after {
                    continue;
                }
                let name = p.get_ref(2).and_then(|v| v.as_str().map_err(Into::into)).map_err(|e| sq(inner, e))?;
                if !streams.iter().any(|s| s == name) {
                    // Not this sink's: pass over the page's records unread.
                    let from = after.max(first - 1).max(batch.last_seq);
                    let n = (last.saturating_sub(from).max(0) as usize).min(limit - scanned);
                    batch.last_seq = from + n as i64;
                    scanned += n;
                    if scanned >= limit {
                        break;
                    }
                    continue;
                }
                let (no, at, len): (i64, i64, i64) = (
                    p.get(3).map_err(|e| sq(inner, e))?,
                    p.get(4).map_err(|e| sq(inner, e))?,
                    p.get(5).map_err(|e| sq(inner, e))?,
                );
                let stream = stream_name(name);
                let buf = segments::read(&inner.segments_dir, no as u64, at as u64, len as usize)
                    .map(bytes::Bytes::from)
                    .map_err(|message| other(inner, format!("{message}. {}", segments::REPAIR)))?;
                let damaged = |what: String| {
                    other(inner, format!("journal segment {no} (page from seq {first}): {what}. {}", segments::REPAIR))
                };
                let mut frames = 0i64;
                for frame in segments::decode(&buf) {
                    let seq = first + frames;
                    frames += 1;
                    let f = frame.map_err(damaged)?;
                    if seq <= after {
                        continue;
                    }
                    if seq > last {
                        return Err(damaged(format!("more than the {records} records it should hold")));
                    }
                    if !batch.rows.is_empty() && bytes + f.body.len() + overhead > max_bytes {
                        break 'pages; // this row starts the next batch
                    }
                    bytes += f.body.len() + overhead;
                    batch.rows.push(JournalRow {
                        seq,
                        stream: stream.clone(),
                        id: Text::slice_of(&buf, f.id),
                        created: f.created,
                        body: Text::slice_of(&buf, f.body),
                    });
                    batch.last_seq = seq;
                    scanned += 1;
                    if scanned >= limit {
                        break 'pages;
                    }
                }
                if frames != records {
                    // Never skip silently past records that cannot be read.
                    return Err(damaged(format!("{frames} records where {records} should be")));
                }
            }
            Ok(batch)
        })
        .await
    }

    /// The highest `seq` ever journaled.
    pub async fn high_seq(&self) -> Result<i64, StoreError> {
        self.run(|inner, conn| {
            conn.query_row("SELECT high FROM journal_seq", [], |r| r.get(0)).map_err(|e| sq(inner, e))
        })
        .await
    }

    /// A batch is delivered: move the sink's cursor (and file position) and trim the journal.
    pub async fn commit_cursor(&self, sink: &str, seq: i64, file: Option<FilePos>, now: i64) -> Result<(), StoreError> {
        let sink = sink.to_string();
        let trimmed = self
            .blocking(move |inner| {
                let detached = {
                    let mut conn = inner.writer();
                    // The cursor and the trim it allows commit together: one fsync a batch.
                    let tx = conn.transaction().map_err(|e| sq(inner, e))?;
                    save_cursor(&tx, &sink, seq, file, now).map_err(|e| sq(inner, e))?;
                    let freed = trim_in(inner, &tx)?;
                    tx.commit().map_err(|e| sq(inner, e))?;
                    release(inner, &conn, freed)
                };
                // With the connection let go: the storer need not wait for it.
                detached.delete(inner);
                Ok(())
            })
            .await;
        self.inner.shrank.notify_waiters();
        trimmed
    }

    /// Keep a record that `sink` refused permanently.
    pub async fn dead_letter(
        &self,
        sink: &str,
        row: JournalRow,
        reason: String,
        status: Option<u16>,
        now: i64,
    ) -> Result<(), StoreError> {
        let sink = sink.to_string();
        self.run(move |inner, conn| {
            conn.execute(
                "INSERT INTO dead_letters(sink, seq, stream, record_id, body, reason, status, at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![sink, row.seq, row.stream, row.id, row.body, reason, status, now],
            )
            .map(|_| ())
            .map_err(|e| sq(inner, e))
        })
        .await
    }

    /// Remember (or clear) why a sink is failing, for `status`.
    pub async fn record_sink_error(&self, sink: &str, error: Option<String>) -> Result<(), StoreError> {
        let sink = sink.to_string();
        self.run(move |inner, conn| {
            conn.execute("UPDATE sink_cursors SET last_error = ?2 WHERE sink = ?1", params![sink, error])
                .map(|_| ())
                .map_err(|e| sq(inner, e))
        })
        .await
    }

    /// Dead letters, oldest first, optionally of one sink.
    pub async fn dead_letters(&self, sink: Option<String>) -> Result<Vec<DeadLetter>, StoreError> {
        self.run(move |inner, conn| {
            let mut stmt = conn
                .prepare(
                    "SELECT id, sink, seq, stream, record_id, status, reason, at, retry FROM dead_letters
                     WHERE ?1 IS NULL OR sink = ?1 ORDER BY id",
                )
                .map_err(|e| sq(inner, e))?;
            stmt.query_map([sink], |r| {
                Ok(DeadLetter {
                    id: r.get(0)?,
                    sink: r.get(1)?,
                    seq: r.get(2)?,
                    stream: r.get(3)?,
                    record_id: r.get(4)?,
                    status: r.get(5)?,
                    reason: r.get(6)?,
                    at: crate::window::fmt_rfc3339(r.get(7)?),
                    retry_requested: r.get::<_, i64>(8)? != 0,
                })
            })
            .map_err(|e| sq(inner, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| sq(inner, e))
        })
        .await
    }

    /// Mark dead letters (of `sink`, and/or with these record ids) to be sent
    /// again by their sink; or, with `purge`, delete them. Returns how many.
    pub async fn select_dead_letters(
        &self,
        sink: Option<String>,
        record_ids: Vec<String>,
        purge: bool,
    ) -> Result<usize, StoreError> {
        self.run(move |inner, conn| {
            let tx = conn.transaction().map_err(|e| sq(inner, e))?;
            let verb = if purge { "DELETE FROM dead_letters" } else { "UPDATE dead_letters SET retry = 1" };
            let mut n = 0;
            if record_ids.is_empty() {
                n += tx
                    .execute(&format!("{verb} WHERE ?1 IS NULL OR sink = ?1"), params![sink])
                    .map_err(|e| sq(inner, e))?;
            } else {
                for id in &record_ids {
                    n += tx
                        .execute(
                            &format!("{verb} WHERE (?1 IS NULL OR sink = ?1) AND record_id = ?2"),
                            params![sink, id],
                        )
                        .map_err(|e| sq(inner, e))?;
                }
            }
            tx.commit().map_err(|e| sq(inner, e))?;
            Ok(n)
        })
        .await
    }

    /// Dead letters of `sink` marked for retry, as rows to deliver (with their dead-letter ids).
    pub async fn retry_requests(&self, sink: &str, limit: usize) -> Result<Vec<(i64, JournalRow)>, StoreError> {
        let sink = sink.to_string();
        self.run_read(move |inner, conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT id, seq, stream, record_id, body FROM dead_letters
                     WHERE sink = ?1 AND retry = 1 ORDER BY id LIMIT ?2",
                )
                .map_err(|e| sq(inner, e))?;
            stmt.query_map(params![sink, limit as i64], |r| {
                Ok((
                    r.get(0)?,
                    JournalRow {
                        seq: r.get(1)?,
                        stream: stream_name(&r.get::<_, String>(2)?),
                        id: r.get::<_, String>(3)?.into(),
                        created: 0,
                        body: r.get::<_, String>(4)?.into(),
                    },
                ))
            })
            .map_err(|e| sq(inner, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| sq(inner, e))
        })
        .await
    }

    /// Retried dead letters of `sink` were delivered (`None`: delete them)
    /// or refused again (why), and the sink's file now stands at `file`: all
    /// of it commits in one transaction, with the cursor left at `seq`, so a
    /// crash neither cuts delivered records that are no longer kept anywhere
    /// nor sends them again.
    pub async fn settle_retries(
        &self,
        sink: &str,
        seq: i64,
        file: Option<FilePos>,
        outcomes: Vec<(i64, Option<Refusal>)>,
        now: i64,
    ) -> Result<(), StoreError> {
        let sink = sink.to_string();
        self.run(move |inner, conn| {
            let settled = (|| {
                let tx = conn.transaction()?;
                if file.is_some() {
                    save_cursor(&tx, &sink, seq, file, now)?;
                }
                for (id, refused) in outcomes {
                    match refused {
                        None => tx.prepare_cached("DELETE FROM dead_letters WHERE id = ?1")?.execute([id])?,
                        Some((reason, status)) => tx
                            .prepare_cached(
                                "UPDATE dead_letters SET retry = 0, reason = ?2, status = ?3, at = ?4 WHERE id = ?1",
                            )?
                            .execute(params![id, reason, status, now])?,
                    };
                }
                tx.commit()
            })();
            settled.map_err(|e| sq(inner, e))
        })
        .await
    }

    /// Point a stream back to `since` (or to its initial lookback when `None`),
    /// forgetting the ids of records from then on so they are delivered again.
    pub async fn reset_stream(&self, stream: &str, since: Option<i64>) -> Result<(), StoreError> {
        let stream = stream.to_string();
        self.run(move |inner, conn| {
            let tx = conn.transaction().map_err(|e| sq(inner, e))?;
            tx.execute(
                "INSERT INTO streams(name, watermark, polled_until) VALUES (?1, ?2, ?2)
                 ON CONFLICT(name) DO UPDATE SET watermark = ?2, polled_until = ?2, last_error = NULL",
                params![stream, since],
            )
            .map_err(|e| sq(inner, e))?;
            tx.execute(
                "DELETE FROM seen WHERE sid = (SELECT sid FROM stream_keys WHERE name = ?1) AND created >= ?2",
                params![stream, since.unwrap_or(i64::MIN)],
            )
            .map_err(|e| sq(inner, e))?;
            tx.commit().map_err(|e| sq(inner, e))
        })
        .await
    }

    /// Everything `status` shows.
    /// `sinks`: each sink's name and the streams it receives.
    pub async fn status(&self, sinks: Vec<SinkStreams>) -> Result<Status, StoreError> {
        self.run(move |inner, conn| {
            let q = |e| sq(inner, e);
            let schema_version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(q)?;
            let (journal_records, journal_bytes): (i64, i64) = conn
                .query_row(
                    "SELECT coalesce(sum(records), 0), coalesce(sum(body_bytes), 0) FROM journal_pages",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(q)?;
            let mut stmt = conn
                .prepare(
                    "SELECT name, watermark, polled_until, last_poll, last_success, last_error, truncated_days
                     FROM streams ORDER BY name",
                )
                .map_err(q)?;
            let t = |v: Option<i64>| v.map(crate::window::fmt_rfc3339);
            let streams = stmt
                .query_map([], |r| {
                    Ok(StreamStatus {
                        name: r.get(0)?,
                        watermark: t(r.get(1)?),
                        polled_until: t(r.get(2)?),
                        last_poll: t(r.get(3)?),
                        last_success: t(r.get(4)?),
                        last_error: r.get(5)?,
                        truncated_days: r.get(6)?,
                    })
                })
                .map_err(q)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(q)?;
            let mut out = Vec::new();
            for (name, streams) in sinks {
                let (seq, updated, last_error): (i64, Option<i64>, Option<String>) = conn
                    .query_row(
                        "SELECT delivered_seq, updated, last_error FROM sink_cursors WHERE sink = ?1",
                        [&name],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .optional()
                    .map_err(q)?
                    .unwrap_or((0, None, None));
                let (lag, _) = lag(conn, seq, &streams).map_err(q)?;
                let dead: i64 = conn
                    .query_row("SELECT count(*) FROM dead_letters WHERE sink = ?1", [&name], |r| r.get(0))
                    .map_err(q)?;
                out.push(SinkStatus {
                    name,
                    delivered_seq: seq,
                    lag_records: lag,
                    dead_letters: dead,
                    last_delivery: t(updated),
                    last_error,
                });
            }
            Ok(Status {
                path: inner.path.display().to_string(),
                schema_version,
                journal_records,
                journal_bytes,
                streams,
                sinks: out,
            })
        })
        .await
    }

    /// The store-derived gauges for `/metrics`; `sinks` as for `status`.
    pub async fn scrape(&self, sinks: Vec<SinkStreams>, streams: Vec<String>) -> Result<Scrape, StoreError> {
        self.run(move |inner, conn| {
            let q = |e| sq(inner, e);
            let mut out = Scrape::default();
            for (name, sink_streams) in sinks {
                let cursor: i64 = conn
                    .query_row("SELECT delivered_seq FROM sink_cursors WHERE sink = ?1", [&name], |r| r.get(0))
                    .optional()
                    .map_err(q)?
                    .unwrap_or(0);
                let (lag_records, oldest_created) = lag(conn, cursor, &sink_streams).map_err(q)?;
                let dead_letters: i64 = conn
                    .query_row("SELECT count(*) FROM dead_letters WHERE sink = ?1", [&name], |r| r.get(0))
                    .map_err(q)?;
                out.sinks.push(SinkScrape { name, lag_records, oldest_created, dead_letters });
            }
            for name in streams {
                let wm: Option<i64> = conn
                    .query_row("SELECT watermark FROM streams WHERE name = ?1", [&name], |r| r.get(0))
                    .optional()
                    .map_err(q)?
                    .flatten();
                out.watermarks.push((name, wm));
            }
            Ok(out)
        })
        .await
    }
}

/// A sink's name and the streams it receives.
pub type SinkStreams = (String, Vec<String>);

/// Why a receiver refused a record: its reply, and the HTTP status if any.
pub type Refusal = (String, Option<u16>);

/// Move `sink`'s cursor to `seq` and its file position to `file`.
fn save_cursor(
    tx: &rusqlite::Transaction,
    sink: &str,
    seq: i64,
    file: Option<FilePos>,
    now: i64,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO sink_cursors(sink, delivered_seq, file_dev, file_ino, file_offset, updated)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT(sink) DO UPDATE SET delivered_seq = ?2, file_dev = ?3, file_ino = ?4,
            file_offset = ?5, updated = ?6, last_error = NULL",
    )?
    .execute(params![
        sink,
        seq,
        file.map(|f| f.dev as i64),
        file.map(|f| f.ino as i64),
        file.map(|f| f.offset as i64),
        now
    ])
    .map(|_| ())
}

/// Records of `streams` journaled after `seq`, and the oldest `createdAt`
/// of their pages.
fn lag(conn: &Connection, seq: i64, streams: &[String]) -> rusqlite::Result<(i64, Option<i64>)> {
    let mut st = conn.prepare_cached(
        "SELECT coalesce(sum(min(records, first_seq + records - 1 - ?1)), 0), min(min_created)
         FROM journal_pages WHERE first_seq + records - 1 > ?1 AND stream = ?2",
    )?;
    let (mut records, mut oldest) = (0, None::<i64>);
    for stream in streams {
        let (n, min): (i64, Option<i64>) = st.query_row(params![seq, stream], |r| Ok((r.get(0)?, r.get(1)?)))?;
        records += n;
        oldest = oldest.into_iter().chain(min).min();
    }
    Ok((records, oldest))
}

/// Delete the journal pages every active sink has passed.
fn trim(inner: &Inner, conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction().map_err(|e| sq(inner, e))?;
    let freed = trim_in(inner, &tx)?;
    tx.commit().map_err(|e| sq(inner, e))?;
    release(inner, conn, freed).delete(inner);
    Ok(())
}

/// Delete the journal pages every active sink has delivered, inside `tx`;
/// returns the (records, bytes) freed, to `release` once `tx` commits.
fn trim_in(inner: &Inner, tx: &rusqlite::Transaction) -> Result<(u64, u64), StoreError> {
    let sinks = lock(&inner.active_sinks).clone();
    if sinks.is_empty() {
        return Ok((0, 0));
    }
    let placeholders = vec!["?"; sinks.len()].join(",");
    let min: Option<i64> = tx
        .prepare_cached(&format!("SELECT min(delivered_seq) FROM sink_cursors WHERE sink IN ({placeholders})"))
        .and_then(|mut st| st.query_row(rusqlite::params_from_iter(sinks.iter()), |r| r.get(0)))
        .map_err(|e| sq(inner, e))?;
    let Some(min) = min else { return Ok((0, 0)) };
    // Whole pages only: a page part-delivered stays until its last record is.
    let (n, bytes): (i64, i64) = tx
        .prepare_cached(
            "SELECT coalesce(sum(records), 0), coalesce(sum(body_bytes), 0) FROM journal_pages
             WHERE first_seq + records - 1 <= ?1",
        )
        .and_then(|mut st| st.query_row([min], |r| Ok((r.get(0)?, r.get(1)?))))
        .map_err(|e| sq(inner, e))?;
    if n > 0 {
        tx.prepare_cached("DELETE FROM journal_pages WHERE first_seq + records - 1 <= ?1")
            .and_then(|mut st| st.execute([min]))
            .map_err(|e| sq(inner, e))?;
    }
    Ok((n as u64, bytes as u64))
}

/// A page's frames are written in pieces of about this size.
const WRITE_CHUNK: usize = 256 << 10;

/// Journal pages being written to the current segment: frames go out in
/// pieces as they are pushed (through one reused buffer), and one sync
/// covers every page of the group.
struct PageWriter<'a> {
    segs: &'a mut Segments,
    idle: bool,
    buf: Vec<u8>,
    /// Where the first page went: everything from there is rolled back if
    /// the pages do not commit.
    start: Option<(u64, u64)>,
    pages: Vec<PageMeta>,
}

/// One journal page: where its frames are, and what they hold.
struct PageMeta {
    stream: String,
    /// Its first `seq`, or `None` for the next after the highest so far.
    first: Option<i64>,
    segment: u64,
    offset: u64,
    len: usize,
    records: i64,
    body_bytes: i64,
    min_created: i64,
}

impl<'a> PageWriter<'a> {
    /// `idle` says nothing else is left to deliver (a segment may close early).
    fn new(segs: &'a mut Segments, idle: bool) -> Self {
        Self { segs, idle, buf: Vec::new(), start: None, pages: Vec::new() }
    }

    /// Start a page.
    fn start_page(&mut self, stream: &str, first: Option<i64>) {
        self.pages.push(PageMeta {
            stream: stream.to_string(),
            first,
            segment: 0,
            offset: 0,
            len: 0,
            records: 0,
            body_bytes: 0,
            min_created: 0,
        });
    }

    /// Add a record to the page started last; frames go out (not synced
    /// yet) in pieces of at most `WRITE_CHUNK` (or one frame, if larger),
    /// so a page is never held twice and the buffer never grows past it.
    fn push(&mut self, id: &str, created: i64, body: &str) -> Result<(), String> {
        if !self.buf.is_empty() && self.buf.len() + segments::frame_len(id, body) > WRITE_CHUNK {
            self.flush()?;
        }
        segments::encode(&mut self.buf, id, created, body);
        let page = self.pages.last_mut().expect("a page is started before records are pushed");
        page.min_created = if page.records == 0 { created } else { page.min_created.min(created) };
        page.records += 1;
        page.body_bytes += body.len() as i64;
        Ok(())
    }

    /// Write what is buffered of the page started last. Only a group's first
    /// write may start a new segment, so a page's pieces are contiguous.
    fn flush(&mut self) -> Result<(), String> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let (no, at) = self.segs.write(&self.buf, self.start.is_none().then_some(self.idle))?;
        self.start.get_or_insert((no, at));
        let page = self.pages.last_mut().expect("a page was started");
        if page.len == 0 {
            (page.segment, page.offset) = (no, at);
        }
        page.len += self.buf.len();
        self.buf.clear();
        Ok(())
    }

    /// Finish the page started last (not synced yet); an empty one is dropped.
    fn end_page(&mut self) -> Result<(), String> {
        self.flush()?;
        if self.pages.last().is_some_and(|p| p.records == 0) {
            self.pages.pop();
        }
        Ok(())
    }

    fn body_bytes(&self) -> i64 {
        self.pages.iter().map(|p| p.body_bytes).sum()
    }

    /// Make the written pages durable; on error everything written is rolled back.
    fn sync(&mut self) -> Result<(), String> {
        self.segs.sync().inspect_err(|_| self.rollback())
    }

    /// Index the synced pages in `tx`; on error everything written is rolled back.
    fn index(&mut self, path: &Path, tx: &rusqlite::Transaction) -> Result<(), StoreError> {
        let indexed = (|| {
            let mut high: i64 = tx.prepare_cached("SELECT high FROM journal_seq")?.query_row([], |r| r.get(0))?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO journal_pages(first_seq, records, stream, segment, offset, len, body_bytes, min_created)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for page in &self.pages {
                let first = page.first.unwrap_or(high + 1);
                insert.execute(params![
                    first,
                    page.records,
                    page.stream,
                    page.segment as i64,
                    page.offset as i64,
                    page.len as i64,
                    page.body_bytes,
                    page.min_created
                ])?;
                high = high.max(first + page.records - 1);
            }
            tx.prepare_cached("UPDATE journal_seq SET high = max(high, ?1)")?.execute([high])?;
            Ok(())
        })();
        if let Err(source) = indexed {
            self.rollback();
            return Err(StoreError::Sqlite { path: path.display().to_string(), source });
        }
        Ok(())
    }

    /// The pages did not commit: forget their bytes.
    fn rollback(&mut self) {
        if let Some((no, at)) = self.start {
            self.segs.rollback(no, at);
        }
    }
}

/// Move the per-record journal of schema versions 1–3 into segments, keeping
/// every `seq` (the sinks' cursors refer to them).
fn convert_old_journal(conn: &mut Connection, segs: &mut Segments, path: &Path) -> Result<(), StoreError> {
    let sq = |source| StoreError::Sqlite { path: path.display().to_string(), source };
    loop {
        let tx = conn.transaction().map_err(sq)?;
        let rows: Vec<(i64, String, String, i64, String)> = tx
            .prepare("SELECT seq, stream, id, created, body FROM journal ORDER BY seq LIMIT 10000")
            .and_then(|mut st| {
                st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?.collect()
            })
            .map_err(sq)?;
        let Some(last) = rows.last().map(|r| r.0) else { return Ok(()) };
        let mut pages = PageWriter::new(segs, false);
        let mut i = 0;
        while i < rows.len() {
            let (first, stream) = (rows[i].0, &rows[i].1);
            pages.start_page(stream, Some(first));
            let written = (|| {
                let mut n = 0;
                while i < rows.len() && &rows[i].1 == stream && rows[i].0 == first + n && (n as usize) < CONVERT_PAGE {
                    pages.push(&rows[i].2, rows[i].3, &rows[i].4)?;
                    (i, n) = (i + 1, n + 1);
                }
                pages.end_page()
            })();
            if let Err(message) = written {
                pages.rollback();
                return Err(StoreError::Other { path: path.display().to_string(), message });
            }
        }
        pages.sync().map_err(|message| StoreError::Other { path: path.display().to_string(), message })?;
        pages.index(path, &tx)?;
        // Not committed: the bytes go too (a start would cut them anyway).
        if let Err(e) = tx.execute("DELETE FROM journal WHERE seq <= ?1", [last]).and_then(|_| tx.commit()) {
            pages.rollback();
            return Err(sq(e));
        }
        tracing::info!(db = %path.display(), through_seq = last, "Moved journaled records into segment files.");
    }
}

fn read_only(inner: &Inner) -> StoreError {
    other(inner, "opened read-only: the journal cannot be read or written")
}

/// An error of the store at `inner.path` that is not SQLite's.
fn other(inner: &Inner, message: impl Into<String>) -> StoreError {
    StoreError::Other { path: inner.path.display().to_string(), message: message.into() }
}

/// After a trim committed: update the counters and take the segments no
/// page refers to any more off the list, to be deleted with
/// [`Detached::delete`] once the locks are let go.
fn release(inner: &Inner, conn: &Connection, (records, bytes): (u64, u64)) -> Detached {
    inner.journal_records.fetch_sub(records, Ordering::Relaxed);
    inner.journal_bytes.fetch_sub(bytes, Ordering::Relaxed);
    if records == 0 {
        return Detached::default();
    }
    if let Some(segs) = lock(&inner.segments).as_mut() {
        let min = "SELECT min(segment) FROM journal_pages WHERE stream <> ?1";
        match conn.query_row(min, [LOST_PAGES], |r| r.get::<_, Option<i64>>(0)) {
            Ok(min) => return Detached(segs.detach_before(min.map_or(segs.current(), |m| m as u64))),
            // Retried at the next trim.
            Err(e) => tracing::warn!(error = %sq(inner, e), "Cannot look up delivered journal segments."),
        }
    }
    Detached::default()
}

/// Journal segments every sink has passed, off the list and to be deleted
/// once the writer connection and the segments' lock are let go.
#[derive(Default)]
#[must_use = "detached segments are deleted with `delete`"]
struct Detached(Vec<u64>);

impl Detached {
    fn delete(self, inner: &Inner) {
        let failed = segments::delete(&inner.segments_dir, &self.0);
        if !failed.is_empty()
            && let Some(segs) = lock(&inner.segments).as_mut()
        {
            segs.reattach(&failed);
        }
    }
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let sq = |source| StoreError::Sqlite { path: path.display().to_string(), source };
    let tx = conn.transaction().map_err(sq)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(sq)?;
    refuse_newer(version, path)?;
    for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.execute_batch(m).map_err(sq)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64).map_err(sq)?;
    }
    tx.commit().map_err(sq)
}

/// A connection to the state database at `path`, and its schema version,
/// refused (before anything changes, even the journal mode) when a newer
/// build wrote it.
fn connect(path: &Path) -> Result<(Connection, i64), StoreError> {
    let sq = |source| StoreError::Sqlite { path: path.display().to_string(), source };
    let conn = Connection::open(path).map_err(sq)?;
    conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(sq)?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(sq)?;
    refuse_newer(version, path)?;
    Ok((conn, version))
}

fn refuse_newer(version: i64, path: &Path) -> Result<(), StoreError> {
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::Other {
            path: path.display().to_string(),
            message: format!(
                "written by a newer opsera-shipper (schema version {version}, this build knows up to {known}); \
                 refusing to touch it: run the newer version, or point state.path elsewhere"
            ),
        });
    }
    Ok(())
}

/// How long a group waits for its next page before it commits without it.
/// A backfill's pages follow each other faster than this, so its groups
/// grow; a slow server's pages commit one at a time, each this much later.
/// Long in unit tests, so that pages sent together are one group.
const GROUP_WAIT: Duration = Duration::from_millis(if cfg!(test) { 300 } else { 10 });
/// A group commits after this long at most: while it is open it holds the
/// writer connection, which the sinks' cursor commits wait for.
const GROUP_TIME: Duration = Duration::from_millis(if cfg!(test) { 60_000 } else { 50 });
/// Or after this long, if someone is waiting for the connection.
const GROUP_SHARE: Duration = Duration::from_millis(if cfg!(test) { 0 } else { 5 });
/// Or once it has written this much to the segment (a segment is only
/// closed between groups).
const GROUP_BYTES: usize = 16 << 20;

/// Pages of one stream being stored in one transaction. As a page is
/// added, its ids go into `seen` and the frames of its new records are
/// written to the segment (not synced), so a group holds none of its pages
/// in memory. `commit` syncs the segment once, then indexes the pages and
/// commits, so the bytes are durable before any row refers to them. A
/// group dropped uncommitted leaves nothing: its transaction rolls back and
/// its bytes are cut.
struct Group<'a> {
    inner: &'a Inner,
    /// `None` once committed.
    tx: Option<rusqlite::Transaction<'a>>,
    writer: PageWriter<'a>,
    stream: String,
    sid: i64,
    /// How the stream's ids go into `seen` (`SeenId`); `None` until its
    /// first page with records decides it.
    newest_first: Option<bool>,
    stats: IngestStats,
    /// Pages added.
    pages: usize,
}

impl<'a> Group<'a> {
    fn open(
        inner: &'a Inner,
        conn: &'a mut Connection,
        segs: &'a mut Option<Segments>,
        stream: &str,
    ) -> Result<Self, StoreError> {
        let segs = segs.as_mut().ok_or_else(|| read_only(inner))?;
        let idle = inner.journal_records.load(Ordering::Relaxed) == 0;
        let tx = conn.transaction().map_err(|e| sq(inner, e))?;
        let (sid, newest_first) = (|| {
            tx.prepare_cached("INSERT OR IGNORE INTO stream_keys(name) VALUES (?1)")?.execute([stream])?;
            tx.prepare_cached("SELECT sid, newest_first FROM stream_keys WHERE name = ?1")?
                .query_row([stream], |r| Ok((r.get(0)?, r.get(1)?)))
        })()
        .map_err(|e| sq(inner, e))?;
        let writer = PageWriter::new(segs, idle);
        Ok(Group {
            inner,
            tx: Some(tx),
            writer,
            stream: stream.to_string(),
            sid,
            newest_first,
            stats: IngestStats::default(),
            pages: 0,
        })
    }

    /// Remember a page's ids and write its new records; its record count.
    fn add(&mut self, page: &PageIn) -> Result<u64, StoreError> {
        let tx = self.tx.as_ref().expect("an open group has its transaction");
        let newest_first = match (self.newest_first, page.records.first(), page.records.last()) {
            (Some(known), _, _) => known,
            (None, Some(first), Some(last)) => {
                // Decided once, for good: the same id must always make the same key.
                let newest_first = first.created >= last.created;
                tx.prepare_cached("UPDATE stream_keys SET newest_first = ?2 WHERE sid = ?1")
                    .and_then(|mut st| st.execute(params![self.sid, newest_first]))
                    .map_err(|e| sq(self.inner, e))?;
                self.newest_first = Some(newest_first);
                newest_first
            }
            (None, _, _) => false, // no records: no ids to key
        };
        let fresh = remember_ids(tx, self.sid, newest_first, page, &mut self.stats).map_err(|e| sq(self.inner, e))?;
        self.pages += 1;
        let max = page.records.iter().map(|r| r.created).max();
        self.stats.max_created = self.stats.max_created.max(max);
        if fresh.contains(&true) {
            let w = &mut self.writer;
            w.start_page(&self.stream, None);
            let kept = page.records.iter().zip(&fresh).filter(|(_, new)| **new);
            kept.map(|(r, _)| r)
                .try_for_each(|r| w.push(&r.id, r.created, &r.body))
                .and_then(|()| w.end_page())
                .map_err(|message| other(self.inner, message))?;
        }
        Ok(page.records.len() as u64)
    }

    /// Bytes written to the segment so far.
    fn written(&self) -> usize {
        self.writer.pages.iter().map(|p| p.len).sum()
    }

    /// Make the group durable: sync the segment, index the pages, commit.
    fn commit(mut self) -> Result<IngestStats, StoreError> {
        let inner = self.inner;
        let tx = self.tx.take().expect("a group commits once");
        if !self.writer.pages.is_empty() {
            self.writer.sync().map_err(|message| other(inner, message))?;
            self.writer.index(&inner.path, &tx)?;
        }
        if let Err(e) = tx.commit() {
            self.writer.rollback();
            return Err(sq(inner, e));
        }
        inner.journal_records.fetch_add(self.stats.new, Ordering::Relaxed);
        inner.journal_bytes.fetch_add(self.writer.body_bytes() as u64, Ordering::Relaxed);
        if self.stats.new > 0 {
            inner.grew.notify_waiters();
        }
        Ok(self.stats)
    }
}

impl Drop for Group<'_> {
    fn drop(&mut self) {
        if self.tx.is_some() {
            self.writer.rollback();
        }
    }
}

/// Ids go into `seen` this many at a time when all of them are new (the
/// common case), one statement for all; small in unit tests, so that they
/// take both paths.
const SEEN_CHUNK: usize = if cfg!(test) { 4 } else { 64 };

/// Put a page's ids into `seen`, counting them in `stats`; which records
/// were new, in order. A chunk of ids goes in one statement when all are
/// new (the usual case in a backfill), else one by one to learn which.
fn remember_ids(
    tx: &rusqlite::Transaction,
    sid: i64,
    newest_first: bool,
    page: &PageIn,
    stats: &mut IngestStats,
) -> rusqlite::Result<Vec<bool>> {
    let (from, to) = page.window;
    let key = |r: &Record| if r.created < from { to } else { r.created };
    let mut new = Vec::with_capacity(page.records.len());
    for chunk in page.records.chunks(SEEN_CHUNK) {
        if chunk.len() == SEEN_CHUNK && insert_all_new(tx, sid, newest_first, chunk, key)? {
            new.extend(std::iter::repeat_n(true, chunk.len()));
            stats.new += chunk.len() as u64;
            continue;
        }
        let mut seen = tx.prepare_cached("INSERT OR IGNORE INTO seen(sid, id, created) VALUES (?1, ?2, ?3)")?;
        for r in chunk {
            let is_new = seen.execute(params![sid, SeenId::of(&r.id, newest_first), key(r)])? == 1;
            new.push(is_new);
            if is_new {
                stats.new += 1;
            } else {
                stats.duplicate += 1;
                if r.created < from {
                    // Served again out of its window: keep remembering it.
                    tx.prepare_cached("UPDATE seen SET created = ?3 WHERE sid = ?1 AND id = ?2 AND created < ?3")?
                        .execute(params![sid, SeenId::of(&r.id, newest_first), key(r)])?;
                }
            }
        }
    }
    Ok(new)
}

/// Insert `chunk`'s ids in one statement, inside a savepoint. `true` when
/// every one was new; otherwise nothing of it is kept (the caller goes one
/// by one, to learn which ones were).
fn insert_all_new(
    tx: &rusqlite::Transaction,
    sid: i64,
    newest_first: bool,
    chunk: &[Record],
    key: impl Fn(&Record) -> i64,
) -> rusqlite::Result<bool> {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let sql = SQL.get_or_init(|| {
        let rows: Vec<String> = (0..SEEN_CHUNK).map(|i| format!("(?1, ?{}, ?{})", 2 * i + 2, 2 * i + 3)).collect();
        format!("INSERT OR IGNORE INTO seen(sid, id, created) VALUES {}", rows.join(", "))
    });
    tx.prepare_cached("SAVEPOINT seen_chunk")?.execute([])?;
    let mut st = tx.prepare_cached(sql)?;
    st.raw_bind_parameter(1, sid)?;
    for (i, r) in chunk.iter().enumerate() {
        st.raw_bind_parameter(2 * i + 2, SeenId::of(&r.id, newest_first))?;
        st.raw_bind_parameter(2 * i + 3, key(r))?;
    }
    let all = st.raw_execute()? == chunk.len();
    if !all {
        tx.prepare_cached("ROLLBACK TO seen_chunk")?.execute([])?;
    }
    tx.prepare_cached("RELEASE seen_chunk")?.execute([])?;
    Ok(all)
}

/// A record's id as its key in `seen`. An ObjectId (24 lowercase hex
/// digits, what the API documents) goes in as its 12 bytes: half the size
/// of its text. For a stream served newest first the bytes are
/// complemented, so that newer ids sort first. Either way a backfill then
/// appends at the B-tree's right edge, whose pages fill up, instead of
/// going in ahead of the page before, where split pages stay about half
/// empty: the state database after a 1M backfill is 28.8 MB, against 50.3
/// MB the other way round and 74.3 MB with the ids as text. The order is
/// decided at a stream's first page with records (its first `createdAt` at
/// or after its last: newest first) and kept for good in
/// `stream_keys.newest_first`, since an id must always make the same key.
/// Any other id keeps its text (text never equals a blob, and only the
/// lowercase form is packed, so two different ids never make one key).
enum SeenId<'a> {
    Packed([u8; 12]),
    Text(&'a str),
}

impl<'a> SeenId<'a> {
    fn of(id: &'a str, newest_first: bool) -> Self {
        let b = id.as_bytes();
        if b.len() != 24 {
            return SeenId::Text(id);
        }
        let flip = if newest_first { 0xff } else { 0 };
        let mut out = [0u8; 12];
        for (o, pair) in out.iter_mut().zip(b.chunks_exact(2)) {
            match (nibble(pair[0]), nibble(pair[1])) {
                (Some(h), Some(l)) => *o = (h << 4 | l) ^ flip,
                _ => return SeenId::Text(id),
            }
        }
        SeenId::Packed(out)
    }
}

/// A lowercase hex digit's value.
fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl rusqlite::ToSql for SeenId<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            SeenId::Packed(b) => ValueRef::Blob(b),
            SeenId::Text(t) => ValueRef::Text(t.as_bytes()),
        }))
    }
}

/// A row's stream name: borrowed when it is a known stream.
fn stream_name(name: &str) -> Cow<'static, str> {
    match crate::config::KNOWN_STREAMS.iter().find(|k| **k == name) {
        Some(k) => Cow::Borrowed(k),
        None => Cow::Owned(name.to_string()),
    }
}

fn sq(inner: &Inner, source: rusqlite::Error) -> StoreError {
    StoreError::Sqlite { path: inner.path.display().to_string(), source }
}

/// Lock a mutex, recovering from poisoning (a panicked holder leaves SQLite consistent).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store at `db` with sink "a" registered.
    async fn with_sink_a(db: &Path) -> Store {
        let s = Store::open(db).unwrap();
        s.register_sinks(vec!["a".into()]).await.unwrap();
        s
    }

    /// A closed state database `s.db` in a new temp directory, with sink a
    /// and `pages` journal pages of stream "u" of 5 records each (page n:
    /// seqs 5n+1.., `createdAt` 10n..).
    async fn closed_with_pages(pages: i64) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.db");
        let s = with_sink_a(&p).await;
        for page in 0..pages {
            let recs = (0..5).map(|i| rec(&format!("p{page}r{i}"), page * 10 + i)).collect();
            s.ingest("u", recs, (0, 0)).await.unwrap();
        }
        (dir, p)
    }
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn rec(id: &str, created: i64) -> Record {
        Record { id: id.into(), created, body: format!(r#"{{"_id":"{id}","createdAt":"x"}}"#).into() }
    }

    /// Run `sql` on the store's writer connection (test triggers).
    async fn exec(s: &Store, sql: &'static str) {
        s.run(move |inner, c| c.execute_batch(sql).map_err(|e| sq(inner, e))).await.unwrap();
    }

    /// The schema of `version` in `c`, in a transaction left open.
    fn schema(c: &mut Connection, version: usize) -> rusqlite::Transaction<'_> {
        let tx = c.transaction().unwrap();
        for m in &MIGRATIONS[..version] {
            tx.execute_batch(m).unwrap();
        }
        tx.pragma_update(None, "user_version", version as i64).unwrap();
        tx
    }

    /// An ObjectId-shaped id: the second, then `n`, in lowercase hex.
    fn object_id(created: i64, n: u64) -> String {
        format!("{:08x}{n:016x}", created / 1000)
    }

    #[test]
    fn only_lowercase_object_ids_are_packed() {
        let id = "61042540e1d666c9ded178c4";
        let bytes = [0x61, 0x04, 0x25, 0x40, 0xe1, 0xd6, 0x66, 0xc9, 0xde, 0xd1, 0x78, 0xc4];
        assert!(matches!(SeenId::of(id, false), SeenId::Packed(b) if b == bytes));
        assert!(matches!(SeenId::of(id, true), SeenId::Packed(b) if b == bytes.map(|x| !x)));
        // Newest first, newer ids make smaller keys.
        match (SeenId::of(id, true), SeenId::of("610425410000000000000000", true)) {
            (SeenId::Packed(o), SeenId::Packed(n)) => assert!(n < o),
            _ => panic!("both are ObjectIds"),
        }
        for other in [
            "61042540E1D666C9DED178C4",
            "61042540e1d666c9ded178c",
            "61042540e1d666c9ded178c4a",
            "61042540e1d666c9ded178g4",
            "",
            "é1042540e1d666c9ded178c",
        ] {
            assert!(matches!(SeenId::of(other, true), SeenId::Text(t) if t == other), "{other}");
        }
    }

    /// A backfill of ObjectIds leaves `seen`'s pages nearly full and its
    /// keys 12 bytes, whether the server sends newest or oldest first.
    #[test]
    fn a_backfill_fills_seen_compactly_in_either_order() {
        for newest_first in [true, false] {
            rt().block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let s = with_sink_a(&dir.path().join("s.db")).await;
                let n: i64 = 30_000;
                let t0 = 1_700_000_000_000;
                let mut recs: Vec<Record> =
                    (0..n).map(|i| rec(&object_id(t0 + i * 50, i as u64), t0 + i * 50)).collect();
                if newest_first {
                    recs.reverse();
                }
                let pages: Vec<Vec<Record>> = recs.chunks(1000).map(<[Record]>::to_vec).collect();
                for page in &pages {
                    assert_eq!(s.ingest("u", page.clone(), (0, 0)).await.unwrap().new, 1000);
                }
                let again = s.ingest("u", pages[7].clone(), (0, 0)).await.unwrap();
                assert_eq!((again.new, again.duplicate), (0, 1000), "dedup by the packed keys");
                let (order, fill, payload): (bool, f64, f64) = s
                    .run(|inner, c| {
                        c.query_row(
                            "SELECT (SELECT newest_first FROM stream_keys WHERE name = 'u'),
                                    sum(pgsize - unused) * 1.0 / sum(pgsize), sum(payload) * 1.0 / sum(ncell)
                             FROM dbstat WHERE name = 'seen' AND pagetype = 'leaf'",
                            [],
                            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                        )
                        .map_err(|e| sq(inner, e))
                    })
                    .await
                    .unwrap();
                assert_eq!(order, newest_first);
                assert!(fill > 0.8, "newest first {newest_first}: leaf pages {:.0} % full", fill * 100.0);
                assert!(payload < 24.0, "newest first {newest_first}: {payload:.1} bytes a row");
            });
        }
    }

    /// Ids stored as text before schema 6 are still known after it.
    #[test]
    fn ids_stored_as_text_are_still_duplicates_after_the_upgrade() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("s.db");
            let ids =
                [object_id(5000, 1), "61042540E1D666C9DED178C4".into(), "not-an-object-id".into(), object_id(3000, 2)];
            {
                let mut c = Connection::open(&p).unwrap();
                let tx = schema(&mut c, 5);
                tx.execute("INSERT INTO stream_keys(name) VALUES ('u')", []).unwrap();
                for (i, id) in ids.iter().enumerate() {
                    tx.execute("INSERT INTO seen(id, sid, created) VALUES (?1, 1, ?2)", params![id, 5000 - i as i64])
                        .unwrap();
                }
                tx.commit().unwrap();
            }
            let s = with_sink_a(&p).await;
            let recs: Vec<Record> = ids.iter().map(|id| rec(id, 5000)).collect();
            let again = s.ingest("u", recs, (0, 0)).await.unwrap();
            assert_eq!((again.new, again.duplicate), (0, 4));
            // Only the lowercase ObjectIds were packed, in their text's order.
            let (blobs, order): (i64, i64) = s
                .run(|inner, c| {
                    c.query_row(
                        "SELECT (SELECT count(*) FROM seen WHERE typeof(id) = 'blob' AND length(id) = 12),
                                (SELECT newest_first FROM stream_keys WHERE name = 'u')",
                        [],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .map_err(|e| sq(inner, e))
                })
                .await
                .unwrap();
            assert_eq!((blobs, order), (2, 0));
            let fresh =
                s.ingest("u", vec![rec(&object_id(6000, 3), 6000), rec("61042540e1d666c9ded178c4", 6000)], (0, 0));
            assert_eq!(fresh.await.unwrap().new, 2, "the lowercase form of a text id is another id");
        });
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
    }

    #[test]
    fn file_is_private_and_newer_schema_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/state.db");
        drop(Store::open(&p).unwrap());
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        let c = Connection::open(&p).unwrap();
        let _: String = c.query_row("PRAGMA journal_mode = DELETE", [], |r| r.get(0)).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        let before = std::fs::read(&p).unwrap();
        let e = Store::open(&p).err().unwrap().to_string();
        assert!(e.contains("newer opsera-shipper") && e.contains("state.db"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), before);
    }

    #[test]
    fn only_the_writer_upgrades_an_older_schema() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("old.db");
        let mut c = Connection::open(&p).unwrap();
        schema(&mut c, 3).commit().unwrap();
        let version = |c: &Connection| c.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0)).unwrap();
        let e = Store::open_read(&p).err().expect("a reader refuses an older schema").to_string();
        assert!(e.contains("schema version 3") && e.contains("old.db"), "{e}");
        assert_eq!(version(&c), 3, "left as it was");
        Store::open(&p).unwrap();
        assert_eq!(version(&c), MIGRATIONS.len() as i64);
        Store::open_read(&p).unwrap();
    }

    #[test]
    fn journal_seq_is_never_reused_after_trim() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let s = with_sink_a(&dir.path().join("s.db")).await;
            s.ingest("u", vec![rec("1", 1), rec("2", 2)], (0, 0)).await.unwrap();
            s.commit_cursor("a", 2, None, 0).await.unwrap();
            assert_eq!(s.backlog().0, 0);
            s.ingest("u", vec![rec("3", 3)], (0, 0)).await.unwrap();
            let b = s.read_batch(2, Arc::from(vec!["u".to_string()]), 10, 1 << 20, 1).await.unwrap();
            assert_eq!(b.rows.len(), 1);
            assert_eq!(b.rows[0].seq, 3);
        });
    }

    #[test]
    fn a_version_3_journal_moves_into_segments_with_its_seqs() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("old.db");
            let mut c = Connection::open(&p).unwrap();
            let tx = schema(&mut c, 3);
            // seqs 1-2 delivered and trimmed; 3-5 user, 6 token, 8 user (7 trimmed by hand: a gap).
            for (seq, stream) in [(1, "u"), (2, "u"), (3, "u"), (4, "u"), (5, "u"), (6, "t"), (7, "u"), (8, "u")] {
                tx.execute(
                    "INSERT INTO journal(seq, stream, id, created, body, len) VALUES (?1, ?2, ?3, ?1, ?4, 3)",
                    params![seq, stream, format!("id{seq}"), format!("b{seq}x")],
                )
                .unwrap();
            }
            tx.execute("DELETE FROM journal WHERE seq IN (1, 2, 7)", []).unwrap();
            tx.execute("INSERT INTO sink_cursors(sink, delivered_seq) VALUES ('a', 2)", []).unwrap();
            tx.execute("INSERT INTO seen(stream, id, created) VALUES ('u', 'id3', 3), ('t', 'id6', 6)", []).unwrap();
            tx.execute_batch(
                "CREATE TRIGGER refuse BEFORE DELETE ON journal BEGIN SELECT RAISE(ABORT, 'refused'); END;",
            )
            .unwrap();
            tx.commit().unwrap();
            // A move that cannot commit leaves no bytes in the segments, and the rows where they were.
            let err = Store::open(&p).err().expect("the move cannot commit").to_string();
            assert!(err.contains("refused"), "{err}");
            let bytes: u64 =
                std::fs::read_dir(segments::dir_for(&p)).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
            assert_eq!(bytes, 0);
            c.execute_batch("DROP TRIGGER refuse").unwrap();
            drop(c);
            let s = Store::open(&p).unwrap();
            assert_eq!(s.backlog(), (5, 15));
            let b = s.read_batch(2, Arc::from(vec!["u".to_string()]), 100, usize::MAX, 1).await.unwrap();
            let got: Vec<(i64, String, i64, String)> =
                b.rows.into_iter().map(|r| (r.seq, r.id.to_string(), r.created, r.body.to_string())).collect();
            let want: Vec<(i64, String, i64, String)> =
                [3, 4, 5, 8].into_iter().map(|q| (q, format!("id{q}"), q, format!("b{q}x"))).collect();
            assert_eq!(got, want);
            assert_eq!(b.last_seq, 8);
            assert_eq!(s.high_seq().await.unwrap(), 8);
            // The seen ids moved too, per stream; new pages continue after the old numbers.
            let st = s.ingest("u", vec![rec("id3", 3), rec("id6", 6), rec("new", 9)], (0, 0)).await.unwrap();
            assert_eq!((st.new, st.duplicate), (2, 1));
            let b = s.read_batch(8, Arc::from(vec!["u".to_string()]), 100, usize::MAX, 1).await.unwrap();
            assert_eq!(
                b.rows.iter().map(|r| (r.seq, r.id.as_str())).collect::<Vec<_>>(),
                vec![(9, "id6"), (10, "new")]
            );
            let left: i64 =
                Connection::open(&p).unwrap().query_row("SELECT count(*) FROM journal", [], |r| r.get(0)).unwrap();
            assert_eq!(left, 0);
        });
    }

    #[test]
    fn a_damaged_journal_page_is_an_error_not_a_skip() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("s.db");
            let s = Store::open(&p).unwrap();
            s.ingest("u", (0..5).map(|i| rec(&format!("r{i}"), i)).collect(), (0, 0)).await.unwrap();
            let u: Arc<[String]> = Arc::from(vec!["u".to_string()]);
            Connection::open(&p).unwrap().execute("UPDATE journal_pages SET records = 6", []).unwrap();
            let e = s.read_batch(0, u.clone(), 100, usize::MAX, 1).await.unwrap_err().to_string();
            assert!(e.contains("5 records where 6 should be") && e.contains("s.db"), "{e}");
            Connection::open(&p).unwrap().execute("UPDATE journal_pages SET records = 4", []).unwrap();
            let e = s.read_batch(0, u.clone(), 100, usize::MAX, 1).await.unwrap_err().to_string();
            assert!(e.contains("more than the 4 records"), "{e}");
            // Bytes overwritten on disk: the frame that no longer parses is named.
            Connection::open(&p).unwrap().execute("UPDATE journal_pages SET records = 5", []).unwrap();
            let seg = segments::dir_for(&p).join("0000000000000001.seg");
            let mut bytes = std::fs::read(&seg).unwrap();
            bytes[4] = 0xff;
            std::fs::write(&seg, bytes).unwrap();
            let e = s.read_batch(0, u, 100, usize::MAX, 1).await.unwrap_err().to_string();
            assert!(e.contains("truncated frame at byte 0"), "{e}");
        });
    }

    #[test]
    fn repair_drops_only_the_pages_whose_records_cannot_be_read_back() {
        rt().block_on(async {
            let (_dir, p) = closed_with_pages(3).await;
            let page_at = |first: i64| -> (i64, i64) {
                Connection::open(&p)
                    .unwrap()
                    .query_row("SELECT offset, len FROM journal_pages WHERE first_seq = ?1", [first], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })
                    .unwrap()
            };
            let seg = segments::dir_for(&p).join("0000000000000001.seg");
            let seqs = |b: Batch| b.rows.iter().map(|r| r.seq).collect::<Vec<_>>();
            let u: Arc<[String]> = Arc::from(vec!["u".to_string()]);

            // The second page's bytes overwritten on disk: its first frame no longer parses.
            let (at, _) = page_at(6);
            let mut bytes = std::fs::read(&seg).unwrap();
            bytes[at as usize + 4] = 0xff;
            std::fs::write(&seg, bytes).unwrap();
            let lock = WriterLock::acquire(&p).unwrap();
            let (pages, damaged) = Store::repair_journal(&p, false, &lock).unwrap();
            assert_eq!(pages, 3);
            assert_eq!(damaged.len(), 1, "{damaged:?}");
            assert_eq!((damaged[0].first_seq, damaged[0].records, damaged[0].min_created), (6, 5, 10));
            assert!(damaged[0].reason.contains("truncated frame"), "{}", damaged[0].reason);
            // A dry run changes nothing: reading still stops at that page, naming the way out.
            let e = Store::open(&p).unwrap().read_batch(0, u.clone(), 100, usize::MAX, 1).await.unwrap_err();
            assert!(e.to_string().contains("opsera-shipper repair"), "{e}");
            let (_, damaged) = Store::repair_journal(&p, true, &lock).unwrap();
            assert_eq!(damaged.len(), 1);
            let (pages, damaged) = Store::repair_journal(&p, true, &lock).unwrap();
            assert_eq!((pages, damaged.len()), (2, 0), "dropped once, sound after");
            drop(lock);
            let s = Store::open(&p).unwrap();
            let b = s.read_batch(0, u.clone(), 100, usize::MAX, 1).await.unwrap();
            assert_eq!(seqs(b), [1, 2, 3, 4, 5, 11, 12, 13, 14, 15]);
            drop(s);

            // The segment cut short inside the third page: the store no longer opens.
            let (at, _) = page_at(11);
            std::fs::OpenOptions::new().write(true).open(&seg).unwrap().set_len(at as u64 + 3).unwrap();
            let e = Store::open(&p).err().expect("a short segment is refused").to_string();
            assert!(e.contains("the filesystem lost data") && e.contains("opsera-shipper repair"), "{e}");
            let lock = WriterLock::acquire(&p).unwrap();
            let (_, damaged) = Store::repair_journal(&p, true, &lock).unwrap();
            assert_eq!(damaged.iter().map(|d| d.first_seq).collect::<Vec<_>>(), [11]);
            drop(lock);
            let s = with_sink_a(&p).await;
            let b = s.read_batch(0, u, 100, usize::MAX, 1).await.unwrap();
            // A sink passes over the lost pages' seqs: it does not wait for them.
            assert_eq!(b.last_seq, 15);
            assert_eq!(seqs(b), [1, 2, 3, 4, 5]);
            // Once delivered past, they are trimmed like any page.
            s.commit_cursor("a", 15, None, 0).await.unwrap();
            assert_eq!(s.backlog(), (0, 0));
            // New pages go on after the old numbers.
            s.ingest("u", vec![rec("late", 99)], (0, 0)).await.unwrap();
            let b = s.read_batch(5, Arc::from(vec!["u".to_string()]), 100, usize::MAX, 1).await.unwrap();
            assert_eq!(seqs(b), [16]);
        });
    }

    #[test]
    fn repair_stops_and_changes_nothing_when_a_segment_cannot_be_checked() {
        rt().block_on(async {
            let (dir, p) = closed_with_pages(1).await;
            // Not lost, not short: something else is wrong, which repair must not take for lost records.
            let seg = segments::dir_for(&p).join("0000000000000001.seg");
            let kept = dir.path().join("kept.seg");
            std::fs::rename(&seg, &kept).unwrap();
            std::fs::create_dir(&seg).unwrap();
            let lock = WriterLock::acquire(&p).unwrap();
            let e = Store::repair_journal(&p, true, &lock).unwrap_err().to_string();
            assert!(e.contains("not a regular file") && e.contains("changed nothing"), "{e}");
            std::fs::remove_dir(&seg).unwrap();
            std::fs::rename(&kept, &seg).unwrap();
            let (pages, damaged) = Store::repair_journal(&p, false, &lock).unwrap();
            assert_eq!((pages, damaged.len()), (1, 0), "{damaged:?}");
        });
    }

    #[test]
    fn seen_ids_are_pruned_past_the_horizon_in_steps() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let s = Store::open(&dir.path().join("s.db")).unwrap();
            let ids = |from: i64, to: i64| (from..to).map(|i| rec(&format!("i{i}"), i * 60_000)).collect::<Vec<_>>();
            s.ingest("u", ids(0, 40), (0, i64::MAX)).await.unwrap();
            s.ingest("t", ids(0, 40), (0, i64::MAX)).await.unwrap();
            let new = |r: IngestStats| r.new;
            // First window: prunes below minute 10, of this stream only.
            s.complete_window("u", None, 0, 0, |_| 10 * 60_000).await.unwrap();
            assert_eq!(new(s.ingest("u", ids(0, 40), (0, i64::MAX)).await.unwrap()), 10);
            assert_eq!(new(s.ingest("t", ids(0, 40), (0, i64::MAX)).await.unwrap()), 0);
            // The horizon moved less than a step: nothing is pruned yet.
            s.complete_window("u", None, 0, 0, |_| 15 * 60_000).await.unwrap();
            assert_eq!(new(s.ingest("u", ids(0, 40), (0, i64::MAX)).await.unwrap()), 0);
            // A whole step: everything below the new horizon goes.
            s.complete_window("u", None, 0, 0, |_| 10 * 60_000 + PRUNE_STEP).await.unwrap();
            assert_eq!(new(s.ingest("u", ids(0, 40), (0, i64::MAX)).await.unwrap()), 20);
        });
    }

    #[test]
    fn a_group_that_fails_to_commit_leaves_nothing_behind() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let db = dir.path().join("s.db");
            let s = with_sink_a(&db).await;
            s.ingest("u", vec![rec("a", 1)], (0, 0)).await.unwrap();
            let seg = segments::dir_for(&db).join(format!("{:016}.seg", 1));
            let len = std::fs::metadata(&seg).unwrap().len();
            // The second page's journal row is refused: the whole group must go.
            exec(
                &s,
                "CREATE TRIGGER refuse BEFORE INSERT ON journal_pages WHEN NEW.records = 3
                 BEGIN SELECT RAISE(ABORT, 'refused'); END",
            )
            .await;
            let group = || {
                vec![
                    PageIn { records: vec![rec("b", 2), rec("c", 3)], window: (0, 0) },
                    PageIn { records: vec![rec("d", 4), rec("e", 5), rec("f", 6)], window: (0, 0) },
                ]
            };
            assert!(s.ingest_pages("u", group()).await.is_err());
            assert_eq!(std::fs::metadata(&seg).unwrap().len(), len, "the group's bytes are cut");
            assert_eq!(s.backlog().0, 1);
            exec(&s, "DROP TRIGGER refuse").await;
            // Nothing of it was remembered: it is all new the second time.
            let st = s.ingest_pages("u", group()).await.unwrap();
            assert_eq!((st.new, st.duplicate), (5, 0));
            let b = s.read_batch(0, Arc::from(vec!["u".to_string()]), 100, usize::MAX, 1).await.unwrap();
            let ids: Vec<String> = b.rows.iter().map(|r| r.id.to_string()).collect();
            assert_eq!(ids, ["a", "b", "c", "d", "e", "f"]);
            assert_eq!(b.rows.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6]);
        });
    }

    #[test]
    fn retried_dead_letters_and_the_file_position_commit_together() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let s = with_sink_a(&dir.path().join("s.db")).await;
            s.ingest("u", vec![rec("x", 1), rec("y", 2)], (0, 0)).await.unwrap();
            let rows = s.read_batch(0, Arc::from(vec!["u".to_string()]), 100, usize::MAX, 1).await.unwrap().rows;
            for row in rows {
                s.dead_letter("a", row, "refused".into(), Some(400), 5).await.unwrap();
            }
            s.commit_cursor("a", 2, Some(FilePos { dev: 1, ino: 2, offset: 10 }), 6).await.unwrap();
            assert_eq!(s.select_dead_letters(Some("a".into()), vec![], false).await.unwrap(), 2);
            let pending = s.retry_requests("a", 10).await.unwrap();
            let outcomes = vec![(pending[0].0, None), (pending[1].0, Some(("again".to_string(), Some(422))))];
            let moved = Some(FilePos { dev: 1, ino: 2, offset: 99 });
            // The dead letter's deletion fails: the position must not move either.
            exec(&s, "CREATE TRIGGER refuse BEFORE DELETE ON dead_letters BEGIN SELECT RAISE(ABORT, 'refused'); END")
                .await;
            assert!(s.settle_retries("a", 2, moved, outcomes.clone(), 7).await.is_err());
            assert_eq!(s.sink_cursor("a").await.unwrap().file.map(|f| f.offset), Some(10));
            assert_eq!(s.retry_requests("a", 10).await.unwrap().len(), 2, "both still to retry");
            exec(&s, "DROP TRIGGER refuse").await;
            s.settle_retries("a", 2, moved, outcomes, 7).await.unwrap();
            let cursor = s.sink_cursor("a").await.unwrap();
            assert_eq!((cursor.delivered_seq, cursor.file), (2, moved));
            assert!(s.retry_requests("a", 10).await.unwrap().is_empty());
            let left = s.dead_letters(Some("a".into())).await.unwrap();
            assert_eq!(left.len(), 1);
            assert_eq!(
                (left[0].record_id.as_str(), left[0].reason.as_str(), left[0].status),
                ("y", "again", Some(422))
            );
        });
    }

    /// Stream `groups` into `s` (stream "u"), each group's pages sent
    /// together and the next group's only once it committed; what
    /// `ingest_stream` returned, and what it said of each group.
    async fn stream_groups(
        s: &Store,
        groups: Vec<Vec<PageIn>>,
    ) -> (Result<IngestStats, StoreError>, Vec<(u64, IngestStats)>) {
        let (pages, taken) = std::sync::mpsc::channel();
        let (committed, wait) = std::sync::mpsc::channel();
        let feeder = std::thread::spawn(move || {
            for group in groups {
                for page in group {
                    if pages.send((page, ())).is_err() {
                        return;
                    }
                }
                if wait.recv().is_err() {
                    return;
                }
            }
        });
        let said = Arc::new(Mutex::new(Vec::new()));
        let tell = said.clone();
        let result = s
            .ingest_stream("u", taken, move |n, st| {
                lock(&tell).push((n, *st));
                let _ = committed.send(());
            })
            .await;
        feeder.join().unwrap();
        let said = lock(&said).clone();
        (result, said)
    }

    #[test]
    fn streamed_groups_write_only_new_records_and_a_failed_group_leaves_nothing() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let db = dir.path().join("s.db");
            let s = with_sink_a(&db).await;
            let seg = segments::dir_for(&db).join(format!("{:016}.seg", 1));
            // Every byte of the segment belongs to an indexed page: nothing
            // written for a group is left behind unindexed.
            let indexed = || async {
                let pages: i64 = s
                    .run(|inner, c| {
                        c.query_row("SELECT coalesce(sum(len), 0) FROM journal_pages", [], |r| r.get(0))
                            .map_err(|e| sq(inner, e))
                    })
                    .await
                    .unwrap();
                assert_eq!(std::fs::metadata(&seg).unwrap().len(), pages as u64);
            };
            let page = |ids: &[&str]| PageIn {
                records: ids.iter().enumerate().map(|(i, id)| rec(id, i as i64)).collect(),
                window: (0, 0),
            };
            let stats = |new, duplicate, max| IngestStats { new, duplicate, max_created: Some(max) };
            let (result, said) = stream_groups(
                &s,
                vec![
                    // All new.
                    vec![page(&["a", "b", "c", "d", "e"]), page(&["f", "g", "h", "i", "j"])],
                    // One seen before, one twice in the group: only the new ones are kept.
                    vec![page(&["k", "l", "c", "m", "n"]), page(&["o", "p", "k", "q", "r"]), page(&["s"])],
                    // Nothing new: nothing written.
                    vec![page(&["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"])],
                ],
            )
            .await;
            assert_eq!(result.unwrap(), stats(19, 12, 9));
            assert_eq!(said, [(10, stats(10, 0, 4)), (11, stats(9, 2, 4)), (10, stats(0, 10, 9))]);
            indexed().await;
            assert_eq!(s.backlog().0, 19);
            // A group that fails to commit leaves none of its bytes, and
            // nothing of it is remembered; the groups before it stay.
            exec(&s, "CREATE TRIGGER refuse BEFORE INSERT ON journal_pages WHEN NEW.records = 1 BEGIN SELECT RAISE(ABORT, 'refused'); END")
                .await;
            let groups = || vec![vec![page(&["t", "u"])], vec![page(&["v", "w"]), page(&["x"])]];
            let (result, said) = stream_groups(&s, groups()).await;
            assert!(result.is_err());
            assert_eq!(said, [(2, stats(2, 0, 1))]);
            indexed().await;
            exec(&s, "DROP TRIGGER refuse").await;
            let (result, said) = stream_groups(&s, groups()).await;
            assert_eq!(result.unwrap(), stats(3, 2, 1));
            assert_eq!(said, [(2, stats(0, 2, 1)), (3, stats(3, 0, 1))]);
            indexed().await;
            let b = s.read_batch(0, Arc::from(vec!["u".to_string()]), 100, usize::MAX, 1).await.unwrap();
            let ids: Vec<String> = b.rows.iter().map(|r| r.id.to_string()).collect();
            let want = "a b c d e f g h i j k l m n o p q r s t u v w x";
            assert_eq!(ids, want.split(' ').collect::<Vec<_>>());
        });
    }

    #[test]
    fn a_cursor_commit_is_not_held_up_by_a_stream_of_pages() {
        rt().block_on(async {
            use std::sync::atomic::AtomicBool;
            let dir = tempfile::tempdir().unwrap();
            let s = with_sink_a(&dir.path().join("s.db")).await;
            s.ingest("u", vec![rec("first", 1)], (0, 0)).await.unwrap();
            // Pages follow each other well within `GROUP_WAIT`, for up to
            // 10 s: one group, open all that time, unless a waiter cuts it.
            let (pages, taken) = std::sync::mpsc::channel();
            let (stop, fed) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
            let (stop2, fed2) = (stop.clone(), fed.clone());
            let feeder = std::thread::spawn(move || {
                for i in 0..5000 {
                    if stop2.load(Ordering::Relaxed) {
                        break;
                    }
                    let page = PageIn { records: vec![rec(&format!("r{i}"), i)], window: (0, 0) };
                    if pages.send((page, ())).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                fed2.store(true, Ordering::Relaxed);
            });
            let store = s.clone();
            let storing = tokio::spawn(async move { store.ingest_stream("u", taken, |_, _| {}).await });
            tokio::time::sleep(Duration::from_millis(100)).await;
            s.commit_cursor("a", 1, None, 0).await.unwrap();
            assert!(!fed.load(Ordering::Relaxed), "the commit waited for the pages to stop");
            stop.store(true, Ordering::Relaxed);
            feeder.join().unwrap();
            assert!(storing.await.unwrap().unwrap().new > 0);
        });
    }

    #[test]
    fn pages_larger_than_a_write_chunk_read_back_whole() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let s = Store::open(&dir.path().join("s.db")).unwrap();
            let big = |p: usize, i: usize| Record {
                id: format!("{p}-{i}").into(),
                created: i as i64,
                body: format!(r#"{{"_id":"{p}-{i}","pad":"{}"}}"#, "x".repeat(2000 + i)).into(),
            };
            let pages: Vec<PageIn> =
                (0..3).map(|p| PageIn { records: (0..300).map(|i| big(p, i)).collect(), window: (0, 0) }).collect();
            assert!(pages[0].records.iter().map(|r| r.body.len()).sum::<usize>() > 2 * WRITE_CHUNK);
            let want: Vec<(String, String)> =
                pages.iter().flat_map(|p| &p.records).map(|r| (r.id.to_string(), r.body.to_string())).collect();
            assert_eq!(s.ingest_pages("u", pages).await.unwrap().new, 900);
            let b = s.read_batch(0, Arc::from(vec!["u".to_string()]), 10_000, usize::MAX, 1).await.unwrap();
            let got: Vec<(String, String)> = b.rows.iter().map(|r| (r.id.to_string(), r.body.to_string())).collect();
            assert!(got == want, "every record comes back whole and in order");
        });
    }

    #[test]
    fn sinks_read_while_the_writer_is_busy() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let s = Store::open(&dir.path().join("s.db")).unwrap();
            s.ingest("u", vec![rec("a", 1), rec("b", 2)], (0, 0)).await.unwrap();
            // Hold the writer, as a page group being synced and committed does.
            let (held, release) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
            let inner = s.inner.clone();
            let holder = std::thread::spawn(move || {
                let _writer = inner.conn.lock();
                held.0.send(()).unwrap();
                let _ = release.1.recv();
            });
            held.1.recv().unwrap();
            let read = s.read_batch(0, Arc::from(vec!["u".to_string()]), 100, usize::MAX, 1);
            let b = tokio::time::timeout(std::time::Duration::from_secs(10), read).await;
            release.0.send(()).unwrap();
            holder.join().unwrap();
            assert_eq!(b.expect("a read does not wait for the writer").unwrap().rows.len(), 2);
        });
    }

    #[test]
    fn batches_split_pages_and_skip_other_streams() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let s = Store::open(&dir.path().join("s.db")).unwrap();
            s.register_sinks(vec!["a".into(), "b".into()]).await.unwrap();
            let page = |p: &str, n: i64| (0..n).map(|i| rec(&format!("{p}{i}"), i)).collect::<Vec<_>>();
            s.ingest("u", page("u", 5), (0, 0)).await.unwrap(); // seq 1-5
            s.ingest("t", page("t", 4), (0, 0)).await.unwrap(); // seq 6-9
            s.ingest("u", page("v", 3), (0, 0)).await.unwrap(); // seq 10-12
            let u: Arc<[String]> = Arc::from(vec!["u".to_string()]);
            let mut after = 0;
            let mut seqs = Vec::new();
            let mut lasts = Vec::new();
            loop {
                let b = s.read_batch(after, u.clone(), 2, usize::MAX, 1).await.unwrap();
                if b.last_seq == after {
                    break;
                }
                seqs.extend(b.rows.iter().map(|r| r.seq));
                lasts.push(b.last_seq);
                after = b.last_seq;
            }
            assert_eq!(seqs, vec![1, 2, 3, 4, 5, 10, 11, 12]);
            assert_eq!(lasts, vec![2, 4, 6, 8, 10, 12], "other streams' records count against the limit");
            // Trimming is by whole pages, and only past every sink.
            s.commit_cursor("a", 12, None, 0).await.unwrap();
            assert_eq!(s.backlog().0, 12);
            s.commit_cursor("b", 7, None, 0).await.unwrap();
            assert_eq!(s.backlog().0, 7);
            s.commit_cursor("b", 9, None, 0).await.unwrap();
            assert_eq!(s.backlog().0, 3);
            let st = s.status(vec![("b".into(), vec!["u".into(), "t".into()])]).await.unwrap();
            assert_eq!((st.journal_records, st.sinks[0].lag_records), (3, 3));
            // A sink's lag counts only the streams it receives.
            let lag = |streams: &[&str]| {
                let sinks = vec![("b".to_string(), streams.iter().map(|s| s.to_string()).collect())];
                let s = s.clone();
                async move { s.scrape(sinks, vec![]).await.unwrap().sinks[0].lag_records }
            };
            assert_eq!((lag(&["u"]).await, lag(&["t"]).await, lag(&["t", "u"]).await), (3, 0, 3));
            s.ingest("t", page("w", 2), (0, 0)).await.unwrap(); // seq 13-14
            assert_eq!((lag(&["u"]).await, lag(&["t"]).await, lag(&["t", "u"]).await), (3, 2, 5));
        });
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Ingesting groups of pages with repeats (within a page, across
        /// the pages of a group, across groups) journals each id exactly
        /// once, in first-seen order, with a journal page per non-empty page.
        #[test]
        fn dedup_matches_a_set_model(
            groups in prop::collection::vec(prop::collection::vec(prop::collection::vec(0u8..40, 0..30), 1..4), 1..6)
        ) {
            rt().block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let s = with_sink_a(&dir.path().join("s.db")).await;
                let mut model = BTreeSet::new();
                let mut order = Vec::new();
                let mut journal_pages = 0;
                for group in &groups {
                    let pages = group
                        .iter()
                        .map(|page| PageIn {
                            records: page.iter().map(|i| rec(&format!("{i:024x}"), *i as i64)).collect(),
                            window: (0, 0),
                        })
                        .collect();
                    let stats = s.ingest_pages("u", pages).await.unwrap();
                    let mut new = 0;
                    for page in group {
                        let before = new;
                        for i in page {
                            if model.insert(*i) { order.push(format!("{i:024x}")); new += 1; }
                        }
                        journal_pages += i64::from(new > before);
                    }
                    assert_eq!(stats.new, new);
                    assert_eq!(stats.new + stats.duplicate, group.iter().map(Vec::len).sum::<usize>() as u64);
                }
                let b = s.read_batch(0, Arc::from(vec!["u".to_string()]), 10_000, usize::MAX, 1).await.unwrap();
                let got: Vec<String> = b.rows.into_iter().map(|r| r.id.to_string()).collect();
                assert_eq!(got, order);
                let rows: i64 = s
                    .run(|inner, c| c.query_row("SELECT count(*) FROM journal_pages", [], |r| r.get(0)).map_err(|e| sq(inner, e)))
                    .await
                    .unwrap();
                assert_eq!(rows, journal_pages);
            });
        }
    }
}
