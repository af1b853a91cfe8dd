//! The model store over real sockets and files (`donate serve --store`,
//! `NodeConfig::with_store`): nothing pushed twice, not even after a restart;
//! broken uploads resume; corrupt files are caught; connections share a
//! mounted model; one writer per model; a full disk fails one upload only.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{chunk, fj, Raw};
use donate_host::{ModelStore, NodeConfig};
use donate_proto::{
    hex, Capability, Executor, JobContext, JobError, NoSpool, ServerConfig, Stub, Weights,
};
use donate_std::Client;
use sha2::{Digest, Sha256};

/// The stub, counting how models were mounted.
#[derive(Clone, Default)]
struct Counting {
    mounts: Arc<AtomicUsize>,
    file_mounts: Arc<AtomicUsize>,
    shares: bool,
}

impl Executor for Counting {
    type Model = usize;
    type Spool = NoSpool;

    fn mount(&self, _: String, weights: Weights<NoSpool>) -> Result<usize, String> {
        self.mounts.fetch_add(1, Ordering::SeqCst);
        Ok(weights.into_memory().len())
    }

    fn mount_file(&self, _: String, path: &Path) -> Result<usize, String> {
        self.file_mounts.fetch_add(1, Ordering::SeqCst);
        Ok(std::fs::metadata(path).map_err(|e| e.to_string())?.len() as usize)
    }

    fn shares_models(&self) -> bool {
        self.shares
    }

    fn infer(
        &self,
        len: &usize,
        ids: &[i32],
        max: i64,
        job: &JobContext<'_>,
    ) -> Result<Vec<i32>, JobError> {
        // The model's size says which model the job ran on.
        let mut out = Stub::default().infer(&(), ids, max, job)?;
        out.push(*len as i32);
        Ok(out)
    }
}

struct Node {
    server: donate_std::Server,
    addr: SocketAddr,
}

fn start(dir: &Path, max_bytes: u64, executor: Counting) -> Node {
    start_with(dir, max_bytes, executor, 1 << 20)
}

/// A node whose uploads go to the store in stretches of `stretch` bytes.
fn start_with(dir: &Path, max_bytes: u64, executor: Counting, stretch: usize) -> Node {
    let store = ModelStore::open(dir, max_bytes).expect("open the store");
    serve_store(store, executor, stretch)
}

fn serve_store(store: ModelStore, executor: Counting, stretch: usize) -> Node {
    let config =
        NodeConfig::from(ServerConfig::default().upload_stretch(stretch)).with_store(store);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = donate_std::serve(listener, config, executor).expect("serve");
    let addr = server.local_addr();
    Node { server, addr }
}

fn weights(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
        .collect()
}

fn sha(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn push(addr: SocketAddr, model: &[u8]) -> donate_host::Pushed {
    push_to(addr, model, true)
}

/// Pushes `model` with the store-aware client and runs a job on it; on a
/// [`Counting`] node (`counting`) the job says it ran on a model of that size.
fn push_to(addr: SocketAddr, model: &[u8], counting: bool) -> donate_host::Pushed {
    let mut client = Client::connect(addr).unwrap();
    assert!(client.capabilities().contains(Capability::Store));
    let pushed = client
        .push_stored(
            r#"{"m":1}"#,
            std::io::Cursor::new(model),
            model.len() as u64,
            sha(model),
            |_| {},
        )
        .unwrap();
    // The mounted model is the one pushed.
    let out = client.infer(&[5], 1).unwrap().output_ids;
    let len = model.len() as i32;
    assert_eq!(
        out,
        if counting {
            vec![5, 1, len]
        } else {
            vec![5, 1]
        }
    );
    pushed
}

#[test]
fn a_second_push_sends_nothing_also_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let model = weights(3 << 20, 1);
    let node = start(dir.path(), 1 << 30, Counting::default());
    let first = push(node.addr, &model);
    assert_eq!((first.sent, first.reused), (model.len() as u64, false));
    let second = push(node.addr, &model);
    assert_eq!((second.sent, second.reused), (0, true));
    node.server.shutdown();

    let node = start(dir.path(), 1 << 30, Counting::default());
    let third = push(node.addr, &model);
    assert_eq!(
        (third.sent, third.reused),
        (0, true),
        "the store outlives the node"
    );
    let stored = std::fs::read(dir.path().join("models").join(hex(&sha(&model)))).unwrap();
    assert!(
        stored == model,
        "the stored file is the weights, byte for byte"
    );
    node.server.shutdown();
}

