#![no_main]
//! The `client` target: see `donate_proto_fuzz::client`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| donate_proto_fuzz::client::run(data));
