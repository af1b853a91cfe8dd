//! Server-side model upload assembly: `model_begin` → `weights_chunk`* → `model_commit`.
//!
//! Chunk data is decoded from the frame's base64 text straight into the model
//! buffer. The buffer grows with the bytes received, never reserved from
//! `weights_len` up front, and bytes past `weights_len` are refused before they
//! are buffered.

use sha2::{Digest, Sha256};

use crate::error::{MountError, ProtocolError};
use crate::message::{decoded_len, ModelBegin, WeightsChunk, BASE64};
use base64::Engine as _;

/// Where an upload's running SHA-256 is, when `weights_sha256` was given.
#[derive(Debug)]
enum HashProgress {
    /// No hash to check, or hashing is left to [`CommittedModel::verify`].
    Unchecked,
    /// The state is here; bytes before `hashed` are in it.
    Home { state: Sha256, hashed: usize },
    /// The state is with a worker, which is hashing up to `hashed`.
    Away { hashed: usize },
}

/// A stretch of an upload's bytes for a worker to hash while more arrive
/// (from [`Event::Digest`](crate::Event::Digest)): [`run`](DigestWork::run) it,
/// then hand it back with [`Node::digest_done`](crate::Node::digest_done).
#[derive(Debug)]
pub struct DigestWork {
    pub(crate) conn: crate::ConnectionId,
    pub(crate) upload: u64,
    state: Sha256,
    data: Vec<u8>,
}

impl DigestWork {
    /// Hashes the stretch (about 2 GB/s with SHA-NI) and drops its copy.
    pub fn run(&mut self) {
        self.state.update(&self.data);
        self.data = Vec::new();
    }

    /// Bytes in this stretch (0 once run).
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the stretch is empty (it is once run).
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// An upload in progress on one connection.
#[derive(Debug)]
pub struct Upload {
    /// Tells this upload's returning [`DigestWork`] from an older one's.
    pub(crate) id: u64,
    config_json: String,
    weights_len: u64,
    sha256: Option<[u8; 32]>,
    hash: HashProgress,
    next_index: u64,
    /// A chunk marked `last` arrived.
    last_seen: bool,
    weights: Vec<u8>,
}

/// A complete upload, ready to be verified and handed to an executor.
#[derive(Debug)]
pub struct CommittedModel {
    /// The model's `config_json`.
    pub config_json: String,
    /// The raw weights, exactly `weights_len` bytes.
    pub weights: Vec<u8>,
    /// `weights_sha256` from `model_begin`, when given.
    pub sha256: Option<[u8; 32]>,
    /// The hash of the first bytes, computed by workers while the upload arrived.
    hashed: Option<(Sha256, usize)>,
}

impl CommittedModel {
    /// Checks `weights_sha256` when it was given. Runs off the I/O path, on a worker.
    pub fn verify(&self) -> Result<(), MountError> {
        let Some(expected) = self.sha256 else {
            return Ok(());
        };
        let (mut state, hashed) = self.hashed.clone().unwrap_or_default();
        state.update(&self.weights[hashed..]);
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
}

impl Upload {
    /// Starts an upload, checking `weights_len` against `max_model_len` and the hash's form.
    pub fn begin(begin: ModelBegin, max_model_len: u64) -> Result<Upload, ProtocolError> {
        let weights_len = u64::try_from(begin.weights_len)
            .ok()
            .filter(|len| *len <= max_model_len)
            .ok_or(ProtocolError::BadWeightsLen)?;
        let sha256 = match begin.weights_sha256.as_str() {
            "" => None,
            text => Some(parse_sha256(text).ok_or(ProtocolError::BadWeightsSha256)?),
        };
        Ok(Upload {
            id: 0,
            config_json: begin.config_json,
            weights_len,
            hash: match sha256 {
                Some(_) => HashProgress::Home {
                    state: Sha256::new(),
                    hashed: 0,
                },
                None => HashProgress::Unchecked,
            },
            sha256,
            next_index: 0,
            last_seen: false,
            weights: Vec::new(),
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
        let received = self.weights.len();
        if received as u64 + raw_len as u64 > self.weights_len {
            return Err(ProtocolError::WeightsOverflow);
        }
        self.grow_for(raw_len);
        self.weights.resize(received + raw_len, 0);
        match BASE64.decode_slice(data_b64, &mut self.weights[received..]) {
            Ok(n) if n == raw_len => {}
            _ => {
                self.weights.truncate(received);
                return Err(ProtocolError::WeightsBase64);
            }
        }
        self.last_seen = last;
        self.next_index += 1;
        Ok(())
    }

    /// Takes the hash state and a copy of at least `min` unhashed bytes for a
    /// worker, if the state is here and that many are waiting.
    pub(crate) fn digest_work(
        &mut self,
        conn: crate::ConnectionId,
        min: usize,
    ) -> Option<DigestWork> {
        let len = self.weights.len();
        match &self.hash {
            HashProgress::Home { hashed, .. } if len - hashed >= min.max(1) => {}
            _ => return None,
        }
        let HashProgress::Home { state, hashed } =
            std::mem::replace(&mut self.hash, HashProgress::Away { hashed: len })
        else {
            unreachable!("matched above")
        };
        Some(DigestWork {
            conn,
            upload: self.id,
            state,
            data: self.weights[hashed..].to_vec(),
        })
    }

    /// Takes back the hash state from a worker.
    pub(crate) fn digest_returned(&mut self, work: DigestWork) {
        if let HashProgress::Away { hashed } = self.hash {
            self.hash = HashProgress::Home {
                state: work.state,
                hashed,
            };
        }
    }

    /// Whether a worker holds the hash state (the commit must wait for it).
    pub(crate) fn digest_away(&self) -> bool {
        matches!(self.hash, HashProgress::Away { .. })
    }

    /// Finishes the upload: all bytes must have arrived and the config must be non-empty.
    pub fn commit(self) -> Result<CommittedModel, MountError> {
        let got = self.weights.len() as u64;
        if got != self.weights_len {
            return Err(MountError::SizeMismatch {
                got,
                expected: self.weights_len,
            });
        }
        if self.config_json.is_empty() {
            return Err(MountError::NoConfig);
        }
        let hashed = match self.hash {
            HashProgress::Home { state, hashed } => Some((state, hashed)),
            _ => None,
        };
        Ok(CommittedModel {
            config_json: self.config_json,
            weights: self.weights,
            sha256: self.sha256,
            hashed,
        })
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.weights.len() as u64
    }

    /// Heap bytes held by the model buffer.
    pub fn allocated(&self) -> usize {
        self.weights.capacity() + self.config_json.capacity()
    }

    /// Grows capacity geometrically, but never past `weights_len`.
    fn grow_for(&mut self, more: usize) {
        let needed = self.weights.len() + more;
        if needed <= self.weights.capacity() {
            return;
        }
        let cap = (self.weights.capacity() * 2)
            .max(needed)
            .min(self.weights_len as usize);
        self.weights.reserve_exact(cap - self.weights.len());
    }
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
