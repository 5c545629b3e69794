//! memcached's text protocol (and its meta commands), client side: which one-key gets a
//! Django process sent and whether each came back with a value, empty, or an error.
//!
//! Commands are lines, storage commands followed by a data block of the length the line
//! gives; answers come back in order. `get`/`gets` of one key is a lookup (VALUE...END is
//! a hit, END alone a miss); of several keys it is Django's `get_many`, which
//! django-prometheus does not count. `mg` is a lookup too (VA or HD a hit, EN a miss)
//! unless it asks for quiet mode. Data blocks are stepped over by length; a line that
//! falls in a capture hole loses the framing, and the answer side resynchronises at the
//! first read after the next command.

use std::collections::VecDeque;

use super::{
    Chunk, Cursor, KEY_HEAD, KeyGet, Outcome,
    lines::{self, Line},
};
use crate::events::Direction;

pub use super::{CacheEvent as Event, CacheLimits as Limits, CacheParseError as ParseError};

const STORAGE: [&[u8]; 6] = [b"set", b"add", b"replace", b"append", b"prepend", b"cas"];
const COMMANDS: [&[u8]; 22] = [
    b"get",
    b"gets",
    b"gat",
    b"gats",
    b"set",
    b"add",
    b"replace",
    b"append",
    b"prepend",
    b"cas",
    b"delete",
    b"incr",
    b"decr",
    b"touch",
    b"flush_all",
    b"version",
    b"stats",
    b"verbosity",
    b"mg",
    b"ms",
    b"md",
    b"ma",
];

/// Whether a client's first write is memcached commands: a known command word, then a
/// space or the end of the line.
pub fn is_command(first: &[u8]) -> bool {
    let word_len = first.iter().take_while(|c| c.is_ascii_lowercase() || **c == b'_').count();
    let word = &first[..word_len];
    COMMANDS.contains(&word) && matches!(first.get(word_len), Some(b' ' | b'\r' | b'\n') | None)
}

/// Pickled `None` (protocols 0-5), as Django's memcached and Redis backends store it:
/// Django's cache API reads it back as `None`, which django-prometheus counts a miss.
pub fn is_pickled_none(value: &[u8]) -> bool {
    matches!(value, b"N." | b"\x80\x02N." | b"\x80\x03N." | b"\x80\x04N." | b"\x80\x05N.")
}

/// Whether a meta command's flags (from word `from` on) ask for quiet mode.
fn quiet(words: &[&[u8]], from: usize) -> bool {
    words.get(from..).unwrap_or_default().iter().any(|f| f.first() == Some(&b'q'))
}

#[derive(Debug, Clone)]
enum Want {
    /// A one-key lookup.
    Get(Box<[u8]>),
    /// Lines until END (a multi-key get, stats).
    UntilEnd,
    /// One line (or a meta answer, possibly with a value block).
    Line,
    /// A quiet meta command (`q` flag): answered only on some outcomes (a hit, an
    /// error), so which answer is its own is known only at the next `mn` barrier.
    Quiet,
}

#[derive(Debug, Clone)]
struct Pending {
    want: Want,
    /// A meta command (answers VA/HD/EN/...).
    meta: bool,
    /// A VALUE/VA line was read for it; `none` when its value was a pickled None.
    value: bool,
    none: bool,
}

#[derive(Debug)]
pub struct MemcachedParser {
    limits: Limits,
    pending: VecDeque<Pending>,
    limbo: Vec<Pending>,
    front_line: Vec<u8>,
    front_synced: bool,
    /// Data block of a storage command still to step over (with its CRLF).
    front_block: u64,
    back_line: Vec<u8>,
    back_synced: bool,
    back_armed: bool,
    back_block: u64,
    /// Bytes of the `END\r\n` that closes a one-key get's value already stepped over
    /// (`Some` while it is expected).
    back_end: Option<usize>,
    /// The first bytes of the value being stepped over (to tell a pickled None).
    value_head: Vec<u8>,
    value_len: u64,
    value_pickled: bool,
}

