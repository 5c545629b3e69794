//! Shared by the Redis and memcached targets: a cache parser on arbitrary syscall
//! sequences (see steps.rs) must not panic and must stay bounded, whatever the bytes,
//! holes, losses and closes.
use observer::protocol::{CacheEvent, CacheParser, KEY_HEAD};

use super::steps::steps;

/// `max_pending` is the parser's bound; `detect` runs on each chunk's bytes.
pub fn run(p: &mut dyn CacheParser, max_pending: usize, detect: fn(&[u8]) -> bool, data: &[u8]) {
    let mut out = Vec::new();
    for s in steps(data) {
        let _ = detect(s.chunk.bytes);
        p.feed(&s.chunk, &mut out);
        if s.lost {
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
