//! The input format every parser target shares: a sequence of steps, each a control byte
//! (bit 0: send, else receive; bit 1: records lost after it; high nibble: a hole of that
//! many times 997 bytes after the captured ones), a length byte, then the bytes.
use observer::{events::Direction, protocol::Chunk};

pub struct Step<'a> {
    pub chunk: Chunk<'a>,
    /// Records of the connection were lost after this one.
    pub lost: bool,
}

pub fn steps(data: &[u8]) -> impl Iterator<Item = Step<'_>> {
    let mut rest = data;
    let mut ts = 0;
    std::iter::from_fn(move || {
        if rest.len() < 2 {
            return None;
        }
        let (ctl, len) = (rest[0], rest[1] as usize);
        rest = &rest[2..];
        let n = len.min(rest.len());
        let (bytes, tail) = rest.split_at(n);
        rest = tail;
        ts += 1;
        let dir = if ctl & 1 == 0 { Direction::Recv } else { Direction::Send };
        let hole = u64::from(ctl >> 4) * 997;
        let chunk = Chunk { dir, enter_ns: ts, exit_ns: ts, bytes, total_len: bytes.len() as u64 + hole };
        Some(Step { chunk, lost: ctl & 2 != 0 })
    })
}
