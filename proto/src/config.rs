//! [`ServerConfig`]: every limit a node's protocol behaviour depends on, and
//! [`UploadHandling`]: how much of an upload's work the node's host takes over.

use std::time::Duration;

use crate::capability::Capabilities;
use crate::frame::DEFAULT_MAX_FRAME_LEN;
use crate::message::Mode;
use crate::secure::SecureServerConfig;

/// Everything a node's protocol behaviour depends on. Every limit has a default.
///
/// Start from [`Default`] and change what you need with the setters (one per
/// field, named after it), so that a new limit is not a breaking change:
///
/// ```
/// # use std::time::Duration;
/// let config = donate_proto::ServerConfig::default()
///     .queue_capacity(8)
///     .idle_timeout(Some(Duration::from_secs(60)));
/// assert_eq!(config.queue_capacity, 8);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerConfig {
    /// `model_push` (default) or `local_lm`.
    pub mode: Mode,
    /// Informational path sent in `hello` on `local_lm` nodes.
    pub local_lm_path: String,
    /// Jobs that may wait in the queue (default 64).
    pub queue_capacity: usize,
    /// Largest frame body accepted (default 64 MiB).
    pub max_frame_len: usize,
    /// Largest `weights_len` accepted (default 6,710,886,400 as in Go).
    pub max_model_len: u64,
    /// Connections at once; more are sent an error and closed (default 1024).
    /// In secure mode only those past their handshake count here.
    pub max_connections: usize,
    /// Unsent bytes per connection above which its input is paused (default 8 MiB).
    pub max_outbound: usize,
    /// Secure mode: connections still in their handshake (not yet
    /// authorized) at once, apart from `max_connections` (default 64). When
    /// full, the oldest handshake of the source holding the most is closed
    /// to make room.
    pub max_handshakes: usize,
    /// Secure mode: handshakes at once from one source address (an IPv6
    /// one by its /64) (default 8); more are refused. Only for connections
    /// accepted with their address ([`Node::accept_from`](crate::Node::accept_from)).
    pub max_handshakes_per_source: usize,
    /// Time allowed from accept to the first complete frame (default 5 s);
    /// in secure mode the whole handshake comes first.
    pub handshake_timeout: Duration,
    /// Time a partial frame may go without new bytes (default 10 s).
    pub stall_timeout: Duration,
    /// Time a connection with nothing in flight may stay silent (default 300 s; `None` = never).
    pub idle_timeout: Option<Duration>,
    /// Time a connection may stay over `max_outbound` (default 30 s).
    pub backpressure_timeout: Duration,
    /// Bytes an upload gathers before they go to the host as
    /// [`Event::Upload`](crate::Event::Upload) work (default 4 MiB): larger
    /// stretches mean fewer hand-offs, smaller ones less memory per upload.
    pub upload_stretch: usize,
    /// Worker threads a host runs for jobs and mounts (default 1, as in Go).
    /// The node itself runs nothing; `in_progress` counts what workers took.
    pub workers: usize,
    /// Longest a job may take from its receipt to its answer, queue wait
    /// included (default `None`: no bound). A job still queued then is
    /// dropped, a running one cancelled; either is answered `deadline_exceeded`.
    pub max_job_time: Option<Duration>,
    /// Longest `job_id` accepted, in bytes (default 256); a longer one, or
    /// one with control characters, is refused with `bad_field`.
    pub max_job_id_len: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            mode: Mode::ModelPush,
            local_lm_path: String::new(),
            queue_capacity: 64,
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            max_model_len: 100 * DEFAULT_MAX_FRAME_LEN as u64,
            max_connections: 1024,
            max_handshakes: 64,
            max_handshakes_per_source: 8,
            max_outbound: 8 * 1024 * 1024,
            handshake_timeout: Duration::from_secs(5),
            stall_timeout: Duration::from_secs(10),
            idle_timeout: Some(Duration::from_secs(300)),
            backpressure_timeout: Duration::from_secs(30),
            upload_stretch: 4 * 1024 * 1024,
            workers: 1,
            max_job_time: None,
            max_job_id_len: 256,
        }
    }
}

/// Chaining setters, one per field, named after it.
macro_rules! setters {
    ($config:ty { $($field:ident: $ty:ty),* $(,)? }) => {
        impl $config {
            $(
                #[doc = concat!("Sets [`", stringify!($field), "`](Self::", stringify!($field), ").")]
                #[must_use]
                pub fn $field(mut self, value: $ty) -> Self {
                    self.$field = value;
                    self
                }
            )*
        }
    };
}
pub(crate) use setters;

setters!(ServerConfig {
    mode: Mode,
    local_lm_path: String,
    queue_capacity: usize,
    max_frame_len: usize,
    max_model_len: u64,
    max_connections: usize,
    max_handshakes: usize,
    max_handshakes_per_source: usize,
    max_outbound: usize,
    handshake_timeout: Duration,
    stall_timeout: Duration,
    idle_timeout: Option<Duration>,
    backpressure_timeout: Duration,
    upload_stretch: usize,
    workers: usize,
    max_job_time: Option<Duration>,
    max_job_id_len: usize,
});

/// What a node does with an upload's bytes as they arrive. This is a promise
/// by whoever drives the node, not a limit: anything but `InMemory` means the
/// driver runs every [`Event::Upload`](crate::Event::Upload) and hands it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UploadHandling {
    /// Keep the whole model in memory; `weights_sha256` is checked at the
    /// commit by [`run_mount`](crate::run_mount). Needs no driver support.
    #[default]
    InMemory,
    /// Keep the model in memory, but hash it on the driver's upload thread as
    /// it arrives, so the commit does not wait for a whole-model hash.
    HashAsItArrives,
    /// Move each stretch, as it arrives, to the executor's
    /// [`Spool`](crate::Spool) (hashing it on the way): the node never holds
    /// a whole model. For executors whose
    /// [`spools_uploads`](crate::Executor::spools_uploads) is true.
    Spool,
}

/// A node's settings, shared by its connections.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) config: ServerConfig,
    pub(crate) uploads: UploadHandling,
    pub(crate) secure: Option<SecureServerConfig>,
    /// Extensions offered to clients (never `secure`: that follows `secure`).
    pub(crate) offered: Capabilities,
}

impl Settings {
    /// The capabilities the node's `hello` lists.
    pub(crate) fn advertised(&self) -> Capabilities {
        match self.secure {
            Some(_) => self.offered.with(crate::Capability::Secure),
            None => self.offered,
        }
    }
}
