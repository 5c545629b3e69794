//! Redis serialization protocol (RESP2 and RESP3), client side: which GETs a Django
//! process sent and whether each came back with a value, a null or an error.
//!
//! Commands are arrays of bulk strings; replies come back in order, one per command,
//! except RESP3 push messages (out of band) and attributes (a prefix to the reply).
//! Pipelines are matched in order; inside MULTI each command is answered `+QUEUED` and
//! its real reply is the matching element of EXEC's array. Bulk payloads are stepped
//! over by length, so large values are never needed in the capture; a type line that
//! falls in a hole loses the framing, and the reply side resynchronises at the first read
//! after the client's next command (replies to what was in flight are then unknown).

use std::collections::VecDeque;

use super::{
    Chunk, Cursor, KEY_HEAD, KeyGet, Outcome,
    lines::{self, Line},
    memcached::is_pickled_none,
};
use crate::events::Direction;

pub use super::{CacheEvent as Event, CacheLimits as Limits, CacheParseError as ParseError};

/// Nesting of aggregate replies followed.
const MAX_DEPTH: usize = 64;
/// Commands remembered inside one MULTI.
const MAX_TXN: usize = 1024;

/// Whether a client's write is RESP commands: `*<n>\r\n$<len>\r\n` and a command name.
pub fn is_command(first: &[u8]) -> bool {
    let Some(rest) = first.strip_prefix(b"*") else { return false };
    let n = rest.iter().take_while(|c| c.is_ascii_digit()).count();
    if n == 0 || n > 6 {
        return false;
    }
    let Some(rest) = rest[n..].strip_prefix(b"\r\n$") else { return false };
    let m = rest.iter().take_while(|c| c.is_ascii_digit()).count();
    if m == 0 || m > 6 {
        return false;
    }
    match rest[m..].strip_prefix(b"\r\n") {
        Some(name) => name.first().is_some_and(u8::is_ascii_alphabetic),
        None => false,
    }
}

/// Whether a read starts like a reply.
fn is_reply(first: &[u8]) -> bool {
    first.first().is_some_and(|t| b"+-:$*_#,(!=%~>|".contains(t))
}

#[derive(Debug, Clone)]
enum Want {
    Get(Box<[u8]>),
    /// Answered `+QUEUED` inside MULTI.
    Queued,
    /// EXEC: the keys of the GETs queued in the transaction, in order.
    Exec(Vec<Option<Box<[u8]>>>),
    Other,
}

#[derive(Debug, Clone)]
struct Pending {
    want: Want,
}

/// The first type line of a reply (or of an EXEC element).
#[derive(Debug, Clone, Copy, Default)]
struct Kind {
    t: u8,
    null: bool,
}

impl Kind {
    /// A value is a hit, a null a miss (so is a pickled None: Django reads it back as
    /// `None`, and django-prometheus counts that a miss), an error a fail.
    fn outcome(self) -> Outcome {
        match self.t {
            b'-' | b'!' => Outcome::Fail,
            _ if self.null => Outcome::Miss,
            _ => Outcome::Hit,
        }
    }
}

/// An aggregate being read: elements left, and whether it is an attribute inside
/// another aggregate (a prefix of the next element, not an element itself).
#[derive(Debug, Clone, Copy)]
struct Frame {
    left: u64,
    attr: bool,
}

/// The command being read from the client.
#[derive(Debug, Default)]
struct Command {
    /// Arguments still to read (0: between commands).
    args_left: u64,
    index: u64,
    name: Vec<u8>,
    key: Vec<u8>,
    nargs: u64,
    payload_left: u64,
    crlf_left: u64,
}

#[derive(Debug)]
pub struct RedisParser {
    limits: Limits,
    pending: VecDeque<Pending>,
    limbo: Vec<Pending>,
    in_multi: bool,
    txn: Vec<Option<Box<[u8]>>>,
    /// SUBSCRIBE/MONITOR: the connection is no cache connection; nothing more is read.
    done: bool,
    cmd: Command,
    front_line: Vec<u8>,
    front_synced: bool,
    // Replies.
    back_line: Vec<u8>,
    back_synced: bool,
    back_armed: bool,
    /// Aggregates being read, innermost last.
    stack: Vec<Frame>,
    /// Replies still to come for commands dropped by the `max_pending` bound (the
    /// oldest ones): they are stepped over, so later replies keep their commands.
    skip_replies: u64,
    top: Kind,
    top_push: bool,
    top_attr: bool,
    elems: Vec<Kind>,
    collecting: bool,
    payload_left: u64,
    crlf_left: u64,
    /// The current bulk's length and first bytes.
    value_len: u64,
    value_head: Vec<u8>,
}

