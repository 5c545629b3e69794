//! HTTP/1.0 and 1.1, server side: the requests a traced process reads and the responses
//! it writes on one connection, paired in order into [`Exchange`]s.
//!
//! Heads are parsed with `httparse`; bodies are framed by Content-Length, chunked coding
//! or connection close, and stepped over by length, so a body larger than the capture
//! costs nothing. Keep-alive and pipelining pair responses with requests first-in
//! first-out; 1xx responses (`Expect: 100-continue`) are skipped; HEAD, 204 and 304
//! responses have no body. When bytes are missing (a lost record, a head in a hole), the
//! state is dropped, counted, and parsing resumes at the next syscall that provably
//! starts a message.

use std::collections::VecDeque;

use self::{
    chunked::{Chunked, ChunkedStep, chunk_line_start, feed_chunked},
    head::{
        HeadResult, ResponseHead, Start, complete_lines, extend_head, parse_request, parse_response,
        parse_truncated, request_start, response_start,
    },
};
use super::{Chunk, Cursor};
use crate::events::Direction;

mod chunked;
mod head;

/// Bounds of one connection's parser (each has a flag in `observer run`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest request or response head kept while it is incomplete.
    pub max_head_bytes: usize,
    /// Requests waiting for their response (pipelining).
    pub max_pending: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_head_bytes: 32 * 1024, max_pending: 64 }
    }
}

/// Longest method kept; longer tokens make the head invalid.
pub const MAX_METHOD: usize = 32;
/// Longest request path kept (the rest is cut; Django would see it whole).
pub const MAX_PATH: usize = 4096;
/// Longest value kept for a charset or a Location header.
pub const MAX_VALUE: usize = 2048;
/// Headers parsed per head (gunicorn's default limit_request_fields is 100).
const MAX_HEADERS: usize = 128;
/// Longest chunk-size line (with extensions) accepted.
const MAX_CHUNK_LINE: usize = 1024;

/// A request as read by the server.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The method token as sent (`GET`, `PROPFIND`, ...).
    pub method: String,
    /// The path of the request target, query and fragment removed, still percent-encoded.
    pub path: String,
    /// The Content-Length header's value, when present and valid.
    pub content_length: Option<u64>,
    /// The Content-Length as django-prometheus observes it (digits beyond u64 too, 0
    /// without a number).
    pub declared_length: f64,
    /// `X-Requested-With: XMLHttpRequest`.
    pub ajax: bool,
    /// Proxy headers kept for deciding later whether Django considers the request secure
    /// (its SECURE_PROXY_SSL_HEADER): names lower-case, values bounded.
    pub proxy_headers: Vec<(String, String)>,
    /// When the server read the request's first byte (exit of that read).
    pub start_ns: u64,
}

/// A response as written by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// `charset` parameter of Content-Type, when present.
    pub charset: Option<String>,
    /// The Content-Length header's value, when present.
    pub content_length: Option<u64>,
    /// Transfer-Encoding: chunked.
    pub chunked: bool,
    /// Body delimited by closing the connection.
    pub close_delimited: bool,
    /// Body bytes written (by length: the parts not captured count too).
    pub body_bytes: u64,
    /// When the server wrote the response's last byte (exit of that write).
    pub end_ns: u64,
}

/// A request and its response.
#[derive(Debug, Clone, PartialEq)]
pub struct Exchange {
    pub request: Request,
    pub response: Response,
}

impl Exchange {
    /// First request byte read to last response byte written, in seconds.
    pub fn latency_s(&self) -> f64 {
        self.response.end_ns.saturating_sub(self.request.start_ns) as f64 / 1e9
    }
}

/// Why bytes could not be followed (each is an `observer_parse_errors_total` reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParseError {
    /// A request or response head longer than `max_head_bytes`.
    HeadTooLarge,
    /// Bytes where a head should start are not a valid head.
    InvalidHead,
    /// A head fell (partly) outside the capture.
    HeadNotCaptured,
    /// A chunk-size line fell outside the capture or was invalid.
    ChunkedLost,
    /// A response with no request waiting for it.
    UnpairedResponse,
    /// More pipelined requests than `max_pending`: the oldest was dropped.
    PendingOverflow,
    /// The connection closed with requests still waiting for a response.
    Unanswered,
}

