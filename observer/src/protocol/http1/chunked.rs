//! Chunked transfer coding, followed by length: chunk-size lines are read, chunk data
//! is stepped over by its size, captured or not.

use super::MAX_CHUNK_LINE;
use crate::protocol::Cursor;

/// Chunked transfer coding, followed by length where it can be.
#[derive(Debug)]
pub(super) enum Chunked {
    /// Reading a chunk-size line.
    Size { line: Vec<u8> },
    /// Skipping chunk data, then its CRLF.
    Data { remaining: u64 },
    /// Reading trailer lines after the last chunk; `line` holds the current one.
    Trailer { line: Vec<u8> },
}

pub(super) enum ChunkedStep {
    Done,
    More,
    Lost,
}

/// `HEX [; ext] CRLF` at the start of `b`.
pub(super) fn chunk_line_start(b: &[u8]) -> bool {
    let hex = b.iter().take_while(|c| c.is_ascii_hexdigit()).count();
    hex > 0 && hex <= 16 && matches!(b.get(hex), Some(b'\r' | b';' | b' ' | b'\t'))
}

pub(super) fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let hex: Vec<u8> = line.iter().copied().take_while(u8::is_ascii_hexdigit).collect();
    if hex.is_empty() || hex.len() > 16 {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()
}

/// Reads up to and including `\n` into `line`; `Some(true)` when the line is complete,
/// `None` when it is lost (in a hole or too long).
pub(super) fn read_line(line: &mut Vec<u8>, cur: &mut Cursor<'_>) -> Option<bool> {
    if cur.in_hole() {
        return None;
    }
    let v = cur.visible();
    match v.iter().position(|&c| c == b'\n') {
        Some(i) => {
            line.extend_from_slice(&v[..i]);
            cur.advance(i as u64 + 1);
            (line.len() <= MAX_CHUNK_LINE).then_some(true)
        }
        None => {
            line.extend_from_slice(v);
            cur.advance(v.len() as u64);
            (line.len() <= MAX_CHUNK_LINE).then_some(false)
        }
    }
}

pub(super) fn feed_chunked(state: &mut Chunked, cur: &mut Cursor<'_>) -> ChunkedStep {
    while cur.remaining() > 0 {
        match state {
            Chunked::Size { line } => match read_line(line, cur) {
                None => return ChunkedStep::Lost,
                Some(false) => {}
                Some(true) => {
                    let Some(size) = parse_chunk_size(line) else { return ChunkedStep::Lost };
                    *state = if size == 0 {
                        Chunked::Trailer { line: Vec::new() }
                    } else {
                        // The data, then its CRLF. A size that leaves no room for the CRLF
                        // (near u64::MAX: no real body) is not a chunk we can follow.
                        let Some(remaining) = size.checked_add(2) else { return ChunkedStep::Lost };
                        Chunked::Data { remaining }
                    };
                }
            },
            Chunked::Data { remaining } => {
                let n = (*remaining).min(cur.remaining());
                cur.advance(n);
                *remaining -= n;
                if *remaining == 0 {
                    *state = Chunked::Size { line: Vec::new() };
                }
            }
            Chunked::Trailer { line } => match read_line(line, cur) {
                None => return ChunkedStep::Lost,
                Some(false) => {}
                Some(true) => {
                    if line.is_empty() || line == b"\r" {
                        return ChunkedStep::Done;
                    }
                    line.clear();
                }
            },
        }
    }
    ChunkedStep::More
}
