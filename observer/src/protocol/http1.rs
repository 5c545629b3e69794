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

use super::{Chunk, Cursor};
use crate::events::Direction;

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
const MAX_METHOD: usize = 32;
/// Longest request path kept (the rest is cut; Django would see it whole).
const MAX_PATH: usize = 4096;
/// Longest value kept for a charset or a Location header.
const MAX_VALUE: usize = 2048;
/// Headers parsed per head (gunicorn's default limit_request_fields is 100).
const MAX_HEADERS: usize = 128;
/// Longest chunk-size line (with extensions) accepted.
const MAX_CHUNK_LINE: usize = 1024;

/// A request as read by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method token as sent (`GET`, `PROPFIND`, ...).
    pub method: String,
    /// The path of the request target, query and fragment removed, still percent-encoded.
    pub path: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// The Content-Length header's value, when present and valid.
    pub content_length: Option<u64>,
    /// `X-Requested-With: XMLHttpRequest`.
    pub ajax: bool,
    /// Proxy headers kept for deciding later whether Django considers the request secure
    /// (its SECURE_PROXY_SSL_HEADER): names lower-case, values bounded.
    pub proxy_headers: Vec<(String, String)>,
    /// When the server read the request's first byte (exit of that read).
    pub start_ns: u64,
    /// Part of the head was not captured: headers after the capture are unknown.
    pub head_truncated: bool,
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
    /// The Location header, for redirects.
    pub location: Option<String>,
    /// When the server wrote the response's last byte (exit of that write).
    pub end_ns: u64,
}

/// A request and its response.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// Records of this connection were lost: state dropped.
    RecordsLost,
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
            Self::RecordsLost => "records_lost",
            Self::Unanswered => "unanswered",
        }
    }
}

/// What a chunk produced.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// Chunked transfer coding, followed by length where it can be.
#[derive(Debug)]
enum Chunked {
    /// Reading a chunk-size line.
    Size { line: Vec<u8> },
    /// Skipping chunk data, then its CRLF.
    Data { remaining: u64 },
    /// Reading trailer lines after the last chunk; `line` holds the current one.
    Trailer { line: Vec<u8> },
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

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Whether bytes can start a request head: `TOKEN SP TARGET`.
#[derive(Debug, PartialEq, Eq)]
enum Start {
    Yes,
    No,
    /// A valid prefix: more bytes needed to tell.
    Maybe,
}

fn request_start(b: &[u8]) -> Start {
    let Some(sp) = b.iter().position(|&c| !is_tchar(c)) else {
        return if b.len() <= MAX_METHOD { Start::Maybe } else { Start::No };
    };
    if sp == 0 || sp > MAX_METHOD || b[sp] != b' ' {
        return Start::No;
    }
    match b.get(sp + 1) {
        None => Start::Maybe,
        Some(c) if *c == b'/' || *c == b'*' || c.is_ascii_alphanumeric() => Start::Yes,
        Some(_) => Start::No,
    }
}

fn response_start(b: &[u8]) -> Start {
    const P: &[u8] = b"HTTP/1.";
    let n = b.len().min(P.len());
    if b[..n] != P[..n] {
        Start::No
    } else if n < P.len() {
        Start::Maybe
    } else {
        Start::Yes
    }
}

fn header<'h>(headers: &'h [httparse::Header<'h>], name: &str) -> impl Iterator<Item = &'h [u8]> + 'h {
    let name = name.to_string();
    headers.iter().filter(move |h| h.name.eq_ignore_ascii_case(&name)).map(|h| h.value)
}

/// The single valid Content-Length, as Django reads it (`int(value)`); `None` when
/// absent, repeated with different values, or not a number.
fn content_length(headers: &[httparse::Header<'_>]) -> Option<u64> {
    let mut found: Option<u64> = None;
    for v in header(headers, "content-length") {
        let n: u64 = std::str::from_utf8(v).ok()?.trim().parse().ok()?;
        if found.is_some_and(|f| f != n) {
            return None;
        }
        found = Some(n);
    }
    found
}

fn is_chunked(headers: &[httparse::Header<'_>]) -> bool {
    header(headers, "transfer-encoding")
        .last()
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.rsplit(',').next())
        .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
}

fn bounded(v: &[u8], max: usize) -> String {
    String::from_utf8_lossy(&v[..v.len().min(max)]).into_owned()
}

/// `charset` from a Content-Type value such as `text/html; charset=utf-8`.
fn charset(content_type: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(content_type).ok()?;
    s.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim().eq_ignore_ascii_case("charset").then(|| {
            let v = v.trim().trim_matches('"');
            v[..v.len().min(MAX_VALUE)].to_string()
        })
    })
}

