//! Harnesses behind the cargo-fuzz targets of `donate-proto`.
//!
//! Each target in `fuzz_targets/` is one line calling a function here, so the
//! same harness also runs on stable in `cargo test` (over the committed corpus)
//! and in the seed generator (`tests/corpus.rs`).
//!
//! - [`decode::run`]: bytes, split at chosen points, through the frame decoder
//!   and the message parser.
//! - [`server::run`]: a whole [`Node`](donate_proto::Node) driven by a script.
//! - [`client::run`]: a [`ClientConnection`](donate_proto::ClientConnection) fed server bytes.
//! - [`secure::run`]: bytes on a secure node's byte path, before and after a real handshake.
//! - [`roundtrip::run`]: structured messages encode and decode back equal.
//! - [`store::run`]: a node offering the `store` extension, its host's answers played by the input.
//! - [`gguf::run`]: a hostile GGUF model file through the candle executor's loader, then a job on it.

pub mod client;
pub mod common;
pub mod decode;
pub mod gguf;
pub mod roundtrip;
pub mod secure;
pub mod seeds;
pub mod server;
pub mod store;
