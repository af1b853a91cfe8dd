//! [`WeightsFile`]: the spool the executors write pushed weights into.

use std::io::Write;
use std::path::{Path, PathBuf};

use donate_proto::Spool;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

/// A pushed model's weights, written to a new file in a private temporary
/// directory (0700, the file 0600) stretch by stretch as the upload arrives
/// (it is an executor's [`Spool`]). Dropped, it removes its directory: an
/// upload that failed or whose connection closed leaves nothing behind.
pub struct WeightsFile {
    dir: TempDir,
    path: PathBuf,
    file: std::fs::File,
    expected: u64,
    written: u64,
    hash: Option<Sha256>,
}

impl WeightsFile {
    /// Makes the directory (under `root`, or the system temporary directory)
    /// and an empty `weights.bin` in it, for `expected` bytes, hashing what
    /// is written when `hashed` (see [`sha256_hex`](WeightsFile::sha256_hex)).
    pub fn create(root: Option<&Path>, expected: u64, hashed: bool) -> Result<WeightsFile, String> {
        let mut builder = tempfile::Builder::new();
        builder.prefix("donate-model-");
        #[cfg(unix)]
        builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700));
        let dir = match root {
            Some(root) => builder.tempdir_in(root),
            None => builder.tempdir(),
        }
        .map_err(|e| format!("cannot make a temporary directory for the weights: {e}"))?;
        let path = dir.path().join("weights.bin");
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options
            .open(&path)
            .map_err(|e| format!("cannot create the weights file: {e}"))?;
        Ok(WeightsFile {
            dir,
            path,
            file,
            expected,
            written: 0,
            hash: hashed.then(Sha256::new),
        })
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Whether all `expected` bytes are in.
    pub fn is_complete(&self) -> bool {
        self.written == self.expected
    }

    /// The lowercase hex SHA-256 of what was written, when hashed.
    pub fn sha256_hex(&self) -> Option<String> {
        let hash = self.hash.clone()?.finalize();
        Some(hash.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Closes the file (not synced: readers go through the page cache) and
    /// hands over what keeps it: the directory (removed when dropped), the
    /// path, the length and the hash.
    pub(crate) fn close(self) -> (TempDir, PathBuf, u64, Option<String>) {
        let sha256 = self.sha256_hex();
        let WeightsFile {
            dir, path, written, ..
        } = self;
        (dir, path, written, sha256)
    }
}

impl Spool for WeightsFile {
    fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        if self.written + bytes.len() as u64 > self.expected {
            return Err("more weights than weights_len".to_owned());
        }
        self.file
            .write_all(bytes)
            .map_err(|e| format!("cannot write the weights file: {e}"))?;
        if let Some(hash) = &mut self.hash {
            hash.update(bytes);
        }
        self.written += bytes.len() as u64;
        Ok(())
    }
}

impl std::fmt::Debug for WeightsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightsFile")
            .field("path", &self.path)
            .field("written", &self.written)
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_in_order_hashes_and_goes_with_its_directory() {
        let root = tempfile::tempdir().unwrap();
        let mut file = WeightsFile::create(Some(root.path()), 6, true).unwrap();
        file.write(b"abc").unwrap();
        assert!(!file.is_complete());
        file.write(b"def").unwrap();
        assert!(file.is_complete());
        assert_eq!(std::fs::read(file.path()).unwrap(), b"abcdef");
        assert_eq!(
            file.sha256_hex().unwrap(),
            "bef57ec7f53a6d40beb640a780a639c83bc29ac8a9816f1fc6c5c6dcd93c4721"
        );
        assert!(file.write(b"g").is_err(), "past weights_len");
        let dir = file.path().parent().unwrap().to_owned();
        drop(file);
        assert!(!dir.exists());
        let unhashed = WeightsFile::create(Some(root.path()), 1, false).unwrap();
        assert_eq!(unhashed.sha256_hex(), None);
    }
}
