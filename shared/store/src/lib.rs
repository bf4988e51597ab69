//! FedShield's persistent files, written and read one way everywhere.
//!
//! - [`write_atomic`]: a temporary file beside the target (created with the final mode, so a
//!   secret is never readable by others, not even for a moment), written, fsynced, renamed
//!   over the target, and the directory fsynced: after a crash the file is either the old
//!   one or the new one, whole.
//! - [`read_existing`]: `None` only when the file does not exist. Any other failure is an
//!   error naming the file, so that a caller never mistakes an unreadable file for a missing
//!   one and writes a fresh state over it.
//! - [`JsonLines`]: an append-only file of JSON lines, a process's event file (what it did
//!   and refused, for tools and tests).
//! - [`settings::expand_config`]: a TOML settings file (`--config FILE`) as the flags it
//!   stands for.

pub mod settings;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Who may read a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Owner only (0600): keys, states derived from private data, journals.
    Private,
    /// Owner writes, everyone reads (0644): certificates, registries, outputs.
    Public,
}

impl Access {
    fn mode(self) -> u32 {
        match self {
            Self::Private => 0o600,
            Self::Public => 0o644,
        }
    }
}

/// A persistent file that could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}: {source}", path.display())]
pub struct StoreError {
    /// What was being done ("reading", "writing").
    pub what: &'static str,
    /// The file.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

fn fail<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Seconds since the Unix epoch, from the system clock (0 before 1970): what certificate
/// validity is checked against.
pub fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Writes `bytes` to `path` atomically, readable as `access` says (see the module docs).
pub fn write_atomic(path: &Path, bytes: &[u8], access: Access) -> Result<(), StoreError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| fail("writing", path)(std::io::ErrorKind::InvalidInput.into()))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(access.mode())
        .open(&tmp)
        .map_err(fail("writing", &tmp))?;
    file.write_all(bytes).map_err(fail("writing", &tmp))?;
    file.sync_all().map_err(fail("writing", &tmp))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(fail("writing", path))?;
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(fail("syncing", &dir))
}

/// The contents of `path`, or `None` when it does not exist.
pub fn read_existing(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(fail("reading", path)(e)),
    }
}

/// An append-only file of JSON lines. Each value is one `write` of its line, newline
/// included, so a reader sees whole lines (a process killed mid-write leaves at most one
/// torn last line, which readers skip).
#[derive(Debug)]
pub struct JsonLines {
    file: std::fs::File,
    path: PathBuf,
}

impl JsonLines {
    /// Opens `path` for appending, creating it (readable by everyone) when missing.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(Access::Public.mode())
            .open(path)
            .map_err(fail("opening", path))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Appends `value` as one line.
    pub fn append<T: serde::Serialize>(&mut self, value: &T) -> Result<(), StoreError> {
        let mut line = serde_json::to_vec(value)
            .map_err(|e| fail("encoding a line of", &self.path)(std::io::Error::other(e)))?;
        line.push(b'\n');
        self.file
            .write_all(&line)
            .map_err(fail("appending to", &self.path))
    }
}

/// The values of a JSON-lines file that decode as `T`, in order (a torn last line and
/// lines of other shapes are skipped).
pub fn read_json_lines<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>, StoreError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(fail("reading", path)(e)),
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_replace_whole_files_with_the_mode_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.bin");
        assert!(read_existing(&path).unwrap().is_none());
        write_atomic(&path, b"first", Access::Private).unwrap();
        write_atomic(&path, b"second", Access::Private).unwrap();
        assert_eq!(read_existing(&path).unwrap().unwrap(), b"second");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!dir.path().join("state.bin.tmp").exists());
        let public = dir.path().join("host.json");
        write_atomic(&public, b"{}", Access::Public).unwrap();
        let mode = std::fs::metadata(&public).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
    }

    #[test]
    fn an_unreadable_file_is_an_error_not_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where a file is expected: reading fails, and the error names it.
        let path = dir.path().join("registry.json");
        std::fs::create_dir(&path).unwrap();
        let e = read_existing(&path).unwrap_err();
        assert!(e.to_string().contains("registry.json"), "{e}");
        // A write into a missing directory fails with the temporary file's name.
        let e = write_atomic(&dir.path().join("no/such/file"), b"x", Access::Public).unwrap_err();
        assert!(e.to_string().contains("file.tmp"), "{e}");
    }

    #[test]
    fn json_lines_append_and_read_back_skipping_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        assert!(read_json_lines::<u32>(&path).unwrap().is_empty());
        let mut log = JsonLines::open(&path).unwrap();
        log.append(&1u32).unwrap();
        log.append(&2u32).unwrap();
        drop(log);
        // A second run appends; a torn last line is skipped.
        let mut log = JsonLines::open(&path).unwrap();
        log.append(&3u32).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"4")
            .unwrap();
        let mut torn = std::fs::read(&path).unwrap();
        torn.pop();
        torn.extend(b"{\"x");
        std::fs::write(&path, &torn).unwrap();
        assert_eq!(read_json_lines::<u32>(&path).unwrap(), vec![1, 2, 3]);
        assert!(JsonLines::open(dir.path()).is_err());
    }
}
