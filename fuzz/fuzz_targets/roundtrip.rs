#![no_main]
//! The `roundtrip` target: see `donate_proto_fuzz::roundtrip`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| donate_proto_fuzz::roundtrip::run(data));
