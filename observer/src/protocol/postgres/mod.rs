//! PostgreSQL frontend/backend protocol v3, client side: what a Django process's
//! connection to its database did, as connection attempts and statement completions.
//!
//! Framing is by length only (a type byte and a 4-byte length per message), so a message
//! whose body falls in a capture hole is stepped over without being seen; only the heads
//! that matter are kept (the startup parameters, a statement's first bytes, an error's
//! SQLSTATE). A header that falls in a hole, or a gap in the records, loses the framing:
//! the frontend side resynchronises at the next write that parses as whole messages, the
//! backend side at the first read after the client sends its next statement (a client
//! that is not pipelining has read everything before it sends again).
//!
//! Units of work: a simple Query, or everything from the first extended-protocol
//! message to a Sync, ends with one ReadyForQuery. Units are queued in the order they
//! were sent, so pipelines (psycopg's `executemany`) are matched with their answers.

pub mod fallback;
pub mod shape;
pub mod sql;
pub mod sqlstate;

use std::collections::{HashMap, VecDeque};

use self::{
    sql::{Kind, TableWrite},
    sqlstate::SqlState,
};
use super::{Chunk, Cursor};
use crate::events::Direction;

/// Bounds of one connection's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Units sent and not yet answered (a pipeline's depth).
    pub max_pending: usize,
    /// Prepared statements and portals remembered.
    pub max_prepared: usize,
    /// Keep each statement's normalised text (its shape) for `observer top`; the agent
    /// itself keeps only fingerprints.
    pub keep_shapes: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_pending: 4096, max_prepared: 256, keep_shapes: false }
    }
}

/// Bytes of a statement's text kept to classify it.
pub const SQL_HEAD: usize = 256;
/// Bytes of a startup message kept (its parameters).
const STARTUP_KEEP: usize = 1024;
/// Bytes of an ErrorResponse kept (severity and SQLSTATE come first).
const ERROR_KEEP: usize = 256;
/// Bytes of a Bind, Execute or Close kept (portal and statement names).
const NAMES_KEEP: usize = 128;
/// PostgreSQL refuses messages over 1 GiB.
const MAX_MESSAGE: u32 = 1 << 30;

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;

const FRONTEND_TAGS: &[u8] = b"QPBDECHSXFdcfp";
const BACKEND_TAGS: &[u8] = b"RSKZTDCIEN123nstAGHWdcvV";

/// How a statement unit failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// An ErrorResponse with this SQLSTATE.
    Server(SqlState),
    /// The connection ended before the answer (psycopg raises OperationalError).
    ConnectionLost,
    /// An ErrorResponse whose SQLSTATE was not captured.
    Unknown,
    /// The answer broke the protocol (an impossible message length): libpq's "lost
    /// synchronization with server", which psycopg raises as DatabaseError.
    Desync,
}

/// One completed unit with statements the app executed.
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    /// When its first message was sent.
    pub start_ns: u64,
    /// When its ReadyForQuery was read.
    pub end_ns: u64,
    /// Statements executed: 1 for a Query, one per Execute in the extended protocol.
    pub executes: u32,
    /// Executes pipelined before one Sync: psycopg's `executemany`.
    pub many: bool,
    pub failure: Option<Failure>,
    /// INSERT/UPDATE/DELETE statements, by table, with how many times each ran.
    pub writes: Vec<(TableWrite, u32)>,
    /// The fingerprint of its (first) statement's shape (see `shape`), when its text was
    /// seen: what N+1 detection counts.
    pub shape: Option<u64>,
    /// Its normalised text, only with `Limits::keep_shapes`.
    pub shape_text: Option<Box<str>>,
}

impl Statement {
    /// From its first message sent to its ReadyForQuery read, in seconds.
    pub fn seconds(&self) -> f64 {
        self.end_ns.saturating_sub(self.start_ns) as f64 / 1e9
    }
}

