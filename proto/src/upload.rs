//! Server-side model upload assembly: `model_begin` → `weights_chunk`* → `model_commit`.
//!
//! Chunk data is decoded from the frame's base64 text straight into the model
//! buffer. The buffer grows with the bytes received, never reserved from
//! `weights_len` up front, and bytes past `weights_len` are refused before they
//! are buffered.
//!
//! Two kinds of work leave the I/O path as [`UploadWork`], run on a worker by
//! [`run_upload`](crate::run_upload) while more bytes arrive, as the node's
//! [`UploadHandling`] says: hashing `weights_sha256`, and spooling, where the
//! bytes are moved (not copied) to the executor's [`Spool`](crate::Spool), a
//! file say, and the node keeps only the stretch not yet handed over.
//!
//! An upload's life: its carried state (running hash, spool) is [`Carrier::Home`]
//! with the connection, or [`Carrier::Away`] with a worker while a stretch is
//! hashed or spooled; a commit waits until it is home.

use std::any::Any;

use sha2::{Digest, Sha256};

use crate::config::UploadHandling;
use crate::error::{MountError, ProtocolError};
use crate::id::ConnectionId;
use crate::message::{
    decoded_len, valid_model_name, ModelBegin, WeightsChunk, BASE64, MAX_MODEL_NAME,
};
use base64::Engine as _;

/// An executor's spool with its type erased, so the node need not be generic over it.
pub(crate) type ErasedSpool = Box<dyn Any + Send>;

/// What an executor learns of an upload when it opens a [`Spool`](crate::Spool) for it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UploadInfo {
    /// The model's `config_json`.
    pub config_json: String,
    /// `weights_len` from `model_begin`: the model's size.
    pub weights_len: u64,
    /// `weights_sha256` from `model_begin`, when given.
    pub sha256: Option<[u8; 32]>,
    /// Extension `store`: the upload resumes a broken one whose first `offset`
    /// bytes the node holds; the spool receives the other `weights_len - offset`
    /// and must check the hash itself (the node hashes only what it receives).
    pub offset: u64,
    /// Extension `store`: the model's name from `model_begin` (checked
    /// printable, at most `MAX_MODEL_NAME` bytes), or empty.
    pub name: String,
}

/// The state that travels with an [`UploadWork`] and comes back with it.
#[derive(Default)]
pub(crate) struct Carried {
    /// The running SHA-256, when `weights_sha256` is checked on workers.
    pub(crate) hash: Option<Sha256>,
    /// The executor's spool, once opened.
    pub(crate) spool: Option<ErasedSpool>,
    /// Why spooling failed; later bytes are dropped and the commit is refused with it.
    pub(crate) spool_error: Option<String>,
}

impl std::fmt::Debug for Carried {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Carried")
            .field("hash", &self.hash.is_some())
            .field("spool", &self.spool.is_some())
            .field("spool_error", &self.spool_error)
            .finish()
    }
}

/// A stretch of an upload's bytes for a worker, from
/// [`Event::Upload`](crate::Event::Upload): run it with
/// [`run_upload`](crate::run_upload), then hand it back with
/// [`Node::upload_work_done`](crate::Node::upload_work_done).
#[derive(Debug)]
pub struct UploadWork {
    pub(crate) conn: ConnectionId,
    pub(crate) upload: u64,
    /// The bytes go to a spool.
    pub(crate) spooling: bool,
    /// What opens the spool, while it is not open yet (`carried.spool` is `None`).
    pub(crate) open_with: Option<UploadInfo>,
    pub(crate) carried: Carried,
    pub(crate) data: Vec<u8>,
}

