//! [`ModelStore`]: a node's content-addressed model store on disk.
//!
//! Each model is one plain file of its raw weights, `models/<sha256>`, named by
//! the SHA-256 of its bytes, with `models/<sha256>.json` beside it (size, config,
//! last use). An upload is written to `partial/<sha256>` and renamed into
//! `models/` only once its bytes hash to that name; if its connection breaks,
//! the partial file stays (for a while) so the upload can resume. Names come
//! only from hashes the core parsed as 32 bytes: nothing a client sends
//! becomes a path.
//!
//! A stored file is served only while its bytes still hash to its name: the
//! first mount after the node started re-hashes it, and so does any mount after
//! its size or modification time changed. Entries in use are pinned; the
//! least recently used others are evicted to keep the store under its cap.
//!
//! An upload holds a claim on its hash from its first byte to its end, and
//! reserves its whole size against the cap meanwhile, so uploads at once never
//! pass the cap together. A claim that wrote nothing for the upload timeout
//! (default 30 s) may be taken: by another upload of the same hash, or to
//! make room. Its writer's next write fails.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use donate_proto::message::{ModelInventory, StoredModel};
use donate_proto::{hex, Spool};
use sha2::{Digest, Sha256};

/// A model's name in the store: the SHA-256 of its weights.
pub(crate) type Hash = [u8; 32];

/// Models listed by one `model_query` that asks for every model.
const MAX_LISTED: usize = 4096;

/// How long an upload may write nothing before its claim may be taken.
pub const DEFAULT_UPLOAD_TIMEOUT: Duration = Duration::from_secs(30);

/// The model store of a node (`donate serve --store DIR`).
#[derive(Clone)]
pub struct ModelStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ModelStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelStore")
            .field("dir", &self.inner.dir)
            .field("max_bytes", &self.inner.max_bytes)
            .finish_non_exhaustive()
    }
}

struct Inner {
    dir: PathBuf,
    max_bytes: u64,
    index: Mutex<Index>,
}

struct Index {
    partial_ttl: Duration,
    /// How long an upload may write nothing and keep its claim.
    upload_timeout: Duration,
    models: HashMap<Hash, Entry>,
    partials: HashMap<Hash, PartialEntry>,
    /// Hashes an upload is writing now (one writer per hash).
    writing: HashMap<Hash, Claim>,
    claims_made: u64,
    /// Added to the clock (only tests move it).
    skew: Duration,
}

/// An upload's hold on its hash and on room in the store.
struct Claim {
    /// Tells this upload's writer from a later one of the same hash.
    id: u64,
    /// The upload's whole size, held against the cap until the upload ends.
    reserved: u64,
    /// When it began or last wrote a byte.
    progress: Instant,
}

impl Index {
    fn now(&self) -> Instant {
        Instant::now() + self.skew
    }

    /// Whether a claim wrote nothing for the upload timeout, so it may be taken.
    fn stalled(&self, claim: &Claim, now: Instant) -> bool {
        now.saturating_duration_since(claim.progress) > self.upload_timeout
    }

    fn owns(&self, hash: &Hash, claim: u64) -> bool {
        self.writing.get(hash).is_some_and(|c| c.id == claim)
    }
}

struct Entry {
    size: u64,
    config_json: String,
    /// What its upload called it (`model_begin`'s `name`), or empty.
    name: String,
    /// Milliseconds since the epoch.
    last_used: u64,
    /// Mounted models holding it.
    pins: usize,
    /// Size and modification time when its bytes were last hashed in this process.
    verified: Option<(u64, SystemTime)>,
}

