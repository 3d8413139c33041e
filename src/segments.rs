//! Journal segments: the bodies of journaled records, in append-only files
//! beside the state database (`<db>.journal/<n>.seg`).
//!
//! SQLite keeps, per stored page, which segment and byte range holds its
//! records (`journal_pages`); the bytes are written and fsynced here before
//! that row commits. So a crash can leave bytes past the last committed
//! page (an uncommitted tail, cut at the next start) but never a committed
//! page without its bytes. Segments are deleted whole once every sink has
//! passed every page in them.
//!
//! A frame is `id length (u32 LE) | body length (u32 LE) | createdAt ms
//! (i64 LE) | id | body`: bodies are kept byte for byte as the API sent them.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, Read, Seek};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A segment is closed once it holds this much.
const SEGMENT_MAX: u64 = 64 << 20;
/// When nothing is left to deliver, a segment this big is closed (and
/// deleted) rather than grown, so delivered bytes do not linger.
const SEGMENT_IDLE_MAX: u64 = 4 << 20;
const HEADER: usize = 16;

/// One record in a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub id: &'a str,
    pub created: i64,
    pub body: &'a str,
}

/// The bytes one frame takes.
pub fn frame_len(id: &str, body: &str) -> usize {
    HEADER + id.len() + body.len()
}

/// Append one frame to `buf`.
pub fn encode(buf: &mut Vec<u8>, id: &str, created: i64, body: &str) {
    buf.reserve(frame_len(id, body));
    buf.extend_from_slice(&(id.len() as u32).to_le_bytes());
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&created.to_le_bytes());
    buf.extend_from_slice(id.as_bytes());
    buf.extend_from_slice(body.as_bytes());
}

/// The frames in `bytes`, in order; an error says what is wrong where.
pub fn decode(bytes: &[u8]) -> impl Iterator<Item = Result<Frame<'_>, String>> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        if at >= bytes.len() {
            return None;
        }
        let rest = &bytes[at..];
        let frame = (|| {
            if rest.len() < HEADER {
                return Err(format!("truncated frame header at byte {at}"));
            }
            let n = |i: usize| u32::from_le_bytes(rest[i..i + 4].try_into().unwrap_or_default()) as usize;
            let (id_len, body_len) = (n(0), n(4));
            let created = i64::from_le_bytes(rest[8..16].try_into().unwrap_or_default());
            let end = HEADER.checked_add(id_len).and_then(|v| v.checked_add(body_len)).filter(|&e| e <= rest.len());
            let Some(end) = end else { return Err(format!("truncated frame at byte {at}")) };
            let id = utf8(&rest[HEADER..HEADER + id_len], at)?;
            let body = utf8(&rest[HEADER + id_len..end], at)?;
            Ok((Frame { id, created, body }, end))
        })();
        Some(match frame {
            Ok((f, len)) => {
                at += len;
                Ok(f)
            }
            Err(e) => {
                at = bytes.len();
                Err(e)
            }
        })
    })
}

fn utf8(b: &[u8], at: usize) -> Result<&str, String> {
    std::str::from_utf8(b).map_err(|_| format!("frame at byte {at} is not UTF-8"))
}

struct Writer {
    no: u64,
    file: File,
    /// Bytes written and synced; the next frame goes here.
    end: u64,
}

/// The segment files of one state database, open for writing (only by the
/// process holding the writer lock).
pub struct Segments {
    dir: PathBuf,
    writer: Writer,
    /// Every segment file that exists, by number.
    existing: BTreeSet<u64>,
}

/// The directory of `db`'s segments.
pub fn dir_for(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(".journal");
    PathBuf::from(p)
}

/// Segment `no`'s file in `dir`.
pub fn seg_path(dir: &Path, no: u64) -> PathBuf {
    dir.join(format!("{no:016}.seg"))
}

/// The `len` bytes at `at` of segment `no` in `dir`. Needs no lock: it
/// opens the file itself, and reads only bytes of committed pages, which
/// are never written again, nor deleted while a sink has yet to read them.
pub fn read(dir: &Path, no: u64, at: u64, len: usize) -> Result<Vec<u8>, String> {
    let path = seg_path(dir, no);
    let mut buf = Vec::with_capacity(len);
    // Seek and read into the reserved capacity: `read_exact_at` would need
    // the buffer zeroed first.
    let mut f = File::open(&path).map_err(|e| io_err(&path, e))?;
    f.seek(io::SeekFrom::Start(at))
        .and_then(|_| f.take(len as u64).read_to_end(&mut buf))
        .map_err(|e| io_err(&path, format!("reading {len} bytes at {at}: {e}")))?;
    if buf.len() < len {
        return Err(io_err(&path, format!("reading {len} bytes at {at}: only {} there", buf.len())));
    }
    Ok(buf)
}

/// What to do about a journal whose records cannot be read back.
pub const REPAIR: &str = "If it cannot be restored, `opsera-shipper repair` (with the daemon stopped) drops the \
                          journal pages whose records are lost, and says how to fetch them again";

