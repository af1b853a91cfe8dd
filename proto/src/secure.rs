//! Secure mode: mutual authentication and encryption with
//! `Noise_XX_25519_ChaChaPoly_BLAKE2s`, one layer under the v1 framing.
//!
//! The wire, as docs/PROTOCOL.md (Extensions, `secure`) records it:
//!
//! 1. The node sends its v1 `hello` in plain text, with `"capabilities":["secure"]`.
//!    A v1 client reads an ordinary hello; whatever it sends next is answered
//!    with one `error` frame (`secure_required`) and the connection closes.
//! 2. The client sends one v1 frame `{"v":1,"type":"noise","data_b64":…}`
//!    holding Noise message 1 (`-> e`).
//! 3. From then on both directions carry records: a `u32` little-endian
//!    length (at most 65,535) and that many bytes of one Noise message. Message
//!    2 (`<- e, ee, s, es`) and 3 (`-> s, se`) finish the handshake; every later
//!    record holds at most 65,519 bytes of the v1 byte stream, encrypted.
//! 4. The prologue binds `donate secure v1\n` and the node's hello frame (its
//!    exact bytes) into the handshake: a hello altered in transit fails it.
//!
//! Why these primitives: X25519 and ChaCha20-Poly1305 are fast and constant
//! time in software on any CPU a donor may have (no AES instructions needed),
//! and BLAKE2s is the hash Noise pairs with them; `snow` implements them in
//! pure Rust.

use std::fmt;
use std::sync::Arc;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine as _;
use sha2::{Digest, Sha256};
use snow::{HandshakeState, TransportState};

use crate::capability::Capability;
use crate::error::{ClientError, ProtocolError};
use crate::frame::{encode_frame, FrameDecoder, HEADER_LEN};
use crate::message::{Hello, Message};

/// The Noise protocol name.
pub const NOISE_PARAMS: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";
const PROLOGUE_LABEL: &[u8] = b"donate secure v1\n";
/// Largest record body: the largest Noise message.
pub(crate) const MAX_RECORD: usize = 65535;
const TAG_LEN: usize = 16;
/// Plain bytes in one record.
const MAX_PLAIN: usize = MAX_RECORD - TAG_LEN;
/// How a public key is written: `donate-x25519 <base64>`, as in `.pub` files.
const PUBLIC_PREFIX: &str = "donate-x25519";
/// How a private key file starts.
const SECRET_PREFIX: &str = "donate-x25519-secret";

/// A key or key file that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct KeyError(String);

/// An X25519 public key: who a node or a client is.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// The key's 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// `SHA256:` and the unpadded base64 of the key's SHA-256, as SSH prints them.
    pub fn fingerprint(&self) -> String {
        format!("SHA256:{}", STANDARD_NO_PAD.encode(Sha256::digest(self.0)))
    }

    /// Reads `donate-x25519 <base64> [comment]` (a `.pub` file's line) or a bare base64 key.
    pub fn parse(text: &str) -> Result<PublicKey, KeyError> {
        let mut words = text.split_whitespace();
        let first = words.next().unwrap_or_default();
        if first == SECRET_PREFIX {
            // Never quoted: the text is a secret.
            return Err(KeyError(
                "this looks like a private key: list the line of its .pub file instead".to_owned(),
            ));
        }
        let b64 = if first == PUBLIC_PREFIX {
            words.next().unwrap_or_default()
        } else {
            first
        };
        // Not quoted either: a mangled private key must not reach a log.
        decode_key(b64).map(PublicKey).ok_or_else(|| {
            KeyError(
                "not a donate public key (expected `donate-x25519 <base64>`, the line of a .pub file)"
                    .to_owned(),
            )
        })
    }

    fn from_slice(bytes: &[u8]) -> Option<PublicKey> {
        bytes.try_into().ok().map(PublicKey)
    }
}

impl fmt::Display for PublicKey {
    /// The `.pub` form: `donate-x25519 <base64>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PUBLIC_PREFIX} {}", STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.fingerprint())
    }
}

fn decode_key(b64: &str) -> Option<[u8; 32]> {
    STANDARD.decode(b64).ok()?.try_into().ok()
}

/// A node's or client's own key pair.
#[derive(Clone)]
pub struct Keypair {
    secret: [u8; 32],
    public: PublicKey,
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keypair({:?})", self.public)
    }
}

impl Keypair {
    /// A new random key pair (from the operating system's random source).
    pub fn generate() -> Keypair {
        let pair = snow::Builder::new(params())
            .generate_keypair()
            .expect("X25519 is built in");
        let secret = pair.private.try_into().expect("32-byte X25519 key");
        Keypair {
            secret,
            public: PublicKey::from_slice(&pair.public).expect("32-byte X25519 key"),
        }
    }

