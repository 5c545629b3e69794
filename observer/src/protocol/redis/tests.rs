use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::protocol::fixtures::{self, errors, gets, tally};

use Direction::{Recv as R, Send as S};

fn chunk(dir: Direction, i: usize, bytes: &[u8], total_len: u64) -> Chunk<'_> {
    let ts = (i as u64 + 1) * 10;
    Chunk { dir, enter_ns: ts, exit_ns: ts + 1, bytes, total_len }
}

fn run(p: &mut RedisParser, steps: &[(Direction, Vec<u8>)]) -> Vec<Event> {
    let mut out = Vec::new();
    for (i, (dir, b)) in steps.iter().enumerate() {
        p.feed(&chunk(*dir, i, b, b.len() as u64), &mut out);
    }
    out
}

/// A command as redis-py writes it.
fn cmd(args: &[&[u8]]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        v.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        v.extend_from_slice(a);
        v.extend_from_slice(b"\r\n");
    }
    v
}

fn bulk(v: &[u8]) -> Vec<u8> {
    let mut out = format!("${}\r\n", v.len()).into_bytes();
    out.extend_from_slice(v);
    out.extend_from_slice(b"\r\n");
    out
}

fn replay(name: &str, cap: usize) -> Vec<Event> {
    let mut parsers: BTreeMap<u32, RedisParser> = BTreeMap::new();
    let mut out = Vec::new();
    for r in fixtures::load(name) {
        match &r.step {
            Some(step) => {
                let p = parsers.entry(r.conn).or_insert_with(|| {
                    assert!(is_command(&step.data), "connection {} starts with a command", r.conn);
                    RedisParser::new(Limits::default())
                });
                p.feed(&step.chunk(cap), &mut out);
            }
            None => {
                if let Some(mut p) = parsers.remove(&r.conn) {
                    p.close(&mut out);
                }
            }
        }
    }
    out
}

/// The test app's /cache/ views once each (hit, miss, get_or_set, get_many, has_key,
/// set_delete, integer, none, big): 8 GETs, the MGET and EXISTS not among them.
fn views_tally() -> BTreeMap<&'static str, usize> {
    [("hit", 4), ("miss", 4)].into_iter().collect()
}

#[test]
fn real_capture_django_redis_resp2() {
    // django-redis 7.0 on redis-py 8.1, RESP2 (CLIENT SETINFO refused by Redis 7.0).
    let ev = replay("redis-django-redis.jsonl", usize::MAX);
    assert!(errors(&ev).is_empty(), "{:?}", errors(&ev));
    assert_eq!(tally(&ev), views_tally());
    let g = gets(&ev);
    assert_eq!(g[0], (":1:hit-key".into(), Outcome::Hit));
    assert!(g.iter().all(|(k, _)| k.starts_with(":1:")));
    // The stored None (pickled) reads as a miss.
    assert!(g.contains(&(":1:none-key".into(), Outcome::Miss)));
}

#[test]
fn real_capture_native_backend_resp3() {
    // Django's own Redis backend with protocol=3: HELLO 3, a map reply, `_` nulls.
    let ev = replay("redis-native-resp3.jsonl", usize::MAX);
    assert!(errors(&ev).is_empty(), "{:?}", errors(&ev));
    assert_eq!(tally(&ev), views_tally());
}

#[test]
fn real_captures_cut_to_64_bytes_count_the_same() {
    for name in ["redis-django-redis.jsonl", "redis-native-resp3.jsonl"] {
        let ev = replay(name, 64);
        assert_eq!(tally(&ev), views_tally(), "{name}");
    }
}

#[test]
fn commands_are_recognised() {
    assert!(is_command(&cmd(&[b"GET", b":1:k"])));
    assert!(is_command(&cmd(&[b"HELLO", b"3"])));
    assert!(!is_command(b"GET :1:k\r\n"));
    assert!(!is_command(b"*\r\n"));
    assert!(!is_command(b"get :1:k\r\n"));
    assert!(!is_command(&[0, 0, 0, 8, 4, 210, 22, 47]));
}