#[test]
fn a_corrupt_stored_model_is_caught_after_a_restart_and_uploaded_again() {
    let dir = tempfile::tempdir().unwrap();
    let model = weights(1 << 20, 2);
    let node = start(dir.path(), 1 << 30, Counting::default());
    push(node.addr, &model);
    node.server.shutdown();

    let path = dir.path().join("models").join(hex(&sha(&model)));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[12345] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();

    let node = start(dir.path(), 1 << 30, Counting::default());
    let again = push(node.addr, &model);
    assert_eq!((again.sent, again.reused), (model.len() as u64, false));
    assert!(std::fs::read(&path).unwrap() == model, "re-uploaded, whole");
    // And a truncated file is caught the same way.
    std::fs::write(&path, &model[..1000]).unwrap();
    let node2 = start(dir.path(), 1 << 30, Counting::default());
    assert_eq!(push(node2.addr, &model).sent, model.len() as u64);
    node2.server.shutdown();
    node.server.shutdown();
}

#[test]
fn a_broken_upload_resumes_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let model = weights(8 << 20, 3);
    let hash = sha(&model);
    // Stretches of 4 MiB: the last MiB that arrived is still buffered at the break.
    let node = start_with(dir.path(), 1 << 30, Counting::default(), 4 << 20);

    // A client that opted into `store` sends 5 MiB of 8 and vanishes.
    let mut raw = Raw::connect(node.addr);
    raw.frame();
    raw.send(&fj(
        r#"{"v":1,"type":"hello","role":"client","capabilities":["store"]}"#,
    ));
    raw.send(&fj(&format!(
        r#"{{"v":1,"type":"model_begin","config_json":"{{\"m\":1}}","weights_len":{},"weights_sha256":"{}"}}"#,
        model.len(),
        hex(&hash)
    )));
    for (i, piece) in model[..5 << 20].chunks(1 << 20).enumerate() {
        raw.send(&chunk(i as i64, false, piece));
    }
    // Wait until the node wrote what it got, then break the connection.
    let partial = |addr| {
        let mut client = Client::connect(addr).unwrap();
        client.query_models(&[hash]).unwrap().models[0].partial
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    std::thread::sleep(Duration::from_millis(200));
    drop(raw);
    // The tail is handed over as the connection closes: wait for all of it.
    let held = loop {
        let held = partial(node.addr);
        if held == 5 << 20 || Instant::now() > deadline {
            break held as u64;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Every byte that arrived is kept, the tail not yet spooled included.
    assert_eq!(held, 5 << 20, "held {held}");

    let resumed = push(node.addr, &model);
    assert_eq!(resumed.resumed_from, held);
    assert_eq!(resumed.sent, model.len() as u64 - held);
    // The whole upload, first try and resume, sent the model once plus at most a stretch.
    assert!((5 << 20) + resumed.sent <= model.len() as u64 + (1 << 20));
    let stored = std::fs::read(dir.path().join("models").join(hex(&hash))).unwrap();
    assert!(stored == model);
    assert_eq!(push(node.addr, &model).sent, 0);
    node.server.shutdown();
}

#[test]
fn connections_share_one_mounted_model_when_the_executor_can() {
    for shares in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let executor = Counting {
            shares,
            ..Counting::default()
        };
        let node = start(dir.path(), 1 << 30, executor.clone());
        let model = weights(1 << 20, 4);
        push(node.addr, &model);
        // Two more connections use it while a first one holds it mounted.
        let mut holder = Client::connect(node.addr).unwrap();
        let hold = holder
            .push_stored(
                "{\"m\":1}",
                std::io::Cursor::new(&model),
                model.len() as u64,
                sha(&model),
                |_| {},
            )
            .unwrap();
        assert!(hold.reused);
        let start = Instant::now();
        let mut other = Client::connect(node.addr).unwrap();
        other
            .push_stored(
                "{\"m\":1}",
                std::io::Cursor::new(&model),
                model.len() as u64,
                sha(&model),
                |_| {},
            )
            .unwrap();
        let first_answer = other.infer(&[1], 1).unwrap();
        let latency = start.elapsed();
        assert_eq!(first_answer.output_ids.last(), Some(&(model.len() as i32)));
        let inventory = other.query_models(&[]).unwrap();
        assert!(inventory.models[0].in_use);
        // Each upload or use mounts from the store file; sharing mounts it once for all.
        let file_mounts = executor.file_mounts.load(Ordering::SeqCst);
        if shares {
            assert_eq!(
                file_mounts, 2,
                "the first push, then the holder's mount serves the other"
            );
        } else {
            assert_eq!(file_mounts, 3);
        }
        assert_eq!(
            executor.mounts.load(Ordering::SeqCst),
            0,
            "never from memory"
        );
        eprintln!("shares={shares}: first answer {latency:?} after connect");
        drop((holder, other));
        node.server.shutdown();
    }
}

#[test]
fn one_upload_per_model_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let model = weights(4 << 20, 5);
    let hash = sha(&model);
    let node = start(dir.path(), 1 << 30, Counting::default());
    let mut first = Raw::connect(node.addr);
    first.frame();
    first.send(&fj(
        r#"{"v":1,"type":"hello","role":"client","capabilities":["store"]}"#,
    ));
    first.send(&fj(&format!(
        r#"{{"v":1,"type":"model_begin","config_json":"{{}}","weights_len":{},"weights_sha256":"{}"}}"#,
        model.len(),
        hex(&hash)
    )));
    first.send(&chunk(0, false, &model[..2 << 20]));
    std::thread::sleep(Duration::from_millis(200));

    // A second client pushing the same model meanwhile is told why it cannot.
    let mut second = Client::connect(node.addr).unwrap();
    let err = second
        .push_stored(
            "{}",
            std::io::Cursor::new(&model),
            model.len() as u64,
            hash,
            |_| {},
        )
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("another connection is uploading this model"),
        "{err}"
    );

    first.send(&chunk(1, true, &model[2 << 20..]));
    first.send(&fj(r#"{"v":1,"type":"model_commit"}"#));
    assert_eq!(first.expect_status(), (true, "mounted".to_owned()));
    assert_eq!(push(node.addr, &model).sent, 0);
    // Written once: the store holds one copy and no partial.
    let partial = std::fs::read_dir(dir.path().join("partial"))
        .unwrap()
        .count();
    assert_eq!(partial, 0);
    node.server.shutdown();
}

#[test]
fn a_full_disk_fails_that_upload_and_loses_no_other_model() {
    // A node whose files may not grow past 3 MiB (RLIMIT_FSIZE, with SIGXFSZ
    // ignored so a write fails with EFBIG, as on a full disk).
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let bin = env!("CARGO_BIN_EXE_donate");
    let mut child = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "trap '' XFSZ; ulimit -f 3072; exec {bin} serve --addr 127.0.0.1:0 --store {}",
            store.display()
        ))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut out = child.stdout.take().unwrap();
    let mut byte = [0u8; 1];
    while !line.ends_with('\n') && out.read(&mut byte).unwrap() == 1 {
        line.push(byte[0] as char);
    }
    let addr: SocketAddr = line
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));

    let small = weights(1 << 20, 6);
    assert_eq!(push_to(addr, &small, false).sent, small.len() as u64);
    let big = weights(5 << 20, 7);
    let mut client = Client::connect(addr).unwrap();
    let err = client
        .push_stored(
            "{}",
            std::io::Cursor::new(&big),
            big.len() as u64,
            sha(&big),
            |_| {},
        )
        .unwrap_err();
    assert!(
        err.to_string().contains("cannot write the model store"),
        "{err}"
    );
    // The node is fine, the other model is still there and whole, no partial is left.
    assert_eq!(push_to(addr, &small, false).sent, 0);
    assert_eq!(std::fs::read_dir(store.join("partial")).unwrap().count(), 0);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn donate_models_and_push_json_report_what_was_sent() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), 1 << 30, Counting::default());
    let (config, weights_file) = (dir.path().join("c.json"), dir.path().join("w.bin"));
    std::fs::write(&config, r#"{"m":1}"#).unwrap();
    let model = weights(2 << 20, 8);
    std::fs::write(&weights_file, &model).unwrap();
    let bin = env!("CARGO_BIN_EXE_donate");
    let cache = dir.path().join("cache");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin)
            .args(args)
            .env("DONATE_CACHE_DIR", &cache)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let addr = node.addr.to_string();
    let text = |args: &[&str]| {
        let out = std::process::Command::new(bin).args(args).output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let empty = text(&["models", "--addr", &addr]);
    assert!(
        empty.contains("0 models; 1.0 GiB free under the store's cap"),
        "{empty}"
    );
    let push_args = [
        "push",
        "--addr",
        &addr,
        "--config",
        config.to_str().unwrap(),
        weights_file.to_str().unwrap(),
        "--json",
    ];
    let first = run(&push_args);
    assert_eq!(first["bytes"], model.len() as u64);
    let second = run(&push_args);
    assert_eq!(
        (second["bytes"].as_u64(), second["reused"].as_bool()),
        (Some(0), Some(true))
    );
    // The hash is cached by path, size and mtime.
    let cached = std::fs::read_to_string(cache.join("hashes.json")).unwrap();
    assert!(cached.contains(&hex(&sha(&model))), "{cached}");

    let listed = run(&["models", "--addr", &addr, "--json"]);
    assert_eq!(listed["models"][0]["sha256"], hex(&sha(&model)));
    assert_eq!(listed["models"][0]["size"], model.len() as u64);
    assert_eq!(
        listed["models"][0]["name"], "w.bin",
        "the pushed file's name"
    );
    assert!(listed["store_free"].as_u64().unwrap() > 0);
    // Sizes in binary units; what is free goes down as models are stored.
    let table = text(&["models", "--addr", &addr]);
    assert!(table.contains(" 2.0 MiB "), "{table}");
    assert!(
        table.lines().nth(1).unwrap().starts_with("w.bin "),
        "{table}"
    );
    assert!(
        table.contains("1 model; 1022.0 MiB free under the store's cap (1.0 GiB for an upload once models not in use are evicted)"),
        "{table}"
    );
    node.server.shutdown();
}