    /// Reads a private key file's text (`donate-x25519-secret <base64>`).
    pub fn from_secret_text(text: &str) -> Result<Keypair, KeyError> {
        let mut words = text.split_whitespace();
        if text.split_whitespace().next() == Some(PUBLIC_PREFIX) {
            return Err(KeyError(
                "this is a public key; pass the private key file (without .pub)".to_owned(),
            ));
        }
        let secret = match (words.next(), words.next()) {
            (Some(SECRET_PREFIX), Some(b64)) => decode_key(b64),
            _ => None,
        }
        .ok_or_else(|| KeyError("not a donate private key file".to_owned()))?;
        Ok(Keypair {
            public: public_of(&secret),
            secret,
        })
    }

    /// The private key file's text.
    pub fn secret_text(&self) -> String {
        format!("{SECRET_PREFIX} {}\n", STANDARD.encode(self.secret))
    }

    /// The public half.
    pub fn public(&self) -> &PublicKey {
        &self.public
    }
}

fn public_of(secret: &[u8; 32]) -> PublicKey {
    use snow::resolvers::{CryptoResolver, DefaultResolver};
    let mut dh = DefaultResolver
        .resolve_dh(&snow::params::DHChoice::Curve25519)
        .expect("X25519 is built in");
    dh.set(secret);
    PublicKey::from_slice(dh.pubkey()).expect("32-byte X25519 key")
}

fn params() -> snow::params::NoiseParams {
    NOISE_PARAMS.parse().expect("valid Noise parameters")
}

/// Decides whether a client key may use the node; called once per
/// connection, when its handshake completes (a callback may re-read a file).
pub type Authorize = Arc<dyn Fn(&PublicKey) -> bool + Send + Sync>;

/// A node's secure mode: its key and who may connect.
#[derive(Clone)]
pub struct SecureServerConfig {
    /// The node's own key pair.
    pub keypair: Keypair,
    /// Which client keys are let in.
    pub authorize: Authorize,
}

impl SecureServerConfig {
    /// Lets in exactly `keys`.
    pub fn with_keys(keypair: Keypair, keys: Vec<PublicKey>) -> Self {
        SecureServerConfig {
            keypair,
            authorize: Arc::new(move |key| keys.contains(key)),
        }
    }
}

impl fmt::Debug for SecureServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecureServerConfig")
            .field("keypair", &self.keypair)
            .finish_non_exhaustive()
    }
}

/// Which node keys a client accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeTrust {
    /// Only this key (pinned by its value or its fingerprint).
    Pinned(String),
    /// Any key: the caller records it (trust on first use) from
    /// [`ClientConnection::node_key`](crate::ClientConnection::node_key).
    AnyKey,
}

impl NodeTrust {
    /// Pins `text`: a public key (`.pub` line or base64) or a `SHA256:` fingerprint.
    pub fn pin(text: &str) -> Result<NodeTrust, KeyError> {
        let text = text.trim();
        if let Some(digest) = text.strip_prefix("SHA256:") {
            let well_formed = STANDARD_NO_PAD
                .decode(digest)
                .is_ok_and(|bytes| bytes.len() == 32);
            if !well_formed {
                return Err(KeyError(
                    "not a key fingerprint: expected SHA256: and 43 base64 characters, as `donate keygen` prints"
                        .to_owned(),
                ));
            }
            return Ok(NodeTrust::Pinned(text.to_owned()));
        }
        Ok(NodeTrust::Pinned(PublicKey::parse(text)?.fingerprint()))
    }

    fn check(&self, key: &PublicKey) -> Result<(), ClientError> {
        match self {
            NodeTrust::AnyKey => Ok(()),
            NodeTrust::Pinned(fingerprint) if *fingerprint == key.fingerprint() => Ok(()),
            NodeTrust::Pinned(fingerprint) => Err(ClientError::NodeKeyMismatch {
                got: key.fingerprint(),
                expected: fingerprint.clone(),
            }),
        }
    }
}

/// A client's secure mode: its key and which node keys it trusts.
#[derive(Debug, Clone)]
pub struct SecureClientConfig {
    /// The client's own key pair.
    pub keypair: Keypair,
    /// Which node keys are accepted.
    pub trust: NodeTrust,
}

/// The `noise` frame that carries message 1.
#[derive(serde::Serialize, serde::Deserialize)]
struct NoiseFrame {
    v: i64,
    #[serde(rename = "type")]
    kind: String,
    data_b64: String,
}