fn io_err(path: &Path, e: impl std::fmt::Display) -> String {
    format!("journal segment {}: {e}", path.display())
}

impl Segments {
    /// Open the segments in `dir`, given the committed end of every
    /// segment that SQLite still references. The newest segment's
    /// uncommitted tail is cut; segments no page references are deleted.
    pub fn open(dir: &Path, committed: &BTreeMap<u64, u64>) -> Result<Segments, String> {
        if !dir.is_dir() {
            crate::fsutil::create_dir(dir, 0o700)
                .map_err(|e| format!("cannot create directory {}: {e}", dir.display()))?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        let mut existing = BTreeSet::new();
        for entry in std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))? {
            let entry = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
            let name = entry.file_name();
            if let Some(no) = name.to_str().and_then(|n| n.strip_suffix(".seg")).and_then(|n| n.parse::<u64>().ok()) {
                existing.insert(no);
            }
        }
        for (&no, &end) in committed {
            let path = seg_path(dir, no);
            let len = std::fs::metadata(&path)
                .map_err(|e| {
                    io_err(
                        &path,
                        format!(
                            "{e}; it holds records not yet delivered. A state database must be kept (backed up, \
                             moved, restored) together with its {} directory. {REPAIR}",
                            dir.display()
                        ),
                    )
                })?
                .len();
            if len < end {
                return Err(io_err(
                    &path,
                    format!("{len} bytes, but {end} were committed: the filesystem lost data. {REPAIR}"),
                ));
            }
        }
        let newest = existing.last().copied().max(committed.keys().last().copied()).unwrap_or(1);
        let path = seg_path(dir, newest);
        let file = open_rw(&path)?;
        let end = committed.get(&newest).copied().unwrap_or(0);
        let len = file.metadata().map_err(|e| io_err(&path, e))?.len();
        if len > end {
            // Bytes of a page whose transaction never committed: those
            // records are fetched again, so these bytes must go.
            file.set_len(end).and_then(|()| file.sync_all()).map_err(|e| io_err(&path, e))?;
        }
        // The segment's name must be durable before any page in it commits.
        sync_dir(dir)?;
        existing.insert(newest);
        let mut s = Segments { dir: dir.to_path_buf(), writer: Writer { no: newest, file, end }, existing };
        let unreferenced: Vec<u64> =
            s.existing.iter().copied().filter(|n| *n != newest && !committed.contains_key(n)).collect();
        for no in unreferenced {
            s.remove(no);
        }
        Ok(s)
    }

    /// Append `bytes` (whole frames) and sync them; returns (segment, offset).
    /// `idle` says nothing else is left to deliver. On error nothing is kept.
    #[cfg(test)]
    fn append(&mut self, bytes: &[u8], idle: bool) -> Result<(u64, u64), String> {
        let (no, at) = self.write(bytes, Some(idle))?;
        if let Err(e) = self.sync() {
            self.rollback(no, at);
            return Err(e);
        }
        Ok((no, at))
    }

    /// Append `bytes` (whole frames) without syncing; returns (segment,
    /// offset). The first write of a group passes `Some(idle)` and may
    /// start a new segment; later ones (`None`) stay in the same segment,
    /// so one `sync` covers the group. On error nothing of `bytes` is kept.
    pub fn write(&mut self, bytes: &[u8], first: Option<bool>) -> Result<(u64, u64), String> {
        let w = &self.writer;
        if let Some(idle) = first
            && w.end > 0
            && (w.end >= SEGMENT_MAX || (idle && w.end >= SEGMENT_IDLE_MAX))
        {
            self.rotate()?;
        }
        let w = &mut self.writer;
        let at = w.end;
        if let Err(e) = w.file.write_all_at(bytes, at) {
            let _ = w.file.set_len(at);
            return Err(io_err(&seg_path(&self.dir, w.no), e));
        }
        w.end = at + bytes.len() as u64;
        crate::fsutil::start_writeback(&w.file, at, bytes.len() as u64);
        Ok((w.no, at))
    }

    /// Make everything written so far durable.
    pub fn sync(&mut self) -> Result<(), String> {
        let w = &self.writer;
        w.file.sync_data().map_err(|e| io_err(&seg_path(&self.dir, w.no), e))
    }

    /// The page appended at (`no`, `at`) did not commit: forget its bytes.
    pub fn rollback(&mut self, no: u64, at: u64) {
        if self.writer.no == no && at < self.writer.end {
            self.writer.end = at;
            // If this fails, the next start cuts the tail anyway.
            let _ = self.writer.file.set_len(at);
        }
    }

    fn rotate(&mut self) -> Result<(), String> {
        let no = self.writer.no + 1;
        let path = seg_path(&self.dir, no);
        let file = open_rw(&path)?;
        // The new name must survive a crash before any page in it commits.
        sync_dir(&self.dir)?;
        self.existing.insert(no);
        self.writer = Writer { no, file, end: 0 };
        Ok(())
    }

    /// Take every segment before `no` (their pages are all delivered) off
    /// the list, to be deleted with [`delete`] once no lock is held:
    /// deleting a full segment takes 15-20 ms (the kernel drops its cached
    /// pages and frees its blocks), which the writer connection should not
    /// wait for. The one being written is kept. A segment whose deletion
    /// fails goes back on the list with [`Segments::reattach`].
    pub fn detach_before(&mut self, no: u64) -> Vec<u64> {
        let old: Vec<u64> = self.existing.range(..no).copied().filter(|n| *n != self.writer.no).collect();
        for n in &old {
            self.existing.remove(n);
        }
        old
    }

    /// Put segments whose deletion failed back on the list, so the next
    /// trim tries again.
    pub fn reattach(&mut self, failed: &[u64]) {
        self.existing.extend(failed);
    }

    /// The segment being written.
    pub fn current(&self) -> u64 {
        self.writer.no
    }

    fn remove(&mut self, no: u64) {
        let failed = delete(&self.dir, &[no]);
        if failed.is_empty() {
            self.existing.remove(&no);
        }
    }
}

