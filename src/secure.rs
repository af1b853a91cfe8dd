//! Secure mode in the CLI: `donate keygen`, key files, the authorized-keys
//! file a node re-reads per connection, the exposure rule, the client's node
//! trust (`--node-key`, `known_nodes` and `--trust-on-first-use`), and the
//! exit status of each secure-mode failure.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use donate_host::NodeAddr;
use donate_proto::{Keypair, NodeTrust, PublicKey, SecureServerConfig};
use donate_std::Error;

use crate::{exit, CliResult, Failure, KeygenArgs};

/// `donate keygen PATH`: a new key pair in PATH (0600) and PATH.pub.
pub fn keygen(args: KeygenArgs) -> CliResult {
    let path = &args.path;
    let public_path = pub_path(path);
    for p in [path, &public_path] {
        if p.exists() {
            return Err(format!("{} already exists: refusing to overwrite it", p.display()).into());
        }
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_private_dir(parent)
            .map_err(|e| format!("cannot create the folder {}: {e}", parent.display()))?;
    }
    let key = Keypair::generate();
    let mut file =
        create_private(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    file.write_all(key.secret_text().as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let comment = args.comment.unwrap_or_else(default_comment);
    std::fs::write(&public_path, format!("{} {comment}\n", key.public()))
        .map_err(|e| format!("cannot write {}: {e}", public_path.display()))?;
    println!("{}", key.public().fingerprint());
    eprintln!(
        "donate: wrote the private key to {} and the public key to {}",
        path.display(),
        public_path.display()
    );
    Ok(())
}

/// `PATH.pub`.
fn pub_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

fn default_comment() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "donate".to_owned());
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    match host.trim() {
        "" => user,
        host => format!("{user}@{host}"),
    }
}

/// Creates `dir` and the folders above it that are missing, each new one
/// (mode 0700) for its owner only; an existing folder is left as it is.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Creates `path` for a private key: new, and readable by its owner only.
fn create_private(path: &Path) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

/// Reads a private key file, refusing one that group or others can read.
pub fn load_keypair(path: &Path) -> Result<Keypair, Failure> {
    let fail = |message: String| Failure::with_code(message, exit::KEY_FILE);
    let cannot = |e: std::io::Error| {
        fail(format!(
            "cannot read the private key {}: {e}",
            path.display()
        ))
    };
    let meta = std::fs::metadata(path).map_err(cannot)?;
    let text = std::fs::read_to_string(path).map_err(cannot)?;
    // A public key is named as one before its (usual) 0644 mode is blamed.
    if PublicKey::parse(&text).is_ok() {
        return Keypair::from_secret_text(&text)
            .map_err(|e| fail(format!("{}: {e}", path.display())));
    }
    if let Some(mode) = mode_with(&meta, 0o077) {
        return Err(fail(format!(
            "the private key {} is readable by group or others (mode {mode:o}); fix it with: chmod 600 {}",
            path.display(),
            path.display()
        )));
    }
    Keypair::from_secret_text(&text).map_err(|e| fail(format!("{}: {e}", path.display())))
}

/// The file's permission bits when any of `bits` is set (never on non-Unix).
fn mode_with(meta: &std::fs::Metadata, bits: u32) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = meta.permissions().mode() & 0o777;
        (mode & bits != 0).then_some(mode)
    }
    #[cfg(not(unix))]
    {
        let _ = (meta, bits);
        None
    }
}

/// The node's secure mode: its key, and an `authorize` that checks
/// `authorized` for each new connection (a key added or removed takes effect
/// at the next connection). Refuses to start on a file it cannot use; one
/// that later becomes unusable refuses everyone, with the reason logged.
pub fn server_config(key: &Path, authorized: &Path) -> Result<SecureServerConfig, Failure> {
    let keypair = load_keypair(key)?;
    let keys = AuthorizedKeys::new(authorized.to_owned());
    keys.current()
        .map_err(|e| Failure::with_code(e, exit::KEY_FILE))?;
    Ok(SecureServerConfig {
        keypair,
        authorize: Arc::new(move |key: &PublicKey| match keys.current() {
            Ok(known) => known.contains(key),
            Err(e) => {
                tracing::error!(peer_key = %key.fingerprint(), "client refused: {e}");
                false
            }
        }),
    })
}