impl MemcachedParser {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            pending: VecDeque::new(),
            limbo: Vec::new(),
            front_line: Vec::new(),
            front_synced: true,
            front_block: 0,
            back_line: Vec::new(),
            back_synced: true,
            back_armed: false,
            back_block: 0,
            back_end: None,
            value_head: Vec::new(),
            value_len: 0,
            value_pickled: false,
        }
    }

    pub fn pending(&self) -> usize {
        self.pending.len() + self.limbo.len()
    }

    /// Records of this connection were lost (the stream stage saw a gap): what was in
    /// flight cannot be completed and framing resynchronises. Returns whether the
    /// parser was still following the connection (the loss is counted then).
    pub fn lost(&mut self) -> bool {
        self.desync_front();
        self.desync_back();
        true
    }

    /// The connection closed: lookups still waiting failed (a reset, a timeout).
    pub fn close(&mut self, out: &mut Vec<Event>) {
        self.flush_limbo(out);
        for p in std::mem::take(&mut self.pending) {
            if let Want::Get(key) = p.want {
                out.push(Event::Get(KeyGet { key, outcome: Outcome::Fail }));
            }
        }
    }

    pub fn feed(&mut self, c: &Chunk<'_>, out: &mut Vec<Event>) {
        // A syscall that moved no bytes says nothing (not even who spoke first). The
        // kernel side records none; a split of the same stream never has one.
        if c.total_len == 0 {
            return;
        }
        match c.dir {
            Direction::Send => self.feed_commands(c, out),
            Direction::Recv => self.feed_answers(c, out),
        }
    }

    fn desync_front(&mut self) {
        self.front_synced = false;
        self.front_line.clear();
        self.front_block = 0;
    }

    fn desync_back(&mut self) {
        self.back_synced = false;
        self.back_armed = false;
        self.back_line.clear();
        self.back_block = 0;
        self.back_end = None;
        let room = self.limits.max_pending.saturating_sub(self.limbo.len());
        let n = self.pending.len().min(room);
        self.limbo.extend(self.pending.drain(..n));
        self.pending.clear();
    }

    fn flush_limbo(&mut self, out: &mut Vec<Event>) {
        for p in std::mem::take(&mut self.limbo) {
            if let Want::Get(key) = p.want {
                out.push(Event::Get(KeyGet { key, outcome: Outcome::Unknown }));
            }
        }
    }

    fn feed_commands(&mut self, c: &Chunk<'_>, out: &mut Vec<Event>) {
        let mut cur = Cursor::new(c);
        if !self.front_synced {
            if !is_command(cur.visible()) {
                return;
            }
            self.front_synced = true;
        }
        while cur.remaining() > 0 {
            if self.front_block > 0 {
                if !lines::skip_block(&mut cur, &mut self.front_block, None) {
                    return;
                }
                continue;
            }
            match lines::read_line(&mut cur, &mut self.front_line) {
                Line::Partial => return,
                Line::Hole => {
                    out.push(Event::Error(ParseError::Desync));
                    self.desync_front();
                    return;
                }
                Line::Complete => {}
            }
            let line = std::mem::take(&mut self.front_line);
            let ok = self.command(&line, out);
            self.front_line = line;
            self.front_line.clear();
            if !ok {
                out.push(Event::Error(ParseError::BadMessage));
                self.desync_front();
                return;
            }
        }
    }

    /// One command line; false when it is not memcached.
    fn command(&mut self, line: &[u8], out: &mut Vec<Event>) -> bool {
        let words: Vec<&[u8]> = line.split(|&b| b == b' ').filter(|w| !w.is_empty()).collect();
        let Some(&name) = words.first() else { return true };
        let noreply = words.last() == Some(&&b"noreply"[..]);
        let want = if STORAGE.contains(&name) {
            // <cmd> <key> <flags> <exptime> <bytes> [cas] [noreply], then the data.
            let Some(n) = words.get(4).and_then(|w| lines::parse_int(w)).filter(|&n| n >= 0) else {
                return false;
            };
            self.front_block = n as u64 + 2;
            (!noreply).then_some(Want::Line)
        } else {
            match name {
                b"get" | b"gets" if words.len() == 2 => {
                    Some(Want::Get(words[1][..words[1].len().min(KEY_HEAD)].into()))
                }
                b"get" | b"gets" | b"gat" | b"gats" | b"stats" => Some(Want::UntilEnd),
                b"mg" if words.len() >= 2 => {
                    // Quiet mode leaves misses unanswered: not a lookup we can follow.
                    if quiet(&words, 2) {
                        Some(Want::Quiet)
                    } else {
                        Some(Want::Get(words[1][..words[1].len().min(KEY_HEAD)].into()))
                    }
                }
                b"ms" => {
                    // ms <key> <datalen> <flags>*, then the data.
                    let Some(n) = words.get(2).and_then(|w| lines::parse_int(w)).filter(|&n| n >= 0) else {
                        return false;
                    };
                    self.front_block = n as u64 + 2;
                    Some(if quiet(&words, 3) { Want::Quiet } else { Want::Line })
                }
                // md/ma/me <key> <flags>*: the flags start after the key.
                b"md" | b"ma" | b"me" => Some(if quiet(&words, 2) { Want::Quiet } else { Want::Line }),
                b"mn" => Some(Want::Line),
                // quit: no answer, the server closes.
                b"quit" => None,
                n if COMMANDS.contains(&n) || n == b"verbosity" || n == b"cache_memlimit" => {
                    (!noreply).then_some(Want::Line)
                }
                _ => return false,
            }
        };
        self.flush_limbo(out);
        if let Some(want) = want {
            if self.pending.len() >= self.limits.max_pending {
                // The framing of what is in flight depends on each command: past the
                // bound nothing can be matched any more; what waits ends unknown.
                out.push(Event::Error(ParseError::PendingOverflow));
                self.desync_back();
                return true;
            }
            let meta = name.len() == 2 && name[0] == b'm';
            self.pending.push_back(Pending { want, meta, value: false, none: false });
            if !self.back_synced {
                self.back_armed = true;
            }
        }
        true
    }

    fn feed_answers(&mut self, c: &Chunk<'_>, out: &mut Vec<Event>) {
        let mut cur = Cursor::new(c);
        if !self.back_synced {
            let starts_line = cur.visible().first().is_some_and(|b| b.is_ascii_uppercase());
            if !(self.back_armed && starts_line) {
                self.desync_back();
                return;
            }
            self.back_synced = true;
        }
        while cur.remaining() > 0 {
            if self.back_block > 0 {
                let keep = (self.value_len <= 8).then_some((&mut self.value_head, 8));
                if !lines::skip_block(&mut cur, &mut self.back_block, keep) {
                    return;
                }
                let head = &self.value_head[..self.value_head.len().min(self.value_len as usize)];
                let none = self.value_pickled && self.value_len <= 8 && is_pickled_none(head);
                if let Some(p) = self.pending.front_mut() {
                    p.none = none;
                    if p.meta {
                        // A meta answer ends with its value.
                        self.answer_done(false, out);
                    } else if matches!(p.want, Want::Get(_)) {
                        self.back_end = Some(0);
                    }
                }
                continue;
            }
            if let Some(done) = self.back_end {
                // After the value of a one-key get only `END\r\n` can come: stepped over
                // by length, so a large value's tail that was not captured keeps the framing.
                const END: &[u8] = b"END\r\n";
                let n = (END.len() - done).min(usize::try_from(cur.remaining()).unwrap_or(usize::MAX));
                let vis = cur.visible();
                let seen = &vis[..n.min(vis.len())];
                if seen != &END[done..done + seen.len()] {
                    out.push(Event::Error(ParseError::BadMessage));
                    self.desync_back();
                    return;
                }
                cur.advance(n as u64);
                if done + n == END.len() {
                    self.back_end = None;
                    self.answer_done(false, out);
                } else {
                    self.back_end = Some(done + n);
                }
                continue;
            }
            match lines::read_line(&mut cur, &mut self.back_line) {
                Line::Partial => return,
                Line::Hole => {
                    out.push(Event::Error(ParseError::Desync));
                    self.desync_back();
                    return;
                }
                Line::Complete => {}
            }
            let line = std::mem::take(&mut self.back_line);
            self.answer_line(&line, out);
            self.back_line = line;
            self.back_line.clear();
            if !self.back_synced {
                return;
            }
        }
    }

    fn answer_line(&mut self, line: &[u8], out: &mut Vec<Event>) {
        let words: Vec<&[u8]> = line.split(|&b| b == b' ').filter(|w| !w.is_empty()).collect();
        let first = words.first().copied().unwrap_or_default();
        let Some(p) = self.pending.front_mut() else {
            // An answer to a command we did not see (it fell in a hole): wait for the next.
            out.push(Event::Error(ParseError::UnexpectedReply));
            self.desync_back();
            return;
        };
        if matches!(p.want, Want::Quiet) {
            // Quiet commands answered nothing up to the barrier: they are done. Any
            // other answer may be theirs or the next command's: framing is lost.
            if first != b"MN" {
                out.push(Event::Error(ParseError::Desync));
                self.desync_back();
                return;
            }
            while self.pending.front().is_some_and(|p| matches!(p.want, Want::Quiet)) {
                self.pending.pop_front();
            }
            self.answer_line(line, out);
            return;
        }
        if matches!(first, b"ERROR" | b"CLIENT_ERROR" | b"SERVER_ERROR") {
            self.answer_done(true, out);
            return;
        }
        // The value's length: VALUE <key> <flags> <bytes> [<cas>], or VA <bytes> <flags>*.
        let block = match (p.meta, first) {
            (false, b"VALUE") => Some(words.get(3)),
            (true, b"VA") => Some(words.get(1)),
            _ => None,
        };
        if let Some(len) = block {
            let Some(n) = len.and_then(|w| lines::parse_int(w)).filter(|&n| n >= 0) else {
                out.push(Event::Error(ParseError::BadMessage));
                self.desync_back();
                return;
            };
            p.value = true;
            self.value_len = n as u64;
            self.value_head.clear();
            self.back_block = n as u64 + 2;
            // Client libraries flag pickled values with bit 0 (pymemcache, pylibmc).
            self.value_pickled =
                p.meta || words.get(2).and_then(|w| lines::parse_int(w)).is_some_and(|f| f & 1 == 1);
            return;
        }
        match (p.meta, &p.want) {
            // Classic lookups end with END; stats lines come before it.
            (false, Want::Get(_) | Want::UntilEnd) => {
                if first == b"END" {
                    self.answer_done(false, out);
                }
            }
            // Meta: HD is a hit without the value, EN a miss; one line ends the answer.
            (true, _) => {
                p.value |= first == b"HD";
                self.answer_done(false, out);
            }
            (false, Want::Line | Want::Quiet) => self.answer_done(false, out),
        }
    }

    /// The oldest command was answered (`error`: with an error line).
    fn answer_done(&mut self, error: bool, out: &mut Vec<Event>) {
        let Some(p) = self.pending.pop_front() else { return };
        if let Want::Get(key) = p.want {
            let outcome = match (error, p.value, p.none) {
                (true, _, _) => Outcome::Fail,
                (false, true, false) => Outcome::Hit,
                _ => Outcome::Miss,
            };
            out.push(Event::Get(KeyGet { key, outcome }));
        }
    }
}

impl super::CacheParser for MemcachedParser {
    fn feed(&mut self, c: &Chunk<'_>, out: &mut Vec<Event>) {
        MemcachedParser::feed(self, c, out);
    }

    fn lost(&mut self) -> bool {
        MemcachedParser::lost(self)
    }

    fn close(&mut self, out: &mut Vec<Event>) {
        MemcachedParser::close(self, out);
    }

    fn pending(&self) -> usize {
        MemcachedParser::pending(self)
    }
}

#[cfg(test)]
mod tests;
