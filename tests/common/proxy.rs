//! A TCP proxy in front of a node that plays its failures: it can cut every
//! connection at once and refuse new ones (a killed process), or hold the
//! bytes both ways (a stopped one). Shared by the pool tests and bench.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Forwards connections to `target`; can cut them all, or hold their bytes.
pub struct Proxy {
    pub addr: SocketAddr,
    killed: Arc<AtomicBool>,
    pub stalled: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    pub fn new(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let killed = Arc::new(AtomicBool::new(false));
        let stalled = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (k, s, c) = (killed.clone(), stalled.clone(), conns.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                if k.load(Ordering::SeqCst) {
                    continue; // refused: dropped at once
                }
                let Ok(node) = TcpStream::connect(target) else {
                    continue;
                };
                c.lock()
                    .unwrap()
                    .extend([client.try_clone().unwrap(), node.try_clone().unwrap()]);
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), node.try_clone().unwrap()),
                    (node, client),
                ] {
                    let s = s.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0; 64 * 1024];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            while s.load(Ordering::SeqCst) {
                                std::thread::sleep(Duration::from_millis(5));
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Proxy {
            addr,
            killed,
            stalled,
            conns,
        }
    }

    /// Every connection is cut and new ones are refused, as if the process died.
    pub fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        for conn in self.conns.lock().unwrap().drain(..) {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }

    pub fn stall(&self, on: bool) {
        self.stalled.store(on, Ordering::SeqCst);
    }
}
