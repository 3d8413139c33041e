//! File helpers shared by the state store, the journal's segments and the
//! file sink.

use std::fs::File;
use std::path::Path;

/// Create `dir` and its missing parents, mode 0750; an existing one is left as it is.
pub(crate) fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o750).create(dir)
}

/// Open `path` for reading and writing, creating it with mode 0600 if needed
/// (never truncated).
pub(crate) fn open_private(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(path)
}

/// Start writing the whole 4 KiB blocks of `len` bytes at `at` to the disk
/// now, without waiting, so that a later `fdatasync` finds most of them
/// written (a block left partly filled goes with a later hint or with the
/// `fdatasync`). Only a hint: the `fdatasync` still makes them durable, and
/// an error here changes nothing.
pub(crate) fn start_writeback(file: &File, at: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        if let Some((from, len)) = whole_blocks(at, len) {
            // SAFETY: a plain syscall on an open descriptor; it touches no memory of ours.
            unsafe {
                libc::sync_file_range(file.as_raw_fd(), from as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, at, len);
}

/// The whole 4 KiB blocks that `len` bytes at `at` fill: from where the
/// block holding `at` starts up to the last block they complete (the block
/// before `at` was completed by the write before); `None` if they complete
/// none.
fn whole_blocks(at: u64, len: u64) -> Option<(u64, u64)> {
    let (from, to) = (at & !4095, (at + len) & !4095);
    (to > from).then_some((from, to - from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writeback_hints_cover_the_blocks_a_write_completes() {
        assert_eq!(whole_blocks(0, 4095), None);
        assert_eq!(whole_blocks(0, 4096), Some((0, 4096)));
        assert_eq!(whole_blocks(100, 4000), Some((0, 4096)), "completes the block it started in");
        assert_eq!(whole_blocks(5000, 100), None);
        assert_eq!(whole_blocks(5000, 10_000), Some((4096, 2 * 4096)), "up to 15000: blocks 1 and 2");
        assert_eq!(whole_blocks(8192, 0), None);
    }

    #[test]
    fn private_files_and_directories_are_kept_from_others() {
        use std::io::Write;
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        create_private_dir(&dir).unwrap();
        create_private_dir(&dir).unwrap(); // already there
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o027,
            0,
            "no group write, nothing for others"
        );
        let path = dir.join("f");
        open_private(&path).unwrap().write_all(b"kept").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o077, 0, "owner only");
        drop(open_private(&path).unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"kept", "opening again does not truncate");
    }
}
