//! File helpers shared by the state store, the journal's segments and the
//! file sink.

use std::fs::File;
use std::path::Path;

/// Create `dir` and its missing parents, mode 0750; an existing one is left as it is.
pub(crate) fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    create_dir(dir, 0o750)
}

/// Create `dir` and its missing parents with `mode`; an existing one is
/// left as it is. Each one created is handed to its parent's owner (see
/// [`hand_to_dir_owner`]).
pub(crate) fn create_dir(dir: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.as_os_str().is_empty() && !d.is_dir()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    std::fs::DirBuilder::new().recursive(true).mode(mode).create(dir)?;
    for d in missing.iter().rev() {
        hand_to_dir_owner(d);
    }
    Ok(())
}

/// Open `path` for reading and writing, creating it with mode 0600 if needed
/// (never truncated, and handed to its directory's owner when created).
pub(crate) fn open_private(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    open_handing_over(std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600), path)
}

/// Open `path` with `options`; a file that this creates is handed to its
/// directory's owner (see [`hand_to_dir_owner`]).
pub(crate) fn open_handing_over(options: &std::fs::OpenOptions, path: &Path) -> std::io::Result<File> {
    let existed = path.exists();
    let f = options.open(path)?;
    if !existed {
        hand_to_dir_owner(path);
    }
    Ok(f)
}

/// When root creates `path` in a directory that belongs to another user,
/// hand it to that user (and group), as SQLite does with the files it
/// creates beside a database. An operator's `sudo opsera-shipper once`
/// against a service's state or output directory must not leave behind
/// files the service can no longer open. Best effort: a failure leaves the
/// file as it was.
fn hand_to_dir_owner(path: &Path) {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Ok(dir) = std::fs::metadata(parent)
        && dir.uid() != 0
    {
        let _ = std::os::unix::fs::chown(path, Some(dir.uid()), Some(dir.gid()));
    }
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
