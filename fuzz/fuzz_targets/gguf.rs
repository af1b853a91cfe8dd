#![no_main]
//! The `gguf` target: see `donate_proto_fuzz::gguf`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| donate_proto_fuzz::gguf::run(data));
