//! Secure mode over real sockets on every runtime: secure clients of every
//! adapter against secure nodes of every adapter (push + infer), a wrong node
//! key, an unauthorised client key, a key removed from the authorized file,
//! plain-text peers on either side, and a stalled handshake.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{bounded, LIMIT};
use donate_host::{Error, NodeConfig};
use donate_proto::frame::FrameDecoder;
use donate_proto::{
    ClientConfig, ClientError, Keypair, NodeTrust, PublicKey, SecureClientConfig,
    SecureServerConfig, ServerConfig, Stub,
};

#[derive(Clone, Copy, Debug)]
enum Rt {
    Std,
    Smol,
    Tokio,
}

const RUNTIMES: [Rt; 3] = [Rt::Std, Rt::Smol, Rt::Tokio];

/// A node on one runtime, stopped on drop.
struct Node {
    addr: SocketAddr,
    stop: Option<Box<dyn FnOnce() + Send>>,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop();
        }
    }
}

fn start(rt: Rt, config: NodeConfig) -> Node {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    match rt {
        Rt::Std => {
            let server = donate_std::serve(listener, config, Stub::default()).unwrap();
            Node {
                addr: server.local_addr(),
                stop: Some(Box::new(move || server.shutdown())),
            }
        }
        Rt::Smol => {
            let ex = Arc::new(smol::Executor::new());
            let (done, finished) = smol::channel::bounded::<()>(1);
            let thread = {
                let ex = Arc::clone(&ex);
                std::thread::spawn(move || {
                    let _ = smol::block_on(ex.run(finished.recv()));
                })
            };
            let spawn = {
                let ex = Arc::clone(&ex);
                move |task| ex.spawn(task).detach()
            };
            let listener = async_io::Async::new(listener).unwrap();
            let server = donate_smol::serve(listener, config, Stub::default(), spawn).unwrap();
            Node {
                addr: server.local_addr(),
                stop: Some(Box::new(move || {
                    smol::block_on(server.shutdown());
                    drop(done);
                    let _ = thread.join();
                })),
            }
        }
        Rt::Tokio => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            listener.set_nonblocking(true).unwrap();
            let server = runtime.block_on(async {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                donate_tokio::serve(listener, config, Stub::default()).unwrap()
            });
            Node {
                addr: server.local_addr(),
                stop: Some(Box::new(move || runtime.block_on(server.shutdown()))),
            }
        }
    }
}

fn secure_node(rt: Rt, node_key: &Keypair, allowed: &[&Keypair]) -> Node {
    let keys = allowed.iter().map(|k| *k.public()).collect();
    start(
        rt,
        NodeConfig::secure(
            ServerConfig::default(),
            SecureServerConfig::with_keys(node_key.clone(), keys),
        ),
    )
}

fn client_config(own: &Keypair, node: &PublicKey) -> SecureClientConfig {
    SecureClientConfig {
        keypair: own.clone(),
        trust: NodeTrust::pin(&node.fingerprint()).unwrap(),
    }
}

/// Connects a secure client of `rt` to `addr`, pushes a model and runs a job;
/// returns the node key the client saw, or the first error.
fn push_and_infer(
    rt: Rt,
    addr: SocketAddr,
    secure: SecureClientConfig,
) -> Result<PublicKey, Error> {
    bounded("secure client", LIMIT, move || match rt {
        Rt::Std => {
            let mut c =
                donate_std::Client::connect_secure(addr, ClientConfig::default(), secure, None)?;
            c.push_model("{}", &[1, 2], true)?;
            assert_eq!(c.infer(&[5], 2)?.output_ids, [5, 1, 2]);
            Ok(*c.node_key().unwrap())
        }
        Rt::Smol => smol::block_on(async {
            let mut c =
                donate_smol::Client::connect_secure(addr, ClientConfig::default(), secure).await?;
            c.push_model("{}", &[1, 2], true).await?;
            assert_eq!(c.infer(&[6], 2).await?.output_ids, [6, 1, 2]);
            Ok(*c.node_key().unwrap())
        }),
        Rt::Tokio => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let mut c =
                    donate_tokio::Client::connect_secure(addr, ClientConfig::default(), secure)
                        .await?;
                c.push_model("{}", &[1, 2], true).await?;
                assert_eq!(c.infer(&[7], 2).await?.output_ids, [7, 1, 2]);
                Ok(*c.node_key().unwrap())
            }),
    })
}

#[test]
fn secure_clients_and_nodes_of_every_runtime_work_together() {
    let (node_key, client_key) = (Keypair::generate(), Keypair::generate());
    for node_rt in RUNTIMES {
        let node = secure_node(node_rt, &node_key, &[&client_key]);
        for client_rt in RUNTIMES {
            let seen = push_and_infer(
                client_rt,
                node.addr,
                client_config(&client_key, node_key.public()),
            )
            .unwrap_or_else(|e| panic!("{client_rt:?} client, {node_rt:?} node: {e}"));
            assert_eq!(&seen, node_key.public());
        }
    }
}

