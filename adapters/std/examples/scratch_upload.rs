use donate_proto::{ServerConfig, Stub};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Instant;
fn main() {
    let mode = std::env::args().nth(1).unwrap_or("all".into());
    let len: u64 = std::env::args()
        .nth(2)
        .map(|s| s.parse().unwrap())
        .unwrap_or(1 << 30);
    let sha = std::env::args().nth(3).is_some();
    if mode == "raw" || mode == "all" {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut b = vec![0u8; 256 * 1024];
            let mut n = 0u64;
            loop {
                let k = s.read(&mut b).unwrap();
                if k == 0 {
                    break;
                }
                n += k as u64;
            }
            n
        });
        let mut c = std::net::TcpStream::connect(a).unwrap();
        let frame = vec![b'A'; 1398200];
        let t = Instant::now();
        for _ in 0..(len >> 20) {
            c.write_all(&frame).unwrap();
        }
        drop(c);
        let n = h.join().unwrap();
        let s = t.elapsed().as_secs_f64();
        println!(
            "raw tcp: {:.0} MB/s of wire, = {:.0} MB/s payload-equivalent",
            n as f64 / s / 1e6,
            len as f64 / s / 1e6
        );
    }
    let server = donate_std::serve(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        ServerConfig::default(),
        Stub::default(),
    )
    .unwrap();
    let mut client = donate_std::Client::connect(server.local_addr()).unwrap();
    if mode == "upload" || mode == "all" {
        let hash = sha.then(|| donate_std::sha256_of_reader(std::io::repeat(7).take(len)).unwrap());
        let t = Instant::now();
        client
            .push_model_from("{}", std::io::repeat(7).take(len), len, hash, |_| {})
            .unwrap();
        let s = t.elapsed().as_secs_f64();
        println!(
            "upload {} MiB in {:.3}s = {:.0} MB/s (sha={sha})",
            len >> 20,
            s,
            len as f64 / s / 1e6
        );
    }
    if mode == "infer" || mode == "all" {
        client
            .push_model_from("{}", std::io::repeat(7).take(4), 4, None, |_| {})
            .unwrap();
        let t = Instant::now();
        let n = 20000;
        for _ in 0..n {
            client.infer(&[1, 2, 3], 4).unwrap();
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "seq infer: {:.0} jobs/s, {:.1} us/job",
            n as f64 / s,
            s / n as f64 * 1e6
        );
    }
    drop(client);
    server.shutdown();
}
