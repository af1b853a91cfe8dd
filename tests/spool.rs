//! Spooled uploads over real sockets, on every adapter: an executor whose
//! spool is slower than the network holds the client back (the node stops
//! reading, then wakes its reader when the spool catches up) instead of
//! buffering the model, and every byte reaches the spool in order.

mod common;

use std::time::Duration;

use common::{bounded, start, AnyClient, ClientKind, ADAPTERS};
use donate_proto::{Executor, JobError, ServerConfig, Spool, Stub, UploadInfo, Weights};
use sha2::{Digest, Sha256};

/// Spools into memory, sleeping on every stretch; mounts only if the bytes
/// hash to the `config_json` (a hex SHA-256).
struct SlowSpooler;

struct SlowSpool {
    hash: Sha256,
    writes: usize,
}

impl Spool for SlowSpool {
    fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        std::thread::sleep(Duration::from_millis(30));
        self.hash.update(bytes);
        self.writes += 1;
        Ok(())
    }
}

impl Executor for SlowSpooler {
    type Model = ();
    type Spool = SlowSpool;

    fn spools_uploads(&self) -> bool {
        true
    }

    fn open_spool(&self, _: &UploadInfo) -> Result<SlowSpool, String> {
        Ok(SlowSpool {
            hash: Sha256::new(),
            writes: 0,
        })
    }

    fn mount(&self, config_json: String, weights: Weights<SlowSpool>) -> Result<(), String> {
        let Weights::Spooled(spool) = weights else {
            return Err("not spooled".to_owned());
        };
        let got: String = spool
            .hash
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if got != config_json {
            return Err(format!("spooled bytes hash to {got}"));
        }
        if spool.writes < 4 {
            return Err(format!("only {} stretches", spool.writes));
        }
        Ok(())
    }

    fn infer(&self, m: &(), id: &str, ids: &[i32], max: i64) -> Result<Vec<i32>, JobError> {
        Stub::default().infer(m, id, ids, max)
    }

    fn prompt(&self, id: &str, prompt: &str, max_out: i64) -> Result<String, JobError> {
        Stub::default().prompt(id, prompt, max_out)
    }
}

#[test]
fn a_slow_spool_gets_every_byte_in_order_on_every_adapter() {
    let weights: Vec<u8> = (0..4 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let expected = common::sha256_hex(&weights);
    for kind in ADAPTERS {
        let config = ServerConfig {
            upload_stretch: 64 * 1024,
            ..ServerConfig::default()
        };
        let server = start(kind, config, SlowSpooler);
        let addr = server.addr();
        let (weights, expected) = (weights.clone(), expected.clone());
        let status = bounded("slow spool upload", Duration::from_secs(30), move || {
            let mut client = AnyClient::connect(ClientKind::Std, addr).unwrap();
            let status = client.push_model(&expected, &weights, true).unwrap();
            // The connection goes on after the upload.
            let out = client.infer(&[5], 1).unwrap().output_ids;
            (status, out)
        });
        assert!(status.0.ok, "{kind:?}: {}", status.0.message);
        assert_eq!(status.1, [5, 1], "{kind:?}");
        server.shutdown();
    }
}
