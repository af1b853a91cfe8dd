//! The seed corpora are current, read back as built, and run clean; so does
//! everything committed under `corpus/`.
//!
//! `DONATE_FUZZ_WRITE_SEEDS=1 cargo test --test corpus` rewrites the seeds.

use std::fs;
use std::path::PathBuf;

use donate_proto_fuzz::{client, seeds, server};

const TARGETS: [&str; 6] = ["decode", "server", "client", "roundtrip", "secure", "store"];

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

#[test]
fn seeds_are_committed() {
    let write = std::env::var_os("DONATE_FUZZ_WRITE_SEEDS").is_some();
    let mut stale = Vec::new();
    for (target, name, bytes) in seeds::all() {
        let path = corpus_dir(target).join(format!("seed-{name}"));
        if write {
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, &bytes).unwrap();
        } else if fs::read(&path).ok().as_deref() != Some(&bytes[..]) {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "seeds out of date (DONATE_FUZZ_WRITE_SEEDS=1 cargo test --test corpus): {stale:?}"
    );
}

#[test]
fn seeds_run_clean() {
    for (target, name, bytes) in seeds::all() {
        eprintln!("{target}/{name}");
        seeds::run(target, &bytes);
    }
}

#[test]
fn scripts_read_back_as_built() {
    for (name, script) in seeds::server_scripts() {
        let bytes = script.bytes();
        let (_, ops) = server::parse(&bytes).expect("parses");
        let ops: Vec<_> = ops.into_iter().map(|(op, p)| (op, p.to_vec())).collect();
        assert_eq!(ops, script.ops(), "server seed {name}");
    }
    for (name, script) in seeds::client_scripts() {
        let bytes = script.bytes();
        let (_, ops) = client::parse(&bytes).expect("parses");
        let ops: Vec<_> = ops.into_iter().map(|(op, p)| (op, p.to_vec())).collect();
        assert_eq!(ops, script.ops(), "client seed {name}");
    }
}

#[test]
fn committed_corpus_runs_clean() {
    for target in TARGETS {
        let Ok(dir) = fs::read_dir(corpus_dir(target)) else {
            continue;
        };
        for entry in dir {
            let path = entry.unwrap().path();
            seeds::run(target, &fs::read(&path).unwrap());
        }
    }
}
