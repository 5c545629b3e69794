//! Request and response heads: where one can start, and what Django's metrics need
//! from one once `httparse` has read it. Every value kept from a head is bounded, and
//! cut on a character boundary.

use super::chunked::Chunked;
use super::{
    Config, Framing, MAX_HEADERS, MAX_METHOD, MAX_PATH, MAX_PROXY_VALUE, MAX_VALUE, PROXY_HEADERS, Request,
};
use crate::text;

pub(super) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Whether bytes can start a request head: `TOKEN SP TARGET`.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Start {
    Yes,
    No,
    /// A valid prefix: more bytes needed to tell.
    Maybe,
}

pub(super) fn request_start(b: &[u8]) -> Start {
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

pub(super) fn response_start(b: &[u8]) -> Start {
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

pub(super) fn header<'h>(
    headers: &'h [httparse::Header<'h>],
    name: &str,
) -> impl Iterator<Item = &'h [u8]> + 'h {
    let name = name.to_string();
    headers.iter().filter(move |h| h.name.eq_ignore_ascii_case(&name)).map(|h| h.value)
}

/// The single valid Content-Length, as Django reads it (`int(value)`); `None` when
/// absent, repeated with different values, or not a number.
pub(super) fn content_length(headers: &[httparse::Header<'_>]) -> Option<u64> {
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

/// The Content-Length as django-prometheus observes it (`int(value)`, a float in the
/// histogram): digits beyond u64 too; 0 when absent or not a number.
pub(super) fn declared_length(headers: &[httparse::Header<'_>], cl: Option<u64>) -> f64 {
    if let Some(n) = cl {
        return n as f64;
    }
    let mut values = header(headers, "content-length");
    match (values.next().map(<[u8]>::trim_ascii), values.next()) {
        (Some(d), None) if !d.is_empty() && d.iter().all(u8::is_ascii_digit) => {
            std::str::from_utf8(d).ok().and_then(|d| d.parse().ok()).unwrap_or(0.0)
        }
        _ => 0.0,
    }
}

pub(super) fn is_chunked(headers: &[httparse::Header<'_>]) -> bool {
    header(headers, "transfer-encoding")
        .last()
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.rsplit(',').next())
        .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
}

/// `charset` from a Content-Type value such as `text/html; charset=utf-8`.
pub(super) fn charset(content_type: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(content_type).ok()?;
    s.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("charset")
            .then(|| text::cut(v.trim().trim_matches('"'), MAX_VALUE).to_string())
    })
}

/// Path of a request target: origin-form `/p?q`, absolute-form `http://h/p?q`, `*`.
pub(super) fn target_path(target: &str) -> String {
    let t = match target.find("://") {
        Some(i) => target[i + 3..].find('/').map_or("/", |j| &target[i + 3 + j..]),
        None => target,
    };
    let end = t.find(['?', '#']).unwrap_or(t.len());
    // `end` is at '?', '#' or the end: a boundary; MAX_PATH may not be.
    text::cut(&t[..end], MAX_PATH).to_string()
}

/// Appends what fits of `visible` to a head buffer bounded by `max`; returns the length
/// the buffer had (where this syscall's bytes start in it).
pub(super) fn extend_head(buf: &mut Vec<u8>, visible: &[u8], max: usize) -> usize {
    let old = buf.len();
    buf.extend_from_slice(&visible[..visible.len().min(max.saturating_sub(old))]);
    old
}

/// The part of a head buffer worth parsing once it grew from `old` bytes: its complete
/// lines, when the new bytes completed one (else nothing to parse yet).
///
/// Parsing only complete lines makes the verdict depend on the bytes alone, never on
/// where syscalls ended (a line that is invalid is found so once it ends, however it
/// was split); and parsing only when a line ends bounds the work per head (httparse
/// refuses more than MAX_HEADERS lines) where parsing at every syscall was quadratic:
/// 32 KiB sent a byte per syscall scanned 500 M bytes.
pub(super) fn complete_lines(buf: &[u8], old: usize) -> Option<&[u8]> {
    let new = buf.get(old..)?;
    let last = old + new.iter().rposition(|&b| b == b'\n')?;
    buf.get(..=last)
}

/// Parses a head cut short by the capture: up to its last complete line, as if the head
/// ended there. `None` when not even the first line is complete or valid.
pub(super) fn parse_truncated<T>(buf: &[u8], parse: impl Fn(&[u8]) -> HeadResult<T>) -> Option<T> {
    let end = buf.windows(2).rposition(|w| w == b"\r\n")?;
    let mut head = buf[..end + 2].to_vec();
    head.extend_from_slice(b"\r\n");
    match parse(&head) {
        HeadResult::Complete(v, _) => Some(v),
        _ => None,
    }
}

pub(super) enum HeadResult<T> {
    Complete(T, usize),
    Partial,
    Invalid,
}

#[derive(Debug)]
pub(super) struct ResponseHead {
    pub(super) status: u16,
    pub(super) content_length: Option<u64>,
    pub(super) chunked: bool,
    pub(super) charset: Option<String>,
}

pub(super) fn parse_request(buf: &[u8], config: &Config) -> HeadResult<(Request, Framing)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return HeadResult::Partial,
        Err(_) => return HeadResult::Invalid,
    };
    let (Some(method), Some(target), Some(_)) = (req.method, req.path, req.version) else {
        return HeadResult::Invalid;
    };
    if method.len() > MAX_METHOD {
        return HeadResult::Invalid;
    }
    let hs = &*req.headers;
    // Content-Lengths that disagree: a framing error servers answer with their own 400
    // (RFC 9112 6.3; gunicorn and uvicorn's h11 alike), never passing it to Django.
    let mut lengths = header(hs, "content-length").map(<[u8]>::trim_ascii);
    if let Some(first) = lengths.next()
        && lengths.any(|v| v != first)
    {
        return HeadResult::Invalid;
    }
    let ajax = header(hs, "x-requested-with").any(|v| v == b"XMLHttpRequest");
    let proxy_headers: Vec<(String, String)> = hs
        .iter()
        .filter(|h| {
            PROXY_HEADERS.iter().any(|p| h.name.eq_ignore_ascii_case(p))
                || config.extra_header.as_ref().is_some_and(|e| h.name.eq_ignore_ascii_case(e))
        })
        .take(PROXY_HEADERS.len() + 1)
        .map(|h| (h.name.to_ascii_lowercase(), text::lossy(h.value, MAX_PROXY_VALUE)))
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
        content_length: cl,
        declared_length: declared_length(hs, cl),
        ajax,
        proxy_headers,
        start_ns: 0,
    };
    HeadResult::Complete((request, framing), n)
}

pub(super) fn parse_response(buf: &[u8]) -> HeadResult<ResponseHead> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut headers);
    let n = match res.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return HeadResult::Partial,
        Err(_) => return HeadResult::Invalid,
    };
    let (Some(status), Some(_)) = (res.code, res.version) else { return HeadResult::Invalid };
    let hs = &*res.headers;
    HeadResult::Complete(
        ResponseHead {
            status,
            content_length: content_length(hs),
            chunked: is_chunked(hs),
            charset: header(hs, "content-type").last().and_then(charset),
        },
        n,
    )
}
