//! Ring-buffer items: any bytes decode to a record or an error, never a panic.
//! The body lives in observer::fuzzing, where `cargo test` replays the kept corpus.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| observer::fuzzing::decode_record(data));