/// What the parser reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A connection attempt reached the server: its startup message (the user and
    /// database it names), or an encryption request (then both are unknown).
    Attempt {
        user: Option<Box<str>>,
        database: Option<Box<str>>,
    },
    /// The attempt failed: an error during startup (authentication), or the connection
    /// ended before the server said it was ready.
    AttemptFailed {
        sqlstate: Option<SqlState>,
    },
    /// The connection switched to encryption: GSS (no longer parsed), or TLS (its
    /// plaintext, when the app's TLS library is probed, goes on from the startup message;
    /// the socket's bytes are no longer fed).
    Encrypted,
    /// A CancelRequest connection (not a session of the app).
    Cancel,
    Statement(Statement),
    Error(ParseError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParseError {
    /// A message header fell outside the capture: framing was lost.
    Desync,
    /// An unknown message type or an impossible length.
    BadMessage,
    /// More units in flight than `max_pending`: the oldest was dropped.
    PendingOverflow,
    /// More prepared statements than `max_prepared`: the remembered ones were dropped.
    PreparedOverflow,
    /// A ReadyForQuery with no unit waiting for it.
    UnexpectedReady,
}

impl ParseError {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Desync => "desync",
            Self::BadMessage => "bad_message",
            Self::PendingOverflow => "pending_overflow",
            Self::PreparedOverflow => "prepared_overflow",
            Self::UnexpectedReady => "unexpected_ready",
        }
    }
}

/// Whether a client's first write opens a PostgreSQL connection: a StartupMessage
/// (protocol 3.x), an SSLRequest, a GSSENCRequest or a CancelRequest.
pub fn is_startup(first: &[u8]) -> bool {
    let Some((len, code)) = startup_header(first) else { return false };
    match code {
        SSL_REQUEST | GSSENC_REQUEST => len == 8,
        CANCEL_REQUEST => len == 16,
        c if c >> 16 == 3 => {
            // Parameters follow: "user" is required by the protocol.
            (9..=10_000).contains(&len) && contains(&first[8..first.len().min(len as usize)], b"user\0")
        }
        _ => false,
    }
}

fn startup_header(b: &[u8]) -> Option<(u32, u32)> {
    let len = u32::from_be_bytes(b.get(..4)?.try_into().ok()?);
    let code = u32::from_be_bytes(b.get(4..8)?.try_into().ok()?);
    Some((len, code))
}

