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
    let two = [&b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"[..], b"HEAD /b HTTP/1.1\r\nHost: x\r\n\r\n"].concat();
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
    let mut ev =
        run(&mut p, &[(R, b"GET / HTTP/1.0\r\n\r\n"), (S, b"HTTP/1.0 200 OK\r\n\r\nsome"), (S, b" body")]);
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
    assert!(p.lost(), "an HTTP connection's loss counts");
    // the response to the lost request, then a fresh exchange
    p.feed(&chunk(S, 2, OK), &mut out);
    p.feed(&chunk(R, 3, GET), &mut out);
    p.feed(&chunk(S, 4, OK), &mut out);
    assert_eq!(errors(&out), vec![], "the lost request's response is expected");
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
    assert_eq!(ex[0].request.path, "/x");
    assert!(ex[0].request.ajax, "headers before the cut are kept");
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
    assert_eq!(ex[0].response.content_length, Some(4), "headers before the cut are kept");
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
            if i % 7 == 3 { p.lost(); }
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

/// Regression (issue [9a]): a path of 4096 bytes whose last character is multi-byte,
/// its head sent in two writes so that the whole head is buffered. The cut at MAX_PATH
/// fell inside "é" and panicked.
#[test]
fn a_path_cut_at_its_limit_inside_a_character_is_cut_before_it() {
    let mut p = Http1Parser::new(Limits::default(), Config::default());
    let path = format!("/{}é", "a".repeat(4094));
    assert_eq!(path.len(), MAX_PATH + 1);
    let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes();
    let (a, b) = head.split_at(2000);
    let ev = run(&mut p, &[(R, a), (R, b), (S, OK)]);
    let ex = exchanges(&ev);
    assert_eq!(ex.len(), 1, "{ev:?}");
    assert_eq!(ex[0].request.path, format!("/{}", "a".repeat(4094)));
}

/// Regression: a charset value whose cut at MAX_VALUE falls inside a character.
#[test]
fn a_charset_cut_at_its_limit_inside_a_character_is_cut_before_it() {
    let mut p = Http1Parser::new(Limits::default(), Config::default());
    let value = format!("{}€", "a".repeat(MAX_VALUE - 1));
    let resp =
        format!("HTTP/1.1 200 OK\r\nContent-Type: text/html; charset={value}\r\nContent-Length: 0\r\n\r\n");
    let ev = run(&mut p, &[(R, b"GET / HTTP/1.1\r\n\r\n"), (S, resp.as_bytes())]);
    let ex = exchanges(&ev);
    assert_eq!(ex.len(), 1, "{ev:?}");
    assert_eq!(ex[0].response.charset.as_deref(), Some("a".repeat(MAX_VALUE - 1).as_str()));
}

/// Regression: a chunk size of u64::MAX overflowed `size + 2` (a panic with overflow
/// checks, a wrong length without). It is a chunk that cannot be followed: counted,
/// and the next response is parsed.
#[test]
fn a_chunk_size_near_u64_max_is_lost_not_overflowed() {
    for size in ["ffffffffffffffff", "fffffffffffffffe", "FFFFFFFFFFFFFFFD"] {
        let mut p = Http1Parser::new(Limits::default(), Config::default());
        let body = format!("{size}\r\nabc");
        let ev = run(
            &mut p,
            &[
                (R, b"GET / HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n"),
                (S, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
                (S, body.as_bytes()),
                (S, OK),
            ],
        );
        let ex = exchanges(&ev);
        if size == "FFFFFFFFFFFFFFFD" {
            // u64::MAX - 2 + 2 fits: a (very long) chunk being skipped; no error yet.
            assert!(errors(&ev).is_empty(), "{ev:?}");
            assert!(ex.is_empty());
        } else {
            assert_eq!(errors(&ev), vec![ParseError::ChunkedLost], "{size}: {ev:?}");
            assert_eq!(ex.len(), 2, "{size}: {ev:?}");
            assert_eq!(ex[1].response.status, 200);
            assert_eq!(ex[1].request.path, "/2");
        }
    }
}

/// Path text for the property tests: ASCII, and characters of 2, 3 and 4 bytes, so
/// that every limit falls inside one sometimes.
fn path_text(min: usize, max: usize) -> impl Strategy<Value = String> {
    let ch = prop_oneof![
        4 => proptest::char::range('a', 'z'),
        1 => Just('/'),
        1 => Just('é'),
        1 => Just('€'),
        1 => Just('𝄞'),
        1 => Just('%'),
    ];
    proptest::collection::vec(ch, min..max).prop_map(|cs| cs.into_iter().collect())
}

/// Feeds `bytes` as syscalls cut at `cuts` (cycled; whole when empty).
fn feed_split(
    p: &mut Http1Parser,
    dir: Direction,
    bytes: &[u8],
    cuts: &[usize],
    ts: &mut u64,
    out: &mut Vec<Event>,
) {
    let mut rest = bytes;
    let mut cut = cuts.iter().cycle();
    while !rest.is_empty() {
        let n = if cuts.is_empty() { rest.len() } else { (*cut.next().unwrap_or(&1)).min(rest.len()) };
        *ts += 1;
        p.feed(&chunk(dir, *ts, &rest[..n]), out);
        rest = &rest[n..];
    }
}

proptest! {
    /// Paths and charsets around their limits, with multi-byte characters wherever the
    /// cut falls, query strings, invalid UTF-8 in another header, heads far past the
    /// capture size: every split into syscalls gives the same exchange, its path and
    /// charset cut on a character boundary at MAX_PATH and MAX_VALUE.
    #[test]
    fn heads_past_every_limit_in_any_split(
        path in path_text(MAX_PATH / 2 - 16, MAX_PATH / 2 + 16),
        query in path_text(0, 8),
        charset in path_text(MAX_VALUE / 2 - 8, MAX_VALUE / 2 + 8),
        junk in proptest::collection::vec(128u8..=255, 1..64),
        cuts in proptest::collection::vec(1usize..5000, 0..8),
    ) {
        // Characters are 1 to 4 bytes: these lengths straddle both limits.
        let path = format!("/{path}{path}");
        let mut req = format!("GET {path}?{query} HTTP/1.1\r\nHost: x\r\nX-Junk: ").into_bytes();
        req.extend_from_slice(&junk);
        req.extend_from_slice(b"\r\n\r\n");
        let resp = format!("HTTP/1.1 200 OK\r\nContent-Type: text/html; charset={charset}{charset}\r\nContent-Length: 3\r\n\r\nabc");
        let mut p = Http1Parser::new(Limits::default(), Config::default());
        let (mut out, mut ts) = (Vec::new(), 0);
        for _ in 0..2 {
            feed_split(&mut p, R, &req, &cuts, &mut ts, &mut out);
            feed_split(&mut p, S, resp.as_bytes(), &cuts, &mut ts, &mut out);
        }
        prop_assert!(errors(&out).is_empty(), "{:?}", errors(&out));
        let ex = exchanges(&out);
        prop_assert_eq!(ex.len(), 2);
        let charset = format!("{charset}{charset}");
        for x in ex {
            prop_assert_eq!(x.request.path.as_str(), crate::text::cut(&path, MAX_PATH));
            prop_assert_eq!(x.response.charset.as_deref(), Some(crate::text::cut(&charset, MAX_VALUE)));
            prop_assert_eq!(x.response.body_bytes, 3);
        }
    }

    /// A head longer than `max_head_bytes` is one counted error whatever the split, and
    /// the next request on the connection is counted.
    #[test]
    fn a_head_past_max_head_bytes_is_one_error_in_any_split(
        extra in 1usize..3000,
        cuts in proptest::collection::vec(1usize..2000, 0..8),
    ) {
        let limits = Limits { max_head_bytes: 4096, ..Limits::default() };
        let long = format!("GET /a HTTP/1.1\r\nX-Long: {}\r\n\r\n", "v".repeat(4096 + extra));
        let mut p = Http1Parser::new(limits, Config::default());
        let (mut out, mut ts) = (Vec::new(), 0);
        feed_split(&mut p, R, long.as_bytes(), &cuts, &mut ts, &mut out);
        prop_assert_eq!(errors(&out), vec![ParseError::HeadTooLarge]);
        feed_split(&mut p, R, b"GET /b HTTP/1.1\r\n\r\n", &cuts, &mut ts, &mut out);
        feed_split(&mut p, S, OK, &cuts, &mut ts, &mut out);
        let ex = exchanges(&out);
        prop_assert!(p.buffered() <= 2 * 4096 + 4096);
        // The response to the lost request pairs with no request or with /b: either
        // way /b's request is counted once, never a panic or an unbounded buffer.
        prop_assert!(ex.len() <= 1);
    }

    /// Chunked bodies with chunk sizes up to u64::MAX and arbitrary extensions, split
    /// anywhere: never a panic; a body whose sizes add up is followed exactly.
    #[test]
    fn chunk_sizes_of_any_magnitude_in_any_split(
        sizes in proptest::collection::vec(0u64..=u64::MAX, 1..4),
        small in proptest::collection::vec(1usize..300, 1..6),
        cuts in proptest::collection::vec(1usize..64, 0..8),
    ) {
        let mut body = Vec::new();
        for n in &small {
            body.extend_from_slice(format!("{n:x};ext=1\r\n").as_bytes());
            body.extend(std::iter::repeat_n(b'z', *n));
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"0\r\n\r\n");
        let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut p = Http1Parser::new(Limits::default(), Config::default());
        let (mut out, mut ts) = (Vec::new(), 0);
        feed_split(&mut p, R, b"GET / HTTP/1.1\r\n\r\n", &cuts, &mut ts, &mut out);
        feed_split(&mut p, S, head, &cuts, &mut ts, &mut out);
        feed_split(&mut p, S, &body, &cuts, &mut ts, &mut out);
        prop_assert!(errors(&out).is_empty(), "{:?}", out);
        prop_assert_eq!(exchanges(&out).len(), 1);
        // Then absurd sizes: lost or skipped, never a panic.
        feed_split(&mut p, R, b"GET / HTTP/1.1\r\n\r\n", &cuts, &mut ts, &mut out);
        feed_split(&mut p, S, head, &cuts, &mut ts, &mut out);
        for s in &sizes {
            feed_split(&mut p, S, format!("{s:x}\r\nabc\r\n").as_bytes(), &cuts, &mut ts, &mut out);
        }
        p.close(&mut out);
    }
}

/// A head is parsed again only when its new bytes complete a line, and then only its
/// complete lines (parsing at every syscall made a head sent byte by byte quadratic,
/// and parsing incomplete lines made an invalid one's verdict depend on the split).
#[test]
fn heads_are_parsed_only_up_to_their_complete_lines() {
    let buf = b"GET / HTTP/1.1\r\nHost: x\r\nX-Par";
    assert_eq!(head::complete_lines(buf, 0), Some(&buf[..25]));
    assert_eq!(head::complete_lines(buf, 25), None, "no line ended in the new bytes");
    assert_eq!(head::complete_lines(buf, 24), Some(&buf[..25]));
    assert_eq!(head::complete_lines(b"GET", 0), None);
    assert_eq!(head::complete_lines(b"", 0), None);
}

/// Found by the hostile end-to-end test ([9a]): django-prometheus observes `int()` of
/// the Content-Length, so one beyond u64 is observed as sent (not as 0); Content-Lengths
/// that disagree are a framing error servers answer themselves, never a request.
#[test]
fn content_lengths_beyond_u64_and_in_disagreement() {
    let mut p = Http1Parser::new(Limits::default(), Config::default());
    let big = b"GET /a HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n";
    let ev = run(&mut p, &[(R, big), (S, OK)]);
    let ex = exchanges(&ev);
    assert_eq!(ex.len(), 1, "{ev:?}");
    assert_eq!(ex[0].request.content_length, None);
    assert_eq!(ex[0].request.declared_length, 1e23);

    let mut p = Http1Parser::new(Limits::default(), Config::default());
    let two = b"POST /a HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd";
    let ev = run(&mut p, &[(R, two)]);
    assert!(exchanges(&ev).is_empty(), "{ev:?}");
    assert_eq!(errors(&ev), vec![ParseError::InvalidHead]);
    // The same value twice is one length (RFC 9112 allows the repetition).
    let mut p = Http1Parser::new(Limits::default(), Config::default());
    let same = b"POST /a HTTP/1.1\r\nContent-Length: 3\r\nContent-Length:  3\r\n\r\nabc";
    let ex_ev = run(&mut p, &[(R, same), (S, OK)]);
    assert_eq!(exchanges(&ex_ev)[0].request.declared_length, 3.0);
}