impl UploadWork {
    /// Bytes in this stretch (0 once run).
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the stretch is empty (it is once run).
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Where the upload's carried state is.
#[derive(Debug)]
pub(crate) enum Carrier {
    /// Here; bytes of `weights` before `hashed` are in the hash.
    Home { carried: Carried, hashed: usize },
    /// With a worker, which has the bytes up to `hashed` of `weights` (none
    /// when spooling: they were moved out).
    Away { hashed: usize },
}

/// An upload in progress on one connection.
#[derive(Debug)]
pub struct Upload {
    /// Tells this upload's returning [`UploadWork`] from an older one's.
    pub(crate) id: u64,
    config_json: String,
    weights_len: u64,
    sha256: Option<[u8; 32]>,
    /// Bytes the node already holds from a broken upload (extension `store`).
    offset: u64,
    /// The model's name (extension `store`).
    name: String,
    /// Hash on workers (not `InMemory`, a `weights_sha256` given, not resumed).
    hash_on_workers: bool,
    /// Move the bytes to the executor's spool ([`UploadHandling::Spool`]).
    spooling: bool,
    carrier: Carrier,
    next_index: u64,
    /// A chunk marked `last` arrived.
    last_seen: bool,
    /// Bytes received in all.
    received: u64,
    /// The bytes received and not handed to a spool (all of them, when not spooling).
    weights: Vec<u8>,
    /// An empty buffer back from a worker, reused for the next stretch.
    spare: Vec<u8>,
    /// A worker is opening the spool at `model_begin`, before any byte.
    opening: bool,
    /// The spool could not be opened at `model_begin`: why.
    refused: Option<String>,
}

/// A complete upload, ready to be verified and handed to an executor by
/// [`run_mount`](crate::run_mount).
#[derive(Debug)]
pub struct CommittedModel {
    /// The model's `config_json`.
    pub config_json: String,
    /// The raw weights (exactly `weights_len` bytes), or when spooled only the
    /// last ones, not yet handed to the spool.
    pub weights: Vec<u8>,
    /// `weights_sha256` from `model_begin`, when given.
    pub sha256: Option<[u8; 32]>,
    weights_len: u64,
    /// Bytes held from a broken upload before this one (its spool checks the hash).
    offset: u64,
    name: String,
    spooling: bool,
    carried: Carried,
    /// Bytes at the start of `weights` already in `carried.hash`.
    hashed: usize,
}

impl CommittedModel {
    /// `weights_len`: the model's size, whether in memory or spooled.
    pub fn weights_len(&self) -> u64 {
        self.weights_len
    }

    /// Whether the weights go to the executor's spool ([`UploadHandling::Spool`]).
    pub fn is_spooled(&self) -> bool {
        self.spooling
    }

    /// Checks `weights_sha256` when it was given, hashing what is not hashed
    /// yet. Runs off the I/O path, on a worker; [`run_mount`](crate::run_mount) calls it.
    /// A resumed upload's bytes are not all here: its spool checks them.
    pub fn verify(&mut self) -> Result<(), MountError> {
        let Some(expected) = self.sha256.filter(|_| self.offset == 0) else {
            return Ok(());
        };
        let mut state = self.carried.hash.take().unwrap_or_default();
        state.update(&self.weights[self.hashed..]);
        self.hashed = self.weights.len();
        let got: [u8; 32] = state.finalize().into();
        if got == expected {
            Ok(())
        } else {
            Err(MountError::Sha256Mismatch {
                got: hex(&got),
                expected: hex(&expected),
            })
        }
    }

    /// Why spooling failed, if it did: the commit is refused for that reason
    /// (the bytes it dropped would only make the hash check fail).
    pub(crate) fn spool_failure(&self) -> Option<&str> {
        self.carried.spool_error.as_deref()
    }

    /// Takes the spool state: the opened spool if any and a spooling failure if any.
    pub(crate) fn take_spool(&mut self) -> (Option<ErasedSpool>, Option<String>) {
        (self.carried.spool.take(), self.carried.spool_error.take())
    }

    /// What an executor opening a spool at commit learns.
    pub(crate) fn info(&self) -> UploadInfo {
        UploadInfo {
            config_json: self.config_json.clone(),
            weights_len: self.weights_len,
            sha256: self.sha256,
            offset: self.offset,
            name: self.name.clone(),
        }
    }
}

impl Upload {
    /// Starts an upload held in memory, checking `weights_len` against
    /// `max_model_len` and the hash's form.
    pub fn begin(begin: ModelBegin, max_model_len: u64) -> Result<Upload, ProtocolError> {
        Upload::begin_with(begin, max_model_len, UploadHandling::InMemory, false)
    }

    /// What the executor's spool is told of this upload.
    fn info(&self) -> UploadInfo {
        UploadInfo {
            config_json: self.config_json.clone(),
            weights_len: self.weights_len,
            sha256: self.sha256,
            offset: self.offset,
            name: self.name.clone(),
        }
    }