struct PartialEntry {
    size: u64,
    touched: SystemTime,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Meta {
    size: u64,
    #[serde(default)]
    config_json: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    name: String,
    /// Milliseconds since the epoch.
    #[serde(default)]
    last_used: u64,
}

impl ModelStore {
    /// Opens (creating if needed) the store in `dir`, capped at `max_bytes`
    /// of models and partial uploads. Entries already there are indexed;
    /// files whose names are not hashes are left alone.
    pub fn open(dir: impl Into<PathBuf>, max_bytes: u64) -> io::Result<ModelStore> {
        let dir = dir.into();
        for sub in ["models", "partial"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        let mut index = Index {
            partial_ttl: Duration::from_secs(3600),
            upload_timeout: DEFAULT_UPLOAD_TIMEOUT,
            models: HashMap::new(),
            partials: HashMap::new(),
            writing: HashMap::new(),
            claims_made: 0,
            skew: Duration::ZERO,
        };
        for (hash, path) in hashed_files(&dir.join("models"))? {
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            let stored: Option<Meta> = fs::read(meta_path(&path))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let last_used = stored
                .as_ref()
                .map(|m| m.last_used)
                .filter(|t| *t > 0)
                .unwrap_or_else(|| meta.modified().map_or(0, millis));
            index.models.insert(
                hash,
                Entry {
                    size: meta.len(),
                    name: stored
                        .as_ref()
                        .map(|m| m.name.clone())
                        .filter(|n| donate_proto::message::valid_model_name(n))
                        .unwrap_or_default(),
                    config_json: stored.map(|m| m.config_json).unwrap_or_default(),
                    last_used,
                    pins: 0,
                    verified: None,
                },
            );
        }
        for (hash, path) in hashed_files(&dir.join("partial"))? {
            if let Ok(meta) = fs::metadata(&path) {
                index.partials.insert(
                    hash,
                    PartialEntry {
                        size: meta.len(),
                        touched: meta.modified().unwrap_or(SystemTime::now()),
                    },
                );
            }
        }
        let store = ModelStore {
            inner: Arc::new(Inner {
                dir,
                max_bytes,
                index: Mutex::new(index),
            }),
        };
        store.expire_partials();
        Ok(store)
    }

    /// How long a broken upload's bytes are kept for it to resume (default 1 h).
    pub fn partial_ttl(self, ttl: Duration) -> Self {
        self.index().partial_ttl = ttl;
        self
    }

    /// How long an upload may write nothing and keep its hold on its model
    /// and on room in the store (default 30 s). After that, another upload
    /// of the same model takes its place, and uploads that need room may
    /// drop it; its next write fails.
    pub fn upload_timeout(self, timeout: Duration) -> Self {
        self.index().upload_timeout = timeout;
        self
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Bytes held: models and partial uploads.
    pub fn used_bytes(&self) -> u64 {
        let index = self.index();
        index.models.values().map(|e| e.size).sum::<u64>()
            + index.partials.values().map(|p| p.size).sum::<u64>()
    }

    /// Models held.
    pub fn len(&self) -> usize {
        self.index().models.len()
    }

    /// Whether no model is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Moves the store's clock on (tests of the upload timeout).
    #[cfg(test)]
    fn advance(&self, by: Duration) {
        self.index().skew += by;
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        lock(&self.inner.index)
    }

    fn model_path(&self, hash: &Hash) -> PathBuf {
        self.inner.dir.join("models").join(hex(hash))
    }

    fn partial_path(&self, hash: &Hash) -> PathBuf {
        self.inner.dir.join("partial").join(hex(hash))
    }

    /// Whether every byte of `hash` is held.
    pub(crate) fn contains(&self, hash: &Hash) -> bool {
        self.index().models.contains_key(hash)
    }

    /// The answer to a `model_query`: one entry per hash, or every model.
    pub(crate) fn inventory(&self, hashes: &[Hash]) -> ModelInventory {
        self.expire_partials();
        let index = self.index();
        let describe = |hash: &Hash| {
            let model = index.models.get(hash);
            StoredModel {
                sha256: hex(hash),
                stored: model.is_some(),
                size: model.map_or(0, |m| m.size as i64),
                partial: match (model, index.partials.get(hash)) {
                    (None, Some(p)) if !index.writing.contains_key(hash) => p.size as i64,
                    _ => 0,
                },
                in_use: model.is_some_and(|m| m.pins > 0),
                last_used: model.map_or(0, |m| (m.last_used / 1000) as i64),
                name: model.map(|m| m.name.clone()).unwrap_or_default(),
            }
        };
        let models = if hashes.is_empty() {
            let mut all: Vec<_> = index.models.keys().map(describe).collect();
            all.sort_by(|a, b| b.last_used.cmp(&a.last_used).then(a.sha256.cmp(&b.sha256)));
            all.truncate(MAX_LISTED);
            all
        } else {
            hashes.iter().map(describe).collect()
        };
        let pinned: u64 = index
            .models
            .values()
            .filter(|m| m.pins > 0)
            .map(|m| m.size)
            .sum();
        let now = index.now();
        let writing: u64 = index
            .writing
            .values()
            .filter(|c| !index.stalled(c, now))
            .map(|c| c.reserved)
            .sum();
        ModelInventory {
            models,
            store_free: self.inner.max_bytes.saturating_sub(pinned + writing) as i64,
        }
    }

    /// Starts writing `hash` (`total` bytes; the first `offset` already held
    /// as a partial upload), making room first and reserving `total` bytes
    /// until the upload ends. Fails if another upload writes it (and has not
    /// stalled), if it cannot fit, or if the partial bytes are not there.
    pub(crate) fn begin_write(
        &self,
        hash: Hash,
        total: u64,
        offset: u64,
        config_json: &str,
        name: &str,
    ) -> Result<StoreFile, String> {
        self.expire_partials();
        let mut index = self.index();
        let now = index.now();
        if let Some(claim) = index.writing.get(&hash) {
            if !index.stalled(claim, now) {
                return Err(
                    "another connection is uploading this model now: use it once that upload is done"
                        .to_owned(),
                );
            }
            // Its writer stalled: this upload takes its place; what it wrote goes.
            index.writing.remove(&hash);
            index.partials.remove(&hash);
            tracing::info!(sha256 = %hex(&hash), "store: an upload that stalled lost its model to another");
        }
        let held = index.partials.get(&hash).map_or(0, |p| p.size);
        if offset > held {
            return Err(format!(
                "cannot resume at byte {offset}: this node holds {held} bytes of the model"
            ));
        }
        self.make_room(&mut index, total, &hash, now)?;
        index.claims_made += 1;
        let claim = index.claims_made;
        index.writing.insert(
            hash,
            Claim {
                id: claim,
                reserved: total,
                progress: now,
            },
        );
        drop(index);
        let store = self.clone();
        let file = StoreFile::open(store, hash, claim, total, offset, config_json, name);
        if file.is_err() {
            let mut index = self.index();
            if index.owns(&hash, claim) {
                index.writing.remove(&hash);
            }
        }
        file
    }

    /// Evicts until `needed` more bytes fit (a partial of `for_hash` counts
    /// as part of it): first uploads that stalled, then stale partial uploads,
    /// then the least recently used unpinned models. Uploads under way count
    /// with their whole size.
    fn make_room(
        &self,
        index: &mut Index,
        needed: u64,
        for_hash: &Hash,
        now: Instant,
    ) -> Result<(), String> {
        let max = self.inner.max_bytes;
        if needed > max {
            return Err(format!(
                "the model store holds at most {max} bytes; this model is {needed} bytes"
            ));
        }
        loop {
            let used: u64 = index.models.values().map(|e| e.size).sum::<u64>()
                + index
                    .partials
                    .iter()
                    .filter(|(h, _)| *h != for_hash && !index.writing.contains_key(*h))
                    .map(|(_, p)| p.size)
                    .sum::<u64>()
                + index
                    .writing
                    .iter()
                    .filter(|(h, _)| *h != for_hash)
                    .map(|(_, c)| c.reserved)
                    .sum::<u64>();
            if used + needed <= max {
                return Ok(());
            }
            let stalled = index
                .writing
                .iter()
                .filter(|(h, c)| *h != for_hash && index.stalled(c, now))
                .min_by_key(|(_, c)| c.progress)
                .map(|(h, _)| *h);
            let oldest_partial = index
                .partials
                .iter()
                .filter(|(h, _)| *h != for_hash && !index.writing.contains_key(*h))
                .min_by_key(|(_, p)| p.touched)
                .map(|(h, _)| *h);
            let lru = index
                .models
                .iter()
                .filter(|(_, e)| e.pins == 0)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(h, _)| *h);
            if let Some(hash) = stalled {
                index.writing.remove(&hash);
                index.partials.remove(&hash);
                let _ = fs::remove_file(self.partial_path(&hash));
                tracing::info!(sha256 = %hex(&hash), "store: dropped an upload that stalled to make room");
            } else if let Some(hash) = oldest_partial {
                index.partials.remove(&hash);
                let _ = fs::remove_file(self.partial_path(&hash));
                tracing::info!(sha256 = %hex(&hash), "store: dropped a partial upload to make room");
            } else if let Some(hash) = lru {
                index.models.remove(&hash);
                self.remove_files(&hash);
                tracing::info!(sha256 = %hex(&hash), "store: evicted the least recently used model");
            } else {
                return Err(format!(
                    "the model store is full: {used} of {max} bytes are models in use and uploads under way; this model needs {needed}"
                ));
            }
        }
    }

    fn remove_files(&self, hash: &Hash) {
        let path = self.model_path(hash);
        let _ = fs::remove_file(meta_path(&path));
        let _ = fs::remove_file(path);
    }

    /// Drops partial uploads untouched for longer than the TTL.
    fn expire_partials(&self) {
        let now = SystemTime::now();
        let mut index = self.index();
        let ttl = index.partial_ttl;
        let stale: Vec<Hash> = index
            .partials
            .iter()
            .filter(|(h, p)| {
                !index.writing.contains_key(*h)
                    && now.duration_since(p.touched).unwrap_or_default() > ttl
            })
            .map(|(h, _)| *h)
            .collect();
        for hash in stale {
            index.partials.remove(&hash);
            let _ = fs::remove_file(self.partial_path(&hash));
            tracing::info!(sha256 = %hex(&hash), "store: a partial upload expired");
        }
    }

    /// Pins `hash` for a mount and returns its file, after checking that its
    /// bytes still hash to its name (once per process, and again whenever its
    /// size or modification time changed). A corrupt entry is dropped.
    pub(crate) fn pin(&self, hash: &Hash) -> Result<(PathBuf, Pin), String> {
        let path = self.model_path(hash);
        let (size, verified) = {
            let index = self.index();
            let entry = index.models.get(hash).ok_or_else(|| not_stored(hash))?;
            (entry.size, entry.verified)
        };
        let stat = fs::metadata(&path).and_then(|m| Ok((m.len(), m.modified()?)));
        let fresh = match stat {
            Ok(now) if Some(now) == verified => Some(now),
            Ok((len, _)) if len != size => None,
            Ok(_) => match hash_file(&path) {
                Ok(got) if got == *hash => fs::metadata(&path)
                    .and_then(|m| Ok((m.len(), m.modified()?)))
                    .ok(),
                _ => None,
            },
            Err(_) => None,
        };
        let mut index = self.index();
        let Some(checked) = fresh else {
            tracing::warn!(sha256 = %hex(hash), path = %path.display(), "store: a stored model no longer matches its hash (changed or truncated on disk); dropped, the client is asked to upload it again");
            if index.models.remove(hash).is_some() {
                self.remove_files(hash);
            }
            return Err(not_stored(hash));
        };
        let entry = index.models.get_mut(hash).ok_or_else(|| not_stored(hash))?;
        entry.verified = Some(checked);
        entry.pins += 1;
        entry.last_used = millis(SystemTime::now());
        let meta = Meta {
            size: entry.size,
            config_json: entry.config_json.clone(),
            name: entry.name.clone(),
            last_used: entry.last_used,
        };
        drop(index);
        write_meta(&path, &meta);
        Ok((
            path,
            Pin {
                store: self.clone(),
                hash: *hash,
            },
        ))
    }
}

fn not_stored(hash: &Hash) -> String {
    format!("this node does not hold model {}; upload it", hex(hash))
}

/// Keeps a stored model from eviction while a mounted model uses it.
pub(crate) struct Pin {
    store: ModelStore,
    hash: Hash,
}

impl Drop for Pin {
    fn drop(&mut self) {
        if let Some(entry) = self.store.index().models.get_mut(&self.hash) {
            entry.pins = entry.pins.saturating_sub(1);
        }
    }
}

/// An upload being written into the store: the spool of a store upload.
pub(crate) struct StoreFile {
    store: ModelStore,
    hash: Hash,
    /// Its claim on `hash`; once another holds the hash, this file is nothing.
    claim: u64,
    file: Option<File>,
    total: u64,
    written: u64,
    /// For a resumed upload: the hash of every byte (the node saw only the new ones).
    hasher: Option<Sha256>,
    config_json: String,
    name: String,
    finished: bool,
}

impl StoreFile {
    fn open(
        store: ModelStore,
        hash: Hash,
        claim: u64,
        total: u64,
        offset: u64,
        config_json: &str,
        name: &str,
    ) -> Result<StoreFile, String> {
        let path = store.partial_path(&hash);
        if offset == 0 {
            // A new file, not the one a writer that stalled may still hold open.
            let _ = fs::remove_file(&path);
        }
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let fail = |e: io::Error| format!("cannot write the model store: {e}");
        let mut file = options.open(&path).map_err(fail)?;
        file.set_len(offset).map_err(fail)?;
        let hasher = if offset > 0 {
            let mut hasher = Sha256::new();
            file.seek(SeekFrom::Start(0)).map_err(fail)?;
            let copied = io::copy(&mut (&mut file).take(offset), &mut HashWriter(&mut hasher));
            if copied.map_err(fail)? != offset {
                return Err("the partial upload is shorter than it was".to_owned());
            }
            Some(hasher)
        } else {
            None
        };
        file.seek(SeekFrom::Start(offset)).map_err(fail)?;
        Ok(StoreFile {
            store,
            hash,
            claim,
            file: Some(file),
            total,
            written: offset,
            hasher,
            config_json: config_json.to_owned(),
            name: name.to_owned(),
            finished: false,
        })
    }

