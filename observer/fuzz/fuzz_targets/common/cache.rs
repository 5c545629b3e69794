//! Shared by the Redis and memcached targets: a cache parser on arbitrary syscall
//! sequences must not panic and must stay bounded, whatever the bytes, holes, losses and
//! closes.
use observer::{
    events::Direction,
    protocol::{CacheEvent, CacheParser, Chunk, KEY_HEAD},
};

/// Each step of `data`: a control byte (direction, hole size, loss), a length byte, the
/// bytes. `max_pending` is the parser's bound; `detect` runs on each chunk's bytes.
pub fn run(p: &mut dyn CacheParser, max_pending: usize, detect: fn(&[u8]) -> bool, data: &[u8]) {
    let mut out = Vec::new();
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
        let _ = detect(bytes);
        p.feed(&Chunk { dir, enter_ns: ts, exit_ns: ts, bytes, total_len: bytes.len() as u64 + hole }, &mut out);
        if ctl & 2 != 0 {
            p.lost(&mut out);
        }
        assert!(p.pending() <= 2 * max_pending);
        for e in out.drain(..) {
            if let CacheEvent::Get(g) = e {
                assert!(g.key.len() <= KEY_HEAD && g.start_ns <= g.end_ns);
            }
        }
    }
    p.close(&mut out);
}