    /// [`begin`](Upload::begin) with the node's [`UploadHandling`]; `offset` is
    /// read only when `resumable` (the connection agreed `store`).
    pub(crate) fn begin_with(
        begin: ModelBegin,
        max_model_len: u64,
        handling: UploadHandling,
        resumable: bool,
    ) -> Result<Upload, ProtocolError> {
        let spooling = handling == UploadHandling::Spool;
        let weights_len = u64::try_from(begin.weights_len)
            .ok()
            .filter(|len| *len <= max_model_len)
            .ok_or(ProtocolError::BadWeightsLen)?;
        let sha256 = match begin.weights_sha256.as_str() {
            "" => None,
            text => Some(parse_sha256(text).ok_or(ProtocolError::BadWeightsSha256)?),
        };
        let offset = match begin.offset {
            0 => 0,
            _ if !resumable => 0,
            // Only a spool can hold the first bytes, and only a hash can prove them.
            n if sha256.is_none() || !spooling => return Err(ProtocolError::BadOffset(n)),
            n => u64::try_from(n)
                .ok()
                .filter(|n| *n <= weights_len)
                .ok_or(ProtocolError::BadOffset(n))?,
        };
        // A name is read only from a peer that agreed `store`.
        let name = match begin.name {
            _ if !resumable => String::new(),
            name if valid_model_name(&name) => name,
            _ => {
                return Err(ProtocolError::BadField(format!(
                    "name: at most {MAX_MODEL_NAME} bytes of printable text"
                )))
            }
        };
        // Spooled bytes leave the node, so they are hashed on their way out.
        let hash_on_workers =
            sha256.is_some() && handling != UploadHandling::InMemory && offset == 0;
        Ok(Upload {
            id: 0,
            config_json: begin.config_json,
            weights_len,
            sha256,
            offset,
            name,
            hash_on_workers,
            spooling,
            carrier: Carrier::Home {
                carried: Carried {
                    hash: hash_on_workers.then(Sha256::new),
                    ..Carried::default()
                },
                hashed: 0,
            },
            next_index: 0,
            last_seen: false,
            received: offset,
            weights: Vec::new(),
            spare: Vec::new(),
            opening: false,
            refused: None,
        })
    }

    /// Appends one chunk. On error the upload is failed and must be dropped.
    pub fn chunk(&mut self, chunk: &WeightsChunk<'_>) -> Result<(), ProtocolError> {
        self.append(chunk.index, chunk.last, chunk.data_b64.as_bytes())
    }

    /// Appends a chunk given as its parts; on error nothing is appended.
    pub(crate) fn append(
        &mut self,
        index: i64,
        last: bool,
        data_b64: &[u8],
    ) -> Result<(), ProtocolError> {
        if self.last_seen {
            return Err(ProtocolError::ChunkAfterLast);
        }
        if u64::try_from(index).ok() != Some(self.next_index) {
            return Err(ProtocolError::ChunkOutOfOrder {
                got: index,
                expected: self.next_index,
            });
        }
        let raw_len = decoded_len(data_b64).ok_or(ProtocolError::WeightsBase64)?;
        if self.received + raw_len as u64 > self.weights_len {
            return Err(ProtocolError::WeightsOverflow);
        }
        let buffered = self.weights.len();
        self.grow_for(raw_len);
        self.weights.resize(buffered + raw_len, 0);
        match BASE64.decode_slice(data_b64, &mut self.weights[buffered..]) {
            Ok(n) if n == raw_len => {}
            _ => {
                self.weights.truncate(buffered);
                return Err(ProtocolError::WeightsBase64);
            }
        }
        if self.spooling && self.spool_failed() {
            // The commit will be refused with the spool's error: keep nothing.
            self.weights.clear();
        }
        self.received += raw_len as u64;
        self.last_seen = last;
        self.next_index += 1;
        Ok(())
    }

    fn carried_error(&self) -> Option<String> {
        match &self.carrier {
            Carrier::Home { carried, .. } => carried.spool_error.clone(),
            Carrier::Away { .. } => None,
        }
    }

    fn spool_failed(&self) -> bool {
        matches!(&self.carrier, Carrier::Home { carried, .. } if carried.spool_error.is_some())
    }

    /// Work that opens the spool of a spooling upload that names its hash
    /// at once, with no bytes: a store reserves its room (or refuses it)
    /// before the bytes come, not after the first stretch.
    pub(crate) fn open_work(&mut self, conn: ConnectionId) -> Option<UploadWork> {
        if !self.spooling || self.sha256.is_none() {
            return None;
        }
        match &self.carrier {
            Carrier::Home { carried, .. } if carried.spool.is_none() => {}
            _ => return None,
        }
        self.opening = true;
        Some(self.take_work(conn))
    }

    /// Why the spool could not be opened at `model_begin`, once that work is back.
    pub(crate) fn refused(&self) -> Option<&str> {
        self.refused.as_deref()
    }

    /// Takes the carried state and at least `min` bytes not yet handed out, for
    /// a worker, if the state is here, there is work to do and that many are waiting.
    pub(crate) fn upload_work(&mut self, conn: ConnectionId, min: usize) -> Option<UploadWork> {
        if !(self.hash_on_workers || self.spooling) || self.spool_failed() {
            return None;
        }
        let len = self.weights.len();
        match &self.carrier {
            Carrier::Home { hashed, .. } if len - hashed >= min.max(1) => {}
            _ => return None,
        }
        Some(self.take_work(conn))
    }

