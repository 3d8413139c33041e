//! Secrets read from files are re-read when their file changes, so a
//! rotated Kubernetes secret or systemd credential needs no restart: the
//! Opsera API token, webhook credentials and signing secrets alike.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use super::{Secret, read_secret_file};

/// A secret, and the file it came from, if any. Cloning shares it.
#[derive(Debug, Clone)]
pub struct SecretSource(Arc<Rotating>);

#[derive(Debug)]
struct Rotating {
    file: Option<PathBuf>,
    /// The last good value, and the file's modification time when it was read.
    state: Mutex<(Secret, Option<SystemTime>)>,
}

impl SecretSource {
    /// `value`, read from `file` if there is one (which is watched from now on).
    pub fn new(value: Secret, file: Option<PathBuf>) -> Self {
        let mtime = file.as_deref().and_then(modified);
        Self(Arc::new(Rotating { file, state: Mutex::new((value, mtime)) }))
    }

    /// The file the secret is read from, if any.
    pub fn file(&self) -> Option<&Path> {
        self.0.file.as_deref()
    }

    /// The current value: read again when the file's modification time has
    /// changed. A file that cannot be read (mid-rotation, say) keeps the
    /// last good value, with a warning, until its time changes again.
    pub fn current(&self) -> Secret {
        let mut st = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = &self.0.file {
            let mtime = modified(f);
            if mtime.is_some() && mtime != st.1 {
                match read_secret_file(f) {
                    Ok(value) => {
                        if value != st.0 {
                            tracing::info!(file = %f.display(), "Secret file changed; using its new value.");
                        }
                        *st = (value, mtime);
                    }
                    Err(error) => {
                        // Warned once for this version of the file, not at every use.
                        st.1 = mtime;
                        tracing::warn!(%error, "Cannot read the secret file again; keeping its last value.")
                    }
                }
            }
        }
        st.0.clone()
    }

    /// Read the file again now, whatever its time says; true when the value changed.
    pub fn reload(&self) -> bool {
        let Some(f) = &self.0.file else { return false };
        let mut st = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        match read_secret_file(f) {
            Ok(value) if value != st.0 => {
                *st = (value, modified(f));
                true
            }
            _ => false,
        }
    }
}

fn modified(file: &Path) -> Option<SystemTime> {
    std::fs::metadata(file).and_then(|m| m.modified()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Write `value` to `path` with a modification time of `secs` past the epoch.
    fn write(path: &Path, value: &str, secs: u64) {
        std::fs::write(path, value).unwrap();
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(secs)).unwrap();
    }

    #[test]
    fn a_changed_file_is_read_again_and_an_unreadable_one_keeps_the_last_value() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("token");
        write(&path, "one\n", 1000);
        let s = SecretSource::new(read_secret_file(&path).unwrap(), Some(path.clone()));
        let shared = s.clone();
        assert_eq!(s.current().expose(), "one");
        write(&path, "two\n", 2000);
        assert_eq!(shared.current().expose(), "two", "a clone sees the rotation too");
        // The same time again: not read (a file is read only when it changed).
        write(&path, "three\n", 2000);
        assert_eq!(s.current().expose(), "two");
        assert!(s.reload(), "reload reads it whatever the time says");
        assert_eq!(s.current().expose(), "three");
        assert!(!s.reload(), "nothing new");
        // Mid-rotation: empty, then gone. The last good value stays.
        write(&path, "", 3000);
        assert_eq!(s.current().expose(), "three");
        write(&path, "four\n", 4000);
        assert_eq!(s.current().expose(), "four", "read again once it changes again");
        write(&path, "", 5000);
        assert_eq!(s.current().expose(), "four");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(s.current().expose(), "four");
        assert!(!s.reload());
        // No file: the value as given.
        let fixed = SecretSource::new(Secret::new("inline"), None);
        assert_eq!(fixed.current().expose(), "inline");
        assert!(!fixed.reload() && fixed.file().is_none());
    }
}
