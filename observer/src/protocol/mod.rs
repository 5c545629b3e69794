//! Wire protocol parsers. Each is a pure, per-connection state machine over [`Chunk`]s:
//! no I/O, no clock, no globals; bounded memory; bad input is a counted error and a
//! resynchronisation, never a panic.

pub mod detect;
/// Recorded captures for tests and the replay benchmarks.
#[doc(hidden)]
pub mod fixtures;
pub mod http1;
pub mod lines;
pub mod memcached;
pub mod postgres;
pub mod redis;
pub mod sqlite;

use crate::events::Direction;

/// A cache protocol on the wire (Django's backends map onto these, see
/// `django::cache::wire_of`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Wire {
    Redis,
    Memcached,
}

impl Wire {
    /// The `protocol` label of its parse errors.
    pub fn name(self) -> &'static str {
        match self {
            Self::Redis => "redis",
            Self::Memcached => "memcached",
        }
    }
}

/// How a cache lookup of one key ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// A value came back.
    Hit,
    /// The key has no value.
    Miss,
    /// An error reply, or the connection ended (reset, timeout) before the answer.
    Fail,
    /// The answer could not be framed (it fell in a capture hole).
    Unknown,
}

/// One cache lookup of one key (a Redis GET, a memcached `get`/`gets`/`mg`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyGet {
    /// The key's first bytes (enough to tell a Django cache key).
    pub key: Box<[u8]>,
    pub outcome: Outcome,
}

/// Bytes of a cache key kept.
pub const KEY_HEAD: usize = 256;

/// A cache protocol's parser (Redis, memcached): one connection's lookups.
pub trait CacheParser {
    fn feed(&mut self, c: &Chunk<'_>, out: &mut Vec<CacheEvent>);
    /// Records of the connection were lost: what was in flight ends unknown. Returns
    /// whether the parser was still following the connection.
    fn lost(&mut self) -> bool;
    /// The connection closed: lookups still waiting failed.
    fn close(&mut self, out: &mut Vec<CacheEvent>);
    /// Commands waiting for an answer.
    fn pending(&self) -> usize;
}

/// Bounds of a cache protocol parser (Redis, memcached).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    /// Commands sent and not yet answered (a pipeline's depth).
    pub max_pending: usize,
}

impl Default for CacheLimits {
    fn default() -> Self {
        Self { max_pending: 4096 }
    }
}

/// What a cache protocol parser reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheEvent {
    Get(KeyGet),
    Error(CacheParseError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheParseError {
    /// A line fell outside the capture: framing was lost.
    Desync,
    /// Not the protocol.
    BadMessage,
    /// More commands in flight than `max_pending`: the oldest was dropped.
    PendingOverflow,
    /// An answer with no command waiting for it.
    UnexpectedReply,
}

impl CacheParseError {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Desync => "desync",
            Self::BadMessage => "bad_message",
            Self::PendingOverflow => "pending_overflow",
            Self::UnexpectedReply => "unexpected_reply",
        }
    }
}

/// The bytes of one data syscall as the parser sees them: the captured prefix and the
/// true length. `total_len - bytes.len()` bytes at the end were moved but not captured
/// (a hole of known size that length-delimited framing can step over).
#[derive(Debug, Clone, Copy)]
pub struct Chunk<'a> {
    pub dir: Direction,
    pub enter_ns: u64,
    pub exit_ns: u64,
    pub bytes: &'a [u8],
    pub total_len: u64,
}

/// A read position inside a chunk: captured bytes first, then the hole.
#[derive(Debug)]
pub(crate) struct Cursor<'a> {
    captured: &'a [u8],
    pos: u64,
    total: u64,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(c: &Chunk<'a>) -> Self {
        // A record never captures more than it moved; clamp anyway.
        let captured = &c.bytes[..c.bytes.len().min(usize::try_from(c.total_len).unwrap_or(usize::MAX))];
        Self { captured, pos: 0, total: c.total_len.max(captured.len() as u64) }
    }

    /// Bytes left in the chunk, captured or not.
    pub(crate) fn remaining(&self) -> u64 {
        self.total - self.pos
    }

    /// At the very start of the syscall's bytes (a possible message boundary).
    pub(crate) fn at_start(&self) -> bool {
        self.pos == 0
    }

    /// The captured bytes from the position on (empty inside the hole).
    pub(crate) fn visible(&self) -> &'a [u8] {
        let p = usize::try_from(self.pos).unwrap_or(usize::MAX);
        self.captured.get(p..).unwrap_or_default()
    }

    /// The position is past the captured bytes, inside the hole.
    pub(crate) fn in_hole(&self) -> bool {
        self.pos >= self.captured.len() as u64 && self.pos < self.total
    }

    pub(crate) fn advance(&mut self, n: u64) {
        self.pos = self.pos.saturating_add(n).min(self.total);
    }
}
