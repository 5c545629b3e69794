//! sock_diag netlink replies on arbitrary bytes.
//! The body lives in observer::fuzzing, where `cargo test` replays the kept corpus.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| observer::fuzzing::unix_diag(data));
