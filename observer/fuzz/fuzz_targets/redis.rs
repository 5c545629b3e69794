//! The redis parser on arbitrary syscall sequences: no panic, bounded state, whatever
//! the bytes, holes, losses and closes; and the protocol detector on the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use observer::{
    events::Direction,
    protocol::{
        Chunk, KEY_HEAD,
        redis::{Event, Limits, RedisParser, is_command},
    },
};

fuzz_target!(|data: &[u8]| {
    let mut p = RedisParser::new(Limits { max_pending: 16 });
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
        let _ = is_command(bytes);
        p.feed(&Chunk { dir, enter_ns: ts, exit_ns: ts, bytes, total_len: bytes.len() as u64 + hole }, &mut out);
        if ctl & 2 != 0 {
            p.lost(&mut out);
        }
        assert!(p.pending() <= 2 * 16);
        for e in out.drain(..) {
            if let Event::Get(g) = e {
                assert!(g.key.len() <= KEY_HEAD && g.start_ns <= g.end_ns);
            }
        }
    }
    p.close(&mut out);
});
