#![no_main]
//! The `secure` target: see `donate_proto_fuzz::secure`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| donate_proto_fuzz::secure::run(data));