fn prologue(hello_frame: &[u8]) -> Vec<u8> {
    [PROLOGUE_LABEL, hello_frame].concat()
}

/// Appends one record holding a Noise message of at most `max` bytes written by `write`.
fn push_record(
    out: &mut Vec<u8>,
    max: usize,
    write: impl FnOnce(&mut [u8]) -> Result<usize, snow::Error>,
) -> Result<(), snow::Error> {
    let at = out.len();
    out.resize(at + HEADER_LEN + max, 0);
    match write(&mut out[at + HEADER_LEN..]) {
        Ok(n) => {
            out[at..at + HEADER_LEN].copy_from_slice(&(n as u32).to_le_bytes());
            out.truncate(at + HEADER_LEN + n);
            Ok(())
        }
        Err(e) => {
            out.truncate(at);
            Err(e)
        }
    }
}

/// Room for a handshake message with an empty payload (XX: 96 bytes at most).
const HANDSHAKE_MAX: usize = 128;

/// Encrypts `plain` into records appended to `out`.
fn seal(transport: &mut TransportState, plain: &[u8], out: &mut Vec<u8>) {
    out.reserve(plain.len() + plain.len().div_ceil(MAX_PLAIN) * (HEADER_LEN + TAG_LEN));
    for piece in plain.chunks(MAX_PLAIN) {
        push_record(out, piece.len() + TAG_LEN, |buf| {
            transport.write_message(piece, buf)
        })
        .expect("a piece of at most 65,519 bytes always fits a record");
    }
}

/// Decrypts one record body, appending its plain bytes.
fn open(transport: &mut TransportState, record: &[u8], plain: &mut Vec<u8>) -> bool {
    let at = plain.len();
    plain.resize(at + record.len(), 0);
    match transport.read_message(record, &mut plain[at..]) {
        Ok(n) => {
            plain.truncate(at + n);
            true
        }
        Err(_) => {
            plain.truncate(at);
            false
        }
    }
}

/// Feeds `data` through `decoder`, stopping at the first error `each` reports.
fn each_record<E>(
    decoder: &mut FrameDecoder,
    data: &[u8],
    mut each: impl FnMut(&[u8]) -> Result<(), E>,
    framing: impl FnOnce() -> E,
) -> Result<(), E> {
    let mut failed = None;
    let fed = decoder.feed(data, |body| {
        if failed.is_none() {
            failed = each(body).err();
        }
    });
    match (failed, fed) {
        (Some(e), _) => Err(e),
        (None, Err(_)) => Err(framing()),
        (None, Ok(())) => Ok(()),
    }
}

enum ServerState {
    AwaitingNoise,
    Handshaking(Box<HandshakeState>),
    Open(Box<TransportState>),
}

/// The node's side of one secure connection: bytes from the peer in, the
/// v1 byte stream out, and the reverse.
pub(crate) struct ServerSecure {
    config: SecureServerConfig,
    state: ServerState,
    decoder: FrameDecoder,
    /// Handshake bytes to send before anything else.
    wire: Vec<u8>,
    prologue: Vec<u8>,
    peer: Option<PublicKey>,
    /// The handshake is done and `authorize` let the peer in.
    authorized: bool,
    /// Input failed: nothing more is read (the node is closing), while what
    /// is sent still goes out as the state allows (an encrypted error frame).
    input_failed: bool,
}