impl RedisParser {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            pending: VecDeque::new(),
            limbo: Vec::new(),
            in_multi: false,
            txn: Vec::new(),
            done: false,
            cmd: Command::default(),
            front_line: Vec::new(),
            front_synced: true,
            back_line: Vec::new(),
            back_synced: true,
            back_armed: false,
            stack: Vec::new(),
            skip_replies: 0,
            top: Kind::default(),
            top_push: false,
            top_attr: false,
            elems: Vec::new(),
            collecting: false,
            payload_left: 0,
            crlf_left: 0,
            value_len: 0,
            value_head: Vec::new(),
        }
    }

    /// Commands sent and not yet answered (bounded by `max_pending`, twice with limbo).
    pub fn pending(&self) -> usize {
        self.pending.len() + self.limbo.len()
    }

    /// The connection subscribed (or monitors): it is no cache connection.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Records of this connection were lost (the stream stage saw a gap): what was in
    /// flight cannot be completed and framing resynchronises. Returns whether the
    /// parser was still following the connection (the loss is counted then).
    pub fn lost(&mut self) -> bool {
        if self.done {
            return false;
        }
        self.desync_front();
        self.desync_back();
        true
    }

    /// The connection closed: GETs still waiting failed (reset, timeout, server gone).
    pub fn close(&mut self, out: &mut Vec<Event>) {
        self.flush_limbo(out);
        for p in std::mem::take(&mut self.pending) {
            match p.want {
                Want::Exec(keys) => {
                    for key in keys.into_iter().flatten() {
                        out.push(Event::Get(KeyGet { key, outcome: Outcome::Fail }));
                    }
                }
                want => self.complete(Pending { want }, Kind { t: b'-', null: false }, out),
            }
        }
        self.done = true;
    }

    pub fn feed(&mut self, c: &Chunk<'_>, out: &mut Vec<Event>) {
        // A syscall that moved no bytes says nothing (not even who spoke first). The
        // kernel side records none; a split of the same stream never has one.
        if c.total_len == 0 {
            return;
        }
        if self.done {
            return;
        }
        match c.dir {
            Direction::Send => self.feed_commands(c, out),
            Direction::Recv => self.feed_replies(c, out),
        }
    }

    fn desync_front(&mut self) {
        self.front_synced = false;
        self.front_line.clear();
        self.cmd = Command::default();
    }

    fn desync_back(&mut self) {
        self.back_synced = false;
        self.back_armed = false;
        self.back_line.clear();
        self.stack.clear();
        self.skip_replies = 0;
        self.collecting = false;
        self.payload_left = 0;
        self.crlf_left = 0;
        self.move_to_limbo();
    }

    fn move_to_limbo(&mut self) {
        let room = self.limits.max_pending.saturating_sub(self.limbo.len());
        let n = self.pending.len().min(room);
        self.limbo.extend(self.pending.drain(..n));
        self.pending.clear();
    }

    /// The client sends again: what was in limbo was answered, with replies not seen.
    fn flush_limbo(&mut self, out: &mut Vec<Event>) {
        for p in std::mem::take(&mut self.limbo) {
            if let Want::Get(key) = p.want {
                out.push(Event::Get(KeyGet { key, outcome: Outcome::Unknown }));
            }
        }
    }

    // ---- commands ------------------------------------------------------------------

    fn feed_commands(&mut self, c: &Chunk<'_>, out: &mut Vec<Event>) {
        let mut cur = Cursor::new(c);
        if !self.front_synced {
            if !(is_command(cur.visible()) || cur.visible().first().is_some_and(u8::is_ascii_alphabetic)) {
                return;
            }
            self.front_synced = true;
        }
        while cur.remaining() > 0 && !self.done {
            if self.cmd.payload_left > 0 || self.cmd.crlf_left > 0 {
                let keep = match self.cmd.index {
                    0 => Some((&mut self.cmd.name, 16)),
                    1 => Some((&mut self.cmd.key, KEY_HEAD)),
                    _ => None,
                };
                if self.cmd.payload_left > 0 && !lines::skip_block(&mut cur, &mut self.cmd.payload_left, keep)
                {
                    return;
                }
                if !lines::skip_block(&mut cur, &mut self.cmd.crlf_left, None) {
                    return;
                }
                self.cmd.index += 1;
                self.cmd.args_left -= 1;
                if self.cmd.args_left == 0 {
                    self.command(out);
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
            if self.cmd.args_left == 0 {
                if let Some(n) = line.strip_prefix(b"*") {
                    match lines::parse_int(n) {
                        Some(n) if n > 0 => {
                            self.cmd = Command { args_left: n as u64, nargs: n as u64, ..Command::default() };
                        }
                        Some(_) => {}
                        None => {
                            out.push(Event::Error(ParseError::BadMessage));
                            self.desync_front();
                            return;
                        }
                    }
                } else if !line.is_empty() {
                    // An inline command: words separated by spaces.
                    let words: Vec<&[u8]> = line.split(|&b| b == b' ').filter(|w| !w.is_empty()).collect();
                    let word = |i: usize, max: usize| words.get(i).map(|w| w[..w.len().min(max)].to_vec());
                    self.cmd = Command {
                        name: word(0, 16).unwrap_or_default(),
                        key: word(1, KEY_HEAD).unwrap_or_default(),
                        nargs: words.len() as u64,
                        ..Command::default()
                    };
                    self.command(out);
                }
            } else if let Some(len) = line.strip_prefix(b"$").and_then(lines::parse_int).filter(|&l| l >= 0) {
                self.cmd.payload_left = len as u64;
                self.cmd.crlf_left = 2;
                if len == 0 {
                    // Empty argument: only its CRLF follows.
                    self.cmd.payload_left = 0;
                }
            } else {
                out.push(Event::Error(ParseError::BadMessage));
                self.desync_front();
                return;
            }
            self.front_line = line;
            self.front_line.clear();
        }
    }

    /// A whole command was read.
    fn command(&mut self, out: &mut Vec<Event>) {
        self.flush_limbo(out);
        let cmd = std::mem::take(&mut self.cmd);
        let name = cmd.name.to_ascii_uppercase();
        let get = (name == b"GET" && cmd.nargs == 2).then(|| cmd.key.clone().into_boxed_slice());
        let want = match name.as_slice() {
            b"SUBSCRIBE" | b"PSUBSCRIBE" | b"SSUBSCRIBE" | b"MONITOR" => {
                self.done = true;
                return;
            }
            b"MULTI" if !self.in_multi => {
                self.in_multi = true;
                self.txn.clear();
                Want::Other
            }
            b"EXEC" if self.in_multi => {
                self.in_multi = false;
                Want::Exec(std::mem::take(&mut self.txn))
            }
            b"DISCARD" if self.in_multi => {
                self.in_multi = false;
                self.txn.clear();
                Want::Other
            }
            _ if self.in_multi => {
                if self.txn.len() < MAX_TXN {
                    self.txn.push(get);
                }
                Want::Queued
            }
            _ => get.map_or(Want::Other, Want::Get),
        };
        if self.pending.len() >= self.limits.max_pending {
            // The oldest is forgotten, not its reply: that one is stepped over.
            self.pending.pop_front();
            self.skip_replies = self.skip_replies.saturating_add(1);
            out.push(Event::Error(ParseError::PendingOverflow));
        }
        self.pending.push_back(Pending { want });
        if !self.back_synced {
            self.back_armed = true;
        }
    }

    // ---- replies -------------------------------------------------------------------

    fn feed_replies(&mut self, c: &Chunk<'_>, out: &mut Vec<Event>) {
        let mut cur = Cursor::new(c);
        if !self.back_synced {
            if !(self.back_armed && is_reply(cur.visible())) {
                // Answers we cannot frame: whatever waits is being answered.
                self.move_to_limbo();
                return;
            }
            self.back_synced = true;
        }
        while cur.remaining() > 0 && !self.done {
            if self.payload_left > 0 || self.crlf_left > 0 {
                // A top-level value of a few bytes may be a pickled None.
                let keep =
                    (self.stack.is_empty() && self.value_len <= 8).then_some((&mut self.value_head, 8));
                if self.payload_left > 0 && !lines::skip_block(&mut cur, &mut self.payload_left, keep) {
                    return;
                }
                if !lines::skip_block(&mut cur, &mut self.crlf_left, None) {
                    return;
                }
                if self.stack.is_empty() && self.value_len <= 8 && is_pickled_none(&self.value_head) {
                    self.top.null = true;
                }
                self.element_done(out);
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
            let ok = self.type_line(&line, out);
            self.back_line = line;
            self.back_line.clear();
            if !ok {
                out.push(Event::Error(ParseError::BadMessage));
                // The reply that breaks the protocol is the oldest command's: its client
                // fails on it (neither a hit nor a miss), now; what follows is unknown.
                if !self.top_push
                    && !self.top_attr
                    && self.skip_replies == 0
                    && let Some(Pending { want: Want::Get(key) }) = self.pending.pop_front()
                {
                    out.push(Event::Get(KeyGet { key, outcome: Outcome::Unknown }));
                }
                self.desync_back();
                return;
            }
        }
    }

    /// One type line of a reply; false when it is not RESP.
    fn type_line(&mut self, line: &[u8], out: &mut Vec<Event>) -> bool {
        let Some((&t, rest)) = line.split_first() else { return false };
        let depth = self.stack.len();
        // RESP3 allows an attribute before any element, inside aggregates too.
        let attr_inside = t == b'|' && depth > 0;
        if depth == 0 {
            self.top = Kind { t, null: false };
            self.top_push = t == b'>';
            self.top_attr = t == b'|';
            self.collecting = t == b'*'
                && !self.top_attr
                && self.pending.front().is_some_and(|p| matches!(p.want, Want::Exec(_)));
            self.elems.clear();
        } else if depth == 1 && self.collecting && !attr_inside && self.elems.len() < MAX_TXN {
            self.elems.push(Kind { t, null: false });
        }
        let mark_null = |s: &mut Self| {
            if depth == 0 {
                s.top.null = true;
            } else if depth == 1
                && s.collecting
                && let Some(e) = s.elems.last_mut()
            {
                e.null = true;
            }
        };
        match t {
            b'+' | b'-' | b':' | b'#' | b',' | b'(' => self.element_done(out),
            b'_' => {
                mark_null(self);
                self.element_done(out);
            }
            b'$' | b'!' | b'=' => match lines::parse_int(rest) {
                // -1 is the RESP2 null; any other negative length is not RESP (redis-py
                // reads it as an empty value, which Django fails to decode).
                Some(-1) => {
                    mark_null(self);
                    self.element_done(out);
                }
                Some(n) if n < 0 => return false,
                Some(n) => {
                    self.payload_left = n as u64;
                    self.crlf_left = 2;
                    self.value_len = n as u64;
                    self.value_head.clear();
                }
                None => return false,
            },
            b'*' | b'~' | b'>' | b'%' | b'|' => {
                let Some(n) = lines::parse_int(rest) else { return false };
                let n = if matches!(t, b'%' | b'|') { n.saturating_mul(2) } else { n };
                if attr_inside && n <= 0 {
                    // An empty attribute: nothing, and no element of its parent.
                } else if n < -1 {
                    return false;
                } else if n < 0 {
                    mark_null(self);
                    self.element_done(out);
                } else if n == 0 {
                    self.element_done(out);
                } else {
                    if self.stack.len() >= MAX_DEPTH {
                        return false;
                    }
                    self.stack.push(Frame { left: n as u64, attr: attr_inside });
                }
            }
            _ => return false,
        }
        true
    }

    /// An element (or a whole aggregate) ended: count it in its parents; a top-level
    /// reply that ended answers the oldest command.
    fn element_done(&mut self, out: &mut Vec<Event>) {
        loop {
            match self.stack.last_mut() {
                None => {
                    self.reply_done(out);
                    return;
                }
                Some(frame) => {
                    frame.left -= 1;
                    if frame.left > 0 {
                        return;
                    }
                    // An attribute ended: its parent is still waiting for the element.
                    if self.stack.pop().is_some_and(|f| f.attr) {
                        return;
                    }
                }
            }
        }
    }

    fn reply_done(&mut self, out: &mut Vec<Event>) {
        self.collecting = false;
        // Push messages are out of band; an attribute precedes the real reply.
        if self.top_push || self.top_attr {
            return;
        }
        if self.skip_replies > 0 {
            self.skip_replies -= 1;
            return;
        }
        let Some(p) = self.pending.pop_front() else {
            out.push(Event::Error(ParseError::UnexpectedReply));
            return;
        };
        let top = self.top;
        if let Want::Exec(keys) = &p.want {
            // A null EXEC: the transaction was aborted (WATCH), nothing ran.
            if !top.null && top.t == b'*' {
                for (i, key) in keys.iter().enumerate() {
                    if let Some(key) = key {
                        let outcome = self.elems.get(i).map_or(Outcome::Unknown, |k| k.outcome());
                        out.push(Event::Get(KeyGet { key: key.clone(), outcome }));
                    }
                }
            } else if top.t == b'-' {
                for key in keys.iter().flatten() {
                    out.push(Event::Get(KeyGet { key: key.clone(), outcome: Outcome::Fail }));
                }
            }
            return;
        }
        self.complete(p, top, out);
    }

    fn complete(&mut self, p: Pending, kind: Kind, out: &mut Vec<Event>) {
        if let Want::Get(key) = p.want {
            out.push(Event::Get(KeyGet { key, outcome: kind.outcome() }));
        }
    }
}

impl super::CacheParser for RedisParser {
    fn feed(&mut self, c: &Chunk<'_>, out: &mut Vec<Event>) {
        RedisParser::feed(self, c, out);
    }

    fn lost(&mut self) -> bool {
        RedisParser::lost(self)
    }

    fn close(&mut self, out: &mut Vec<Event>) {
        RedisParser::close(self, out);
    }

    fn pending(&self) -> usize {
        RedisParser::pending(self)
    }
}

#[cfg(test)]
mod tests;