#[test]
fn a_wrong_node_key_is_refused_on_every_runtime() {
    let (node_key, client_key, other) = (
        Keypair::generate(),
        Keypair::generate(),
        Keypair::generate(),
    );
    for rt in RUNTIMES {
        let node = secure_node(rt, &node_key, &[&client_key]);
        let err =
            push_and_infer(rt, node.addr, client_config(&client_key, other.public())).unwrap_err();
        assert!(
            matches!(&err, Error::Protocol(ClientError::NodeKeyMismatch { got, expected })
                if *got == node_key.public().fingerprint() && *expected == other.public().fingerprint()),
            "{rt:?}: {err}"
        );
    }
}

fn is_unknown_key(err: &Error, key: &Keypair) -> bool {
    let expected = format!(
        "this node does not know your key {}; ask its owner to add it to its authorized keys",
        key.public().fingerprint()
    );
    match err {
        Error::Closed(Some(frame)) | Error::Refused(frame) => {
            frame.code == "unknown_key" && frame.error == expected
        }
        _ => false,
    }
}

#[test]
fn an_unauthorised_client_key_is_refused_on_every_runtime() {
    let (node_key, client_key, stranger) = (
        Keypair::generate(),
        Keypair::generate(),
        Keypair::generate(),
    );
    for rt in RUNTIMES {
        let node = secure_node(rt, &node_key, &[&client_key]);
        let err =
            push_and_infer(rt, node.addr, client_config(&stranger, node_key.public())).unwrap_err();
        assert!(is_unknown_key(&err, &stranger), "{rt:?}: {err:?}");
    }
}

fn temp_file(name: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "secure-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn a_key_removed_from_the_authorized_file_refuses_the_next_connection() {
    let (node_key, client_key) = (Keypair::generate(), Keypair::generate());
    let file = temp_file("authorized_keys");
    std::fs::write(
        &file,
        format!("# the lab\n{} laptop\n", client_key.public()),
    )
    .unwrap();
    let authorize = {
        let file = file.clone();
        Arc::new(move |key: &PublicKey| {
            std::fs::read_to_string(&file).is_ok_and(|text| {
                text.lines()
                    .filter_map(|line| PublicKey::parse(line).ok())
                    .any(|k| k == *key)
            })
        })
    };
    let secure = SecureServerConfig {
        keypair: node_key.clone(),
        authorize,
    };
    for rt in RUNTIMES {
        std::fs::write(
            &file,
            format!("# the lab\n{} laptop\n", client_key.public()),
        )
        .unwrap();
        let node = start(
            rt,
            NodeConfig::secure(ServerConfig::default(), secure.clone()),
        );
        push_and_infer(rt, node.addr, client_config(&client_key, node_key.public())).unwrap();
        std::fs::write(&file, "# nobody\n").unwrap();
        let err = push_and_infer(rt, node.addr, client_config(&client_key, node_key.public()))
            .unwrap_err();
        assert!(is_unknown_key(&err, &client_key), "{rt:?}: {err:?}");
    }
}

#[test]
fn a_plaintext_client_gets_a_clear_error_from_a_secure_node() {
    let node_key = Keypair::generate();
    for rt in RUNTIMES {
        let node = secure_node(rt, &node_key, &[]);
        let addr = node.addr;
        let err = bounded("plain client", LIMIT, move || {
            let mut c = donate_std::Client::connect(addr).unwrap();
            assert_eq!(c.hello().capabilities, ["secure"]);
            c.push_model("{}", &[1, 2], false).unwrap_err()
        });
        let text = err.to_string();
        assert!(
            text.contains("this node requires an encrypted connection (donate secure mode)"),
            "{rt:?}: {text}"
        );
    }
}

#[test]
fn a_secure_client_refuses_a_plaintext_node_and_sends_nothing() {
    let client_key = Keypair::generate();
    for rt in RUNTIMES {
        // Our plain node: the client stops with a clear error.
        let node = start(rt, ServerConfig::default().into());
        let secure = SecureClientConfig {
            keypair: client_key.clone(),
            trust: NodeTrust::AnyKey,
        };
        let err = push_and_infer(rt, node.addr, secure.clone()).unwrap_err();
        assert!(
            matches!(err, Error::Protocol(ClientError::PlaintextNode)),
            "{rt:?}: {err}"
        );
        // A node that records what it reads: nothing at all arrives.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let recorder = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let hello = br#"{"v":1,"type":"hello","mode":"model_push","role":"server"}"#;
            s.write_all(&(hello.len() as u32).to_le_bytes()).unwrap();
            s.write_all(hello).unwrap();
            s.set_read_timeout(Some(LIMIT)).unwrap();
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got);
            got
        });
        let err = push_and_infer(rt, addr, secure).unwrap_err();
        assert!(
            matches!(err, Error::Protocol(ClientError::PlaintextNode)),
            "{err}"
        );
        assert_eq!(recorder.join().unwrap(), b"", "{rt:?}");
    }
}

