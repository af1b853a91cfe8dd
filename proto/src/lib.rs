//! # donate-proto
//!
//! The sans-IO core of the donate-compute v1 protocol (the wire contract is the
//! repository's `docs/PROTOCOL.md`; how the crates fit together, and the call
//! order for driving a [`Node`] by hand, is `docs/ARCHITECTURE.md`): a
//! donor node offers compute over TCP; clients push a model and send inference
//! jobs, or send prompts to a local language model. This crate holds every
//! protocol decision as pure state machines, with no sockets, threads, clocks
//! or executors inside: bytes and time go in, events and bytes come out.
//!
//! - [`frame`]: the incremental frame decoder and encoder (`u32` LE length + JSON).
//! - [`message`]: the eleven message types, byte-compatible with the Go implementation.
//! - [`Connection`]: the server side of one connection (handshake, upload, mode rules, timers),
//!   owned by a [`Node`], which also holds the one FIFO job queue.
//! - [`ClientConnection`]: the client side of one connection.
//! - [`Executor`]: what a node's workers call, and [`Stub`], the Go node's stub.
//! - Secure mode ([`SecureServerConfig`], [`SecureClientConfig`], [`Keypair`]):
//!   Noise XX under the framing, for nodes reachable from a network.
//! - [`PoolCore`]: the decisions of a client spreading jobs over many donors
//!   (placement, failures, retries, exactly-once delivery).
//! - `sim` (cargo feature `sim`, off by default): a simulated network, one node and
//!   any number of client cores in memory with a virtual clock, for tests and fuzzing,
//!   and the reference for driving the core by hand.
//!
//! Driving a node and a client by hand, with no sockets:
//!
//! ```
//! use std::time::Instant;
//! use donate_proto::{Answer, ClientConnection, ClientEvent, Event, Node, ServerConfig, Stub, run_job, run_mount};
//!
//! let now = Instant::now();
//! let stub = Stub::default();
//! let mut node = Node::new(ServerConfig::default());
//! let mut client = ClientConnection::default();
//! let conn = node.accept(now);
//!
//! // Move bytes both ways, and run whatever the node asks for, until both are quiet.
//! let mut pump = |node: &mut Node<()>, client: &mut ClientConnection| loop {
//!     let (mut to_client, mut to_server) = (Vec::new(), Vec::new());
//!     node.poll_transmit(conn, &mut to_client);
//!     client.handle_input(&to_client).unwrap();
//!     client.poll_transmit(&mut to_server);
//!     node.handle_input(conn, &to_server, now);
//!     while let Some(event) = node.poll_event() {
//!         if let Event::Mount(mount) = event {
//!             node.mount_done(run_mount(&stub, mount), now);
//!         }
//!     }
//!     while let Some(job) = node.next_job() {
//!         let outcome = run_job(&stub, &job);
//!         node.complete(job.id, outcome, now);
//!     }
//!     if to_client.is_empty() && to_server.is_empty() {
//!         break;
//!     }
//! };
//!
//! pump(&mut node, &mut client);
//! assert!(matches!(client.poll_event(), Some(ClientEvent::Connected(_))));
//!
//! // Upload a 4-byte model, then run a job on it once it is mounted.
//! client.begin_upload(r#"{"ok":true}"#, 4, None).unwrap();
//! client.upload_chunk(&[1, 2, 3, 4]).unwrap();
//! pump(&mut node, &mut client);
//! assert!(matches!(client.poll_event(), Some(ClientEvent::Answer { answer: Answer::ModelStatus(s), .. }) if s.ok));
//!
//! let job = client.infer(&[9, 9], 3).unwrap();
//! pump(&mut node, &mut client);
//! match client.poll_event() {
//!     Some(ClientEvent::Answer { request, answer: Answer::Infer(result) }) if request == job => {
//!         assert_eq!(result.output_ids, [9, 9, 1, 2, 3]);
//!     }
//!     other => panic!("unexpected {other:?}"),
//! }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod capability;
mod client;
mod code;
mod config;
mod connection;
pub mod error;
mod executor;
pub mod frame;
mod id;
mod job;
pub mod message;
mod node;
mod phase;
mod pool;
mod queue;
mod sampling;
mod secure;
#[cfg(feature = "sim")]
pub mod sim;
mod upload;

pub use capability::{Capabilities, Capability};
pub use client::{
    Answer, ClientConfig, ClientConnection, ClientEvent, PartialOutput, PromptRequest, RequestId,
    UploadRequest,
};
pub use code::ErrorCode;
pub use config::{ServerConfig, UploadHandling};
pub use connection::Connection;
pub use error::{ApiMisuse, ClientError, FrameError, MountError, ProtocolError};
pub use executor::{
    run_job, run_job_in, run_mount, run_upload, Executor, NoSpool, Spool, Stub, Weights,
};
pub use id::{ConnectionId, JobId};
pub use job::{
    codes, ChatJob, Job, JobContext, JobError, JobInput, JobOutcome, JobOutput, Partial, Reply,
};
pub use message::{ChatMessage, FinishReason, Message, Mode, Usage};
pub use node::{Event, Mount, MountOutcome, MountToken, Node, NodeStats, StoredMount};
pub use pool::{DonorId, DonorStats, PoolAction, PoolConfig, PoolCore, PoolError};
pub use sampling::SamplingParams;
pub use secure::{
    Authorize, KeyError, Keypair, NodeTrust, PublicKey, SecureClientConfig, SecureServerConfig,
};
pub use upload::{hex, CommittedModel, Upload, UploadInfo, UploadWork};