/// Path of a request target: origin-form `/p?q`, absolute-form `http://h/p?q`, `*`.
fn target_path(target: &str) -> String {
    let t = match target.find("://") {
        Some(i) => target[i + 3..].find('/').map_or("/", |j| &target[i + 3 + j..]),
        None => target,
    };
    let end = t.find(['?', '#']).unwrap_or(t.len());
    t[..end.min(MAX_PATH)].to_string()
}

/// Appends what fits of `visible` to a head buffer bounded by `max`; returns the length
/// the buffer had (where this syscall's bytes start in it).
fn extend_head(buf: &mut Vec<u8>, visible: &[u8], max: usize) -> usize {
    let old = buf.len();
    buf.extend_from_slice(&visible[..visible.len().min(max.saturating_sub(old))]);
    old
}

/// Parses a head cut short by the capture: up to its last complete line, as if the head
/// ended there. `None` when not even the first line is complete or valid.
fn parse_truncated<T>(buf: &[u8], parse: impl Fn(&[u8]) -> HeadResult<T>) -> Option<T> {
    let end = buf.windows(2).rposition(|w| w == b"\r\n")?;
    let mut head = buf[..end + 2].to_vec();
    head.extend_from_slice(b"\r\n");
    match parse(&head) {
        HeadResult::Complete(v, _) => Some(v),
        _ => None,
    }
}

enum HeadResult<T> {
    Complete(T, usize),
    Partial,
    Invalid,
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
        if self.mode == Mode::Other {
            return;
        }
        let mut cur = Cursor::new(chunk);
        match chunk.dir {
            Direction::Recv => self.feed_recv(&mut cur, chunk.exit_ns, out),
            Direction::Send => self.feed_send(&mut cur, chunk.exit_ns, out),
        }
    }

    /// Records of this connection were lost (a hole in the record sequence): what was
    /// in flight cannot be completed.
    pub fn lost(&mut self, out: &mut Vec<Event>) {
        if self.mode != Mode::Http {
            return;
        }
        out.push(Event::Error(ParseError::RecordsLost));
        // Responses to the requests lost with those records are expected, not errors.
        self.drop_unpaired = true;
        self.pending.clear();
        self.current = None;
        self.head_start_ns = None;
        self.recv = Framing::Resync;
        self.send = Framing::Resync;
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
                                req.head_truncated = true;
                                req.start_ns = self.head_start_ns.unwrap_or(ts);
                                self.push_request(req, out);
                            }
                        }
                        self.head_start_ns = None;
                        continue;
                    }
                    let visible = cur.visible();
                    if buf.is_empty() {
                        if visible.starts_with(b"PRI * HTTP/2") {
                            self.mode = Mode::Other;
                            return;
                        }
                        match request_start(visible) {
                            Start::Yes => {
                                self.mode = Mode::Http;
                                self.drop_unpaired = false;
                            }
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
                    match parse_request(buf, &self.config) {
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
                    match parse_response(buf) {
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
            c.response.body_bytes += n;
            c.response.end_ns = ts;
        }
    }

    fn start_response(&mut self, head: ResponseHead, ts: u64, out: &mut Vec<Event>) {
        let ResponseHead { status, content_length, chunked, charset, location, minor_version, close } = head;
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
                location,
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
        } else if minor_version == 0 || close {
            if let Some(c) = &mut self.current {
                c.response.close_delimited = true;
            }
            Framing::UntilClose
        } else {
            // HTTP/1.1 without length or chunking: only close can end it.
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

#[derive(Debug)]
struct ResponseHead {
    status: u16,
    content_length: Option<u64>,
    chunked: bool,
    charset: Option<String>,
    location: Option<String>,
    minor_version: u8,
    close: bool,
}

fn parse_request(buf: &[u8], config: &Config) -> HeadResult<(Request, Framing)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return HeadResult::Partial,
        Err(_) => return HeadResult::Invalid,
    };
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return HeadResult::Invalid;
    };
    if method.len() > MAX_METHOD {
        return HeadResult::Invalid;
    }
    let hs = &*req.headers;
    let ajax = header(hs, "x-requested-with").any(|v| v == b"XMLHttpRequest");
    let proxy_headers: Vec<(String, String)> = hs
        .iter()
        .filter(|h| {
            PROXY_HEADERS.iter().any(|p| h.name.eq_ignore_ascii_case(p))
                || config.extra_header.as_ref().is_some_and(|e| h.name.eq_ignore_ascii_case(e))
        })
        .take(PROXY_HEADERS.len() + 1)
        .map(|h| (h.name.to_ascii_lowercase(), bounded(h.value, MAX_PROXY_VALUE)))
        .collect();
    let cl = content_length(hs);
    let framing = if is_chunked(hs) {
        Framing::Chunked(Chunked::Size { line: Vec::new() })
    } else {
        match cl {
            Some(n) if n > 0 => Framing::Length { remaining: n },
            _ => Framing::Head { buf: Vec::new() },
        }
    };
    let request = Request {
        method: method.to_string(),
        path: target_path(target),
        minor_version: minor,
        content_length: cl,
        ajax,
        proxy_headers,
        start_ns: 0,
        head_truncated: false,
    };
    HeadResult::Complete((request, framing), n)
}

