//! [`NodeAddr`]: where a node listens and a client connects, over TCP or a Unix socket.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// A node's address: `host:port`, `ip:port` or `unix:/path/node.sock`.
///
/// TCP names are kept as written and resolved when connecting or binding, so
/// `localhost:17001` tries every address the name has.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NodeAddr {
    /// `host:port` or `ip:port`.
    Tcp(String),
    /// `unix:PATH`: a Unix domain socket.
    Unix(PathBuf),
}

/// Why an address did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad node address {0:?}: expected host:port, ip:port or unix:/path")]
pub struct AddrParseError(String);

impl FromStr for NodeAddr {
    type Err = AddrParseError;

    fn from_str(s: &str) -> Result<NodeAddr, AddrParseError> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(AddrParseError(s.to_owned()));
            }
            return Ok(NodeAddr::Unix(PathBuf::from(path)));
        }
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(NodeAddr::Tcp(s.to_owned()))
            }
            _ => Err(AddrParseError(s.to_owned())),
        }
    }
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeAddr::Tcp(addr) => f.write_str(addr),
            NodeAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl From<SocketAddr> for NodeAddr {
    fn from(addr: SocketAddr) -> NodeAddr {
        NodeAddr::Tcp(addr.to_string())
    }
}

/// What a client's `connect` accepts: a [`NodeAddr`], a [`SocketAddr`], or a
/// string to parse as one (`"127.0.0.1:17001"`, `"unix:/run/node.sock"`).
pub trait ToNodeAddr {
    /// The address, or an `InvalidInput` error naming the text that did not parse.
    fn to_node_addr(&self) -> io::Result<NodeAddr>;
}

impl ToNodeAddr for NodeAddr {
    fn to_node_addr(&self) -> io::Result<NodeAddr> {
        Ok(self.clone())
    }
}

impl ToNodeAddr for SocketAddr {
    fn to_node_addr(&self) -> io::Result<NodeAddr> {
        Ok(NodeAddr::from(*self))
    }
}

impl ToNodeAddr for str {
    fn to_node_addr(&self) -> io::Result<NodeAddr> {
        self.parse()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    }
}

impl ToNodeAddr for String {
    fn to_node_addr(&self) -> io::Result<NodeAddr> {
        self.as_str().to_node_addr()
    }
}

impl<T: ToNodeAddr + ?Sized> ToNodeAddr for &T {
    fn to_node_addr(&self) -> io::Result<NodeAddr> {
        (**self).to_node_addr()
    }
}

/// Binds a Unix socket at `path` for a node.
///
/// A socket file left by a node that is gone (nothing accepts on it) is
/// removed and bound again; a socket a live node listens on, or a path that is
/// not a socket, is refused with an error that says so: a second node never
/// steals a running node's address, and no other file is ever deleted.
#[cfg(unix)]
pub fn bind_unix(path: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::net::{UnixListener, UnixStream};

    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("a node already listens on {}", path.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "removing a stale socket file");
                std::fs::remove_file(path)?;
            }
            Err(e) => return Err(e),
        },
    }
    UnixListener::bind(path)
}

/// The IP address of a peer whose address is a [`SocketAddr`] or a TCP
/// [`NodeAddr`] (`None` for any other type, and for a Unix socket's peer):
/// what [`Node::accept_from`](donate_proto::Node::accept_from) counts handshakes by.
pub fn peer_ip<A: std::any::Any>(peer: &A) -> Option<std::net::IpAddr> {
    let peer: &dyn std::any::Any = peer;
    if let Some(addr) = peer.downcast_ref::<SocketAddr>() {
        return Some(addr.ip());
    }
    match peer.downcast_ref::<NodeAddr>()? {
        NodeAddr::Tcp(name) => name.parse::<SocketAddr>().ok().map(|a| a.ip()),
        NodeAddr::Unix(_) => None,
    }
}

/// The address of a Unix listener, as a [`NodeAddr`] (`unix:` and its path).
#[cfg(unix)]
pub fn unix_addr(addr: &std::os::unix::net::SocketAddr) -> NodeAddr {
    NodeAddr::Unix(addr.as_pathname().map(Path::to_owned).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_ips_come_from_tcp_addresses_only() {
        let v4: SocketAddr = "127.0.0.2:9".parse().unwrap();
        assert_eq!(peer_ip(&v4), Some(v4.ip()));
        assert_eq!(peer_ip(&NodeAddr::from(v4)), Some(v4.ip()));
        assert_eq!(peer_ip(&NodeAddr::Unix("/tmp/n.sock".into())), None);
        assert_eq!(peer_ip(&"127.0.0.1:9"), None);
    }

    #[test]
    fn parses_tcp_and_unix_addresses() {
        let tcp: NodeAddr = "localhost:17001".parse().unwrap();
        assert_eq!(tcp, NodeAddr::Tcp("localhost:17001".into()));
        assert_eq!(
            "[::1]:9".parse::<NodeAddr>().unwrap().to_string(),
            "[::1]:9"
        );
        let unix: NodeAddr = "unix:/run/node.sock".parse().unwrap();
        assert_eq!(unix, NodeAddr::Unix("/run/node.sock".into()));
        assert_eq!(unix.to_string(), "unix:/run/node.sock");
        for bad in ["", "unix:", "localhost", ":80", "host:port", "host:70000"] {
            assert!(bad.parse::<NodeAddr>().is_err(), "{bad:?}");
        }
    }
}
