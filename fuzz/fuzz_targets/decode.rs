#![no_main]
//! The `decode` target: see `donate_proto_fuzz::decode`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| donate_proto_fuzz::decode::run(data));
