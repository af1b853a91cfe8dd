#![no_main]
//! The `server` target: see `donate_proto_fuzz::server`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| donate_proto_fuzz::server::run(data));