    /// The hash the file is named by.
    pub(crate) fn hash(&self) -> Hash {
        self.hash
    }

    /// Moves a complete upload into place (its hash already checked by the
    /// node, or here for a resumed one) and registers it.
    pub(crate) fn finish(mut self) -> Result<Hash, String> {
        if self.written != self.total {
            return Err(format!(
                "the store file holds {} bytes, fewer than the {} announced",
                self.written, self.total
            ));
        }
        if let Some(hasher) = self.hasher.take() {
            let got: [u8; 32] = hasher.finalize().into();
            if got != self.hash {
                return Err(format!(
                    "sha256 mismatch after resuming: got {}, expected {}",
                    hex(&got),
                    hex(&self.hash)
                ));
            }
        }
        self.file = None;
        let store = self.store.clone();
        let from = store.partial_path(&self.hash);
        let to = store.model_path(&self.hash);
        let last_used = millis(SystemTime::now());
        let mut index = store.index();
        if !index.owns(&self.hash, self.claim) {
            return Err(self.lost(&index));
        }
        // Under the lock: no other upload can take the file meanwhile.
        fs::rename(&from, &to).map_err(|e| format!("cannot move the model into the store: {e}"))?;
        let checked = fs::metadata(&to)
            .and_then(|m| Ok((m.len(), m.modified()?)))
            .ok();
        index.writing.remove(&self.hash);
        index.partials.remove(&self.hash);
        index.models.insert(
            self.hash,
            Entry {
                size: self.total,
                config_json: self.config_json.clone(),
                name: self.name.clone(),
                last_used,
                pins: 0,
                verified: checked,
            },
        );
        self.finished = true;
        drop(index);
        let meta = Meta {
            size: self.total,
            config_json: std::mem::take(&mut self.config_json),
            name: std::mem::take(&mut self.name),
            last_used,
        };
        write_meta(&to, &meta);
        tracing::info!(sha256 = %hex(&self.hash), bytes = self.total, "store: model stored");
        Ok(self.hash)
    }