/// Delete the segments `nos` in `dir`; those that could not be (the bytes
/// are only wasted space, and the next trim tries again once they are
/// reattached). A segment already gone counts as deleted.
pub fn delete(dir: &Path, nos: &[u64]) -> Vec<u64> {
    let mut failed = Vec::new();
    for &no in nos {
        let path = seg_path(dir, no);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "Cannot delete a delivered journal segment.");
                failed.push(no);
            }
        }
    }
    failed
}

fn sync_dir(dir: &Path) -> Result<(), String> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| format!("cannot sync directory {}: {e}", dir.display()))
}

fn open_rw(path: &Path) -> Result<File, String> {
    crate::fsutil::open_private(path).map_err(|e| io_err(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_damage_is_reported() {
        let mut buf = Vec::new();
        encode(&mut buf, "a1", 5, r#"{"_id":"a1"}"#);
        encode(&mut buf, "", -1, "");
        let got: Vec<Frame> = decode(&buf).collect::<Result<_, _>>().unwrap();
        assert_eq!(
            got,
            vec![Frame { id: "a1", created: 5, body: r#"{"_id":"a1"}"# }, Frame { id: "", created: -1, body: "" }]
        );
        for cut in 1..buf.len() {
            if cut == HEADER + 2 + 12 {
                continue; // a whole first frame
            }
            let r: Result<Vec<Frame>, String> = decode(&buf[..cut]).collect();
            assert!(r.is_err(), "cut at {cut} was accepted");
        }
    }

    #[test]
    fn uncommitted_tails_are_cut_and_delivered_segments_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("j");
        let mut s = Segments::open(&d, &BTreeMap::new()).unwrap();
        let (no, at) = s.append(b"hello", false).unwrap();
        assert_eq!((no, at), (1, 0));
        s.append(b"world", false).unwrap();
        drop(s);
        // Only "hello" committed: the reopen cuts "world".
        let s = Segments::open(&d, &BTreeMap::from([(1, 5)])).unwrap();
        assert_eq!(std::fs::metadata(seg_path(&d, 1)).unwrap().len(), 5);
        drop(s);
        // Committed bytes that are missing are an error naming the file.
        let e = Segments::open(&d, &BTreeMap::from([(1, 9)])).err().unwrap();
        assert!(e.contains("0000000000000001.seg") && e.contains("lost data"), "{e}");
        // A full segment rotates; the old one goes once nothing references it.
        let mut s = Segments::open(&d, &BTreeMap::from([(1, 5)])).unwrap();
        s.writer.end = SEGMENT_MAX;
        let (no, at) = s.append(b"x", false).unwrap();
        assert_eq!((no, at), (2, 0));
        assert_eq!(read(&d, 1, 0, 5).unwrap(), b"hello");
        let old = s.detach_before(2);
        assert_eq!(old, vec![1]);
        assert!(seg_path(&d, 1).exists(), "detached, not yet deleted");
        assert!(s.detach_before(2).is_empty(), "detached once");
        assert_eq!(delete(&d, &old), Vec::<u64>::new());
        assert!(!seg_path(&d, 1).exists() && seg_path(&d, 2).exists());
        assert_eq!(delete(&d, &old), Vec::<u64>::new(), "already gone counts as deleted");
        // One that cannot be deleted goes back on the list, for the next trim.
        std::fs::create_dir_all(seg_path(&d, 1).join("x")).unwrap();
        assert_eq!(delete(&d, &[1]), vec![1]);
        s.reattach(&[1]);
        assert_eq!(s.detach_before(2), vec![1]);
        std::fs::remove_dir_all(seg_path(&d, 1)).unwrap();
        assert!(read(&d, 1, 0, 5).unwrap_err().contains("0000000000000001.seg"));
        drop(s);
        // A database restored without its segments says which file is missing and why it matters.
        let e = Segments::open(&d, &BTreeMap::from([(1, 5)])).err().unwrap();
        assert!(e.contains("0000000000000001.seg") && e.contains("not yet delivered"), "{e}");
    }
}