/// Whether a write, met in the middle of a connection, is whole frontend messages (a
/// connection opened before the observer started). Callers also check the peer is a
/// database the app uses: this alone is a plausibility test.
pub fn looks_like_frontend(first: &[u8], total_len: u64) -> bool {
    first.first().is_some_and(|t| b"QPBS".contains(t)) && plausible(first, total_len, FRONTEND_TAGS)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Walks whole messages from the start of a syscall's bytes: every captured header must
/// have a known type and a sane length, and a Query must end with its NUL.
fn plausible(b: &[u8], total: u64, tags: &[u8]) -> bool {
    let mut i = 0usize;
    let mut seen = 0;
    while (i as u64) < total {
        let Some(h) = b.get(i..i + 5) else {
            // The rest was not captured (or a header continues in the next syscall).
            return seen > 0;
        };
        let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
        if !tags.contains(&h[0]) || !(4..=MAX_MESSAGE).contains(&len) {
            return false;
        }
        if h[0] == b'Q' && b.get(i + len as usize).is_some_and(|&c| c != 0) {
            return false;
        }
        seen += 1;
        i += 1 + len as usize;
    }
    seen > 0 && i as u64 == total
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The next frontend message is a startup-type one (no type byte).
    Start,
    /// An SSLRequest / GSSENCRequest awaits its one-byte answer.
    Ssl,
    Gss,
    /// The startup message was sent; authentication until ReadyForQuery.
    Auth,
    Ready,
    /// Encrypted, a cancel request, or ended: nothing more to parse.
    Done,
}

/// A message being read.
#[derive(Debug)]
struct Msg {
    tag: u8,
    /// The length field as sent.
    len: u32,
    /// The startup code (startup-type messages only).
    code: u32,
    remaining: u64,
    keep: Vec<u8>,
    keep_max: usize,
}

/// One direction's framing.
#[derive(Debug)]
struct Framer {
    hdr: [u8; 8],
    hdr_len: usize,
    msg: Option<Msg>,
    synced: bool,
}

impl Framer {
    fn new(synced: bool) -> Self {
        Self { hdr: [0; 8], hdr_len: 0, msg: None, synced }
    }

    fn reset(&mut self, synced: bool) {
        *self = Self::new(synced);
    }
}

/// A unit sent and not yet answered.
#[derive(Debug, Clone)]
struct Unit {
    start_ns: u64,
    executes: u32,
    many: bool,
    /// Pushed on an assumption: the rest of a write that lost its framing was taken for
    /// one Execute and a Sync (libpq's shape for a statement).
    blind: bool,
    /// Reads seen when it was pushed.
    pushed_at_recv: u64,
    failure: Option<Failure>,
    writes: Vec<(TableWrite, u32)>,
    shape: Option<Shape>,
}

/// A statement's fingerprint, and its normalised text when kept.
type Shape = (u64, Option<Box<str>>);

/// Distinct tables remembered per unit.
const MAX_WRITES: usize = 16;

impl Unit {
    fn new(start_ns: u64) -> Self {
        Self {
            start_ns,
            executes: 0,
            many: false,
            blind: false,
            pushed_at_recv: 0,
            failure: None,
            writes: Vec::new(),
            shape: None,
        }
    }

    fn count(&mut self, kind: &Kind, shape: Option<Shape>) {
        if !matches!(kind, Kind::TxControl | Kind::ServerCursor) && self.shape.is_none() {
            self.shape = shape;
        }
        match kind {
            Kind::TxControl | Kind::ServerCursor => {}
            Kind::Other => self.executes += 1,
            Kind::Write(w) => {
                self.executes += 1;
                if let Some(e) = self.writes.iter_mut().find(|(x, _)| x == w) {
                    e.1 += 1;
                } else if self.writes.len() < MAX_WRITES {
                    self.writes.push((w.clone(), 1));
                }
            }
        }
    }
}

/// The parser of one client connection.
#[derive(Debug)]
pub struct PgParser {
    limits: Limits,
    phase: Phase,
    /// A startup-type message was sent.
    began: bool,
    attempted: bool,
    /// The server accepted TLS: what follows comes as the TLS library's plaintext.
    tls: bool,
    front: Framer,
    back: Framer,
    pending: VecDeque<Unit>,
    /// Extended-protocol messages since the last Sync.
    batch: Option<Unit>,
    /// Prepared statement name -> what it is and its shape ("" is the unnamed statement).
    statements: HashMap<Box<[u8]>, (Kind, Shape)>,
    /// Where statement shapes are normalised (reused).
    shape_scratch: Vec<u8>,
    /// Portal -> the statement bound to it.
    portals: HashMap<Box<[u8]>, Box<[u8]>>,
    /// Writes seen, to tell a Sync sent on its own (a pipeline) from one sent with its
    /// Execute.
    sends: u64,
    recvs: u64,
    last_execute_send: u64,
    last_parse_send: u64,
    /// The backend lost framing and waits for the answer to the next unit sent.
    back_armed: bool,
    /// Units whose answers were being read when the backend lost framing: a client that
    /// is not pipelining has read their ReadyForQuery by the time it sends again, so
    /// they complete then, at the last read before that send.
    limbo: Vec<Unit>,
    /// When the last read of the connection returned.
    last_recv_ns: u64,
    last_ns: u64,
}

impl PgParser {
    /// A connection seen from its first byte.
    pub fn new(limits: Limits) -> Self {
        Self::with_phase(limits, Phase::Start, true)
    }

    /// A connection met in the middle (it was open before tracing started): statements
    /// are parsed from the next whole message on.
    pub fn mid_stream(limits: Limits) -> Self {
        Self::with_phase(limits, Phase::Ready, false)
    }

    fn with_phase(limits: Limits, phase: Phase, synced: bool) -> Self {
        Self {
            limits,
            phase,
            began: false,
            attempted: false,
            tls: false,
            front: Framer::new(synced),
            back: Framer::new(synced),
            pending: VecDeque::new(),
            batch: None,
            statements: HashMap::new(),
            shape_scratch: Vec::new(),
            portals: HashMap::new(),
            sends: 0,
            recvs: 0,
            last_execute_send: 0,
            last_parse_send: 0,
            back_armed: false,
            limbo: Vec::new(),
            last_recv_ns: 0,
            last_ns: 0,
        }
    }

    /// Units sent and not yet answered (bounded by `max_pending`).
    pub fn pending(&self) -> usize {
        self.pending.len() + self.limbo.len()
    }

    /// Prepared statements and portals remembered (each bounded by `max_prepared`).
    pub fn remembered(&self) -> (usize, usize) {
        (self.statements.len(), self.portals.len())
    }

    /// Records of this connection were lost (the stream stage saw a gap): what was in
    /// flight cannot be completed and framing resynchronises. Returns whether the
    /// parser was still following the connection (the loss is counted then).
    pub fn lost(&mut self) -> bool {
        if self.phase == Phase::Done {
            return false;
        }
        self.front.reset(false);
        self.back.reset(false);
        self.move_pending_to_limbo();
        self.batch = None;
        self.back_armed = false;
        if self.phase != Phase::Ready {
            // The startup's outcome is unknown; go on as if it succeeded.
            self.phase = Phase::Ready;
        }
        true
    }

    /// The connection went TLS but its plaintext is not seen (no probed library, or the
    /// handshake ran before the probes were set): it was an attempt all the same.
    pub fn opaque(&mut self, out: &mut Vec<Event>) {
        if self.tls && self.phase == Phase::Start {
            self.attempt(None, None, out);
            self.phase = Phase::Done;
        }
    }

    /// The TLS plaintext of a connection given up as [`opaque`](Self::opaque) appears
    /// (the probes were set meanwhile): statements are parsed from the next whole
    /// message on, as on a connection met in the middle.
    pub fn decrypted(&mut self) {
        if self.tls && self.phase == Phase::Done {
            self.phase = Phase::Ready;
            self.front.reset(false);
            self.back.reset(false);
        }
    }

    /// Waits for TLS plaintext: the socket's bytes are ciphertext from now on.
    pub fn awaits_tls(&self) -> bool {
        self.tls
    }

    /// The connection closed: an unfinished startup failed, and statements still
    /// waiting for their answer failed with it.
    pub fn close(&mut self, out: &mut Vec<Event>) {
        match self.phase {
            Phase::Ssl | Phase::Gss | Phase::Auth | Phase::Start if self.began => {
                self.attempt(None, None, out);
                out.push(Event::AttemptFailed { sqlstate: None });
            }
            Phase::Ready => {
                self.flush_limbo(out);
                for mut u in std::mem::take(&mut self.pending) {
                    u.failure.get_or_insert(Failure::ConnectionLost);
                    self.complete(u, self.last_ns, out);
                }
            }
            _ => {}
        }
        self.phase = Phase::Done;
    }

    pub fn feed(&mut self, c: &Chunk<'_>, out: &mut Vec<Event>) {
        // A syscall that moved no bytes says nothing (not even who spoke first). The
        // kernel side records none; a split of the same stream never has one.
        if c.total_len == 0 {
            return;
        }
        if self.phase == Phase::Done {
            return;
        }
        // TLS records where the plaintext startup was expected: the handshake, fed
        // because nobody decrypts this connection.
        if self.tls
            && self.phase == Phase::Start
            && c.dir == Direction::Send
            && c.bytes.first() == Some(&0x16)
        {
            self.opaque(out);
            return;
        }
        self.last_ns = self.last_ns.max(c.exit_ns);
        match c.dir {
            Direction::Send => self.sends += 1,
            Direction::Recv => {
                self.recvs += 1;
                self.last_recv_ns = self.last_recv_ns.max(c.exit_ns);
            }
        }
        let mut cur = Cursor::new(c);
        while cur.remaining() > 0 && self.phase != Phase::Done {
            let synced = self.framer(c.dir).synced;
            if !synced {
                if !(cur.at_start() && self.can_resync(c.dir, cur.visible(), c.total_len)) {
                    if c.dir == Direction::Recv && self.phase == Phase::Ready {
                        // Answers we cannot frame: whatever waits is being answered.
                        self.move_pending_to_limbo();
                    }
                    return;
                }
                self.framer(c.dir).reset(true);
            }
            if self.framer(c.dir).msg.is_none() {
                if c.dir == Direction::Recv && matches!(self.phase, Phase::Ssl | Phase::Gss) {
                    let Some(&b) = cur.visible().first() else {
                        self.desync(c.dir, c.enter_ns, out);
                        return;
                    };
                    cur.advance(1);
                    self.encryption_answer(b, out);
                    continue;
                }
                if !self.read_header(c, &mut cur, out) {
                    return;
                }
            }
            self.read_body(c, &mut cur, out);
        }
    }

    fn framer(&mut self, dir: Direction) -> &mut Framer {
        match dir {
            Direction::Send => &mut self.front,
            Direction::Recv => &mut self.back,
        }
    }

    fn can_resync(&self, dir: Direction, b: &[u8], total: u64) -> bool {
        match (dir, self.phase) {
            (Direction::Send, Phase::Ready | Phase::Auth) => plausible(b, total, FRONTEND_TAGS),
            (Direction::Recv, Phase::Ready) => self.back_armed && plausible(b, total, BACKEND_TAGS),
            _ => false,
        }
    }

    fn desync(&mut self, dir: Direction, ts: u64, out: &mut Vec<Event>) {
        out.push(Event::Error(ParseError::Desync));
        self.framer(dir).reset(false);
        match dir {
            // The answers in flight can no longer be framed.
            Direction::Recv => self.move_pending_to_limbo(),
            // A write of several messages longer than the capture: libpq writes a
            // statement's Parse/Bind/Describe/Execute/Sync at once. Take the rest for an
            // Execute and a Sync; if the next write turns out to continue a pipeline,
            // the unit is reopened (see `ready_frontend`).
            Direction::Send if self.phase == Phase::Ready => {
                let mut u = self.batch.take().unwrap_or_else(|| Unit::new(ts));
                if self.last_execute_send != self.sends {
                    // The unnamed statement, if this write parsed it, is what runs.
                    let (kind, shape) = match self.last_parse_send == self.sends {
                        true => self
                            .statements
                            .get(&b""[..])
                            .map_or((Kind::Other, None), |(k, h)| (k.clone(), Some(h.clone()))),
                        false => (Kind::Other, None),
                    };
                    u.count(&kind, shape);
                    self.last_execute_send = self.sends;
                }
                u.blind = true;
                self.push(u, out);
            }
            Direction::Send => {}
        }
    }

    /// Reads (the rest of) a header; false when the chunk ended or framing was lost.
    fn read_header(&mut self, c: &Chunk<'_>, cur: &mut Cursor<'_>, out: &mut Vec<Event>) -> bool {
        let dir = c.dir;
        let size = if dir == Direction::Send && self.phase == Phase::Start { 8 } else { 5 };
        {
            let f = self.framer(dir);
            while f.hdr_len < size && cur.remaining() > 0 {
                let vis = cur.visible();
                if vis.is_empty() {
                    break;
                }
                let n = (size - f.hdr_len).min(vis.len());
                f.hdr[f.hdr_len..f.hdr_len + n].copy_from_slice(&vis[..n]);
                f.hdr_len += n;
                cur.advance(n as u64);
            }
        }
        let (hdr, hdr_len) = {
            let f = self.framer(dir);
            (f.hdr, f.hdr_len)
        };
        if hdr_len < size {
            if cur.in_hole() {
                self.desync(dir, c.enter_ns, out);
            }
            return false;
        }
        let (tag, code, len, body) = if size == 8 {
            let len = u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
            let code = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
            (0u8, code, len, len.checked_sub(8))
        } else {
            let len = u32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]);
            (hdr[0], 0, len, len.checked_sub(4))
        };
        let tags = if dir == Direction::Send { FRONTEND_TAGS } else { BACKEND_TAGS };
        let Some(body) = body.filter(|_| len <= MAX_MESSAGE && (size == 8 || tags.contains(&tag))) else {
            out.push(Event::Error(ParseError::BadMessage));
            self.framer(dir).reset(false);
            if dir == Direction::Recv && self.phase == Phase::Ready {
                // libpq gives the statement in flight up: "lost synchronization".
                if let Some(u) = self.pending.front_mut() {
                    u.failure.get_or_insert(Failure::Desync);
                }
                // As after any desync of the answers: what waits is being answered, and
                // completes before the client's next write (never with its answer).
                self.move_pending_to_limbo();
            }
            if self.phase != Phase::Ready {
                // An answer to the startup that cannot be framed: the client gives the
                // attempt up ("expected authentication request", "invalid message length").
                if dir == Direction::Recv && self.began {
                    self.attempt(None, None, out);
                    out.push(Event::AttemptFailed { sqlstate: None });
                }
                // Not PostgreSQL after all (or garbage in the startup): stop.
                self.phase = Phase::Done;
            }
            return false;
        };
        let keep_max = keep_for(dir, tag, size == 8);
        let f = self.framer(dir);
        f.hdr_len = 0;
        f.msg = Some(Msg { tag, len, code, remaining: u64::from(body), keep: Vec::new(), keep_max });
        true
    }

    fn read_body(&mut self, c: &Chunk<'_>, cur: &mut Cursor<'_>, out: &mut Vec<Event>) {
        let Some(m) = self.framer(c.dir).msg.as_mut() else { return };
        let take = m.remaining.min(cur.remaining());
        let vis = cur.visible();
        let vis_take = (vis.len() as u64).min(take) as usize;
        let room = m.keep_max.saturating_sub(m.keep.len());
        if room > 0 {
            m.keep.extend_from_slice(&vis[..vis_take.min(room)]);
        }
        cur.advance(take);
        m.remaining -= take;
        if m.remaining == 0 {
            let msg = self.framer(c.dir).msg.take();
            if let Some(msg) = msg {
                match c.dir {
                    Direction::Send => self.frontend(c, &msg, out),
                    Direction::Recv => self.backend(c, &msg, out),
                }
            }
        }
    }

    fn attempt(&mut self, user: Option<Box<str>>, database: Option<Box<str>>, out: &mut Vec<Event>) {
        if !self.attempted {
            self.attempted = true;
            out.push(Event::Attempt { user, database });
        }
    }

    fn encryption_answer(&mut self, b: u8, out: &mut Vec<Event>) {
        match (self.phase, b) {
            (Phase::Ssl, b'S') => {
                // The startup message comes next, encrypted: it is the attempt (and names
                // the user and database) once its plaintext is fed.
                out.push(Event::Encrypted);
                self.tls = true;
                self.phase = Phase::Start;
                self.front.reset(true);
                self.back.reset(true);
            }
            (Phase::Gss, b'G') => {
                self.attempt(None, None, out);
                out.push(Event::Encrypted);
                self.phase = Phase::Done;
            }
            (_, b'N') => self.phase = Phase::Start,
            (_, b'E') => {
                // An old server answering with an error message: read it as one.
                self.phase = Phase::Auth;
                self.back.hdr[0] = b'E';
                self.back.hdr_len = 1;
            }
            _ => {
                out.push(Event::Error(ParseError::BadMessage));
                // libpq: "received invalid response to SSL negotiation": the attempt failed.
                self.attempt(None, None, out);
                out.push(Event::AttemptFailed { sqlstate: None });
                self.phase = Phase::Done;
            }
        }
    }

    fn frontend(&mut self, c: &Chunk<'_>, m: &Msg, out: &mut Vec<Event>) {
        match self.phase {
            Phase::Start => {
                self.began = true;
                match m.code {
                    SSL_REQUEST => self.phase = Phase::Ssl,
                    GSSENC_REQUEST => self.phase = Phase::Gss,
                    CANCEL_REQUEST => {
                        out.push(Event::Cancel);
                        self.phase = Phase::Done;
                    }
                    code if code >> 16 == 3 => {
                        let (user, database) = startup_params(&m.keep);
                        self.attempt(user, database, out);
                        self.phase = Phase::Auth;
                    }
                    _ => {
                        out.push(Event::Error(ParseError::BadMessage));
                        self.phase = Phase::Done;
                    }
                }
            }
            // Authentication answers whose ReadyForQuery was not seen: the client
            // only sends statements once it was.
            Phase::Auth if m.tag != b'p' => {
                self.phase = Phase::Ready;
                self.ready_frontend(c, m, out);
            }
            Phase::Ready => self.ready_frontend(c, m, out),
            _ => {} // password messages during authentication
        }
    }

    fn ready_frontend(&mut self, c: &Chunk<'_>, m: &Msg, out: &mut Vec<Event>) {
        let ts = c.enter_ns;
        if !self.limbo.is_empty() && !matches!(m.tag, b'd' | b'c' | b'f') {
            self.flush_limbo(out);
        }
        // A blind unit followed, with no read in between, by more of a batch was a
        // pipeline's write without a Sync: it goes on.
        if self.batch.is_none()
            && matches!(m.tag, b'P' | b'B' | b'D' | b'E' | b'C' | b'S')
            && self.pending.back().is_some_and(|u| u.blind && u.pushed_at_recv == self.recvs)
        {
            self.batch = self.pending.pop_back().map(|mut u| {
                u.blind = false;
                u
            });
        }
        match m.tag {
            b'Q' => {
                let mut u = self.batch.take().unwrap_or_else(|| Unit::new(ts));
                let mut text = cstr(&m.keep).0;
                // psycopg2 declares a named cursor through the cursor class
                // django-prometheus wraps, in a simple Query: its execute(), counted as the
                // query it runs. (psycopg 3's ServerCursor, which django-prometheus does
                // not wrap, declares through the extended protocol.)
                if let Some(query) = sql::declared_query(text) {
                    text = query;
                }
                let shape = self.shape_of(text);
                u.count(&sql::classify(text), Some(shape));
                self.push(u, out);
            }
            b'P' => {
                let (name, rest) = cstr(&m.keep);
                let text = cstr(rest).0;
                let kind = sql::classify(text);
                let shape = self.shape_of(text);
                self.remember_statement(name, kind, shape, out);
                self.last_parse_send = self.sends;
                self.batch.get_or_insert_with(|| Unit::new(ts));
            }
            b'B' => {
                let (portal, rest) = cstr(&m.keep);
                let (stmt, _) = cstr(rest);
                if self.portals.len() >= self.limits.max_prepared && !self.portals.contains_key(portal) {
                    self.portals.clear();
                }
                self.portals.insert(portal.into(), stmt.into());
                self.batch.get_or_insert_with(|| Unit::new(ts));
            }
            b'E' => {
                let (portal, _) = cstr(&m.keep);
                let (kind, shape) = self
                    .portals
                    .get(portal)
                    .and_then(|s| self.statements.get(s))
                    .map_or((Kind::Other, None), |(k, h)| (k.clone(), Some(h.clone())));
                self.batch.get_or_insert_with(|| Unit::new(ts)).count(&kind, shape);
                self.last_execute_send = self.sends;
            }
            b'D' => {
                self.batch.get_or_insert_with(|| Unit::new(ts));
            }
            b'C' => {
                let (name, _) = cstr(m.keep.get(1..).unwrap_or_default());
                match m.keep.first() {
                    Some(b'S') => {
                        self.statements.remove(name);
                    }
                    Some(b'P') => {
                        self.portals.remove(name);
                    }
                    _ => {}
                }
                self.batch.get_or_insert_with(|| Unit::new(ts));
            }
            b'S' => {
                let mut u = self.batch.take().unwrap_or_else(|| Unit::new(ts));
                u.many = u.executes > 1 || (u.executes == 1 && self.last_execute_send != self.sends);
                self.push(u, out);
            }
            // A function call is answered with a ReadyForQuery but is no execute().
            b'F' => self.push(Unit::new(ts), out),
            _ => {} // Flush, Terminate, copy data
        }
    }

    /// A statement's fingerprint, and its normalised text when asked to keep it.
    fn shape_of(&mut self, sql: &[u8]) -> Shape {
        let h = shape::fingerprint_of(sql, &mut self.shape_scratch);
        let text = self.limits.keep_shapes.then(|| String::from_utf8_lossy(&self.shape_scratch).into());
        (h, text)
    }

    fn remember_statement(&mut self, name: &[u8], kind: Kind, shape: Shape, out: &mut Vec<Event>) {
        if self.statements.len() >= self.limits.max_prepared && !self.statements.contains_key(name) {
            out.push(Event::Error(ParseError::PreparedOverflow));
            self.statements.clear();
        }
        self.statements.insert(name.into(), (kind, shape));
    }

    fn move_pending_to_limbo(&mut self) {
        self.back_armed = false;
        let room = self.limits.max_pending.saturating_sub(self.limbo.len());
        let n = self.pending.len().min(room);
        self.limbo.extend(self.pending.drain(..n));
        self.pending.clear();
    }

    /// The client sends again (or closes): units in limbo were answered by now.
    fn flush_limbo(&mut self, out: &mut Vec<Event>) {
        for u in std::mem::take(&mut self.limbo) {
            self.complete(u, self.last_recv_ns, out);
        }
    }

    fn push(&mut self, mut u: Unit, out: &mut Vec<Event>) {
        u.pushed_at_recv = self.recvs;
        if self.pending.len() >= self.limits.max_pending {
            self.pending.pop_front();
            out.push(Event::Error(ParseError::PendingOverflow));
        }
        self.pending.push_back(u);
        if !self.back.synced {
            self.back_armed = true;
        }
    }

    fn complete(&mut self, u: Unit, end_ns: u64, out: &mut Vec<Event>) {
        if u.executes == 0 {
            return;
        }
        out.push(Event::Statement(Statement {
            start_ns: u.start_ns,
            end_ns: end_ns.max(u.start_ns),
            executes: u.executes,
            many: u.many,
            failure: u.failure,
            writes: u.writes,
            shape: u.shape.as_ref().map(|s| s.0),
            shape_text: u.shape.and_then(|s| s.1),
        }));
    }

    fn backend(&mut self, c: &Chunk<'_>, m: &Msg, out: &mut Vec<Event>) {
        match (self.phase, m.tag) {
            (Phase::Auth, b'E') => {
                self.attempt(None, None, out);
                out.push(Event::AttemptFailed { sqlstate: error_sqlstate(&m.keep) });
                self.phase = Phase::Done;
            }
            // A ReadyForQuery is 5 bytes: libpq reads its status byte past a shorter one
            // and waits on; the statement is not answered.
            (_, b'Z') if m.len != 5 => out.push(Event::Error(ParseError::BadMessage)),
            (Phase::Auth, b'Z') => self.phase = Phase::Ready,
            (Phase::Ready, b'Z') => match self.pending.pop_front() {
                Some(u) => self.complete(u, c.exit_ns, out),
                None => out.push(Event::Error(ParseError::UnexpectedReady)),
            },
            (Phase::Ready, b'E') => {
                if let Some(u) = self.pending.front_mut()
                    && u.failure.is_none()
                {
                    u.failure = Some(error_sqlstate(&m.keep).map_or(Failure::Unknown, Failure::Server));
                }
            }
            _ => {} // rows, completions, notices, parameter status...
        }
    }
}

