#![no_main]
//! The `store` target: see `donate_proto_fuzz::store`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| donate_proto_fuzz::store::run(data));