    fn lost(&self, index: &Index) -> String {
        format!(
            "this upload wrote nothing for over {} s and lost its place in the model store to another upload",
            index.upload_timeout.as_secs_f64()
        )
    }
}

impl Spool for StoreFile {
    fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        if bytes.is_empty() {
            // Nothing written is no progress.
            return Ok(());
        }
        {
            let mut index = self.store.index();
            let now = index.now();
            match index.writing.get_mut(&self.hash) {
                Some(claim) if claim.id == self.claim => claim.progress = now,
                _ => {
                    self.file = None;
                    return Err(self.lost(&index));
                }
            }
        }
        let Some(file) = &mut self.file else {
            return Err("the store file was closed after an error".to_owned());
        };
        if let Err(e) = file.write_all(bytes) {
            // Disk full, say: this upload fails and leaves nothing behind.
            self.file = None;
            self.written = 0;
            let _ = fs::remove_file(self.store.partial_path(&self.hash));
            return Err(format!("cannot write the model store: {e}"));
        }
        if let Some(hasher) = &mut self.hasher {
            hasher.update(bytes);
        }
        self.written += bytes.len() as u64;
        Ok(())
    }
}

impl Drop for StoreFile {
    fn drop(&mut self) {
        let mut index = self.store.index();
        // Finished, or taken by another upload with what it had written.
        if self.finished || !index.owns(&self.hash, self.claim) {
            return;
        }
        index.writing.remove(&self.hash);
        // A broken upload keeps what it wrote, to resume; a complete one that
        // was not finished did not hash to its name, and an empty one holds nothing.
        let path = self.store.partial_path(&self.hash);
        if self.written > 0 && self.written < self.total {
            index.partials.insert(
                self.hash,
                PartialEntry {
                    size: self.written,
                    touched: SystemTime::now(),
                },
            );
        } else {
            index.partials.remove(&self.hash);
            let _ = fs::remove_file(path);
        }
    }
}

struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The SHA-256 of a file's bytes.
pub(crate) fn hash_file(path: &Path) -> io::Result<Hash> {
    let mut hasher = Sha256::new();
    io::copy(&mut File::open(path)?, &mut HashWriter(&mut hasher))?;
    Ok(hasher.finalize().into())
}

/// Files in `dir` whose names are hashes (64 lowercase hex digits).
fn hashed_files(dir: &Path) -> io::Result<Vec<(Hash, PathBuf)>> {
    let mut out = Vec::new();
    for item in fs::read_dir(dir)? {
        let item = item?;
        let name = item.file_name();
        if let Some(hash) = name.to_str().and_then(parse_hash) {
            out.push((hash, item.path()));
        }
    }
    Ok(out)
}

fn parse_hash(name: &str) -> Option<Hash> {
    if name.len() != 64 || !name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(name.as_bytes().chunks_exact(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

fn meta_path(model: &Path) -> PathBuf {
    model.with_extension("json")
}

/// Writes a model's metadata beside it (a temporary file renamed over the old one).
fn write_meta(model: &Path, meta: &Meta) {
    let path = meta_path(model);
    let tmp = model.with_extension("json.tmp");
    let written = serde_json::to_vec(meta)
        .map_err(io::Error::other)
        .and_then(|bytes| fs::write(&tmp, bytes))
        .and_then(|()| fs::rename(&tmp, &path));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "store: cannot write a model's metadata");
    }
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(bytes: &[u8]) -> Hash {
        Sha256::digest(bytes).into()
    }

    fn put(store: &ModelStore, bytes: &[u8]) -> Hash {
        let hash = sha(bytes);
        let mut file = store
            .begin_write(hash, bytes.len() as u64, 0, "{}", "")
            .unwrap();
        file.write(bytes).unwrap();
        file.finish().unwrap()
    }

    #[test]
    fn lru_eviction_skips_pinned_models_and_refuses_what_cannot_fit() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path(), 300).unwrap();
        let a = put(&store, &[1; 100]);
        let b = put(&store, &[2; 100]);
        // `a` is used after `b`, so `b` is the least recently used; but `a` is pinned.
        std::thread::sleep(Duration::from_millis(5));
        let (_, pin_a) = store.pin(&a).unwrap();
        let c = put(&store, &[3; 100]);
        let d = put(&store, &[4; 100]);
        assert!(store.contains(&a), "pinned: never evicted");
        assert!(!store.contains(&b), "least recently used: evicted first");
        assert!(store.contains(&d));
        assert!(store.contains(&c));
        assert!(store.used_bytes() <= 300);
        // With `a` pinned and 300 bytes of cap, 250 bytes cannot fit.
        let big = vec![5; 250];
        let err = store
            .begin_write(sha(&big), 250, 0, "{}", "")
            .err()
            .expect("full");
        assert!(err.contains("in use"), "{err}");
        drop(pin_a);
        assert!(store.begin_write(sha(&big), 250, 0, "{}", "").is_ok());
        let err = store
            .begin_write(sha(b"x"), 301, 0, "{}", "")
            .err()
            .unwrap();
        assert!(err.contains("at most 300 bytes"), "{err}");
    }

