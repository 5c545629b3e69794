//! /proc/net/{tcp,tcp6,unix} and status parsers on arbitrary text.
//! The body lives in observer::fuzzing, where `cargo test` replays the kept corpus.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| observer::fuzzing::proc_tables(data));
