//! The HTTP/1 parser on arbitrary syscall sequences: no panic, bounded buffers and
//! pending requests, whatever the bytes, holes, losses and closes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use observer::{
    events::Direction,
    protocol::{
        Chunk,
        http1::{Config, Http1Parser, Limits},
    },
};

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_head_bytes: 2048, max_pending: 16 };
    let mut p = Http1Parser::new(limits, Config::default());
    let mut out = Vec::new();
    // Each step: a control byte (direction, hole size, loss), a length byte, the bytes.
    let mut rest = data;
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
        p.feed(&Chunk { dir, enter_ns: ts, exit_ns: ts, bytes, total_len: bytes.len() as u64 + hole }, &mut out);
        if ctl & 2 != 0 {
            p.lost(&mut out);
        }
        assert!(p.pending() <= 16);
        assert!(p.buffered() <= 8 * 2048);
        out.clear();
    }
    p.close(&mut out);
});