    #[test]
    fn a_models_name_is_listed_and_kept_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path(), 1 << 20).unwrap();
        let bytes = [7u8; 64];
        let mut file = store
            .begin_write(sha(&bytes), 64, 0, "{}", "SmolLM2.Q4_1.gguf")
            .unwrap();
        file.write(&bytes).unwrap();
        let hash = file.finish().unwrap();
        let name = |store: &ModelStore| store.inventory(&[hash]).models[0].name.clone();
        assert_eq!(name(&store), "SmolLM2.Q4_1.gguf");
        assert_eq!(
            name(&ModelStore::open(dir.path(), 1 << 20).unwrap()),
            "SmolLM2.Q4_1.gguf"
        );
        // A name edited into the metadata file with a control character is dropped.
        let meta = meta_path(&store.model_path(&hash));
        let text = fs::read_to_string(&meta).unwrap();
        fs::write(&meta, text.replace("SmolLM2.Q4_1.gguf", "bad\\u001b[2J")).unwrap();
        assert_eq!(name(&ModelStore::open(dir.path(), 1 << 20).unwrap()), "");
    }

    #[test]
    fn a_broken_upload_resumes_and_a_wrong_resume_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path(), 1 << 20).unwrap();
        let bytes: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let hash = sha(&bytes);
        let mut first = store.begin_write(hash, 1000, 0, "{}", "").unwrap();
        first.write(&bytes[..400]).unwrap();
        drop(first);
        assert_eq!(store.inventory(&[hash]).models[0].partial, 400);
        // The same store reopened (a restarted node) still holds the partial.
        let store = ModelStore::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(store.inventory(&[hash]).models[0].partial, 400);
        assert!(store.begin_write(hash, 1000, 401, "{}", "").is_err());
        let mut second = store.begin_write(hash, 1000, 400, "{}", "").unwrap();
        second.write(&bytes[400..]).unwrap();
        assert_eq!(second.finish().unwrap(), hash);
        assert!(store.inventory(&[hash]).models[0].stored);
        assert_eq!(fs::read(store.model_path(&hash)).unwrap(), bytes);

        // A resume whose new bytes are wrong does not hash to the name.
        let other: Vec<u8> = vec![9; 1000];
        let hash = sha(&other);
        let mut first = store.begin_write(hash, 1000, 0, "{}", "").unwrap();
        first.write(&other[..500]).unwrap();
        drop(first);
        let mut second = store.begin_write(hash, 1000, 500, "{}", "").unwrap();
        second.write(&[8; 500]).unwrap();
        assert!(second.finish().unwrap_err().contains("mismatch"));
        assert!(!store.contains(&hash));
    }

    #[test]
    fn one_writer_per_hash_and_expired_partials_go() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path(), 1 << 20)
            .unwrap()
            .partial_ttl(Duration::ZERO);
        let hash = sha(b"model");
        let mut first = store.begin_write(hash, 5, 0, "{}", "").unwrap();
        assert!(store
            .begin_write(hash, 5, 0, "{}", "")
            .err()
            .unwrap()
            .contains("uploading this model now"));
        first.write(b"mo").unwrap();
        drop(first);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(store.inventory(&[hash]).models[0].partial, 0, "expired");
        assert!(!store.partial_path(&hash).exists());
    }

    #[test]
    fn a_changed_file_is_caught_and_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path(), 1 << 20).unwrap();
        let hash = put(&store, b"some weights");
        drop(store.pin(&hash).unwrap());
        let store = ModelStore::open(dir.path(), 1 << 20).unwrap();
        let path = store.model_path(&hash);
        let mut bytes = fs::read(&path).unwrap();
        bytes[0] ^= 1;
        fs::write(&path, bytes).unwrap();
        assert!(store.pin(&hash).err().unwrap().contains("upload it"));
        assert!(!store.contains(&hash));
        assert!(!path.exists());
        // Files not named by a hash are ignored, never parsed as one.
        fs::write(dir.path().join("models/NOTAHASH"), b"x").unwrap();
        assert_eq!(ModelStore::open(dir.path(), 1 << 20).unwrap().len(), 0);
    }

    #[test]
    fn uploads_under_way_hold_their_whole_size_against_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path(), 300).unwrap();
        let (a, b) = (vec![1u8; 200], vec![2u8; 200]);
        let mut first = store.begin_write(sha(&a), 200, 0, "{}", "").unwrap();
        first.write(&a[..10]).unwrap();
        // Ten bytes are on disk, but the first upload will need 200.
        let err = store.begin_write(sha(&b), 200, 0, "{}", "").err().unwrap();
        assert!(err.contains("uploads under way"), "{err}");
        assert_eq!(store.inventory(&[]).store_free, 100);
        // Abandoned: its reservation goes, its 10 bytes stay (and may be dropped for room).
        drop(first);
        let mut second = store.begin_write(sha(&b), 200, 0, "{}", "").unwrap();
        second.write(&b).unwrap();
        second.finish().unwrap();
        // Committed: the model counts, not a reservation beside it.
        assert_eq!(store.used_bytes(), 210);
        let c = vec![3u8; 100];
        let mut third = store.begin_write(sha(&c), 100, 0, "{}", "").unwrap();
        third.write(&c).unwrap();
        third.finish().unwrap();
        assert_eq!(store.used_bytes(), 300, "the partial made room");
        assert!(store.contains(&sha(&b)) && store.contains(&sha(&c)));
        // A failed one releases its reservation too.
        let mut failed = store.begin_write(sha(&a), 200, 0, "{}", "").unwrap();
        failed.write(&a).unwrap();
        failed.hasher = Some(Sha256::new());
        assert!(failed.finish().is_err());
        assert!(store.index().writing.is_empty());
    }

    #[test]
    fn an_upload_that_writes_nothing_loses_its_model_to_another() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path(), 1 << 20).unwrap();
        let model = vec![7u8; 1000];
        let hash = sha(&model);
        let mut stalled = store.begin_write(hash, 1000, 0, "{}", "").unwrap();
        stalled.write(&[0; 400]).unwrap();
        store.advance(Duration::from_secs(29));
        assert!(store
            .begin_write(hash, 1000, 0, "{}", "")
            .err()
            .unwrap()
            .contains("uploading this model now"));
        // Empty writes are no progress: 31 s after its last byte, it has stalled.
        stalled.write(&[]).unwrap();
        store.advance(Duration::from_secs(2));
        let mut owner = store.begin_write(hash, 1000, 0, "{}", "").unwrap();
        let err = stalled.write(&[0; 10]).unwrap_err();
        assert!(err.contains("lost its place"), "{err}");
        drop(stalled);
        owner.write(&model).unwrap();
        assert_eq!(owner.finish().unwrap(), hash);
        assert_eq!(fs::read(store.model_path(&hash)).unwrap(), model);

        // A writer that keeps writing keeps its model.
        let other = vec![8u8; 1000];
        let mut busy = store.begin_write(sha(&other), 1000, 0, "{}", "").unwrap();
        for piece in other.chunks(100) {
            store.advance(Duration::from_secs(20));
            busy.write(piece).unwrap();
            assert!(store.begin_write(sha(&other), 1000, 0, "{}", "").is_err());
        }
        busy.finish().unwrap();
    }

    #[test]
    fn an_upload_that_stalled_gives_up_its_room() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path(), 300)
            .unwrap()
            .upload_timeout(Duration::from_secs(5));
        let mut stalled = store.begin_write(sha(b"big"), 250, 0, "{}", "").unwrap();
        stalled.write(&[1; 50]).unwrap();
        let small = vec![2u8; 100];
        assert!(store.begin_write(sha(&small), 100, 0, "{}", "").is_err());
        store.advance(Duration::from_secs(6));
        assert_eq!(
            store.inventory(&[]).store_free,
            300,
            "a stalled claim is free room"
        );
        let mut file = store.begin_write(sha(&small), 100, 0, "{}", "").unwrap();
        assert!(!store.partial_path(&sha(b"big")).exists());
        assert!(stalled.write(&[1; 50]).is_err());
        drop(stalled);
        file.write(&small).unwrap();
        file.finish().unwrap();
        assert_eq!(store.used_bytes(), 100);
    }
}
