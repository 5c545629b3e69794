//! The PostgreSQL parser on arbitrary syscall sequences: no panic, bounded state,
//! whatever the bytes, holes, losses and closes; and the statement classifier and the
//! detectors on the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use observer::protocol::postgres::{Limits, PgParser, is_startup, looks_like_frontend, sql};

#[path = "common/steps.rs"]
mod steps;

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_pending: 16, max_prepared: 8 };
    let mid = data.first().is_some_and(|b| b & 1 == 1);
    let mut p = if mid { PgParser::mid_stream(limits) } else { PgParser::new(limits) };
    let mut out = Vec::new();
    for s in steps::steps(data.get(1..).unwrap_or_default()) {
        let (bytes, total) = (s.chunk.bytes, s.chunk.total_len);
        let _ = (is_startup(bytes), looks_like_frontend(bytes, total), sql::classify(bytes));
        p.feed(&s.chunk, &mut out);
        if s.lost {
            p.lost(&mut out);
        }
        assert!(p.pending() <= 2 * 16);
        let (statements, portals) = p.remembered();
        assert!(statements <= 8 && portals <= 8);
        out.clear();
    }
    p.close(&mut out);
});
