//! The HTTP/1 parser on arbitrary syscall sequences (observer::fuzzing::steps).
//! The body lives in observer::fuzzing, where `cargo test` replays the kept corpus.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| observer::fuzzing::http1(data));