/// How many body bytes of a message are worth keeping.
fn keep_for(dir: Direction, tag: u8, startup: bool) -> usize {
    match (dir, tag) {
        (Direction::Send, _) if startup => STARTUP_KEEP,
        (Direction::Send, b'Q') => SQL_HEAD,
        // The statement name (up to 64 bytes) comes before the text.
        (Direction::Send, b'P') => SQL_HEAD + 64,
        (Direction::Send, b'B' | b'E' | b'C') => NAMES_KEEP,
        (Direction::Recv, b'E') => ERROR_KEEP,
        _ => 0,
    }
}

/// A NUL-terminated string and what follows it (all of it when unterminated).
fn cstr(b: &[u8]) -> (&[u8], &[u8]) {
    match b.iter().position(|&c| c == 0) {
        Some(i) => (&b[..i], &b[i + 1..]),
        None => (b, &[]),
    }
}

/// `user` and `database` of a startup message's parameters (libpq's default database is
/// the user name).
fn startup_params(mut b: &[u8]) -> (Option<Box<str>>, Option<Box<str>>) {
    let (mut user, mut database) = (None, None);
    while !b.is_empty() && b[0] != 0 {
        let (k, rest) = cstr(b);
        let (v, rest) = cstr(rest);
        let v = String::from_utf8_lossy(v).into_owned().into_boxed_str();
        match k {
            b"user" => user = Some(v),
            b"database" => database = Some(v),
            _ => {}
        }
        b = rest;
    }
    let database = database.or_else(|| user.clone());
    (user, database)
}

/// The SQLSTATE (field 'C') of an ErrorResponse body.
fn error_sqlstate(mut b: &[u8]) -> Option<SqlState> {
    while let Some((&field, rest)) = b.split_first() {
        if field == 0 {
            return None;
        }
        let (v, rest) = cstr(rest);
        if field == b'C' {
            return SqlState::parse(v);
        }
        b = rest;
    }
    None
}

#[cfg(test)]
mod tests;