impl fmt::Debug for ServerSecure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerSecure")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl ServerSecure {
    /// Starts with the node's `hello` (with the `secure` capability) to send in plain text.
    pub(crate) fn new(config: SecureServerConfig, hello: &Message<'_>) -> Self {
        let mut wire = Vec::new();
        hello.encode(&mut wire);
        ServerSecure {
            config,
            state: ServerState::AwaitingNoise,
            decoder: FrameDecoder::new(MAX_RECORD),
            prologue: prologue(&wire),
            wire,
            peer: None,
            authorized: false,
            input_failed: false,
        }
    }

    /// The client's key, once the handshake is done.
    pub(crate) fn peer(&self) -> Option<&PublicKey> {
        self.peer.as_ref()
    }

    /// Whether the handshake is done and the peer's key let in.
    pub(crate) fn authorized(&self) -> bool {
        self.authorized
    }

    pub(crate) fn has_partial(&self) -> bool {
        self.decoder.has_partial()
    }

    pub(crate) fn allocated(&self) -> usize {
        self.decoder.allocated() + self.wire.capacity()
    }

    /// Handshake bytes waiting to be sent.
    pub(crate) fn pending(&self) -> usize {
        self.wire.len()
    }

    /// Takes bytes from the peer; the v1 bytes they carry are appended to `plain`.
    pub(crate) fn read(&mut self, data: &[u8], plain: &mut Vec<u8>) -> Result<(), ProtocolError> {
        let mut decoder = std::mem::replace(&mut self.decoder, FrameDecoder::new(0));
        let awaiting = matches!(self.state, ServerState::AwaitingNoise);
        let result = each_record(
            &mut decoder,
            data,
            |record| self.record(record, plain),
            // A v1 peer's first frame may be larger than a record.
            || {
                if awaiting {
                    ProtocolError::SecureRequired
                } else {
                    ProtocolError::Decrypt
                }
            },
        );
        self.decoder = decoder;
        self.input_failed |= result.is_err();
        result
    }

    fn record(&mut self, record: &[u8], plain: &mut Vec<u8>) -> Result<(), ProtocolError> {
        if self.input_failed {
            return Ok(());
        }
        match &mut self.state {
            ServerState::AwaitingNoise => {
                let msg1 = serde_json::from_slice::<NoiseFrame>(record)
                    .ok()
                    .filter(|f| f.kind == "noise")
                    .and_then(|f| STANDARD.decode(f.data_b64).ok())
                    .ok_or(ProtocolError::SecureRequired)?;
                let handshake = |e: snow::Error| ProtocolError::Handshake(e.to_string());
                let mut hs = snow::Builder::new(params())
                    .local_private_key(&self.config.keypair.secret)
                    .and_then(|b| b.prologue(&self.prologue))
                    .and_then(|b| b.build_responder())
                    .map_err(handshake)?;
                let mut scratch = [0u8; 1024];
                hs.read_message(&msg1, &mut scratch).map_err(handshake)?;
                push_record(&mut self.wire, HANDSHAKE_MAX, |buf| {
                    hs.write_message(&[], buf)
                })
                .map_err(handshake)?;
                self.state = ServerState::Handshaking(Box::new(hs));
            }
            ServerState::Handshaking(hs) => {
                let handshake = |e: snow::Error| ProtocolError::Handshake(e.to_string());
                let mut scratch = [0u8; 1024];
                hs.read_message(record, &mut scratch).map_err(handshake)?;
                let peer = hs
                    .get_remote_static()
                    .and_then(PublicKey::from_slice)
                    .ok_or_else(|| ProtocolError::Handshake("no client key".to_owned()))?;
                let ServerState::Handshaking(hs) =
                    std::mem::replace(&mut self.state, ServerState::AwaitingNoise)
                else {
                    unreachable!("matched above")
                };
                let transport = hs.into_transport_mode().map_err(handshake)?;
                self.state = ServerState::Open(Box::new(transport));
                self.peer = Some(peer);
                if !(self.config.authorize)(&peer) {
                    return Err(ProtocolError::UnknownKey(peer.fingerprint()));
                }
                self.authorized = true;
            }
            ServerState::Open(transport) => {
                if !open(transport, record, plain) {
                    return Err(ProtocolError::Decrypt);
                }
            }
        }
        Ok(())
    }

    /// Moves what is to be sent into `out`: handshake bytes, then `outbound`
    /// (the v1 stream) encrypted, or in plain text before the handshake ends
    /// (only an `error` frame gets there then).
    pub(crate) fn transmit(&mut self, outbound: &mut Vec<u8>, out: &mut Vec<u8>) {
        out.append(&mut self.wire);
        if self.wire.capacity() > 4096 {
            self.wire = Vec::new();
        }
        match &mut self.state {
            ServerState::Open(transport) => seal(transport, outbound, out),
            _ => out.extend_from_slice(outbound),
        }
        outbound.clear();
    }
}

enum ClientState {
    AwaitingHello,
    Handshaking {
        hs: Box<HandshakeState>,
        hello_frame: Vec<u8>,
    },
    Open(Box<TransportState>),
    Failed,
}

/// The client's side of one secure connection.
pub(crate) struct ClientSecure {
    config: SecureClientConfig,
    state: ClientState,
    decoder: FrameDecoder,
    wire: Vec<u8>,
    node: Option<PublicKey>,
    /// A record from the node decrypted: from then on it never speaks in plain text.
    node_spoke: bool,
}

