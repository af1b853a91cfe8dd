//! The seed corpora are current, read back as built, and run clean; so does
//! everything committed under `corpus/`.
//!
//! `DONATE_FUZZ_WRITE_SEEDS=1 cargo test --test corpus` rewrites the seeds.

use std::fs;
use std::path::PathBuf;

use donate_proto_fuzz::{client, gguf, seeds, server};

const TARGETS: [&str; 7] = [
    "decode",
    "server",
    "client",
    "roundtrip",
    "secure",
    "store",
    "gguf",
];

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

#[test]
fn gguf_seeds_read_back_and_load() {
    for (name, bytes) in seeds::gguf() {
        let input = gguf::Input::parse(&bytes);
        assert_eq!(input.to_bytes(), bytes, "gguf seed {name} reads back");
        let outcome = gguf::outcome(&bytes);
        eprintln!("gguf/{name}: {outcome:?}");
        if name.starts_with("raw-") || name.starts_with("structured-") || name == "version-1" {
            assert_eq!(outcome.push, None, "gguf seed {name} mounts");
        }
        let has_tokenizer = ["gpt2", "spm"].iter().any(|t| name.contains(t)) || name == "version-1";
        if has_tokenizer {
            assert_eq!(
                outcome.local_lm,
                Some(None),
                "gguf seed {name} starts a local_lm node"
            );
        }
    }
    // Every base, every edit kind: structured inputs read back as written.
    let edits = vec![
        gguf::Edit::Set {
            key: 200,
            value: gguf::Val::Str(b"phi2".to_vec()),
        },
        gguf::Edit::Remove { key: 3 },
        gguf::Edit::Dims {
            tensor: 4,
            dims: vec![1 << 40, 3],
        },
        gguf::Edit::Type { tensor: 1, ty: 39 },
        gguf::Edit::Type {
            tensor: 1,
            ty: 1000,
        },
        gguf::Edit::Offset {
            tensor: 2,
            offset: u64::MAX,
        },
        gguf::Edit::Fit { tensor: 2, fill: 9 },
        gguf::Edit::Resize { tensor: 3, len: 7 },
        gguf::Edit::Rename {
            tensor: 5,
            name: 17,
        },
        gguf::Edit::Drop { tensor: 6 },
        gguf::Edit::Copy { tensor: 0, name: 3 },
        gguf::Edit::Version { version: 7 },
        gguf::Edit::Count {
            which: 1,
            count: 1 << 50,
        },
        gguf::Edit::Flip { at: 300, xor: 0x80 },
        gguf::Edit::Cut { at: 4000 },
    ];
    let input = gguf::Input {
        mode: gguf::STRUCTURED,
        ctx: 0,
        body: gguf::Body::Structured { base: 1, edits },
    };
    assert_eq!(gguf::Input::parse(&input.to_bytes()), input);
}
