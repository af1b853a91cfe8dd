//! A cache of weights files' SHA-256, by path, size and modification time, so
//! a multi-GB model is hashed once, not on every `donate push` or `infer`.
//!
//! Kept in `$DONATE_CACHE_DIR`, else `$XDG_CACHE_HOME/donate`, else
//! `~/.cache/donate`, as `hashes.json`. A missing or unreadable cache only
//! costs a re-hash; it never fails a command.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

/// Files remembered at most (the least recently hashed are forgotten first).
const MAX_ENTRIES: usize = 256;

#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
struct Entry {
    size: u64,
    mtime_ns: u128,
    sha256: String,
    /// When it was hashed or last used, for trimming.
    used_ns: u128,
}

/// The cached hash of `path`, if its size and modification time still match.
pub fn lookup(path: &Path) -> Option<[u8; 32]> {
    let (key, size, mtime_ns) = identify(path)?;
    let entry = load().remove(&key)?;
    (entry.size == size && entry.mtime_ns == mtime_ns)
        .then(|| parse(&entry.sha256))
        .flatten()
}

/// Remembers `sha256` for `path` as it is now.
pub fn store(path: &Path, sha256: &[u8; 32]) {
    let Some((key, size, mtime_ns)) = identify(path) else {
        return;
    };
    let Some(file) = cache_file() else { return };
    let mut entries = load();
    entries.insert(
        key,
        Entry {
            size,
            mtime_ns,
            sha256: donate_proto::hex(sha256),
            used_ns: now_ns(),
        },
    );
    if entries.len() > MAX_ENTRIES {
        let mut by_age: Vec<_> = entries
            .iter()
            .map(|(k, e)| (e.used_ns, k.clone()))
            .collect();
        by_age.sort();
        for (_, key) in by_age.into_iter().take(entries.len() - MAX_ENTRIES) {
            entries.remove(&key);
        }
    }
    let written = file
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| {
            let tmp = file.with_extension(format!("json.{}", std::process::id()));
            std::fs::write(&tmp, serde_json::to_vec(&entries).unwrap_or_default())?;
            std::fs::rename(&tmp, &file)
        });
    if let Err(e) = written {
        tracing::debug!(path = %file.display(), error = %e, "cannot write the hash cache");
    }
}

fn identify(path: &Path) -> Option<(String, u64, u128)> {
    let canonical = std::fs::canonicalize(path).ok()?;
    let meta = std::fs::metadata(&canonical).ok()?;
    let mtime = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
    Some((
        canonical.to_string_lossy().into_owned(),
        meta.len(),
        mtime.as_nanos(),
    ))
}

fn cache_file() -> Option<PathBuf> {
    let dir = std::env::var_os("DONATE_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("donate")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/donate")))?;
    Some(dir.join("hashes.json"))
}

fn load() -> HashMap<String, Entry> {
    cache_file()
        .and_then(|f| std::fs::read(f).ok())
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

fn parse(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}
