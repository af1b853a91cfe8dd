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

/// An upload in progress on one connection.
#[derive(Debug)]
pub struct Upload {
    config_json: String,
    weights_len: u64,
    sha256: Option<[u8; 32]>,
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
}

impl CommittedModel {
    /// Checks `weights_sha256` when it was given. Runs off the I/O path, on a worker.
    pub fn verify(&self) -> Result<(), MountError> {
        let Some(expected) = self.sha256 else {
            return Ok(());
        };
        let got: [u8; 32] = Sha256::digest(&self.weights).into();
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
            config_json: begin.config_json,
            weights_len,
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
        Ok(CommittedModel {
            config_json: self.config_json,
            weights: self.weights,
            sha256: self.sha256,
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