    /// Takes the carried state and the bytes not yet handed out (the state is home).
    fn take_work(&mut self, conn: ConnectionId) -> UploadWork {
        let len = self.weights.len();
        let away = Carrier::Away {
            hashed: if self.spooling { 0 } else { len },
        };
        let Carrier::Home { carried, hashed } = std::mem::replace(&mut self.carrier, away) else {
            unreachable!("matched above")
        };
        let data = if self.spooling {
            // Moved, not copied: the node keeps only what arrives from now on.
            std::mem::replace(&mut self.weights, std::mem::take(&mut self.spare))
        } else {
            // Copied into the buffer the last stretch came back in: a fresh
            // multi-MiB buffer per stretch would be a fresh mapping to fault in.
            let mut copy = std::mem::take(&mut self.spare);
            copy.extend_from_slice(&self.weights[hashed..]);
            copy
        };
        UploadWork {
            conn,
            upload: self.id,
            spooling: self.spooling,
            // Cloned once per upload, for the stretch that opens the spool.
            open_with: (self.spooling && carried.spool.is_none()).then(|| self.info()),
            carried,
            data,
        }
    }

    /// Takes back the carried state (and an empty buffer to reuse) from a worker.
    pub(crate) fn work_returned(&mut self, work: UploadWork) {
        if let Carrier::Away { hashed } = self.carrier {
            self.carrier = Carrier::Home {
                carried: work.carried,
                hashed,
            };
            if self.spooling && self.spool_failed() {
                self.weights = Vec::new();
                if self.opening {
                    self.refused = self.carried_error();
                }
            }
            self.opening = false;
            let mut spare = work.data;
            spare.clear();
            if !self.spool_failed() {
                self.spare = spare;
            }
        }
    }

    /// Whether a spooling upload has `limit` bytes waiting while a worker still
    /// has the previous stretch.
    pub(crate) fn backlogged(&self, limit: usize) -> bool {
        self.spooling && self.work_away() && self.weights.len() >= limit
    }

    /// Of a spooling upload: bytes arrived and not yet handed to the spool.
    pub(crate) fn buffered(&self) -> usize {
        self.weights.len()
    }

    /// Whether the bytes go to the executor's spool.
    pub(crate) fn is_spooling(&self) -> bool {
        self.spooling
    }

    /// Whether a worker holds the carried state (the commit must wait for it).
    pub(crate) fn work_away(&self) -> bool {
        matches!(self.carrier, Carrier::Away { .. })
    }

    /// Finishes the upload: all bytes must have arrived and the config must be non-empty.
    pub fn commit(self) -> Result<CommittedModel, MountError> {
        if self.received != self.weights_len {
            return Err(MountError::SizeMismatch {
                got: self.received,
                expected: self.weights_len,
            });
        }
        if self.config_json.is_empty() {
            return Err(MountError::NoConfig);
        }
        let (carried, hashed) = match self.carrier {
            Carrier::Home { carried, hashed } => (carried, hashed),
            Carrier::Away { .. } => unreachable!("a commit waits for its work to return"),
        };
        Ok(CommittedModel {
            config_json: self.config_json,
            weights: self.weights,
            sha256: self.sha256,
            weights_len: self.weights_len,
            offset: self.offset,
            name: self.name,
            spooling: self.spooling,
            carried,
            hashed,
        })
    }

    /// Bytes received so far (counting those a resumed upload started with).
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Heap bytes held by the model buffers.
    pub fn allocated(&self) -> usize {
        self.weights.capacity() + self.spare.capacity() + self.config_json.capacity()
    }

    /// Grows capacity geometrically, but never past what is still to come.
    fn grow_for(&mut self, more: usize) {
        let needed = self.weights.len() + more;
        if needed <= self.weights.capacity() {
            return;
        }
        let to_come = (self.weights_len - self.received) as usize + self.weights.len();
        let cap = (self.weights.capacity() * 2).max(needed).min(to_come);
        self.weights.reserve_exact(cap - self.weights.len());
    }
}

/// A store hash: exactly 64 lowercase hex digits (a store names files by it,
/// so one spelling per hash).
pub(crate) fn parse_store_hash(text: &str) -> Option<[u8; 32]> {
    if !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    parse_sha256(text)
}

fn parse_sha256(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(text.as_bytes().chunks_exact(2)) {
        let digits = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(digits, 16).ok()?;
    }
    Some(out)
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