#[test]
fn a_stalled_handshake_is_closed_by_the_handshake_timeout_with_nothing_leaking() {
    let node_key = Keypair::generate();
    for rt in RUNTIMES {
        let config = ServerConfig::default().handshake_timeout(Duration::from_millis(300));
        let node = start(
            rt,
            NodeConfig::secure(
                config,
                SecureServerConfig::with_keys(node_key.clone(), vec![]),
            ),
        );
        let mut s = TcpStream::connect(node.addr).unwrap();
        s.set_read_timeout(Some(LIMIT)).unwrap();
        let started = Instant::now();
        // Half a noise frame, then silence.
        s.write_all(&100u32.to_le_bytes()).unwrap();
        s.write_all(br#"{"v":1,"type":"noi"#).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert!(started.elapsed() < LIMIT, "{rt:?}");
        let mut frames = Vec::new();
        FrameDecoder::new(1 << 20)
            .feed(&got, |b| {
                frames.push(String::from_utf8(b.to_vec()).unwrap())
            })
            .unwrap();
        // The plain hello and one plain error: no key material, nothing else.
        assert_eq!(frames.len(), 2, "{rt:?}: {frames:?}");
        assert!(
            frames[0].contains(r#""capabilities":["secure"]"#),
            "{frames:?}"
        );
        assert!(
            frames[1].contains(r#""code":"handshake_timeout""#),
            "{frames:?}"
        );
    }
}

/// A TCP connection to `addr` from the loopback address `127.0.0.{n}`.
fn connect_from(n: u8, addr: SocketAddr) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, n], 0)).into())?;
    socket.connect_timeout(&addr.into(), LIMIT)?;
    Ok(socket.into())
}

/// The first frame the node sends on `s`.
fn first_frame(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(LIMIT)).unwrap();
    let mut len = [0; 4];
    s.read_exact(&mut len).unwrap();
    let mut body = vec![0; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut body).unwrap();
    String::from_utf8(body).unwrap()
}

#[test]
fn half_open_handshakes_from_many_sockets_never_lock_out_an_authorized_client() {
    let (node_key, client_key) = (Keypair::generate(), Keypair::generate());
    for rt in RUNTIMES {
        // Fewer slots than the keyless connections below; the handshake limits as by default.
        let config = ServerConfig::default().max_connections(32);
        let node = start(
            rt,
            NodeConfig::secure(
                config,
                SecureServerConfig::with_keys(node_key.clone(), vec![*client_key.public()]),
            ),
        );
        // One source holds eight handshakes at once: of nine, one is refused.
        let mut held: Vec<TcpStream> = (0..9)
            .map(|_| connect_from(2, node.addr).unwrap())
            .collect();
        let firsts: Vec<String> = held.iter_mut().map(first_frame).collect();
        let refused = firsts
            .iter()
            .filter(|f| f.contains(r#""code":"too_many_connections""#))
            .count();
        assert_eq!(refused, 1, "{rt:?}: {firsts:?}");
        // Keyless clients from eight more addresses open connections, send
        // half a noise frame and hold them, while the client connects.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let opened = Arc::new(AtomicUsize::new(0));
        let flood: Vec<_> = (3..=10u8)
            .map(|n| {
                let (stop, opened, addr) = (Arc::clone(&stop), Arc::clone(&opened), node.addr);
                std::thread::spawn(move || {
                    let mut sockets = Vec::new();
                    while !stop.load(Ordering::SeqCst) && sockets.len() < 60 {
                        if let Ok(mut s) = connect_from(n, addr) {
                            let _ = s.write_all(&100u32.to_le_bytes());
                            let _ = s.write_all(br#"{"v":1,"type":"noi"#);
                            sockets.push(s);
                            opened.fetch_add(1, Ordering::SeqCst);
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    while !stop.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                })
            })
            .collect();
        let deadline = Instant::now() + LIMIT;
        while opened.load(Ordering::SeqCst) < 64 {
            assert!(Instant::now() < deadline, "{rt:?}: the flood did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        for round in 0..10 {
            let seen = push_and_infer(rt, node.addr, client_config(&client_key, node_key.public()))
                .unwrap_or_else(|e| {
                    panic!(
                        "{rt:?}, round {round}, {} keyless connections: {e}",
                        opened.load(Ordering::SeqCst)
                    )
                });
            assert_eq!(&seen, node_key.public());
        }
        stop.store(true, Ordering::SeqCst);
        for t in flood {
            t.join().unwrap();
        }
        drop(held);
    }
}
