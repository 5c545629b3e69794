//! The HTTP/1 parser on arbitrary syscall sequences: no panic, bounded buffers and
//! pending requests, whatever the bytes, holes, losses and closes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use observer::protocol::http1::{Config, Http1Parser, Limits};

#[path = "common/steps.rs"]
mod steps;

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_head_bytes: 2048, max_pending: 16 };
    let mut p = Http1Parser::new(limits, Config::default());
    let mut out = Vec::new();
    for s in steps::steps(data) {
        p.feed(&s.chunk, &mut out);
        if s.lost {
            p.lost(&mut out);
        }
        assert!(p.pending() <= 16);
        assert!(p.buffered() <= 8 * 2048);
        out.clear();
    }
    p.close(&mut out);
});