impl ParseError {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HeadTooLarge => "head_too_large",
            Self::InvalidHead => "invalid_head",
            Self::HeadNotCaptured => "head_not_captured",
            Self::ChunkedLost => "chunked_lost",
            Self::UnpairedResponse => "unpaired_response",
            Self::PendingOverflow => "pending_overflow",
            Self::Unanswered => "unanswered",
        }
    }
}

/// What a chunk produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Exchange(Exchange),
    Error(ParseError),
}

/// What the connection turned out to carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No bytes yet.
    Detecting,
    Http,
    /// Not HTTP/1 (TLS, HTTP/2, another protocol), or switched protocols: ignored.
    Other,
}

/// Headers a proxy uses to say the client spoke HTTPS: what Django's
/// SECURE_PROXY_SSL_HEADER names in practice. Kept per request so that the decision can
/// wait for the app's settings.
pub const PROXY_HEADERS: [&str; 7] = [
    "x-forwarded-proto",
    "x-forwarded-protocol",
    "x-forwarded-scheme",
    "x-forwarded-ssl",
    "x-scheme",
    "x-url-scheme",
    "front-end-https",
];
/// Longest proxy header value kept.
const MAX_PROXY_VALUE: usize = 64;

/// How an HTTP/2 connection starts (prior knowledge): not HTTP/1.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2";

/// Request-side configuration shared by a target's connections.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// Another header to keep (the app's SECURE_PROXY_SSL_HEADER when it is not one of
    /// [`PROXY_HEADERS`]), lower-case.
    pub extra_header: Option<String>,
}

#[derive(Debug)]
enum Framing {
    /// Expecting a head.
    Head {
        buf: Vec<u8>,
    },
    /// Skipping `remaining` body bytes.
    Length {
        remaining: u64,
    },
    Chunked(Chunked),
    /// Response body until the connection closes.
    UntilClose,
    /// Lost: wait for a syscall that starts with a head.
    Resync,
}

/// The response being written.
#[derive(Debug)]
struct Current {
    response: Response,
    /// Paired with a request that is at the front of `pending` (not yet popped).
    paired: bool,
}

/// One connection's parser.
#[derive(Debug)]
pub struct Http1Parser {
    limits: Limits,
    config: Config,
    mode: Mode,
    recv: Framing,
    send: Framing,
    /// Start of the request whose head is being read.
    head_start_ns: Option<u64>,
    pending: VecDeque<Request>,
    current: Option<Current>,
    /// After lost records, until the next request: responses with no request are those
    /// of lost requests, already counted.
    drop_unpaired: bool,
}