/// An authorized-keys file, parsed again only when its size, time or inode changed.
struct AuthorizedKeys {
    path: PathBuf,
    parsed: std::sync::Mutex<Option<(FileStamp, Arc<HashSet<PublicKey>>)>>,
}

/// What tells a changed file from the one parsed last.
#[derive(PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
    inode: u64,
}

impl AuthorizedKeys {
    fn new(path: PathBuf) -> Self {
        AuthorizedKeys {
            path,
            parsed: std::sync::Mutex::new(None),
        }
    }

    /// The keys listed now, or why the file cannot be trusted.
    fn current(&self) -> Result<Arc<HashSet<PublicKey>>, String> {
        let path = self.path.display();
        let cannot = |e: std::io::Error| format!("cannot read the authorized keys {path}: {e}");
        let meta = std::fs::metadata(&self.path).map_err(cannot)?;
        if let Some(mode) = mode_with(&meta, 0o022) {
            return Err(format!(
                "the authorized keys {path} are writable by group or others (mode {mode:o}),                  so anyone with that access could let themselves in; fix it with: chmod go-w {path}"
            ));
        }
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&meta);
        #[cfg(not(unix))]
        let inode = 0;
        let stamp = FileStamp {
            len: meta.len(),
            modified: meta.modified().ok(),
            inode,
        };
        let mut parsed = self.parsed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((seen, keys)) = parsed.as_ref() {
            if *seen == stamp {
                return Ok(Arc::clone(keys));
            }
        }
        let keys = Arc::new(read_authorized(&self.path).map_err(cannot)?);
        *parsed = Some((stamp, Arc::clone(&keys)));
        Ok(keys)
    }
}

/// The keys in an authorized-keys file: one per line, `#` comments and blank
/// lines allowed; a line that is not a key is logged (never quoted) and skipped.
fn read_authorized(path: &Path) -> std::io::Result<HashSet<PublicKey>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty() && !line.trim_start().starts_with('#'))
        .filter_map(|(n, line)| match PublicKey::parse(line) {
            Ok(key) => Some(key),
            Err(e) => {
                tracing::warn!(file = %path.display(), line = n + 1, "skipped: {e}");
                None
            }
        })
        .collect())
}

/// Whether a node on `addr` can be reached from other machines: anything
/// but a loopback address or a `unix:` path (an address that does not
/// resolve counts as exposed).
pub fn is_exposed(addr: &NodeAddr) -> bool {
    match addr {
        NodeAddr::Unix(_) => false,
        NodeAddr::Tcp(name) => match name.to_socket_addrs() {
            Ok(mut addrs) => addrs.any(|a| !a.ip().is_loopback()),
            Err(_) => true,
        },
    }
}

/// The exposure rule: a node reachable from other machines needs `--key`,
/// or `--insecure` to accept the risk (then a warning is logged).
pub fn check_exposure(addr: &NodeAddr, secure: bool, insecure: bool) -> CliResult {
    if secure || !is_exposed(addr) {
        return Ok(());
    }
    if !insecure {
        return Err(Failure::with_code(
            format!(
                "refusing to listen on {addr} without --key: anyone who can reach it could run jobs \
                 and read every prompt and answer; use --key PATH --authorized-keys FILE \
                 (secure mode), or --insecure to accept that risk"
            ),
            exit::EXPOSED,
        ));
    }
    tracing::warn!(%addr, "--insecure: listening without authentication or encryption on an address other machines can reach: anyone who can reach it can push models, run jobs and read every prompt and answer");
    Ok(())
}

/// The user's `known_nodes` file: `$XDG_CONFIG_HOME/donate/known_nodes` or
/// `~/.config/donate/known_nodes`.
pub fn known_nodes_path() -> Option<PathBuf> {
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(config.join("donate").join("known_nodes"))
}

/// The key recorded for `addr` in `known_nodes`, if any.
pub fn known_node(path: &Path, addr: &str) -> Result<Option<PublicKey>, Failure> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display()).into()),
    };
    for (n, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let Ok(line) = std::str::from_utf8(line) else {
            eprintln!(
                "donate: warning: {} line {}: not UTF-8, skipped",
                path.display(),
                n + 1
            );
            continue;
        };
        let mut parts = line.trim().splitn(2, char::is_whitespace);
        if parts.next() == Some(addr) {
            let key = PublicKey::parse(parts.next().unwrap_or_default())
                .map_err(|e| format!("{}: the line for {addr}: {e}", path.display()))?;
            return Ok(Some(key));
        }
    }
    Ok(None)
}

