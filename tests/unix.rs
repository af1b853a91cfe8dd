//! `unix:` addresses on every runtime: each adapter's node on a Unix socket in
//! a temporary directory, called by each adapter's client; the stale-socket
//! rule; and connection errors that name the address.
#![cfg(unix)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use donate_host::NodeAddr;
use donate_proto::{ServerConfig, Stub};

/// A fresh socket path under the target's temporary directory.
fn socket_path() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "unix-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("node.sock")
}

/// Every client pushes a model and runs a job over `addr`.
fn every_client_calls(addr: &NodeAddr) {
    let mut std_client = donate_std::Client::connect(addr).expect("std client");
    std_client.push_model("{}", &[1, 2], false).unwrap();
    assert_eq!(std_client.infer(&[5], 2).unwrap().output_ids, [5, 1, 2]);
    smol::block_on(async {
        let mut c = donate_smol::Client::connect(addr)
            .await
            .expect("smol client");
        c.push_model("{}", &[1, 2], false).await.unwrap();
        assert_eq!(c.infer(&[6], 2).await.unwrap().output_ids, [6, 1, 2]);
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = donate_tokio::Client::connect(addr)
            .await
            .expect("tokio client");
        c.push_model("{}", &[1, 2], false).await.unwrap();
        assert_eq!(c.infer(&[7], 2).await.unwrap().output_ids, [7, 1, 2]);
    });
}

#[test]
fn std_node_on_a_unix_socket() {
    let path = socket_path();
    let listener = donate_host::bind_unix(&path).unwrap();
    let server = donate_std::serve(listener, ServerConfig::default(), Stub::default()).unwrap();
    assert_eq!(server.local_addr(), NodeAddr::Unix(path.clone()));
    every_client_calls(&server.local_addr());
    server.shutdown();
}

#[test]
fn smol_node_on_a_unix_socket() {
    let path = socket_path();
    let listener = async_io::Async::new(donate_host::bind_unix(&path).unwrap()).unwrap();
    let spawn = |task| smol::spawn(task).detach();
    let server =
        donate_smol::serve(listener, ServerConfig::default(), Stub::default(), spawn).unwrap();
    assert_eq!(server.local_addr(), NodeAddr::Unix(path.clone()));
    every_client_calls(&server.local_addr());
    smol::block_on(server.shutdown());
}

#[test]
fn tokio_node_on_a_unix_socket() {
    let path = socket_path();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(async {
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        donate_tokio::serve(listener, ServerConfig::default(), Stub::default()).unwrap()
    });
    assert_eq!(server.local_addr(), NodeAddr::Unix(path.clone()));
    every_client_calls(&server.local_addr());
    rt.block_on(server.shutdown());
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_refused() {
    let path = socket_path();
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let live = donate_host::bind_unix(&path).expect("a stale socket is replaced");
    let refused = donate_host::bind_unix(&path).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::AddrInUse, "{refused}");
    drop(live);
    let file = path.with_file_name("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    assert!(donate_host::bind_unix(&file).is_err());
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

#[test]
fn connection_errors_name_the_address() {
    let gone = socket_path();
    let addr = format!("unix:{}", gone.display());
    let err = donate_std::Client::connect(addr.as_str()).err().unwrap();
    assert!(
        err.to_string()
            .starts_with(&format!("connecting to {addr}: ")),
        "{err}"
    );
    let err = smol::block_on(donate_smol::Client::connect("127.0.0.1:9"))
        .err()
        .unwrap();
    assert!(
        err.to_string().starts_with("connecting to 127.0.0.1:9: "),
        "{err}"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt
        .block_on(donate_tokio::Client::connect(addr.as_str()))
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .starts_with(&format!("connecting to {addr}: ")),
        "{err}"
    );
}

#[test]
fn tokio_serve_outside_a_runtime_is_an_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    // A tokio listener needs a runtime to exist; serve is then called outside it.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt.block_on(async { tokio::net::TcpListener::from_std(listener).unwrap() });
    let err = donate_tokio::serve(listener, ServerConfig::default(), Stub::default())
        .err()
        .expect("no runtime here");
    assert!(err.to_string().contains("tokio runtime"), "{err}");
}

/// A stream the client cannot see into: only `Read + Write`.
struct Opaque(std::os::unix::net::UnixStream);

impl std::io::Read for Opaque {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl std::io::Write for Opaque {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[test]
fn the_blocking_client_talks_over_any_read_write_stream() {
    let path = socket_path();
    let listener = donate_host::bind_unix(&path).unwrap();
    let server = donate_std::serve(listener, ServerConfig::default(), Stub::default()).unwrap();
    let stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let core = donate_proto::ClientConnection::new(donate_proto::ClientConfig::default());
    let mut client = donate_std::Client::over(Opaque(stream), core).unwrap();
    assert_eq!(client.hello().mode, "model_push");
    client
        .push_model(r#"{"ok":true}"#, &[1, 2, 3, 4], true)
        .unwrap();
    assert_eq!(client.infer(&[9], 2).unwrap().output_ids, [9, 1, 2]);
    drop(client);
    server.shutdown();
}