fn parse_response(buf: &[u8]) -> HeadResult<ResponseHead> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut headers);
    let n = match res.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return HeadResult::Partial,
        Err(_) => return HeadResult::Invalid,
    };
    let (Some(status), Some(minor)) = (res.code, res.version) else { return HeadResult::Invalid };
    let hs = &*res.headers;
    let close = header(hs, "connection").any(|v| v.eq_ignore_ascii_case(b"close"));
    HeadResult::Complete(
        ResponseHead {
            status,
            content_length: content_length(hs),
            chunked: is_chunked(hs),
            charset: header(hs, "content-type").last().and_then(charset),
            location: header(hs, "location").last().map(|v| bounded(v, MAX_VALUE)),
            minor_version: minor,
            close,
        },
        n,
    )
}

enum ChunkedStep {
    Done,
    More,
    Lost,
}

/// `HEX [; ext] CRLF` at the start of `b`.
fn chunk_line_start(b: &[u8]) -> bool {
    let hex = b.iter().take_while(|c| c.is_ascii_hexdigit()).count();
    hex > 0 && hex <= 16 && matches!(b.get(hex), Some(b'\r' | b';' | b' ' | b'\t'))
}

fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let hex: Vec<u8> = line.iter().copied().take_while(u8::is_ascii_hexdigit).collect();
    if hex.is_empty() || hex.len() > 16 {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()
}