#[test]
fn errors_nulls_and_resp3_types() {
    let mut p = RedisParser::new(Limits::default());
    let ev = run(
        &mut p,
        &[
            (S, cmd(&[b"GET", b"a"])),
            (R, b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n".to_vec()),
            (S, cmd(&[b"GET", b"b"])),
            (R, b"_\r\n".to_vec()),
            (S, cmd(&[b"GET", b"c"])),
            (R, b"!21\r\nSYNTAX invalid syntax\r\n".to_vec()),
            (S, cmd(&[b"GET", b"d"])),
            (R, b"|1\r\n+key-popularity\r\n%1\r\n$1\r\na\r\n,0.19\r\n$3\r\nabc\r\n".to_vec()),
            (S, cmd(&[b"GET", b"e"])),
            (R, b"=15\r\ntxt:Some string\r\n".to_vec()),
        ],
    );
    assert_eq!(
        gets(&ev),
        vec![
            ("a".into(), Outcome::Fail),
            ("b".into(), Outcome::Miss),
            ("c".into(), Outcome::Fail),
            ("d".into(), Outcome::Hit),
            ("e".into(), Outcome::Hit)
        ]
    );
    assert!(errors(&ev).is_empty());
}

#[test]
fn pipelines_and_push_messages_keep_order() {
    let mut p = RedisParser::new(Limits::default());
    let pipeline =
        [cmd(&[b"GET", b"a"]), cmd(&[b"SET", b"b", b"1"]), cmd(&[b"GET", b"c"]), cmd(&[b"MGET", b"a", b"c"])]
            .concat();
    let replies = [
        bulk(b"1").as_slice(),
        b">3\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nx\r\n$0\r\n\r\n", // out of band
        b"+OK\r\n",
        b"$-1\r\n",
        b"*2\r\n$1\r\n1\r\n$-1\r\n",
    ]
    .concat();
    // The replies arrive split at an awkward place.
    let ev = run(&mut p, &[(S, pipeline), (R, replies[..7].to_vec()), (R, replies[7..].to_vec())]);
    assert_eq!(gets(&ev), vec![("a".into(), Outcome::Hit), ("c".into(), Outcome::Miss)]);
    assert!(errors(&ev).is_empty());
    assert_eq!(p.pending(), 0);
}

#[test]
fn multi_exec_gives_each_queued_get_its_element() {
    let mut p = RedisParser::new(Limits::default());
    let ev = run(
        &mut p,
        &[
            (
                S,
                [
                    cmd(&[b"MULTI"]),
                    cmd(&[b"GET", b"a"]),
                    cmd(&[b"INCR", b"n"]),
                    cmd(&[b"GET", b"b"]),
                    cmd(&[b"EXEC"]),
                ]
                .concat(),
            ),
            (R, b"+OK\r\n+QUEUED\r\n+QUEUED\r\n+QUEUED\r\n*3\r\n$-1\r\n:5\r\n$2\r\nhi\r\n".to_vec()),
            (S, [cmd(&[b"MULTI"]), cmd(&[b"GET", b"c"]), cmd(&[b"EXEC"])].concat()),
            // Aborted by WATCH: nothing ran.
            (R, b"+OK\r\n+QUEUED\r\n*-1\r\n".to_vec()),
            (S, [cmd(&[b"MULTI"]), cmd(&[b"GET", b"d"]), cmd(&[b"DISCARD"]), cmd(&[b"GET", b"e"])].concat()),
            (R, b"+OK\r\n+QUEUED\r\n+OK\r\n$1\r\nx\r\n".to_vec()),
        ],
    );
    assert_eq!(
        gets(&ev),
        vec![("a".into(), Outcome::Miss), ("b".into(), Outcome::Hit), ("e".into(), Outcome::Hit)]
    );
}

#[test]
fn large_values_are_stepped_over_by_length() {
    let mut p = RedisParser::new(Limits::default());
    let value = vec![b'x'; 100_000];
    let mut out = Vec::new();
    let two = [cmd(&[b"GET", b"big"]), cmd(&[b"GET", b"small"])].concat();
    p.feed(&chunk(S, 0, &two, two.len() as u64), &mut out);
    // redis-py reads the big value in pieces; the next reply comes in its own read.
    let big = bulk(&value);
    for (i, part) in big.chunks(32 * 1024).enumerate() {
        p.feed(&chunk(R, i + 1, &part[..part.len().min(64)], part.len() as u64), &mut out);
    }
    p.feed(&chunk(R, 9, &bulk(b"small"), 11), &mut out);
    assert_eq!(gets(&out), vec![("big".into(), Outcome::Hit), ("small".into(), Outcome::Hit)]);
    assert!(errors(&out).is_empty());
}

#[test]
fn a_reply_behind_a_large_value_in_the_same_read_is_unknown() {
    let mut p = RedisParser::new(Limits::default());
    let mut out = Vec::new();
    let two = [cmd(&[b"GET", b"big"]), cmd(&[b"GET", b"small"])].concat();
    p.feed(&chunk(S, 0, &two, two.len() as u64), &mut out);
    let replies = [bulk(&[b'x'; 5000]), bulk(b"small")].concat();
    p.feed(&chunk(R, 1, &replies[..64], replies.len() as u64), &mut out);
    p.close(&mut out);
    assert_eq!(gets(&out), vec![("big".into(), Outcome::Hit), ("small".into(), Outcome::Unknown)]);
}

#[test]
fn a_reply_header_in_a_hole_leaves_the_outcome_unknown_until_the_next_command() {
    let mut p = RedisParser::new(Limits::default());
    let mut out = Vec::new();
    let two = [cmd(&[b"GET", b"a"]), cmd(&[b"GET", b"b"])].concat();
    p.feed(&chunk(S, 0, &two, two.len() as u64), &mut out);
    let replies = [bulk(&[b'v'; 5000]), bulk(b"w")].concat();
    p.feed(&chunk(R, 1, &replies[..100], replies.len() as u64), &mut out);
    assert_eq!(gets(&out), vec![("a".into(), Outcome::Hit)]);
    assert_eq!(errors(&out), vec![ParseError::Desync]);
    let c = cmd(&[b"GET", b"c"]);
    p.feed(&chunk(S, 2, &c, c.len() as u64), &mut out);
    p.feed(&chunk(R, 3, b"$-1\r\n", 5), &mut out);
    assert_eq!(
        gets(&out),
        vec![("a".into(), Outcome::Hit), ("b".into(), Outcome::Unknown), ("c".into(), Outcome::Miss)]
    );
}

#[test]
fn a_get_without_answer_fails_at_close() {
    let mut p = RedisParser::new(Limits::default());
    let mut ev = run(&mut p, &[(S, cmd(&[b"GET", b"a"]))]);
    p.close(&mut ev);
    assert_eq!(gets(&ev), vec![("a".into(), Outcome::Fail)]);
}

#[test]
fn inline_commands_and_subscribers() {
    let mut p = RedisParser::new(Limits::default());
    let ev = run(&mut p, &[(S, b"GET a\r\n".to_vec()), (R, bulk(b"1"))]);
    assert_eq!(gets(&ev), vec![("a".into(), Outcome::Hit)]);
    let mut p = RedisParser::new(Limits::default());
    run(
        &mut p,
        &[(S, cmd(&[b"SUBSCRIBE", b"ch"])), (R, b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n".to_vec())],
    );
    assert!(p.is_done());
}

#[test]
fn bounded_pending_and_unexpected_replies() {
    let mut p = RedisParser::new(Limits { max_pending: 2 });
    let ev = run(&mut p, &[(S, [cmd(&[b"GET", b"a"]), cmd(&[b"GET", b"b"]), cmd(&[b"GET", b"c"])].concat())]);
    assert_eq!(errors(&ev), vec![ParseError::PendingOverflow]);
    assert_eq!(p.pending(), 2);
    let mut p = RedisParser::new(Limits::default());
    let ev = run(&mut p, &[(R, b"+OK\r\n".to_vec())]);
    assert_eq!(errors(&ev), vec![ParseError::UnexpectedReply]);
}

fn session() -> Vec<(Direction, Vec<u8>)> {
    vec![
        (S, cmd(&[b"HELLO", b"3"])),
        (R, b"%2\r\n$6\r\nserver\r\n$5\r\nredis\r\n$5\r\nproto\r\n:3\r\n".to_vec()),
        (S, cmd(&[b"SET", b":1:k", b"v"])),
        (R, b"+OK\r\n".to_vec()),
        (S, cmd(&[b"GET", b":1:k"])),
        (R, bulk(&[b'v'; 3000])),
        (S, cmd(&[b"GET", b":1:nope"])),
        (R, b"_\r\n".to_vec()),
        (S, cmd(&[b"MGET", b":1:k", b":1:nope"])),
        (R, [b"*2\r\n".to_vec(), bulk(b"v"), b"_\r\n".to_vec()].concat()),
        (S, cmd(&[b"GET", b":1:k"])),
        (R, b"-ERR oops\r\n".to_vec()),
    ]
}

proptest! {
    #[test]
    fn reads_split_anywhere_give_the_same_gets(cuts in proptest::collection::vec(1usize..300, 0..40)) {
        let steps = session();
        let want = run(&mut RedisParser::new(Limits::default()), &steps);
        let mut split = Vec::new();
        let mut cuts = cuts.into_iter();
        for (dir, b) in steps {
            let mut rest = &b[..];
            while !rest.is_empty() {
                let n = cuts.next().unwrap_or(rest.len()).min(rest.len());
                split.push((dir, rest[..n].to_vec()));
                rest = &rest[n..];
            }
        }
        let got = run(&mut RedisParser::new(Limits::default()), &split);
        prop_assert_eq!(gets(&got), gets(&want));
    }

    #[test]
    fn any_capture_of_48_bytes_or_more_keeps_the_outcomes(cap in 48usize..200) {
        let mut p = RedisParser::new(Limits::default());
        let mut out = Vec::new();
        for (i, (dir, b)) in session().iter().enumerate() {
            p.feed(&chunk(*dir, i, &b[..b.len().min(cap)], b.len() as u64), &mut out);
        }
        prop_assert_eq!(tally(&out), [("fail", 1), ("hit", 1), ("miss", 1)].into_iter().collect(), "{:?}", out);
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_stay_bounded(
        steps in proptest::collection::vec((any::<bool>(), proptest::collection::vec(any::<u8>(), 0..200), 0u64..3000), 0..30),
    ) {
        let mut p = RedisParser::new(Limits { max_pending: 8 });
        let mut out = Vec::new();
        for (i, (send, b, extra)) in steps.iter().enumerate() {
            let dir = if *send { S } else { R };
            p.feed(&chunk(dir, i, b, b.len() as u64 + extra), &mut out);
            prop_assert!(p.pending() <= 16);
            prop_assert!(p.stack.len() <= MAX_DEPTH && p.txn.len() <= MAX_TXN);
        }
        p.close(&mut out);
    }
}

/// Audit [9a]: dropping the oldest command at the pending bound shifted every later
/// reply onto the wrong command; its reply is now stepped over.
#[test]
fn the_pending_bound_never_shifts_replies() {
    let mut p = RedisParser::new(Limits { max_pending: 2 });
    let send = [cmd(&[b"GET", b"a"]), cmd(&[b"GET", b"b"]), cmd(&[b"GET", b"c"])].concat();
    let recv = [bulk(b"x"), b"$-1\r\n".to_vec(), bulk(b"z")].concat();
    let ev = run(&mut p, &[(S, send), (R, recv)]);
    assert_eq!(errors(&ev), vec![ParseError::PendingOverflow]);
    assert_eq!(gets(&ev), vec![("b".into(), Outcome::Miss), ("c".into(), Outcome::Hit)]);
}

/// Audit [9a]: a RESP3 attribute inside an aggregate is a prefix of the next element,
/// not an element: counted as one, it closed the array early and the next GET took
/// the array's last element for its reply.
#[test]
fn an_attribute_inside_an_aggregate_is_not_an_element() {
    let mut p = RedisParser::new(Limits::default());
    let send = [cmd(&[b"MGET", b"a", b"x"]), cmd(&[b"GET", b"b"])].concat();
    let recv = b"*2\r\n|1\r\n+ttl\r\n:3\r\n$1\r\nx\r\n$1\r\ny\r\n$-1\r\n".to_vec();
    let ev = run(&mut p, &[(S, send), (R, recv)]);
    assert!(errors(&ev).is_empty(), "{ev:?}");
    assert_eq!(gets(&ev), vec![("b".into(), Outcome::Miss)]);
    // An empty attribute inside an aggregate, and one inside EXEC's reply.
    let mut p = RedisParser::new(Limits::default());
    let send = [cmd(&[b"MULTI"]), cmd(&[b"GET", b"k"]), cmd(&[b"EXEC"]), cmd(&[b"GET", b"b"])].concat();
    let recv = b"+OK\r\n+QUEUED\r\n*1\r\n|0\r\n|1\r\n+a\r\n+b\r\n$1\r\nv\r\n$-1\r\n".to_vec();
    let ev = run(&mut p, &[(S, send), (R, recv)]);
    assert!(errors(&ev).is_empty(), "{ev:?}");
    assert_eq!(gets(&ev), vec![("k".into(), Outcome::Hit), ("b".into(), Outcome::Miss)]);
}

use crate::protocol::fixtures::resplit;

proptest! {
    /// GET and MGET of keys of any bytes past KEY_HEAD (invalid UTF-8, CR, LF, `$`),
    /// answered by values of any bytes (RESP framing inside them) or by nil in both
    /// RESP versions, split anywhere in both directions: each GET is counted once with
    /// its outcome, its key cut at KEY_HEAD bytes, whatever the split (an MGET is
    /// django-redis's get_many, which django-prometheus does not count: it must only
    /// keep the framing).
    #[test]
    fn lookups_past_key_head_in_any_split(
        lookups in proptest::collection::vec(
            proptest::collection::vec(
                (proptest::collection::vec(any::<u8>(), 0..600), proptest::option::of(proptest::collection::vec(any::<u8>(), 0..2000)), any::<bool>()),
                1..4,
            ),
            1..5,
        ),
        cuts in proptest::collection::vec(1usize..700, 1..8),
    ) {
        let mut steps = Vec::new();
        let mut want = Vec::new();
        for keys in &lookups {
            let answer = |(value, resp3): &(Option<Vec<u8>>, bool)| match value {
                Some(v) => bulk(v),
                None if *resp3 => b"_\r\n".to_vec(),
                None => b"$-1\r\n".to_vec(),
            };
            if let [(key, value, resp3)] = &keys[..] {
                steps.push((S, cmd(&[b"GET", key])));
                steps.push((R, answer(&(value.clone(), *resp3))));
            } else {
                let mut args: Vec<&[u8]> = vec![b"MGET"];
                args.extend(keys.iter().map(|(k, _, _)| &k[..]));
                steps.push((S, cmd(&args)));
                let mut r = format!("*{}\r\n", keys.len()).into_bytes();
                for (_, v, resp3) in keys {
                    r.extend(answer(&(v.clone(), *resp3)));
                }
                steps.push((R, r));
            }
            if let [(key, value, _)] = &keys[..] {
                let outcome = if value.is_some() { Outcome::Hit } else { Outcome::Miss };
                want.push((String::from_utf8_lossy(&key[..key.len().min(KEY_HEAD)]).into_owned(), outcome));
            }
        }
        let whole = run(&mut RedisParser::new(Limits::default()), &steps);
        prop_assert!(errors(&whole).is_empty(), "{:?}", errors(&whole));
        prop_assert_eq!(gets(&whole), want.clone());
        let split = run(&mut RedisParser::new(Limits::default()), &resplit(&steps, &cuts));
        prop_assert!(errors(&split).is_empty(), "{:?}", errors(&split));
        prop_assert_eq!(gets(&split), want);
    }
}

/// Found by the hostile end-to-end test ([9a]): a length of -2 (or any negative but
/// -1) is not RESP. redis-py reads `$-2` as an empty value that Django then fails to
/// decode: the GET is neither a hit nor a miss, and the framing is lost.
#[test]
fn negative_lengths_other_than_minus_one_are_protocol_errors() {
    for reply in [&b"$-2\r\n"[..], b"*-2\r\n", b"$-9223372036854775808\r\n"] {
        let ev = run(
            &mut RedisParser::new(Limits::default()),
            &[(S, cmd(&[b"GET", b":1:k"])), (R, reply.to_vec())],
        );
        assert_eq!(gets(&ev), vec![(":1:k".into(), Outcome::Unknown)], "{reply:?}");
        assert_eq!(errors(&ev), vec![ParseError::BadMessage], "{reply:?}");
    }
    // -1 stays the RESP2 null: a miss.
    let ev = run(
        &mut RedisParser::new(Limits::default()),
        &[(S, cmd(&[b"GET", b":1:k"])), (R, b"*-1\r\n".to_vec())],
    );
    assert_eq!(gets(&ev), vec![(":1:k".into(), Outcome::Miss)]);
}
