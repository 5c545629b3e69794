use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::protocol::fixtures::{self, errors, gets, tally};

use Direction::{Recv as R, Send as S};

fn chunk(dir: Direction, i: usize, bytes: &[u8], total_len: u64) -> Chunk<'_> {
    let ts = (i as u64 + 1) * 10;
    Chunk { dir, enter_ns: ts, exit_ns: ts + 1, bytes, total_len }
}

fn run(p: &mut MemcachedParser, steps: &[(Direction, &[u8])]) -> Vec<Event> {
    let mut out = Vec::new();
    for (i, (dir, b)) in steps.iter().enumerate() {
        p.feed(&chunk(*dir, i, b, b.len() as u64), &mut out);
    }
    out
}

fn replay(cap: usize) -> Vec<Event> {
    let mut parsers: BTreeMap<u32, MemcachedParser> = BTreeMap::new();
    let mut out = Vec::new();
    for r in fixtures::load("memcached-pymemcache.jsonl") {
        match &r.step {
            Some(step) => {
                let p = parsers.entry(r.conn).or_insert_with(|| {
                    assert!(is_command(&step.data), "connection {} starts with a command", r.conn);
                    MemcachedParser::new(Limits::default())
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

/// Audit [9a]: `md`/`ma` keys that start with `q` were read as the quiet flag, so the
/// answer of `md` went to the next lookup (a miss counted as a hit).
#[test]
fn a_key_starting_with_q_is_no_quiet_flag() {
    let mut p = MemcachedParser::new(Limits::default());
    let ev = run(&mut p, &[(S, b"md queue:1\r\nma quota\r\nmg f v\r\n"), (R, b"HD\r\nHD\r\nEN\r\n")]);
    assert_eq!(gets(&ev), vec![("f".into(), Outcome::Miss)]);
    assert!(errors(&ev).is_empty(), "{ev:?}");
}

/// Audit [9a]: quiet meta commands are answered on some outcomes only (a hit, an
/// error): their answers shifted every later one. Up to an `mn` barrier that answered
/// nothing they are done; an answer that may be theirs loses the framing, counted.
#[test]
fn quiet_meta_commands_never_shift_later_answers() {
    let mut p = MemcachedParser::new(Limits::default());
    let ev = run(&mut p, &[(S, b"mg e v q\r\nmn\r\nmg f v\r\n"), (R, b"MN\r\nVA 1\r\ny\r\n")]);
    assert_eq!(gets(&ev), vec![("f".into(), Outcome::Hit)]);
    assert!(errors(&ev).is_empty(), "{ev:?}");
    let mut p = MemcachedParser::new(Limits::default());
    let ev =
        run(&mut p, &[(S, b"mg e v q\r\nmn\r\nmg f v\r\n"), (R, b"VA 1\r\nx\r\nMN\r\nVA 1 f1\r\ny\r\n")]);
    assert!(!gets(&ev).iter().any(|(k, o)| k == "f" && *o == Outcome::Miss), "{ev:?}");
    assert_eq!(errors(&ev), vec![ParseError::Desync]);
    let mut p = MemcachedParser::new(Limits::default());
    let ev = run(&mut p, &[(S, b"ms k 2 q\r\nhi\r\nmg f v\r\n"), (R, b"NS\r\nVA 1\r\ny\r\n")]);
    assert!(!gets(&ev).iter().any(|(_, o)| *o == Outcome::Miss), "{ev:?}");
}

/// Audit [9a]: dropping the oldest command at the pending bound shifted every later
/// answer onto the wrong command. Past the bound the answers in flight are unknown.
#[test]
fn the_pending_bound_never_shifts_answers() {
    let mut p = MemcachedParser::new(Limits { max_pending: 2 });
    let ev = run(
        &mut p,
        &[
            (S, b"get a\r\nget b\r\nget c\r\n"),
            (R, b"VALUE a 0 1\r\nx\r\nEND\r\nEND\r\nVALUE c 0 1\r\nz\r\nEND\r\n"),
        ],
    );
    assert!(errors(&ev).contains(&ParseError::PendingOverflow));
    for (k, o) in gets(&ev) {
        assert!(matches!(o, Outcome::Unknown) || (k == "a" && o == Outcome::Hit), "{k} {o:?}: {ev:?}");
    }
}

#[test]
fn real_capture_pymemcache() {
    // Django's PyMemcacheCache: one connection per request, `get` of one key per
    // cache.get() and per has_key() (Django's BaseCache.has_key calls get()), `get k1 k2`
    // for get_many (not a lookup).
    let ev = replay(usize::MAX);
    assert!(errors(&ev).is_empty(), "{:?}", errors(&ev));
    assert_eq!(tally(&ev), [("hit", 5), ("miss", 5)].into_iter().collect());
    let g = gets(&ev);
    assert_eq!(g[0], (":1:hit-key".into(), Outcome::Hit));
    // A stored None (pickled, flags 1) reads as a miss.
    assert!(g.contains(&(":1:none-key".into(), Outcome::Miss)));
    assert!(g.contains(&(":1:int-key".into(), Outcome::Hit)));
    assert!(g.contains(&(":1:big-key".into(), Outcome::Hit)));
}

#[test]
fn real_capture_cut_to_48_and_64_bytes_counts_the_same() {
    // Command and VALUE lines hold the key: they must be captured whole (48 bytes here).
    for cap in [48, 64] {
        let ev = replay(cap);
        assert_eq!(tally(&ev), [("hit", 5), ("miss", 5)].into_iter().collect(), "cap {cap}");
    }
}

#[test]
fn commands_are_recognised() {
    assert!(is_command(b"get :1:k\r\n"));
    assert!(is_command(b"set :1:k 0 0 1\r\nx\r\n"));
    assert!(is_command(b"mg :1:k v\r\n"));
    assert!(is_command(b"version\r\n"));
    assert!(!is_command(b"GET / HTTP/1.1\r\n"));
    assert!(!is_command(b"getx\r\n"));
    assert!(!is_command(b"*2\r\n$3\r\nGET\r\n"));
    assert!(!is_command(&[0, 0, 0, 8, 4, 210, 22, 47]));
}

#[test]
fn errors_and_multi_key_gets() {
    let mut p = MemcachedParser::new(Limits::default());
    let ev = run(
        &mut p,
        &[
            (S, b"get a\r\n"),
            (R, b"SERVER_ERROR out of memory\r\n"),
            (S, b"get a b\r\n"),
            (R, b"VALUE a 0 1\r\n1\r\nEND\r\n"),
            (S, b"gets c\r\n"),
            (R, b"VALUE c 0 2 99\r\nhi\r\nEND\r\n"),
            (S, b"get d\r\n"),
            (R, b"CLIENT_ERROR bad command line format\r\n"),
            (S, b"incr n 1\r\n"),
            (R, b"NOT_FOUND\r\n"),
            (S, b"get e\r\n"),
            (R, b"END\r\n"),
        ],
    );
    assert_eq!(
        gets(&ev),
        vec![
            ("a".into(), Outcome::Fail),
            ("c".into(), Outcome::Hit),
            ("d".into(), Outcome::Fail),
            ("e".into(), Outcome::Miss)
        ]
    );
    assert!(errors(&ev).is_empty());
    assert_eq!(p.pending(), 0);
}

#[test]
fn meta_commands() {
    let mut p = MemcachedParser::new(Limits::default());
    let ev = run(
        &mut p,
        &[
            (S, b"mg a v f\r\nmg b v\r\nmg c\r\nms d 2 T0\r\nhi\r\nmg e v q\r\nmn\r\nmg f v\r\n"),
            (R, b"VA 3 f0\r\nabc\r\nEN\r\nHD\r\nHD\r\nMN\r\nVA 4 f1\r\n\x80\x04N.\r\n"),
        ],
    );
    assert_eq!(
        gets(&ev),
        vec![
            ("a".into(), Outcome::Hit),
            ("b".into(), Outcome::Miss),
            ("c".into(), Outcome::Hit),
            ("f".into(), Outcome::Miss)
        ]
    );
    assert!(errors(&ev).is_empty(), "{:?}", errors(&ev));
}

#[test]
fn storage_data_blocks_and_large_values_are_stepped_over() {
    let mut p = MemcachedParser::new(Limits::default());
    let mut out = Vec::new();
    let set = [b"set big 0 0 100000\r\n".as_slice(), &[b'x'; 100_000], b"\r\nget big\r\n"].concat();
    p.feed(&chunk(S, 0, &set[..64], set.len() as u64), &mut out);
    p.feed(&chunk(R, 1, b"STORED\r\n", 8), &mut out);
    // The get sat in the hole: its answer cannot be matched to a key we never saw.
    let value = [b"VALUE big 0 100000\r\n".as_slice(), &[b'x'; 100_000], b"\r\nEND\r\n"].concat();
    p.feed(&chunk(R, 2, &value[..64], value.len() as u64), &mut out);
    p.feed(&chunk(S, 3, b"get big\r\n", 9), &mut out);
    for (i, part) in value.chunks(4096).enumerate() {
        p.feed(&chunk(R, 4 + i, &part[..part.len().min(32)], part.len() as u64), &mut out);
    }
    assert_eq!(gets(&out), vec![("big".into(), Outcome::Hit)]);
    assert_eq!(errors(&out), vec![ParseError::Desync, ParseError::UnexpectedReply]);
}

#[test]
fn an_answer_line_in_a_hole_leaves_the_outcome_unknown() {
    // The first value's END is known by its length; the second get's answer line is not.
    let mut p = MemcachedParser::new(Limits::default());
    let mut out = Vec::new();
    p.feed(&chunk(S, 0, b"get a\r\nget b\r\n", 14), &mut out);
    let answers = [b"VALUE a 0 5000\r\n".as_slice(), &[b'v'; 5000], b"\r\nEND\r\nEND\r\n"].concat();
    p.feed(&chunk(R, 1, &answers[..100], answers.len() as u64), &mut out);
    assert_eq!(errors(&out), vec![ParseError::Desync]);
    p.feed(&chunk(S, 2, b"get c\r\n", 7), &mut out);
    p.feed(&chunk(R, 3, b"END\r\n", 5), &mut out);
    assert_eq!(
        gets(&out),
        vec![("a".into(), Outcome::Hit), ("b".into(), Outcome::Unknown), ("c".into(), Outcome::Miss)]
    );
}

#[test]
fn a_get_without_answer_fails_at_close() {
    let mut p = MemcachedParser::new(Limits::default());
    let mut ev = run(&mut p, &[(S, b"get a\r\n")]);
    p.close(&mut ev);
    assert_eq!(gets(&ev), vec![("a".into(), Outcome::Fail)]);
}

#[test]
fn bounded_pending_and_unexpected_answers() {
    let mut p = MemcachedParser::new(Limits { max_pending: 2 });
    let ev = run(&mut p, &[(S, b"get a\r\nget b\r\nget c\r\n")]);
    assert_eq!(errors(&ev), vec![ParseError::PendingOverflow]);
    assert_eq!(p.pending(), 2);
    let mut p = MemcachedParser::new(Limits::default());
    let ev = run(&mut p, &[(R, b"END\r\n")]);
    assert_eq!(errors(&ev), vec![ParseError::UnexpectedReply]);
    let mut p = MemcachedParser::new(Limits::default());
    let ev = run(&mut p, &[(S, b"\x16\x03\x01 hello\r\n")]);
    assert_eq!(errors(&ev), vec![ParseError::BadMessage]);
}

fn session() -> Vec<(Direction, Vec<u8>)> {
    vec![
        (S, b"set :1:k 16 300 3000\r\n".iter().chain(&[b'v'; 3000]).chain(b"\r\n").copied().collect()),
        (R, b"STORED\r\n".to_vec()),
        (S, b"get :1:k\r\n".to_vec()),
        (R, b"VALUE :1:k 16 3000\r\n".iter().chain(&[b'v'; 3000]).chain(b"\r\nEND\r\n").copied().collect()),
        (S, b"get :1:nope\r\n".to_vec()),
        (R, b"END\r\n".to_vec()),
        (S, b"get :1:k :1:nope\r\n".to_vec()),
        (R, b"VALUE :1:k 16 1\r\nv\r\nEND\r\n".to_vec()),
        (S, b"get :1:k\r\n".to_vec()),
        (R, b"SERVER_ERROR busy\r\n".to_vec()),
    ]
}

proptest! {
    #[test]
    fn reads_split_anywhere_give_the_same_gets(cuts in proptest::collection::vec(1usize..300, 0..40)) {
        let steps = session();
        let refs: Vec<(Direction, &[u8])> = steps.iter().map(|(d, b)| (*d, b.as_slice())).collect();
        let want = run(&mut MemcachedParser::new(Limits::default()), &refs);
        prop_assert_eq!(tally(&want), [("fail", 1), ("hit", 1), ("miss", 1)].into_iter().collect());
        let mut split = Vec::new();
        let mut cuts = cuts.into_iter();
        for (dir, b) in &steps {
            let mut rest = &b[..];
            while !rest.is_empty() {
                let n = cuts.next().unwrap_or(rest.len()).min(rest.len());
                split.push((*dir, &rest[..n]));
                rest = &rest[n..];
            }
        }
        let got = run(&mut MemcachedParser::new(Limits::default()), &split);
        prop_assert_eq!(gets(&got), gets(&want));
    }

    #[test]
    fn any_capture_of_24_bytes_or_more_keeps_the_outcomes(cap in 24usize..200) {
        let mut p = MemcachedParser::new(Limits::default());
        let mut out = Vec::new();
        for (i, (dir, b)) in session().iter().enumerate() {
            p.feed(&chunk(*dir, i, &b[..b.len().min(cap)], b.len() as u64), &mut out);
        }
        prop_assert_eq!(tally(&out), [("fail", 1), ("hit", 1), ("miss", 1)].into_iter().collect());
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_stay_bounded(
        steps in proptest::collection::vec((any::<bool>(), proptest::collection::vec(any::<u8>(), 0..200), 0u64..3000), 0..30),
    ) {
        let mut p = MemcachedParser::new(Limits { max_pending: 8 });
        let mut out = Vec::new();
        for (i, (send, b, extra)) in steps.iter().enumerate() {
            let dir = if *send { S } else { R };
            p.feed(&chunk(dir, i, b, b.len() as u64 + extra), &mut out);
            prop_assert!(p.pending() <= 16);
        }
        p.close(&mut out);
    }
}

use crate::protocol::fixtures::resplit;

proptest! {
    /// `get` of keys of any bytes memcached allows (no space or control character),
    /// past KEY_HEAD and past memcached's own 250, answered with data of any bytes
    /// (`\r\nEND\r\n` inside it) or a miss, between `set`s whose data holds command
    /// lines, split anywhere in both directions: each get is counted once with its
    /// outcome and its key cut at KEY_HEAD bytes, whatever the split.
    #[test]
    fn gets_past_key_head_in_any_split(
        ops in proptest::collection::vec(
            (proptest::collection::vec(0x21u8..=0xff, 1..300), proptest::option::of(proptest::collection::vec(any::<u8>(), 0..2000)), any::<bool>()),
            1..6,
        ),
        cuts in proptest::collection::vec(1usize..700, 1..8),
    ) {
        let mut steps = Vec::new();
        let mut want = Vec::new();
        for (key, value, set_first) in &ops {
            let data = value.clone().unwrap_or_else(|| b"\r\nget x\r\nEND\r\n".to_vec());
            if *set_first {
                let mut set = [b"set ", &key[..], format!(" 0 0 {}\r\n", data.len()).as_bytes()].concat();
                set.extend_from_slice(&data);
                set.extend_from_slice(b"\r\n");
                steps.push((S, set));
                steps.push((R, b"STORED\r\n".to_vec()));
            }
            steps.push((S, [b"get ", &key[..], b"\r\n"].concat()));
            let answer = match value {
                Some(v) => {
                    let mut a = [b"VALUE ", &key[..], format!(" 0 {}\r\n", v.len()).as_bytes()].concat();
                    a.extend_from_slice(v);
                    a.extend_from_slice(b"\r\nEND\r\n");
                    a
                }
                None => b"END\r\n".to_vec(),
            };
            steps.push((R, answer));
            let outcome = if value.is_some() { Outcome::Hit } else { Outcome::Miss };
            want.push((String::from_utf8_lossy(&key[..key.len().min(KEY_HEAD)]).into_owned(), outcome));
        }
        let run_steps = |steps: &[(Direction, Vec<u8>)]| {
            let mut p = MemcachedParser::new(Limits::default());
            let borrowed: Vec<(Direction, &[u8])> = steps.iter().map(|(d, b)| (*d, &b[..])).collect();
            run(&mut p, &borrowed)
        };
        let whole = run_steps(&steps);
        prop_assert!(errors(&whole).is_empty(), "{:?}", errors(&whole));
        prop_assert_eq!(gets(&whole), want.clone());
        let split = run_steps(&resplit(&steps, &cuts));
        prop_assert!(errors(&split).is_empty(), "{:?}", errors(&split));
        prop_assert_eq!(gets(&split), want);
    }
}