#[test]
fn the_async_clients_push_through_the_store_too() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), 1 << 30, Counting::default());
    let model = weights(1 << 20, 9);
    let push_async = |model: Vec<u8>| {
        smol::block_on(async {
            let mut client = donate_smol::Client::connect(node.addr).await.unwrap();
            let len = model.len() as u64;
            let hash = sha(&model);
            let reader = smol::io::Cursor::new(model);
            client
                .push_stored("{\"m\":1}", reader, len, hash, |_| {})
                .await
                .unwrap()
        })
    };
    assert_eq!(push_async(model.clone()).sent, model.len() as u64);
    let again = push_async(model.clone());
    assert_eq!((again.sent, again.reused), (0, true));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let listed = rt.block_on(async {
        let mut client = donate_tokio::Client::connect(node.addr).await.unwrap();
        client.query_models(&[]).await.unwrap()
    });
    assert_eq!(listed.models.len(), 1);
    assert_eq!(listed.models[0].sha256, hex(&sha(&model)));
    node.server.shutdown();
}

#[test]
fn a_model_that_cannot_fit_is_refused_before_a_byte_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), 1 << 20, Counting::default());
    let model = weights(2 << 20, 10);
    let mut client = Client::connect(node.addr).unwrap();
    let mut sent = 0;
    let err = client
        .push_stored(
            "{}",
            std::io::Cursor::new(&model),
            model.len() as u64,
            sha(&model),
            |n| sent = n,
        )
        .unwrap_err();
    assert!(
        err.to_string().contains("has room for 1048576 bytes"),
        "{err}"
    );
    assert_eq!(sent, 0);
    // The same connection goes on: a model that fits is stored.
    let small = weights(1 << 19, 11);
    let pushed = client
        .push_stored(
            "{}",
            std::io::Cursor::new(&small),
            small.len() as u64,
            sha(&small),
            |_| {},
        )
        .unwrap();
    assert_eq!(pushed.sent, small.len() as u64);
    node.server.shutdown();
}