/// Records `key` for `addr` in `known_nodes`.
pub fn record_node(path: &Path, addr: &str, key: &PublicKey) -> CliResult {
    let cannot =
        |e: std::io::Error| format!("cannot record the node's key in {}: {e}", path.display());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(cannot)?;
    }
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(cannot)?;
    writeln!(file, "{addr} {key}").map_err(cannot)?;
    eprintln!(
        "donate: trusting the node at {addr} on first use: recorded its key {} in {}",
        key.fingerprint(),
        path.display()
    );
    Ok(())
}

/// Where a client's trust in the node's key comes from.
pub enum Trust {
    /// `--node-key`.
    Given(NodeTrust),
    /// The key `known_nodes` recorded for the address.
    Known { trust: NodeTrust, file: PathBuf },
    /// Not known: `--trust-on-first-use` records it.
    FirstUse(PathBuf),
    /// Not known and not to be trusted: the connection stops at the node's key.
    Unknown,
}

impl Trust {
    /// What the client core checks the node's key against.
    pub fn node_trust(&self) -> NodeTrust {
        match self {
            Trust::Given(trust) | Trust::Known { trust, .. } => trust.clone(),
            Trust::FirstUse(_) => NodeTrust::AnyKey,
            // Matches no key: the handshake stops before the client's key is sent.
            Trust::Unknown => NodeTrust::Pinned(String::new()),
        }
    }
}

/// The one-line message and exit status of a client failure in secure mode
/// (or of a plain client meeting a secure node).
pub fn classify(e: &Error, addr: &NodeAddr, trust: Option<&Trust>) -> Option<(String, u8)> {
    use donate_proto::ClientError as C;
    let frame_code = match e {
        Error::Closed(Some(frame)) | Error::Refused(frame) => Some(frame),
        _ => None,
    };
    if let Some(frame) = frame_code {
        use donate_proto::ErrorCode as Code;
        let code = match frame.error_code() {
            Some(Code::UnknownKey) => exit::UNKNOWN_KEY,
            Some(Code::SecureRequired) => {
                return Some((
                    format!("{}: use --key PATH (and --node-key KEY)", frame.error),
                    exit::SECURE_REQUIRED,
                ))
            }
            Some(Code::DecryptFailed | Code::HandshakeFailed) => exit::TAMPERED,
            Some(Code::HandshakeTimeout) => exit::HANDSHAKE_TIMEOUT,
            _ => return None,
        };
        return Some((frame.error.clone(), code));
    }
    Some(match e {
        Error::Protocol(C::NodeKeyMismatch { got, expected }) => match trust {
            Some(Trust::Unknown) => (
                format!(
                    "the node at {addr} is in secure mode with key {got}, which you have not pinned: \
                     check it with the node's owner, then pass --node-key {got} (or --trust-on-first-use)"
                ),
                exit::UNKNOWN_NODE,
            ),
            Some(Trust::Known { file, .. }) => (
                format!(
                    "the node at {addr} presented key {got}, expected {expected} (recorded in {}); \
                     if the node's key really changed, delete its line there",
                    file.display()
                ),
                exit::NODE_KEY_MISMATCH,
            ),
            _ => (
                format!("the node at {addr} presented key {got}, expected {expected}"),
                exit::NODE_KEY_MISMATCH,
            ),
        },
        Error::Protocol(C::PlaintextNode) => (
            format!("the node at {addr} does not offer an encrypted connection (donate secure mode); refusing to talk to it in plain text"),
            exit::PLAINTEXT_NODE,
        ),
        Error::HandshakeTimeout(limit) => (
            format!("the secure handshake with {addr} did not complete within {:.1} s", limit.as_secs_f64()),
            exit::HANDSHAKE_TIMEOUT,
        ),
        Error::Protocol(C::Decrypt) => (
            "decryption failed: the connection was altered in transit".to_owned(),
            exit::TAMPERED,
        ),
        Error::Protocol(C::Handshake(why)) => (
            format!("the secure handshake with {addr} failed ({why}): the connection was altered in transit"),
            exit::TAMPERED,
        ),
        _ => return None,
    })
}