impl fmt::Debug for ClientSecure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientSecure")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl ClientSecure {
    pub(crate) fn new(config: SecureClientConfig) -> Self {
        ClientSecure {
            config,
            state: ClientState::AwaitingHello,
            decoder: FrameDecoder::new(MAX_RECORD),
            wire: Vec::new(),
            node: None,
            node_spoke: false,
        }
    }

    /// The node's key, once the handshake is done.
    pub(crate) fn node(&self) -> Option<&PublicKey> {
        self.node.as_ref()
    }

    /// Handshake bytes waiting to be sent.
    pub(crate) fn pending(&self) -> usize {
        self.wire.len()
    }

    /// Takes bytes from the node; the v1 bytes they carry (starting with the
    /// node's hello, once the handshake is done) are appended to `plain`.
    pub(crate) fn read(&mut self, data: &[u8], plain: &mut Vec<u8>) -> Result<(), ClientError> {
        let mut decoder = std::mem::replace(&mut self.decoder, FrameDecoder::new(0));
        let result = each_record(
            &mut decoder,
            data,
            |record| self.record(record, plain),
            || ClientError::Decrypt,
        );
        self.decoder = decoder;
        if result.is_err() {
            self.state = ClientState::Failed;
        }
        result
    }

    fn record(&mut self, record: &[u8], plain: &mut Vec<u8>) -> Result<(), ClientError> {
        let handshake = |e: snow::Error| ClientError::Handshake(e.to_string());
        match &mut self.state {
            ClientState::AwaitingHello => {
                match Message::parse(record).map_err(|e| ClientError::BadMessage(e.to_string()))? {
                    Message::Hello(hello) if offers_secure(&hello) => {}
                    Message::Hello(_) => return Err(ClientError::PlaintextNode),
                    Message::Error(e) => return Err(ClientError::Refused(e.error)),
                    other => return Err(ClientError::NoHello(other.kind().to_owned())),
                }
                let mut hello_frame = Vec::with_capacity(HEADER_LEN + record.len());
                encode_frame(record, &mut hello_frame);
                let prologue = prologue(&hello_frame);
                let mut hs = snow::Builder::new(params())
                    .local_private_key(&self.config.keypair.secret)
                    .and_then(|b| b.prologue(&prologue))
                    .and_then(|b| b.build_initiator())
                    .map_err(handshake)?;
                let mut msg1 = [0u8; 64];
                let n = hs.write_message(&[], &mut msg1).map_err(handshake)?;
                let frame = NoiseFrame {
                    v: 1,
                    kind: "noise".to_owned(),
                    data_b64: STANDARD.encode(&msg1[..n]),
                };
                encode_frame(
                    &serde_json::to_vec(&frame).expect("serialisable"),
                    &mut self.wire,
                );
                self.state = ClientState::Handshaking {
                    hs: Box::new(hs),
                    hello_frame,
                };
            }
            ClientState::Handshaking { hs, .. } => {
                // The node refuses in plain text until the handshake is done.
                if let Ok(Message::Error(e)) = Message::parse(record) {
                    return Err(ClientError::Refused(e.error));
                }
                let mut scratch = [0u8; 1024];
                hs.read_message(record, &mut scratch).map_err(handshake)?;
                let node = hs
                    .get_remote_static()
                    .and_then(PublicKey::from_slice)
                    .ok_or_else(|| ClientError::Handshake("no node key".to_owned()))?;
                self.config.trust.check(&node)?;
                push_record(&mut self.wire, HANDSHAKE_MAX, |buf| {
                    hs.write_message(&[], buf)
                })
                .map_err(handshake)?;
                let ClientState::Handshaking { hs, hello_frame } =
                    std::mem::replace(&mut self.state, ClientState::Failed)
                else {
                    unreachable!("matched above")
                };
                self.state =
                    ClientState::Open(Box::new(hs.into_transport_mode().map_err(handshake)?));
                self.node = Some(node);
                plain.extend_from_slice(&hello_frame);
            }
            ClientState::Open(transport) => {
                if !open(transport, record, plain) {
                    // A node that closes the handshake before reading our
                    // last message (no room for it) can only refuse in plain
                    // text. Believing it costs nothing: anyone on the path
                    // could as well cut the connection.
                    if let (false, Ok(Message::Error(e))) =
                        (self.node_spoke, Message::parse(record))
                    {
                        return Err(ClientError::Refused(e.error));
                    }
                    return Err(ClientError::Decrypt);
                }
                self.node_spoke = true;
            }
            ClientState::Failed => {}
        }
        Ok(())
    }

    /// Moves what is to be sent into `out`: handshake bytes, then `outbound`
    /// encrypted once the handshake is done (before that it waits).
    pub(crate) fn transmit(&mut self, outbound: &mut Vec<u8>, out: &mut Vec<u8>) {
        out.append(&mut self.wire);
        if let ClientState::Open(transport) = &mut self.state {
            seal(transport, outbound, out);
            outbound.clear();
        }
    }
}

fn offers_secure(hello: &Hello) -> bool {
    hello
        .capabilities
        .iter()
        .any(|c| c == Capability::Secure.as_str())
}