impl Http1Parser {
    pub fn new(limits: Limits, config: Config) -> Self {
        Self {
            limits,
            config,
            mode: Mode::Detecting,
            recv: Framing::Head { buf: Vec::new() },
            send: Framing::Head { buf: Vec::new() },
            head_start_ns: None,
            pending: VecDeque::new(),
            current: None,
            drop_unpaired: false,
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Replaces the request-side configuration (once the app's settings are known).
    pub fn set_config(&mut self, config: Config) {
        self.config = config;
    }

    /// Requests waiting for a response.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Bytes held in buffers (for the memory bound).
    pub fn buffered(&self) -> usize {
        let f = |s: &Framing| match s {
            Framing::Head { buf } => buf.capacity(),
            Framing::Chunked(Chunked::Size { line } | Chunked::Trailer { line }) => line.capacity(),
            _ => 0,
        };
        f(&self.recv) + f(&self.send)
    }

    /// Feeds one syscall's bytes.
    pub fn feed(&mut self, chunk: &Chunk<'_>, out: &mut Vec<Event>) {
        // A syscall that moved no bytes says nothing (not even who spoke first). The
        // kernel side records none; a split of the same stream never has one.
        if chunk.total_len == 0 {
            return;
        }
        if self.mode == Mode::Other {
            return;
        }
        let mut cur = Cursor::new(chunk);
        match chunk.dir {
            Direction::Recv => self.feed_recv(&mut cur, chunk.exit_ns, out),
            Direction::Send => self.feed_send(&mut cur, chunk.exit_ns, out),
        }
    }

    /// Records of this connection were lost (the stream stage saw a gap): what was in
    /// flight cannot be completed and framing resynchronises. Returns whether the
    /// parser was still following the connection (the loss is counted then).
    pub fn lost(&mut self) -> bool {
        if self.mode != Mode::Http {
            return false;
        }
        // Responses to the requests lost with those records are expected, not errors.
        self.drop_unpaired = true;
        self.pending.clear();
        self.current = None;
        self.head_start_ns = None;
        self.recv = Framing::Resync;
        self.send = Framing::Resync;
        true
    }

    /// The connection closed at `ts_ns`: a close-delimited response ends here, requests
    /// still waiting never got an answer.
    pub fn close(&mut self, out: &mut Vec<Event>) {
        if matches!(self.send, Framing::UntilClose) {
            self.finish_response(out);
        }
        if !self.pending.is_empty() {
            out.push(Event::Error(ParseError::Unanswered));
            self.pending.clear();
        }
        self.current = None;
    }

    fn feed_recv(&mut self, cur: &mut Cursor<'_>, ts: u64, out: &mut Vec<Event>) {
        while cur.remaining() > 0 {
            match &mut self.recv {
                Framing::Head { buf } => {
                    if cur.in_hole() {
                        // The head continues where nothing was captured: keep what the
                        // request line and the visible headers say, and wait for the next
                        // read that starts a request (where this one ends is unknown).
                        let truncated = (!buf.is_empty())
                            .then(|| parse_truncated(buf, |b| parse_request(b, &self.config)));
                        self.recv = Framing::Resync;
                        if let Some(t) = truncated {
                            out.push(Event::Error(ParseError::HeadNotCaptured));
                            if let Some((mut req, _)) = t {
                                self.mode = Mode::Http;
                                req.start_ns = self.head_start_ns.unwrap_or(ts);
                                self.push_request(req, out);
                            }
                        }
                        self.head_start_ns = None;
                        continue;
                    }
                    let visible = cur.visible();
                    if buf.is_empty() {
                        match request_start(visible) {
                            Start::Yes => self.drop_unpaired = false,
                            Start::Maybe => {}
                            Start::No => {
                                if self.mode == Mode::Detecting {
                                    self.mode = Mode::Other;
                                    return;
                                }
                                out.push(Event::Error(ParseError::InvalidHead));
                                // This syscall's bytes are garbage: resync from the next one.
                                cur.advance(cur.remaining());
                                self.recv = Framing::Resync;
                                continue;
                            }
                        }
                    }
                    let old = extend_head(buf, visible, self.limits.max_head_bytes);
                    self.head_start_ns.get_or_insert(ts);
                    // What the connection carries is decided on the bytes buffered so far,
                    // never on where the first syscall happened to end.
                    if self.mode == Mode::Detecting {
                        if buf.starts_with(H2_PREFACE) {
                            self.mode = Mode::Other;
                            return;
                        }
                        if !H2_PREFACE.starts_with(buf) && request_start(buf) == Start::Yes {
                            self.mode = Mode::Http;
                        }
                    }
                    let parsed = match complete_lines(buf, old) {
                        Some(lines) => parse_request(lines, &self.config),
                        None => HeadResult::Partial,
                    };
                    match parsed {
                        HeadResult::Complete((req, framing), n) => {
                            cur.advance(n.saturating_sub(old) as u64);
                            self.mode = Mode::Http;
                            let mut req = req;
                            req.start_ns = self.head_start_ns.take().unwrap_or(ts);
                            self.recv = framing;
                            self.push_request(req, out);
                        }
                        HeadResult::Partial => {
                            let too_large = buf.len() >= self.limits.max_head_bytes;
                            let not_http = self.mode == Mode::Detecting && request_start(buf) == Start::No;
                            cur.advance(visible.len() as u64);
                            if not_http {
                                self.mode = Mode::Other;
                                return;
                            }
                            if too_large {
                                out.push(Event::Error(ParseError::HeadTooLarge));
                                self.recv = Framing::Resync;
                                self.head_start_ns = None;
                            }
                        }
                        HeadResult::Invalid => {
                            if self.mode == Mode::Detecting {
                                self.mode = Mode::Other;
                                return;
                            }
                            out.push(Event::Error(ParseError::InvalidHead));
                            // This syscall's bytes are garbage: resync from the next one.
                            cur.advance(cur.remaining());
                            self.recv = Framing::Resync;
                            self.head_start_ns = None;
                        }
                    }
                }
                Framing::Length { remaining } => {
                    let n = (*remaining).min(cur.remaining());
                    cur.advance(n);
                    *remaining -= n;
                    if *remaining == 0 {
                        self.recv = Framing::Head { buf: Vec::new() };
                    }
                }
                Framing::Chunked(c) => match feed_chunked(c, cur) {
                    ChunkedStep::Done => self.recv = Framing::Head { buf: Vec::new() },
                    ChunkedStep::More => {}
                    ChunkedStep::Lost => {
                        out.push(Event::Error(ParseError::ChunkedLost));
                        self.recv = Framing::Resync;
                    }
                },
                Framing::UntilClose => cur.advance(cur.remaining()),
                Framing::Resync => {
                    if cur.at_start() && request_start(cur.visible()) == Start::Yes {
                        self.recv = Framing::Head { buf: Vec::new() };
                    } else {
                        cur.advance(cur.remaining());
                    }
                }
            }
        }
    }

    fn push_request(&mut self, req: Request, out: &mut Vec<Event>) {
        if self.pending.len() >= self.limits.max_pending {
            self.pending.pop_front();
            out.push(Event::Error(ParseError::PendingOverflow));
        }
        self.pending.push_back(req);
    }

    fn feed_send(&mut self, cur: &mut Cursor<'_>, ts: u64, out: &mut Vec<Event>) {
        if self.mode == Mode::Detecting {
            // The server spoke first: not HTTP.
            self.mode = Mode::Other;
            return;
        }
        while cur.remaining() > 0 {
            match &mut self.send {
                Framing::Head { buf } => {
                    if cur.in_hole() {
                        // A response head longer than the capture: keep the status and the
                        // visible headers; servers write the head apart from the body, so
                        // assume it ends with this write.
                        let truncated = (!buf.is_empty()).then(|| parse_truncated(buf, parse_response));
                        self.send = Framing::Resync;
                        if let Some(t) = truncated {
                            out.push(Event::Error(ParseError::HeadNotCaptured));
                            cur.advance(cur.remaining());
                            if let Some(head) = t {
                                self.start_response(head, ts, out);
                            }
                        }
                        continue;
                    }
                    let visible = cur.visible();
                    if buf.is_empty() && response_start(visible) == Start::No {
                        out.push(Event::Error(ParseError::InvalidHead));
                        // This syscall's bytes are garbage: resync from the next one.
                        cur.advance(cur.remaining());
                        self.send = Framing::Resync;
                        continue;
                    }
                    let old = extend_head(buf, visible, self.limits.max_head_bytes);
                    let parsed = complete_lines(buf, old).map_or(HeadResult::Partial, parse_response);
                    match parsed {
                        HeadResult::Complete(head, n) => {
                            cur.advance(n.saturating_sub(old) as u64);
                            let to_head = self.pending.front().is_some_and(|r| r.method == "HEAD");
                            self.start_response(head, ts, out);
                            // Some servers (uwsgi) write a body after a HEAD response head
                            // anyway: the rest of that write is not a new response.
                            if to_head && response_start(cur.visible()) == Start::No {
                                cur.advance(cur.remaining());
                            }
                        }
                        HeadResult::Partial => {
                            if buf.len() >= self.limits.max_head_bytes {
                                out.push(Event::Error(ParseError::HeadTooLarge));
                                self.send = Framing::Resync;
                            }
                            cur.advance(visible.len() as u64);
                        }
                        HeadResult::Invalid => {
                            out.push(Event::Error(ParseError::InvalidHead));
                            // This syscall's bytes are garbage: resync from the next one.
                            cur.advance(cur.remaining());
                            self.send = Framing::Resync;
                        }
                    }
                }
                Framing::Length { remaining } => {
                    let n = (*remaining).min(cur.remaining());
                    cur.advance(n);
                    *remaining -= n;
                    let done = *remaining == 0;
                    self.body_written(n, ts);
                    if done {
                        self.finish_response(out);
                    }
                }
                Framing::Chunked(c) => {
                    let before = cur.remaining();
                    let step = feed_chunked(c, cur);
                    self.body_written(before - cur.remaining(), ts);
                    match step {
                        ChunkedStep::Done => self.finish_response(out),
                        ChunkedStep::More => {}
                        ChunkedStep::Lost => {
                            // Writes of a chunked body usually carry whole chunks: the next
                            // write starts with a chunk-size line or the next response.
                            out.push(Event::Error(ParseError::ChunkedLost));
                            self.send = Framing::Resync;
                        }
                    }
                }
                Framing::UntilClose => {
                    let n = cur.remaining();
                    cur.advance(n);
                    self.body_written(n, ts);
                }
                Framing::Resync => {
                    if !cur.at_start() {
                        cur.advance(cur.remaining());
                        continue;
                    }
                    let v = cur.visible();
                    if response_start(v) == Start::Yes {
                        // A new response: whatever was being written ended before it.
                        if self.current.is_some() {
                            self.finish_response(out);
                        }
                        self.send = Framing::Head { buf: Vec::new() };
                    } else if self.current.is_some() && chunk_line_start(v) {
                        self.send = Framing::Chunked(Chunked::Size { line: Vec::new() });
                    } else {
                        cur.advance(cur.remaining());
                    }
                }
            }
        }
    }

    fn body_written(&mut self, n: u64, ts: u64) {
        if let Some(c) = &mut self.current {
            c.response.body_bytes = c.response.body_bytes.saturating_add(n);
            c.response.end_ns = ts;
        }
    }

    fn start_response(&mut self, head: ResponseHead, ts: u64, out: &mut Vec<Event>) {
        let ResponseHead { status, content_length, chunked, charset } = head;
        if (100..200).contains(&status) && status != 101 {
            // Informational (100 Continue, 103 Early Hints): the final response follows.
            self.send = Framing::Head { buf: Vec::new() };
            return;
        }
        let paired = !self.pending.is_empty();
        if !paired && !self.drop_unpaired {
            out.push(Event::Error(ParseError::UnpairedResponse));
        }
        let head_req = self.pending.front().is_some_and(|r| r.method == "HEAD");
        let no_body = head_req || status == 204 || status == 304 || status == 101;
        self.current = Some(Current {
            response: Response {
                status,
                charset,
                content_length,
                chunked: chunked && !no_body,
                close_delimited: false,
                body_bytes: 0,
                end_ns: ts,
            },
            paired,
        });
        if status == 101 {
            // Switching protocols (WebSocket): the bytes that follow are not HTTP/1.
            self.finish_response(out);
            self.mode = Mode::Other;
            return;
        }
        self.send = if no_body {
            Framing::Length { remaining: 0 }
        } else if chunked {
            Framing::Chunked(Chunked::Size { line: Vec::new() })
        } else if let Some(n) = content_length {
            Framing::Length { remaining: n }
        } else {
            // Neither a length nor chunking (HTTP/1.0, `Connection: close`, or an
            // HTTP/1.1 server that just closes): only the close can end it.
            if let Some(c) = &mut self.current {
                c.response.close_delimited = true;
            }
            Framing::UntilClose
        };
        if matches!(self.send, Framing::Length { remaining: 0 }) {
            self.finish_response(out);
        }
    }

    fn finish_response(&mut self, out: &mut Vec<Event>) {
        self.send = Framing::Head { buf: Vec::new() };
        let Some(cur) = self.current.take() else { return };
        if cur.paired
            && let Some(request) = self.pending.pop_front()
        {
            out.push(Event::Exchange(Exchange { request, response: cur.response }));
        }
    }
}

#[cfg(test)]
mod tests;
