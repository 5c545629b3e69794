//! The memcached parser on arbitrary syscall sequences (see common/cache.rs), and the
//! protocol detector on the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use observer::protocol::{
    CacheLimits,
    memcached::{MemcachedParser, is_command},
};

#[path = "common/cache.rs"]
mod cache;
#[path = "common/steps.rs"]
mod steps;

fuzz_target!(|data: &[u8]| {
    let mut p = MemcachedParser::new(CacheLimits { max_pending: 16 });
    cache::run(&mut p, 16, is_command, data);
});
