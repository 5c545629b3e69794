//! CRLF lines and length-counted blocks over a [`Cursor`]: the framing RESP and the
//! memcached text protocol share. A line must be captured to be read; a block is
//! stepped over by its length, captured or not.

use super::Cursor;

/// Longest line kept (longer ones are read to their end and kept cut).
pub const MAX_LINE: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line {
    /// `line` holds a whole line (without its CRLF; cut at [`MAX_LINE`]).
    Complete,
    /// The chunk ended mid-line; the next one continues it.
    Partial,
    /// The line runs into the part of the chunk that was not captured.
    Hole,
}

/// Reads (the rest of) one line into `line`.
pub(crate) fn read_line(cur: &mut Cursor<'_>, line: &mut Vec<u8>) -> Line {
    loop {
        let vis = cur.visible();
        if vis.is_empty() {
            return if cur.in_hole() { Line::Hole } else { Line::Partial };
        }
        match vis.iter().position(|&b| b == b'\n') {
            Some(i) => {
                let room = MAX_LINE.saturating_sub(line.len());
                line.extend_from_slice(&vis[..i.min(room)]);
                cur.advance(i as u64 + 1);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Line::Complete;
            }
            None => {
                let room = MAX_LINE.saturating_sub(line.len());
                line.extend_from_slice(&vis[..vis.len().min(room)]);
                cur.advance(vis.len() as u64);
            }
        }
    }
}

/// Steps over up to `*left` bytes of a block, keeping the captured ones (up to `max`
/// in `keep`). Returns true once the block is done.
pub(crate) fn skip_block(cur: &mut Cursor<'_>, left: &mut u64, keep: Option<(&mut Vec<u8>, usize)>) -> bool {
    let n = (*left).min(cur.remaining());
    if let Some((keep, max)) = keep {
        let vis = cur.visible();
        let take = (n.min(vis.len() as u64) as usize).min(max.saturating_sub(keep.len()));
        keep.extend_from_slice(&vis[..take]);
    }
    cur.advance(n);
    *left -= n;
    *left == 0
}

/// A decimal integer (with an optional minus sign).
pub fn parse_int(b: &[u8]) -> Option<i64> {
    std::str::from_utf8(b).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{events::Direction, protocol::Chunk};

    fn chunk(b: &[u8], total: u64) -> Chunk<'_> {
        Chunk { dir: Direction::Recv, enter_ns: 0, exit_ns: 0, bytes: b, total_len: total }
    }

    #[test]
    fn lines_across_chunks_and_into_holes() {
        let mut line = Vec::new();
        let c = chunk(b"+O", 2);
        let mut cur = Cursor::new(&c);
        assert_eq!(read_line(&mut cur, &mut line), Line::Partial);
        let c = chunk(b"K\r\n$3", 5);
        let mut cur = Cursor::new(&c);
        assert_eq!(read_line(&mut cur, &mut line), Line::Complete);
        assert_eq!(line, b"+OK");
        line.clear();
        assert_eq!(read_line(&mut cur, &mut line), Line::Partial);
        let c = chunk(b"$10", 20);
        let mut cur = Cursor::new(&c);
        line.clear();
        assert_eq!(read_line(&mut cur, &mut line), Line::Hole);
    }

    #[test]
    fn blocks_step_over_holes() {
        let c = chunk(b"abc", 100);
        let mut cur = Cursor::new(&c);
        let mut left = 50;
        let mut keep = Vec::new();
        assert!(skip_block(&mut cur, &mut left, Some((&mut keep, 2))));
        assert_eq!(keep, b"ab");
        assert_eq!(cur.remaining(), 50);
        let mut left = 60;
        assert!(!skip_block(&mut cur, &mut left, None));
        assert_eq!(left, 10);
    }

    #[test]
    fn long_lines_are_cut_not_unbounded() {
        let mut b = vec![b'x'; 5000];
        b.extend_from_slice(b"\r\n");
        let c = chunk(&b, b.len() as u64);
        let mut cur = Cursor::new(&c);
        let mut line = Vec::new();
        assert_eq!(read_line(&mut cur, &mut line), Line::Complete);
        assert_eq!(line.len(), MAX_LINE);
        assert_eq!(parse_int(b"-1"), Some(-1));
        assert_eq!(parse_int(b"x"), None);
    }
}
