//! The PostgreSQL parser on arbitrary syscall sequences: no panic, bounded state,
//! whatever the bytes, holes, losses and closes; and the statement classifier and the
//! detectors on the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use observer::{
    events::Direction,
    protocol::{
        Chunk,
        postgres::{Limits, PgParser, is_startup, looks_like_frontend, sql},
    },
};

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_pending: 16, max_prepared: 8 };
    let mid = data.first().is_some_and(|b| b & 1 == 1);
    let mut p = if mid { PgParser::mid_stream(limits) } else { PgParser::new(limits) };
    let mut out = Vec::new();
    // Each step: a control byte (direction, hole size, loss), a length byte, the bytes.
    let mut rest = data.get(1..).unwrap_or_default();
    let mut ts = 0;
    while rest.len() >= 2 {
        let (ctl, len) = (rest[0], rest[1] as usize);
        rest = &rest[2..];
        let n = len.min(rest.len());
        let (bytes, tail) = rest.split_at(n);
        rest = tail;
        ts += 1;
        let dir = if ctl & 1 == 0 { Direction::Recv } else { Direction::Send };
        let hole = u64::from(ctl >> 4) * 997;
        let total = bytes.len() as u64 + hole;
        let _ = (is_startup(bytes), looks_like_frontend(bytes, total), sql::classify(bytes));
        p.feed(&Chunk { dir, enter_ns: ts, exit_ns: ts, bytes, total_len: total }, &mut out);
        if ctl & 2 != 0 {
            p.lost(&mut out);
        }
        assert!(p.pending() <= 2 * 16);
        let (statements, portals) = p.remembered();
        assert!(statements <= 8 && portals <= 8);
        out.clear();
    }
    p.close(&mut out);
});