/// Sends `model_begin` naming the model's hash, from a client that opted
/// into `store` or from a v1 client (whose hello names nothing).
fn begin_named(raw: &mut Raw, model: &[u8], store: bool) {
    raw.frame();
    let capabilities = if store {
        r#","capabilities":["store"]"#
    } else {
        ""
    };
    raw.send(&fj(&format!(
        r#"{{"v":1,"type":"hello","role":"client","mode":"model_push"{capabilities}}}"#
    )));
    raw.send(&fj(&format!(
        r#"{{"v":1,"type":"model_begin","config_json":"{{\"m\":1}}","weights_len":{},"weights_sha256":"{}"}}"#,
        model.len(),
        hex(&sha(model))
    )));
}

#[test]
fn uploads_at_once_store_no_more_than_the_cap() {
    const MIB: usize = 1 << 20;
    let cap = 10 * MIB as u64;
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), cap, Counting::default());
    // Six connections, half of them v1 clients, each begin a 9 MiB model and
    // send its first MiB; then all send the rest and commit.
    let begun = Arc::new(std::sync::Barrier::new(6));
    let done = Arc::new(std::sync::Barrier::new(6));
    let uploads: Vec<_> = (0..6u8)
        .map(|i| {
            let (begun, done, addr) = (begun.clone(), done.clone(), node.addr);
            std::thread::spawn(move || {
                let model = weights(9 * MIB, 20 + i);
                let mut raw = Raw::connect(addr);
                begin_named(&mut raw, &model, i % 2 == 0);
                let mut pieces = model.chunks(MIB).enumerate();
                let (_, first) = pieces.next().unwrap();
                raw.send(&chunk(0, false, first));
                begun.wait();
                for (index, piece) in pieces {
                    raw.send(&chunk(index as i64, index == 8, piece));
                }
                raw.send(&fj(r#"{"v":1,"type":"model_commit"}"#));
                // One answer: mounted, or the refusal.
                let answer = raw.frame();
                raw.expect_in_step();
                // Connections stay until every upload is answered: nothing is evicted.
                done.wait();
                answer
            })
        })
        .collect();
    let answers: Vec<_> = uploads.into_iter().map(|t| t.join().unwrap()).collect();
    let mounted = answers
        .iter()
        .filter(|a| a["type"] == "model_status" && a["ok"] == true)
        .count();
    for refused in answers.iter().filter(|a| a["type"] == "error") {
        assert_eq!(refused["code"], "upload_refused", "{refused}");
        assert!(
            refused["error"]
                .as_str()
                .unwrap()
                .contains("model store is full"),
            "{refused}"
        );
    }
    assert_eq!(mounted, 1, "{answers:?}");
    assert_eq!(answers.iter().filter(|a| a["type"] == "error").count(), 5);
    node.server.shutdown();
    let store = ModelStore::open(dir.path(), cap).unwrap();
    assert!(store.used_bytes() <= cap, "{} bytes", store.used_bytes());
    assert_eq!(store.len(), 1);
}

#[test]
fn an_upload_that_stalls_loses_its_model_to_its_owner() {
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::open(dir.path(), 1 << 30)
        .unwrap()
        .upload_timeout(Duration::from_secs(2));
    let node = serve_store(store, Counting::default(), 1 << 20);
    let model = weights(6 << 20, 12);
    // A connection names the model, sends 4 MiB of garbage, then only empty chunks.
    let mut squatter = Raw::connect(node.addr);
    begin_named(&mut squatter, &model, true);
    for index in 0..4 {
        squatter.send(&chunk(index, false, &[0xAA; 1 << 20]));
    }
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let mut index = 4;
    let mut keep_alive = |squatter: &mut Raw, until: Instant| {
        while Instant::now() < until {
            squatter.send(&chunk(index, false, &[]));
            index += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    keep_alive(&mut squatter, started + Duration::from_millis(200));
    let push_once = |model: &[u8]| {
        let mut client = Client::connect(node.addr).unwrap();
        client.push_stored(
            r#"{"m":1}"#,
            std::io::Cursor::new(model),
            model.len() as u64,
            sha(model),
            |_| {},
        )
    };
    let err = push_once(&model).unwrap_err();
    assert!(
        err.to_string()
            .contains("another connection is uploading this model now"),
        "{err}"
    );
    // Empty chunks are no progress: two seconds after its last byte it has lost the model.
    keep_alive(&mut squatter, started + Duration::from_secs(3));
    let pushed = push_once(&model).unwrap();
    assert_eq!(pushed.sent, model.len() as u64);
    let stored = std::fs::read(dir.path().join("models").join(hex(&sha(&model)))).unwrap();
    assert!(stored == model);
    // The squatter's next bytes go nowhere: its commit is refused.
    squatter.send(&chunk(index, false, &[0xAA; 1 << 20]));
    squatter.send(&fj(r#"{"v":1,"type":"model_commit"}"#));
    let (ok, message) = squatter.expect_status();
    assert!(!ok, "{message}");
    assert_eq!(push(node.addr, &model).sent, 0);
    node.server.shutdown();
}
