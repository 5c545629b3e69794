//! Protocol detection (protocol::detect) on arbitrary first bytes, roles and knowledge.
//! The body lives in observer::fuzzing, where `cargo test` replays the kept corpus.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| observer::fuzzing::detect(data));