/// Reads up to and including `\n` into `line`; `Some(true)` when the line is complete,
/// `None` when it is lost (in a hole or too long).
fn read_line(line: &mut Vec<u8>, cur: &mut Cursor<'_>) -> Option<bool> {
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

fn feed_chunked(state: &mut Chunked, cur: &mut Cursor<'_>) -> ChunkedStep {
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
                        // data, then CRLF
                        Chunked::Data { remaining: size + 2 }
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn chunk(dir: Direction, ts: u64, bytes: &[u8]) -> Chunk<'_> {
        Chunk { dir, enter_ns: ts, exit_ns: ts, bytes, total_len: bytes.len() as u64 }
    }

    /// Feeds (dir, bytes) pairs at timestamps 1, 2, 3...; returns the events.
    fn run(parser: &mut Http1Parser, steps: &[(Direction, &[u8])]) -> Vec<Event> {
        let mut out = Vec::new();
        for (i, (dir, b)) in steps.iter().enumerate() {
            parser.feed(&chunk(*dir, i as u64 + 1, b), &mut out);
        }
        out
    }

    fn exchanges(events: &[Event]) -> Vec<&Exchange> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Exchange(x) => Some(x),
                Event::Error(_) => None,
            })
            .collect()
    }

    fn errors(events: &[Event]) -> Vec<ParseError> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Error(x) => Some(*x),
                Event::Exchange(_) => None,
            })
            .collect()
    }

    use Direction::{Recv as R, Send as S};

    const GET: &[u8] =
        b"GET /shop/items/7/?page=2 HTTP/1.1\r\nHost: x\r\nX-Requested-With: XMLHttpRequest\r\n\r\n";
    const OK: &[u8] =
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: 5\r\n\r\nhello";

    #[test]
    fn keep_alive_exchange_with_timings_and_labels() {
        let mut p = Http1Parser::new(Limits::default(), Config::default());
        let ev = run(&mut p, &[(R, GET), (S, OK), (R, GET), (S, OK)]);
        let ex = exchanges(&ev);
        assert_eq!(ex.len(), 2);
        let x = ex[0];
        assert_eq!(x.request.method, "GET");
        assert_eq!(x.request.path, "/shop/items/7/");
        assert!(x.request.ajax);
        assert_eq!(x.request.start_ns, 1);
        assert_eq!(x.response.status, 200);
        assert_eq!(x.response.charset.as_deref(), Some("utf-8"));
        assert_eq!(x.response.content_length, Some(5));
        assert_eq!(x.response.body_bytes, 5);
        assert_eq!(x.response.end_ns, 2);
        assert_eq!(ex[1].request.start_ns, 3);
        assert!(errors(&ev).is_empty());
        assert_eq!(p.mode(), Mode::Http);
    }

    #[test]
    fn pipelined_requests_are_answered_in_order() {
        let mut p = Http1Parser::new(Limits::default(), Config::default());
        let two =
            [&b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"[..], b"HEAD /b HTTP/1.1\r\nHost: x\r\n\r\n"].concat();
        let resp_a = b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nnope";
        // HEAD response: a Content-Length but no body.
        let resp_b = b"HTTP/1.1 200 OK\r\nContent-Length: 999\r\n\r\n";
        let both = [&resp_a[..resp_a.len() - 1], resp_b].concat();
        let ev = run(&mut p, &[(R, &two), (S, &both)]);
        let ex = exchanges(&ev);
        assert_eq!(ex.len(), 2, "{ev:?}");
        assert_eq!((ex[0].request.path.as_str(), ex[0].response.status), ("/a", 404));
        assert_eq!((ex[1].request.method.as_str(), ex[1].response.status), ("HEAD", 200));
        assert_eq!(ex[1].response.body_bytes, 0);
    }

    #[test]
    fn heads_split_across_syscalls_and_bodies_by_length() {
        let mut p = Http1Parser::new(Limits::default(), Config::default());
        let post = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789";
        let ev = run(&mut p, &[(R, &post[..7]), (R, &post[7..40]), (R, &post[40..]), (S, OK)]);
        let ex = exchanges(&ev);
        assert_eq!(ex.len(), 1);
        assert_eq!(ex[0].request.content_length, Some(10));
        assert_eq!(ex[0].request.start_ns, 1, "first byte read at the first read");
    }

    #[test]
    fn body_larger_than_capture_is_stepped_over() {
        let mut p = Http1Parser::new(Limits::default(), Config::default());
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n";
        let mut out = Vec::new();
        p.feed(&chunk(R, 1, b"GET /big HTTP/1.1\r\n\r\n"), &mut out);
        // 256 bytes captured of a 60000-byte write, then the rest in a second write.
        let mut first = head.to_vec();
        first.resize(256, b'x');
        p.feed(&Chunk { dir: S, enter_ns: 2, exit_ns: 2, bytes: &first, total_len: 60_000 }, &mut out);
        let rest = 100_000 + head.len() as u64 - 60_000;
        p.feed(&Chunk { dir: S, enter_ns: 3, exit_ns: 3, bytes: b"xxxx", total_len: rest }, &mut out);
        p.feed(&chunk(R, 4, b"GET /next HTTP/1.1\r\n\r\n"), &mut out);
        p.feed(&chunk(S, 5, b"HTTP/1.1 204 No Content\r\n\r\n"), &mut out);
        let ex = exchanges(&out);
        assert_eq!(ex.len(), 2, "{out:?}");
        assert_eq!(ex[0].response.body_bytes, 100_000);
        assert_eq!(ex[0].response.end_ns, 3);
        assert_eq!(ex[1].response.status, 204);
    }

    #[test]
    fn chunked_request_and_response() {
        let mut p = Http1Parser::new(Limits::default(), Config::default());
        let req =
            b"POST /u HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3;x=y\r\nabc\r\n0\r\n\r\n";
        let resp_head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n";
        let ev = run(
            &mut p,
            &[(R, &req[..30]), (R, &req[30..]), (S, resp_head), (S, b"4\r\nabcd\r\n"), (S, b"0\r\n\r\n")],
        );
        let ex = exchanges(&ev);
        assert_eq!(ex.len(), 1, "{ev:?}");
        assert_eq!(ex[0].request.content_length, None);
        assert!(ex[0].response.chunked);
        assert_eq!(ex[0].response.end_ns, 5);
        assert_eq!(ex[0].response.charset, None);
    }

    #[test]
    fn chunked_response_with_chunks_larger_than_capture_resyncs_at_write_boundaries() {
        let mut p = Http1Parser::new(Limits::default(), Config::default());
        let mut out = Vec::new();
        p.feed(&chunk(R, 1, b"GET /stream HTTP/1.1\r\n\r\n"), &mut out);
        p.feed(&chunk(S, 2, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"), &mut out);
        // Each write is one chunk of 20000 bytes (hex 4E20), capture 64 bytes.
        for ts in 3..6 {
            let mut w = b"4E20\r\n".to_vec();
            w.resize(64, b'z');
            p.feed(&Chunk { dir: S, enter_ns: ts, exit_ns: ts, bytes: &w, total_len: 20_000 + 8 }, &mut out);
        }
        p.feed(&chunk(S, 9, b"0\r\n\r\n"), &mut out);
        let ex = exchanges(&out);
        assert_eq!(ex.len(), 1, "{out:?}");
        assert_eq!(ex[0].response.end_ns, 9);
        assert!(errors(&out).is_empty(), "length framing steps over the holes: {out:?}");
    }

    #[test]
    fn expect_continue_skips_the_interim_response() {
        let mut p = Http1Parser::new(Limits::default(), Config::default());
        let ev = run(
            &mut p,
            &[
                (R, b"PUT /f HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"),
                (S, b"HTTP/1.1 100 Continue\r\n\r\n"),
                (R, b"abc"),
                (S, b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"),
            ],
        );
        let ex = exchanges(&ev);
        assert_eq!(ex.len(), 1);
        assert_eq!(ex[0].response.status, 201);
    }

    #[test]
    fn close_delimited_response_ends_at_close() {
        let mut p = Http1Parser::new(Limits::default(), Config::default());
        let mut ev = run(
            &mut p,
            &[(R, b"GET / HTTP/1.0\r\n\r\n"), (S, b"HTTP/1.0 200 OK\r\n\r\nsome"), (S, b" body")],
        );
        assert!(exchanges(&ev).is_empty());
        p.close(&mut ev);
        let ex = exchanges(&ev);
        assert_eq!(ex.len(), 1);
        assert!(ex[0].response.close_delimited);
        assert_eq!(ex[0].response.body_bytes, 9);
        assert_eq!(ex[0].response.end_ns, 3);
    }

    #[test]
    fn a_body_after_a_head_response_in_the_same_write_is_ignored() {
        let mut p = Http1Parser::new(Limits::default(), Config::default());
        let ev = run(
            &mut p,
            &[
                (R, b"HEAD / HTTP/1.1\r\n\r\n"),
                (S, b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nindex\n"),
                (R, b"GET / HTTP/1.1\r\n\r\n"),
                (S, b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nindex\n"),
            ],
        );
        assert!(errors(&ev).is_empty(), "{ev:?}");
        assert_eq!(exchanges(&ev).len(), 2);
    }

    #[test]
    fn no_body_statuses() {
        for status in [b"204 No Content".as_slice(), b"304 Not Modified"] {
            let mut p = Http1Parser::new(Limits::default(), Config::default());
            let resp = [b"HTTP/1.1 ".as_slice(), status, b"\r\nContent-Length: 50\r\n\r\n"].concat();
            let ev = run(
                &mut p,
                &[(R, b"GET / HTTP/1.1\r\n\r\n"), (S, &resp), (R, b"GET /2 HTTP/1.1\r\n\r\n"), (S, OK)],
            );
            assert_eq!(exchanges(&ev).len(), 2, "{ev:?}");
        }
    }

    #[test]
    fn non_http_connections_are_ignored_cheaply() {
        for first in [
            b"\x16\x03\x01\x02\x00".as_slice(),
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"\x00\x00\x00\x08\x04\xd2\x16\x2f",
        ] {
            let mut p = Http1Parser::new(Limits::default(), Config::default());
            let ev = run(&mut p, &[(R, first), (S, b"whatever")]);
            assert!(ev.is_empty(), "{ev:?}");
            // HTTP/2's preface is a valid HTTP/1 request line shape; its version is not.
            assert_eq!(p.mode(), Mode::Other, "{first:?}");
        }
        let mut p = Http1Parser::new(Limits::default(), Config::default());
        run(&mut p, &[(S, b"220 smtp ready\r\n")]);
        assert_eq!(p.mode(), Mode::Other);
    }

    #[test]
    fn lost_records_drop_state_and_resync_at_next_request() {
        let mut p = Http1Parser::new(Limits::default(), Config::default());
        let mut out = Vec::new();
        p.feed(&chunk(R, 1, GET), &mut out);
        p.lost(&mut out);
        // the response to the lost request, then a fresh exchange
        p.feed(&chunk(S, 2, OK), &mut out);
        p.feed(&chunk(R, 3, GET), &mut out);
        p.feed(&chunk(S, 4, OK), &mut out);
        assert_eq!(errors(&out), vec![ParseError::RecordsLost]);
        let ex = exchanges(&out);
        assert_eq!(ex.len(), 1);
        assert_eq!(ex[0].request.start_ns, 3);
    }

    #[test]
    fn head_in_the_hole_keeps_what_was_captured_and_resyncs() {
        let mut p = Http1Parser::new(Limits::default(), Config::default());
        let mut out = Vec::new();
        let long = [
            b"GET /x HTTP/1.1\r\nX-Requested-With: XMLHttpRequest\r\nCookie: ".as_slice(),
            &[b'c'; 300],
            b"\r\n\r\n",
        ]
        .concat();
        p.feed(
            &Chunk { dir: R, enter_ns: 1, exit_ns: 1, bytes: &long[..256], total_len: long.len() as u64 },
            &mut out,
        );
        assert_eq!(errors(&out), vec![ParseError::HeadNotCaptured]);
        p.feed(&chunk(S, 2, OK), &mut out);
        p.feed(&chunk(R, 3, GET), &mut out);
        p.feed(&chunk(S, 4, OK), &mut out);
        let ex = exchanges(&out);
        assert_eq!(ex.len(), 2, "{out:?}");
        assert!(ex[0].request.head_truncated);
        assert_eq!(ex[0].request.path, "/x");
        assert!(ex[0].request.ajax, "headers before the cut are kept");
        assert!(!ex[1].request.head_truncated);
    }

    #[test]
    fn response_head_longer_than_capture_is_assumed_to_end_with_its_write() {
        let mut p = Http1Parser::new(Limits::default(), Config::default());
        let mut out = Vec::new();
        p.feed(&chunk(R, 1, b"GET / HTTP/1.1\r\n\r\n"), &mut out);
        let head = [
            b"HTTP/1.1 302 Found\r\nLocation: /next/\r\nContent-Length: 4\r\nSet-Cookie: ".as_slice(),
            &[b's'; 500],
            b"\r\n\r\n",
        ]
        .concat();
        p.feed(
            &Chunk { dir: S, enter_ns: 2, exit_ns: 2, bytes: &head[..200], total_len: head.len() as u64 },
            &mut out,
        );
        p.feed(&chunk(S, 3, b"body"), &mut out);
        let ex = exchanges(&out);
        assert_eq!(ex.len(), 1, "{out:?}");
        assert_eq!(ex[0].response.status, 302);
        assert_eq!(ex[0].response.location.as_deref(), Some("/next/"));
        assert_eq!(ex[0].response.end_ns, 3);
    }

    #[test]
    fn pending_requests_are_bounded() {
        let mut p = Http1Parser::new(Limits { max_pending: 4, ..Limits::default() }, Config::default());
        let many = b"GET / HTTP/1.1\r\n\r\n".repeat(10);
        let ev = run(&mut p, &[(R, &many)]);
        assert_eq!(p.pending(), 4);
        assert_eq!(errors(&ev), vec![ParseError::PendingOverflow; 6]);
    }

    #[test]
    fn oversized_heads_are_bounded() {
        let mut p = Http1Parser::new(Limits { max_head_bytes: 100, ..Limits::default() }, Config::default());
        let mut out = Vec::new();
        p.feed(&chunk(R, 1, b"GET / HTTP/1.1\r\n"), &mut out);
        for ts in 2..50 {
            p.feed(&chunk(R, ts, b"X-Long: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n"), &mut out);
            assert!(p.buffered() <= 256);
        }
        assert_eq!(errors(&out), vec![ParseError::HeadTooLarge]);
    }

    #[test]
    fn methods_targets_and_proxy_headers() {
        let cfg = Config { extra_header: Some("x-my-scheme".into()) };
        let mut p = Http1Parser::new(Limits::default(), cfg);
        let ev = run(
            &mut p,
            &[
                (
                    R,
                    b"PROPFIND http://example.com/dav/a%20b?x HTTP/1.1\r\nX-Forwarded-Proto: https\r\nX-My-Scheme: s\r\nCookie: c\r\n\r\n",
                ),
                (S, b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n"),
                (R, b"OPTIONS * HTTP/1.1\r\n\r\n"),
                (S, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
            ],
        );
        let ex = exchanges(&ev);
        assert_eq!(ex[0].request.method, "PROPFIND");
        assert_eq!(ex[0].request.path, "/dav/a%20b");
        assert_eq!(
            ex[0].request.proxy_headers,
            vec![("x-forwarded-proto".into(), "https".into()), ("x-my-scheme".into(), "s".into())]
        );
        assert_eq!(ex[1].request.path, "*");
        assert!(ex[1].request.proxy_headers.is_empty());
    }

    #[test]
    fn upgrade_stops_parsing() {
        let mut p = Http1Parser::new(Limits::default(), Config::default());
        let ev = run(
            &mut p,
            &[
                (R, b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"),
                (S, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"),
                (R, b"\x81\x85binary frame"),
            ],
        );
        assert_eq!(exchanges(&ev).len(), 1);
        assert_eq!(p.mode(), Mode::Other);
    }

    #[test]
    fn unanswered_requests_are_counted_at_close() {
        let mut p = Http1Parser::new(Limits::default(), Config::default());
        let mut ev = run(&mut p, &[(R, GET)]);
        p.close(&mut ev);
        assert_eq!(errors(&ev), vec![ParseError::Unanswered]);
    }

    /// A valid conversation, and the exchanges it must give.
    fn conversation() -> (Vec<(Direction, Vec<u8>)>, usize) {
        let steps = vec![
            (R, b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody".to_vec()),
            (S, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec()),
            (S, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".to_vec()),
            (R, b"PUT /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n".to_vec()),
            (S, b"HTTP/1.1 204 No Content\r\n\r\n".to_vec()),
        ];
        (steps, 3)
    }

    proptest! {
        #[test]
        fn any_split_into_syscalls_gives_the_same_exchanges(cuts in proptest::collection::vec(1usize..40, 0..30)) {
            let (steps, want) = conversation();
            // Re-split each step's bytes at the given cut sizes (same direction order).
            let mut p = Http1Parser::new(Limits::default(), Config::default());
            let mut out = Vec::new();
            let mut ts = 0;
            let mut cut = cuts.iter().cycle();
            for (dir, bytes) in &steps {
                let mut rest = bytes.as_slice();
                while !rest.is_empty() {
                    let n = if cuts.is_empty() { rest.len() } else { (*cut.next().unwrap()).min(rest.len()) };
                    ts += 1;
                    p.feed(&chunk(*dir, ts, &rest[..n]), &mut out);
                    rest = &rest[n..];
                }
            }
            let ex = exchanges(&out);
            prop_assert_eq!(ex.len(), want, "{:?}", out);
            prop_assert!(errors(&out).is_empty());
            let statuses: Vec<u16> = ex.iter().map(|e| e.response.status).collect();
            prop_assert_eq!(statuses, vec![200, 201, 204]);
        }

        #[test]
        fn truncated_captures_give_the_same_exchanges_when_heads_fit(cap in 48usize..400, body in 0usize..5000) {
            // Length-framed bodies cut anywhere by the capture: framing by length steps
            // over the holes, so the exchanges and their byte counts do not change.
            let mut p = Http1Parser::new(Limits::default(), Config::default());
            let mut out = Vec::new();
            let req = [format!("POST /up HTTP/1.1\r\nContent-Length: {body}\r\n\r\n").into_bytes(), vec![b'q'; body]].concat();
            let resp = [format!("HTTP/1.1 200 OK\r\nContent-Length: {body}\r\n\r\n").into_bytes(), vec![b'r'; body]].concat();
            let steps = [(R, &req), (S, &resp), (R, &req), (S, &resp)];
            for (i, (dir, bytes)) in steps.iter().enumerate() {
                let c = Chunk { dir: *dir, enter_ns: i as u64, exit_ns: i as u64, bytes: &bytes[..bytes.len().min(cap)], total_len: bytes.len() as u64 };
                p.feed(&c, &mut out);
            }
            prop_assert!(errors(&out).is_empty(), "{:?}", out);
            let ex = exchanges(&out);
            prop_assert_eq!(ex.len(), 2);
            for x in ex {
                prop_assert_eq!(x.request.content_length, Some(body as u64));
                prop_assert_eq!(x.response.body_bytes, body as u64);
            }
        }

        #[test]
        fn random_bytes_never_panic_and_stay_bounded(
            steps in proptest::collection::vec((any::<bool>(), proptest::collection::vec(any::<u8>(), 0..300), 0u64..100_000), 0..40)
        ) {
            let limits = Limits { max_head_bytes: 1024, max_pending: 8 };
            let mut p = Http1Parser::new(limits, Config::default());
            let mut out = Vec::new();
            for (i, (send, bytes, extra)) in steps.iter().enumerate() {
                let dir = if *send { S } else { R };
                let c = Chunk { dir, enter_ns: i as u64, exit_ns: i as u64, bytes, total_len: bytes.len() as u64 + extra };
                p.feed(&c, &mut out);
                if i % 7 == 3 { p.lost(&mut out); }
                prop_assert!(p.buffered() <= 4 * 1024);
                prop_assert!(p.pending() <= 8);
            }
            p.close(&mut out);
        }

        #[test]
        fn random_requests_after_a_valid_start_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..500)) {
            let mut p = Http1Parser::new(Limits::default(), Config::default());
            let mut out = Vec::new();
            let mut b = b"GET / HTTP/1.1\r\n".to_vec();
            b.extend_from_slice(&tail);
            p.feed(&chunk(R, 1, &b), &mut out);
            p.feed(&chunk(S, 2, &tail), &mut out);
        }
    }
}
