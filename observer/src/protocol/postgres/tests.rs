use std::collections::BTreeMap;

use bytes::BytesMut;
use postgres_protocol::{IsNull, message::frontend};
use proptest::prelude::*;

use super::{sql::WriteOp, *};
use crate::protocol::fixtures::{self, Rec};

use Direction::{Recv as R, Send as S};

fn chunk(dir: Direction, i: usize, bytes: &[u8], total_len: u64) -> Chunk<'_> {
    let ts = (i as u64 + 1) * 10;
    Chunk { dir, enter_ns: ts, exit_ns: ts + 1, bytes, total_len }
}

/// Feeds (dir, bytes) steps at timestamps 10, 20, 30... (exit one later).
fn run(p: &mut PgParser, steps: &[(Direction, Vec<u8>)]) -> Vec<Event> {
    let mut out = Vec::new();
    for (i, (dir, b)) in steps.iter().enumerate() {
        p.feed(&chunk(*dir, i, b, b.len() as u64), &mut out);
    }
    out
}

fn buf(f: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
    let mut b = BytesMut::new();
    f(&mut b);
    b.to_vec()
}

fn q(sql: &str) -> Vec<u8> {
    buf(|b| frontend::query(sql, b).unwrap())
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    buf(|b| frontend::parse(name, sql, None, b).unwrap())
}

fn bind(portal: &str, stmt: &str) -> Vec<u8> {
    buf(|b| {
        frontend::bind(
            portal,
            stmt,
            Some(1),
            [5i32],
            |v, out| {
                out.extend_from_slice(&v.to_be_bytes());
                Ok(IsNull::No)
            },
            Some(1),
            b,
        )
        .map_err(|_| "bind")
        .unwrap()
    })
}

fn describe(portal: &str) -> Vec<u8> {
    buf(|b| frontend::describe(b'P', portal, b).unwrap())
}

fn execute(portal: &str) -> Vec<u8> {
    buf(|b| frontend::execute(portal, 0, b).unwrap())
}

fn sync() -> Vec<u8> {
    buf(frontend::sync)
}

fn flush() -> Vec<u8> {
    buf(frontend::flush)
}

fn close_statement(name: &str) -> Vec<u8> {
    buf(|b| frontend::close(b'S', name, b).unwrap())
}

fn startup(user: &str, db: &str) -> Vec<u8> {
    buf(|b| {
        frontend::startup_message([("user", user), ("database", db), ("client_encoding", "UTF8")], b).unwrap()
    })
}

fn ssl_request() -> Vec<u8> {
    buf(frontend::ssl_request)
}

fn cancel() -> Vec<u8> {
    buf(|b| frontend::cancel_request(1234, 5678, b))
}

fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn ready() -> Vec<u8> {
    msg(b'Z', b"I")
}

fn complete(tag: &str) -> Vec<u8> {
    msg(b'C', format!("{tag}\0").as_bytes())
}

fn error(code: &str) -> Vec<u8> {
    msg(b'E', format!("SERROR\0VERROR\0C{code}\0Mit failed\0\0").as_bytes())
}

fn fatal(code: &str) -> Vec<u8> {
    msg(b'E', format!("SFATAL\0VFATAL\0C{code}\0Mno\0\0").as_bytes())
}

fn auth_ok() -> Vec<u8> {
    msg(b'R', &0u32.to_be_bytes())
}

fn data_row(len: usize) -> Vec<u8> {
    let mut body = 1u16.to_be_bytes().to_vec();
    body.extend_from_slice(&(len as u32).to_be_bytes());
    body.extend(std::iter::repeat_n(b'x', len));
    msg(b'D', &body)
}

/// A parser past its startup.
fn connected() -> PgParser {
    let mut p = PgParser::new(Limits::default());
    let ev = run(&mut p, &[(S, startup("u", "d")), (R, cat(&[auth_ok(), ready()]))]);
    assert_eq!(ev, vec![Event::Attempt { user: Some("u".into()), database: Some("d".into()) }]);
    p
}

fn statements(ev: &[Event]) -> Vec<&Statement> {
    ev.iter()
        .filter_map(|e| match e {
            Event::Statement(s) => Some(s),
            _ => None,
        })
        .collect()
}

fn errors(ev: &[Event]) -> Vec<ParseError> {
    ev.iter()
        .filter_map(|e| match e {
            Event::Error(x) => Some(*x),
            _ => None,
        })
        .collect()
}

fn server(code: &str) -> Option<Failure> {
    Some(Failure::Server(SqlState::parse(code.as_bytes()).unwrap()))
}

// ---- real captures ----------------------------------------------------------------

/// `testdata/postgres-django-views.jsonl`: every PostgreSQL connection of a gunicorn
/// worker while the test app's /db/ views ran once each (psycopg 3.3.9, Django 5.2,
/// CONN_MAX_AGE 0).
fn fixture(name: &str) -> Vec<Rec> {
    fixtures::load(name)
}

/// Replays a fixture with at most `cap` bytes captured per syscall.
fn replay(recs: &[Rec], cap: usize) -> Vec<Event> {
    let mut parsers: BTreeMap<u32, PgParser> = BTreeMap::new();
    let mut out = Vec::new();
    for r in recs {
        match &r.step {
            Some(step) => {
                let p = parsers.entry(r.conn).or_insert_with(|| {
                    assert!(is_startup(&step.data), "connection {} starts with a startup message", r.conn);
                    PgParser::new(Limits::default())
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

#[derive(Debug, Default, PartialEq)]
struct Summary {
    attempts: usize,
    attempt_failures: Vec<Option<String>>,
    units: usize,
    executes: u32,
    many: u32,
    failures: BTreeMap<String, u32>,
    writes: BTreeMap<(WriteOp, String), u32>,
    errors: usize,
}

fn summary(ev: &[Event]) -> Summary {
    let mut s = Summary::default();
    for e in ev {
        match e {
            Event::Attempt { .. } => s.attempts += 1,
            Event::AttemptFailed { sqlstate } => {
                s.attempt_failures.push(sqlstate.map(|x| x.as_str().to_string()));
            }
            Event::Statement(st) => {
                s.units += 1;
                s.executes += st.executes;
                if st.many {
                    s.many += st.executes;
                }
                if let Some(f) = st.failure {
                    let k = match f {
                        Failure::Server(x) => x.class_name().to_string(),
                        Failure::ConnectionLost => "lost".into(),
                        Failure::Unknown => "unknown".into(),
                        Failure::Desync => "desync".into(),
                    };
                    *s.failures.entry(k).or_default() += 1;
                }
                for (w, n) in &st.writes {
                    *s.writes.entry((w.op, w.table.to_string())).or_default() += n;
                }
            }
            Event::Error(_) => s.errors += 1,
            Event::Encrypted | Event::Cancel => {}
        }
    }
    s
}

fn views_summary() -> Summary {
    Summary {
        // 13 views on "default" plus the wrong-password alias; the closed port never
        // got a byte through.
        attempts: 14,
        attempt_failures: vec![Some("28P01".into())],
        // django-prometheus, same traffic: execute_total 35, execute_many_total 4,
        // query_duration count 32, errors UniqueViolation 2, UndefinedTable 1,
        // QueryCanceled 1.
        units: 32,
        executes: 35,
        many: 4,
        failures: [("UniqueViolation", 2), ("UndefinedTable", 1), ("QueryCanceled", 1)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        writes: [
            ((WriteOp::Insert, "shop_item"), 13),
            ((WriteOp::Update, "shop_item"), 2),
            ((WriteOp::Delete, "shop_item"), 1),
        ]
        .into_iter()
        .map(|((o, t), v)| ((o, t.to_string()), v))
        .collect(),
        errors: 0,
    }
}

#[test]
fn real_capture_of_the_test_views_gives_django_prometheus_counts() {
    let ev = replay(&fixture("postgres-django-views.jsonl"), usize::MAX);
    assert_eq!(summary(&ev), views_summary());
    // Durations run from the statement's write to the ReadyForQuery's read.
    for s in statements(&ev) {
        assert!(s.end_ns > s.start_ns);
    }
}

#[test]
fn real_capture_cut_to_64_bytes_per_syscall_counts_the_same() {
    // Every head that matters fits in 64 bytes. Reads of many messages lose their
    // framing in the hole; their statements complete when the client sends again.
    let ev = replay(&fixture("postgres-django-views.jsonl"), 64);
    let mut s = summary(&ev);
    assert!(s.errors > 0);
    s.errors = 0;
    assert_eq!(s, views_summary());
}

#[test]
fn real_capture_cut_to_16_bytes_keeps_the_counts() {
    // Statement texts and SQLSTATEs are lost (short ones like BEGIN fit), counts are not.
    let ev = replay(&fixture("postgres-django-views.jsonl"), 16);
    let s = summary(&ev);
    assert_eq!((s.attempts, s.units, s.executes, s.many), (14, 32, 35, 4));
    assert_eq!(s.attempt_failures, vec![None]);
    // The timeout's error shares a read with a row description: its header fell in
    // the hole, and that statement completes as a success.
    assert_eq!(s.failures, [("unknown".to_string(), 3)].into_iter().collect());
    assert!(s.writes.is_empty());
}

// ---- startup ----------------------------------------------------------------------

#[test]
fn startup_messages_are_recognised() {
    assert!(is_startup(&startup("observer", "app")));
    assert!(is_startup(&ssl_request()));
    assert!(is_startup(&cancel()));
    assert!(is_startup(&[0, 0, 0, 8, 4, 210, 22, 48])); // GSSENCRequest
    assert!(!is_startup(b"GET / HTTP/1.1\r\n\r\n"));
    assert!(!is_startup(&q("SELECT 1")));
    assert!(!is_startup(b"*1\r\n$4\r\nPING\r\n"));
    assert!(!is_startup(&[0, 0, 0, 8]));
}

#[test]
fn ssl_refused_then_startup_then_auth_failure() {
    let mut p = PgParser::new(Limits::default());
    let ev = run(
        &mut p,
        &[
            (S, ssl_request()),
            (R, b"N".to_vec()),
            (S, startup("observer", "app")),
            (R, msg(b'R', &[0, 0, 0, 10, b'S', b'C', b'R', b'A', b'M', 0, 0])),
            (S, msg(b'p', b"SCRAM-SHA-256\0...")),
            (R, fatal("28P01")),
        ],
    );
    assert_eq!(
        ev,
        vec![
            Event::Attempt { user: Some("observer".into()), database: Some("app".into()) },
            Event::AttemptFailed { sqlstate: SqlState::parse(b"28P01") },
        ]
    );
    let mut out = Vec::new();
    p.close(&mut out);
    assert!(out.is_empty());
}

#[test]
fn ssl_accepted_then_ciphertext_is_one_attempt_and_not_parsed() {
    let mut p = PgParser::new(Limits::default());
    let ev = run(&mut p, &[(S, ssl_request()), (R, b"S".to_vec()), (S, b"\x16\x03\x01 tls".to_vec())]);
    assert_eq!(ev, vec![Event::Encrypted, Event::Attempt { user: None, database: None }]);
    assert!(run(&mut p, &[(S, q("SELECT 1")), (R, cat(&[complete("SELECT 1"), ready()]))]).is_empty());
}

#[test]
fn ssl_accepted_then_plaintext_is_parsed_as_a_session() {
    let mut p = PgParser::new(Limits::default());
    let mut ev = run(&mut p, &[(S, ssl_request()), (R, b"S".to_vec())]);
    assert!(p.awaits_tls());
    // The TLS library's plaintext: the startup, authentication, one statement.
    ev.extend(run(
        &mut p,
        &[
            (S, startup("observer", "app")),
            (R, cat(&[auth_ok(), ready()])),
            (S, q("SELECT 1")),
            (R, cat(&[complete("SELECT 1"), ready()])),
        ],
    ));
    assert_eq!(
        ev[..2],
        [Event::Encrypted, Event::Attempt { user: Some("observer".into()), database: Some("app".into()) }]
    );
    assert_eq!(statements(&ev).len(), 1);
    assert!(errors(&ev).is_empty(), "{ev:?}");
}

#[test]
fn a_tls_handshake_that_fails_is_a_failed_attempt() {
    let mut p = PgParser::new(Limits::default());
    let mut ev = run(&mut p, &[(S, ssl_request()), (R, b"S".to_vec())]);
    // verify-full refused the certificate: the client closes before any plaintext.
    p.close(&mut ev);
    assert_eq!(
        ev,
        [
            Event::Encrypted,
            Event::Attempt { user: None, database: None },
            Event::AttemptFailed { sqlstate: None }
        ]
    );
}

#[test]
fn an_opaque_connection_decrypted_later_is_parsed_from_the_next_message() {
    let mut p = PgParser::new(Limits::default());
    let mut ev = run(&mut p, &[(S, ssl_request()), (R, b"S".to_vec())]);
    p.opaque(&mut ev);
    p.decrypted();
    ev.extend(run(&mut p, &[(S, q("SELECT 1")), (R, cat(&[complete("SELECT 1"), ready()]))]));
    assert_eq!(ev[..2], [Event::Encrypted, Event::Attempt { user: None, database: None }]);
    assert_eq!(statements(&ev).len(), 1, "{ev:?}");
    // Counted once, whatever comes.
    p.close(&mut ev);
    assert_eq!(ev.iter().filter(|e| matches!(e, Event::Attempt { .. })).count(), 1);
}

#[test]
fn gss_accepted_is_counted_and_not_parsed() {
    let mut p = PgParser::new(Limits::default());
    let ev = run(&mut p, &[(S, vec![0, 0, 0, 8, 4, 210, 22, 48]), (R, b"G".to_vec())]);
    assert_eq!(ev, vec![Event::Attempt { user: None, database: None }, Event::Encrypted]);
}

#[test]
fn cancel_requests_are_not_sessions() {
    let mut p = PgParser::new(Limits::default());
    let mut ev = run(&mut p, &[(S, cancel())]);
    p.close(&mut ev);
    assert_eq!(ev, vec![Event::Cancel]);
}

#[test]
fn server_closing_during_startup_is_a_failed_attempt() {
    let mut p = PgParser::new(Limits::default());
    let mut ev = run(&mut p, &[(S, startup("u", "d"))]);
    p.close(&mut ev);
    assert_eq!(
        ev,
        vec![
            Event::Attempt { user: Some("u".into()), database: Some("d".into()) },
            Event::AttemptFailed { sqlstate: None }
        ]
    );
    // Closed while the SSL answer was awaited.
    let mut p = PgParser::new(Limits::default());
    let mut ev = run(&mut p, &[(S, ssl_request())]);
    p.close(&mut ev);
    assert_eq!(
        ev,
        vec![Event::Attempt { user: None, database: None }, Event::AttemptFailed { sqlstate: None }]
    );
}

#[test]
fn database_defaults_to_the_user() {
    let mut p = PgParser::new(Limits::default());
    let m = buf(|b| frontend::startup_message([("user", "alice")], b).unwrap());
    let ev = run(&mut p, &[(S, m)]);
    assert_eq!(ev, vec![Event::Attempt { user: Some("alice".into()), database: Some("alice".into()) }]);
}

// ---- statements -------------------------------------------------------------------

#[test]
fn simple_queries_and_transaction_control() {
    let mut p = connected();
    let ev = run(
        &mut p,
        &[
            (S, q("BEGIN")),
            (R, cat(&[complete("BEGIN"), msg(b'Z', b"T")])),
            (S, q("INSERT INTO \"shop_item\" (\"name\") VALUES ('a')")),
            (R, cat(&[complete("INSERT 0 1"), msg(b'Z', b"T")])),
            (S, q("SAVEPOINT \"s1\"")),
            (R, cat(&[complete("SAVEPOINT"), msg(b'Z', b"T")])),
            (S, q("COMMIT")),
            (R, cat(&[complete("COMMIT"), ready()])),
        ],
    );
    let st = statements(&ev);
    assert_eq!(st.len(), 2);
    assert_eq!((st[0].start_ns, st[0].end_ns), (30, 41));
    assert_eq!(st[0].writes, vec![(TableWrite { op: WriteOp::Insert, table: "shop_item".into() }, 1)]);
    assert!(st[1].writes.is_empty());
    assert!(errors(&ev).is_empty());
}

#[test]
fn error_then_ready_fails_the_statement() {
    let mut p = connected();
    let ev = run(&mut p, &[(S, q("SELECT * FROM nope")), (R, error("42P01")), (R, ready())]);
    let st = statements(&ev);
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].failure, server("42P01"));
    assert_eq!(st[0].end_ns, 31);
}

#[test]
fn extended_protocol_single_execute_is_not_many() {
    // Server-side binding: Parse/Bind/Describe/Execute/Sync in one write.
    let mut p = connected();
    let ev = run(
        &mut p,
        &[
            (S, cat(&[parse("", "SELECT $1"), bind("", ""), describe(""), execute(""), sync()])),
            (R, cat(&[msg(b'1', b""), msg(b'2', b""), data_row(1), complete("SELECT 1"), ready()])),
        ],
    );
    let st = statements(&ev);
    assert_eq!(st.len(), 1);
    assert_eq!((st[0].executes, st[0].many), (1, false));
}

#[test]
fn pipelined_executemany_counts_each_parameter_set() {
    // psycopg 3 executemany: one write per parameter set, then Sync and Flush alone.
    let mut p = connected();
    let one = cat(&[parse("", "INSERT INTO t VALUES ($1)"), bind("", ""), describe(""), execute("")]);
    let answer = cat(&[msg(b'1', b""), msg(b'2', b""), msg(b'n', b""), complete("INSERT 0 1")]);
    let ev = run(
        &mut p,
        &[
            (S, one.clone()),
            (S, one.clone()),
            (S, one),
            (S, sync()),
            (S, flush()),
            (R, cat(&[answer.clone(), answer.clone(), answer, ready()])),
        ],
    );
    let st = statements(&ev);
    assert_eq!(st.len(), 1);
    assert_eq!((st[0].executes, st[0].many, st[0].start_ns), (3, true, 10));
    assert_eq!(st[0].writes, vec![(TableWrite { op: WriteOp::Insert, table: "t".into() }, 3)]);
}

#[test]
fn executemany_of_one_set_is_many_by_its_lone_sync() {
    let mut p = connected();
    let ev = run(
        &mut p,
        &[
            (S, cat(&[parse("", "INSERT INTO t VALUES ($1)"), bind("", ""), describe(""), execute("")])),
            (S, sync()),
            (S, flush()),
            (R, cat(&[msg(b'1', b""), msg(b'2', b""), msg(b'n', b""), complete("INSERT 0 1"), ready()])),
        ],
    );
    let st = statements(&ev);
    assert_eq!((st[0].executes, st[0].many), (1, true));
}

#[test]
fn pipeline_error_skips_to_sync_and_fails_once() {
    let mut p = connected();
    let one = cat(&[parse("", "INSERT INTO t VALUES (1)"), bind("", ""), execute("")]);
    let ev = run(
        &mut p,
        &[
            (S, one.clone()),
            (S, one),
            (S, sync()),
            (R, cat(&[msg(b'1', b""), msg(b'2', b""), complete("INSERT 0 1"), error("23505"), ready()])),
        ],
    );
    let st = statements(&ev);
    assert_eq!(st.len(), 1);
    assert_eq!((st[0].executes, st[0].failure), (2, server("23505")));
}

#[test]
fn transaction_commands_in_a_pipeline_are_not_executes() {
    // psycopg sends BEGIN through the pipeline when executemany runs in a transaction.
    let mut p = connected();
    let ev = run(
        &mut p,
        &[
            (S, cat(&[parse("", "BEGIN"), bind("", ""), execute("")])),
            (S, cat(&[parse("", "INSERT INTO t VALUES (1)"), bind("", ""), execute("")])),
            (S, sync()),
            (R, cat(&[msg(b'1', b""), msg(b'2', b""), complete("BEGIN")])),
            (R, cat(&[msg(b'1', b""), msg(b'2', b""), complete("INSERT 0 1"), ready()])),
        ],
    );
    let st = statements(&ev);
    assert_eq!((st[0].executes, st[0].many), (1, true));
}

#[test]
fn named_prepared_statements_are_remembered_until_closed() {
    let mut p = connected();
    let ev = run(
        &mut p,
        &[
            // psycopg prepares a query it ran often: Parse + Sync, then executes it.
            (S, cat(&[parse("_pg3_0", "DELETE FROM \"shop_item\" WHERE id = $1"), sync()])),
            (R, cat(&[msg(b'1', b""), ready()])),
            (S, cat(&[bind("", "_pg3_0"), execute(""), sync()])),
            (R, cat(&[msg(b'2', b""), complete("DELETE 1"), ready()])),
            (S, cat(&[close_statement("_pg3_0"), sync()])),
            (R, cat(&[msg(b'3', b""), ready()])),
            (S, cat(&[bind("", "_pg3_0"), execute(""), sync()])),
            (R, cat(&[error("26000"), ready()])),
        ],
    );
    let st = statements(&ev);
    // The Parse + Sync and Close + Sync units execute nothing.
    assert_eq!(st.len(), 2);
    assert_eq!(st[0].writes, vec![(TableWrite { op: WriteOp::Delete, table: "shop_item".into() }, 1)]);
    // After the Close, the name is unknown: counted as a plain statement.
    assert!(st[1].writes.is_empty());
    assert_eq!(st[1].failure, server("26000"));
}

#[test]
fn copy_in_and_out_stay_in_their_unit() {
    let mut p = connected();
    let ev = run(
        &mut p,
        &[
            (S, q("COPY t FROM STDIN")),
            (R, msg(b'G', &[0, 0, 0])),
            (S, msg(b'd', b"1\n2\n")),
            (S, msg(b'c', b"")),
            (R, cat(&[complete("COPY 2"), ready()])),
            (S, q("COPY t TO STDOUT")),
            (
                R,
                cat(&[msg(b'H', &[0, 0, 0]), msg(b'd', b"1\n"), msg(b'c', b""), complete("COPY 1"), ready()]),
            ),
        ],
    );
    assert_eq!(statements(&ev).len(), 2);
    assert!(errors(&ev).is_empty());
}

#[test]
fn large_results_are_stepped_over_by_length() {
    let mut p = connected();
    let rows = cat(&(0..50).map(|_| data_row(1000)).collect::<Vec<_>>());
    let total = cat(&[rows, complete("SELECT 50"), ready()]);
    // Four reads, 64 bytes captured of each.
    let mut out = Vec::new();
    p.feed(&chunk(S, 0, &q("SELECT * FROM big"), 23), &mut out);
    for (i, part) in total.chunks(total.len() / 3).enumerate() {
        p.feed(&chunk(R, i + 1, &part[..part.len().min(64)], part.len() as u64), &mut out);
    }
    // Row headers fell in the holes: the ReadyForQuery was not seen...
    assert!(statements(&out).is_empty());
    assert_eq!(errors(&out), vec![ParseError::Desync]);
    // ...but the client's next statement proves it was read, with the last read.
    p.feed(&chunk(S, 6, &q("SELECT 1"), 14), &mut out);
    let st = statements(&out);
    assert_eq!(st.len(), 1);
    assert_eq!((st[0].start_ns, st[0].end_ns), (10, 41));
    p.feed(&chunk(R, 7, &cat(&[complete("SELECT 1"), ready()]), 20), &mut out);
    assert_eq!(statements(&out).len(), 2);
}

#[test]
fn connection_lost_with_statements_in_flight_fails_them() {
    let mut p = connected();
    let mut ev = run(&mut p, &[(S, q("SELECT pg_sleep(10)"))]);
    p.close(&mut ev);
    let st = statements(&ev);
    assert_eq!(st[0].failure, Some(Failure::ConnectionLost));
}

#[test]
fn asynchronous_messages_are_ignored() {
    let mut p = connected();
    let ev = run(
        &mut p,
        &[
            (R, msg(b'S', b"TimeZone\0UTC\0")),
            (R, msg(b'N', b"SNOTICE\0C00000\0Mhi\0\0")),
            (S, q("SELECT 1")),
            (R, cat(&[msg(b'A', b"\0\0\0\x01ch\0x\0"), complete("SELECT 1"), ready()])),
        ],
    );
    assert_eq!(statements(&ev).len(), 1);
    assert!(errors(&ev).is_empty());
}

// ---- holes, loss, resynchronisation ---------------------------------------------------

#[test]
fn header_in_a_hole_desyncs_then_resyncs_at_the_next_statement() {
    let mut p = connected();
    let mut out = Vec::new();
    p.feed(&chunk(S, 0, &q("SELECT 1"), 14), &mut out);
    // The answer's second header is beyond the 3 captured bytes... of a 5-byte capture.
    let answer = cat(&[complete("SELECT 1"), ready()]);
    p.feed(&chunk(R, 1, &answer[..3], answer.len() as u64), &mut out);
    assert_eq!(errors(&out), vec![ParseError::Desync]);
    p.feed(&chunk(S, 2, &q("SELECT 2"), 14), &mut out);
    p.feed(&chunk(R, 3, &answer, answer.len() as u64), &mut out);
    let st = statements(&out);
    // The first completes (at its last read) when the second is sent.
    assert_eq!(st.len(), 2);
    assert_eq!((st[0].start_ns, st[0].end_ns), (10, 21));
    assert_eq!((st[1].start_ns, st[1].end_ns), (30, 41));
}

#[test]
fn writes_longer_than_the_capture_count_as_one_execute_or_continue_a_pipeline() {
    let long = format!("SELECT {}", "1, ".repeat(2000));
    let write = cat(&[parse("", &long), bind("", ""), describe(""), execute(""), sync()]);
    let mut p = connected();
    let mut out = Vec::new();
    p.feed(&chunk(S, 0, &write[..64], write.len() as u64), &mut out);
    p.feed(
        &chunk(R, 1, &cat(&[msg(b'1', b""), msg(b'2', b""), complete("SELECT 1"), ready()]), 30),
        &mut out,
    );
    let st = statements(&out);
    assert_eq!((st.len(), st[0].executes, st[0].many), (1, 1, false));
    // A pipeline: each write is Parse/Bind/Describe/Execute, then a Sync alone.
    let one = cat(&[parse("", &long), bind("", ""), describe(""), execute("")]);
    let mut p = connected();
    let mut out = Vec::new();
    for i in 0..3 {
        p.feed(&chunk(S, i, &one[..64], one.len() as u64), &mut out);
    }
    p.feed(&chunk(S, 3, &sync(), 5), &mut out);
    p.feed(&chunk(R, 4, &ready(), 6), &mut out);
    let st = statements(&out);
    assert_eq!((st.len(), st[0].executes, st[0].many), (1, 3, true));
    assert!(p.pending.is_empty());
}

#[test]
fn lost_records_resync_both_directions() {
    let mut p = connected();
    let mut out = run(&mut p, &[(S, q("SELECT 1"))]);
    assert!(p.lost());
    // The rest of a large answer arrives mid-message: ignored until the next statement.
    p.feed(&chunk(R, 5, &[b'x'; 40], 4000), &mut out);
    p.feed(&chunk(R, 6, &ready(), 6), &mut out);
    p.feed(&chunk(S, 7, &q("SELECT 2"), 14), &mut out);
    p.feed(&chunk(R, 8, &cat(&[complete("SELECT 1"), ready()]), 20), &mut out);
    assert_eq!(errors(&out), vec![]);
    let st = statements(&out);
    // The statement in flight when records were lost completes with the last read
    // before the next one.
    assert_eq!(st.len(), 2);
    assert_eq!((st[0].start_ns, st[0].end_ns), (10, 71));
    assert_eq!(st[1].start_ns, 80);
}

#[test]
fn connections_met_mid_stream_are_parsed_from_the_next_statement() {
    assert!(looks_like_frontend(&q("SELECT 1"), 14));
    let ext = cat(&[parse("", "SELECT 1"), bind("", ""), execute(""), sync()]);
    assert!(looks_like_frontend(&ext, ext.len() as u64));
    assert!(!looks_like_frontend(&ext, ext.len() as u64 - 1));
    assert!(!looks_like_frontend(&q("SELECT 1")[..10], 10));
    assert!(!looks_like_frontend(b"GET / HTTP/1.1\r\n", 16));
    let mut p = PgParser::mid_stream(Limits::default());
    let ev = run(
        &mut p,
        &[
            (R, cat(&[data_row(3), ready()])), // the end of an answer: no statement waits
            (S, q("SELECT 1")),
            (R, cat(&[complete("SELECT 1"), ready()])),
        ],
    );
    assert_eq!(statements(&ev).len(), 1);
    assert!(errors(&ev).is_empty());
}

#[test]
fn bounded_pending_and_prepared() {
    let mut p = PgParser::new(Limits { max_pending: 2, max_prepared: 2, ..Limits::default() });
    run(&mut p, &[(S, startup("u", "d")), (R, cat(&[auth_ok(), ready()]))]);
    let ev = run(
        &mut p,
        &[
            (S, q("SELECT 1")),
            (S, q("SELECT 2")),
            (S, q("SELECT 3")),
            (S, cat(&[parse("a", "SELECT 1"), parse("b", "SELECT 1"), parse("c", "SELECT 1"), sync()])),
        ],
    );
    assert_eq!(
        errors(&ev),
        vec![ParseError::PendingOverflow, ParseError::PreparedOverflow, ParseError::PendingOverflow]
    );
    assert!(p.pending.len() <= 2 && p.statements.len() <= 2);
}

#[test]
fn garbage_in_the_startup_stops_parsing() {
    let mut p = PgParser::new(Limits::default());
    let ev = run(&mut p, &[(S, vec![0, 0, 0, 3, 0, 3, 0, 0])]);
    assert_eq!(errors(&ev), vec![ParseError::BadMessage]);
    let mut p = connected();
    let ev = run(&mut p, &[(S, q("SELECT 1")), (R, b"\xff\x00\x00\x00\x05I".to_vec()), (S, q("SELECT 1"))]);
    assert_eq!(errors(&ev), vec![ParseError::BadMessage]);
}

#[test]
fn unexpected_ready_is_counted() {
    let mut p = connected();
    let ev = run(&mut p, &[(R, ready())]);
    assert_eq!(errors(&ev), vec![ParseError::UnexpectedReady]);
}

// ---- properties -------------------------------------------------------------------

/// A session: startup, then statements, each answered.
fn session() -> Vec<(Direction, Vec<u8>)> {
    vec![
        (S, startup("observer", "app")),
        (R, cat(&[auth_ok(), msg(b'S', b"a\0b\0"), msg(b'K', &[0; 8]), ready()])),
        (S, q("INSERT INTO \"shop_item\" VALUES (1)")),
        (R, cat(&[complete("INSERT 0 1"), ready()])),
        (S, q("SELECT * FROM \"shop_item\"")),
        (R, cat(&[msg(b'T', &[0, 0]), data_row(300), data_row(5000), complete("SELECT 2"), ready()])),
        (S, q("SELECT nope")),
        (R, cat(&[error("42703"), ready()])),
        (S, cat(&[parse("", "UPDATE \"shop_item\" SET a = 1"), bind("", ""), execute(""), sync()])),
        (R, cat(&[msg(b'1', b""), msg(b'2', b""), complete("UPDATE 1"), ready()])),
    ]
}

proptest! {
    #[test]
    fn reads_split_anywhere_give_the_same_events(cuts in proptest::collection::vec(1usize..400, 0..40)) {
        let steps = session();
        let want = run(&mut PgParser::new(Limits::default()), &steps);
        // Re-split every read at the given cut points (the kernel may return any part).
        let mut split = Vec::new();
        let mut cuts = cuts.into_iter();
        for (dir, b) in steps {
            if dir == S {
                split.push((dir, b));
                continue;
            }
            let mut rest = &b[..];
            while !rest.is_empty() {
                let n = cuts.next().unwrap_or(rest.len()).min(rest.len());
                split.push((dir, rest[..n].to_vec()));
                rest = &rest[n..];
            }
        }
        let got = run(&mut PgParser::new(Limits::default()), &split);
        prop_assert_eq!(summary(&got), summary(&want));
    }

    #[test]
    fn any_capture_size_keeps_the_counts(cap in 16usize..200) {
        let steps = session();
        let mut p = PgParser::new(Limits::default());
        let mut out = Vec::new();
        for (i, (dir, b)) in steps.iter().enumerate() {
            p.feed(&chunk(*dir, i, &b[..b.len().min(cap)], b.len() as u64), &mut out);
        }
        p.close(&mut out);
        let s = summary(&out);
        prop_assert_eq!((s.attempts, s.units, s.executes), (1, 4, 4));
        prop_assert_eq!(s.failures.values().sum::<u32>(), 1);
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_stay_bounded(
        steps in proptest::collection::vec((any::<bool>(), proptest::collection::vec(any::<u8>(), 0..300), 0u64..5000), 0..30),
        start in any::<bool>(),
    ) {
        let limits = Limits { max_pending: 8, max_prepared: 8, ..Limits::default() };
        let mut p = if start { PgParser::new(limits) } else { PgParser::mid_stream(limits) };
        let mut out = Vec::new();
        for (i, (send, b, extra)) in steps.iter().enumerate() {
            let dir = if *send { S } else { R };
            p.feed(&chunk(dir, i, b, b.len() as u64 + extra), &mut out);
            prop_assert!(p.pending.len() <= 8 && p.statements.len() <= 8 && p.portals.len() <= 8);
        }
        p.close(&mut out);
    }

    #[test]
    fn valid_frontend_writes_after_garbage_resync(garbage in proptest::collection::vec(any::<u8>(), 1..100)) {
        let mut p = connected();
        let mut out = Vec::new();
        p.lost();
        p.feed(&chunk(S, 0, &garbage, garbage.len() as u64), &mut out);
        p.feed(&chunk(R, 1, &garbage, garbage.len() as u64), &mut out);
        p.feed(&chunk(S, 2, &q("SELECT 1"), 14), &mut out);
        p.feed(&chunk(R, 3, &cat(&[complete("SELECT 1"), ready()]), 20), &mut out);
        prop_assert_eq!(statements(&out).last().map(|s| s.start_ns), Some(30));
    }
}

#[test]
fn statements_carry_the_shape_of_their_sql_in_every_protocol() {
    use super::shape::{fingerprint, normalise};
    let want = |sql: &str| Some(fingerprint(normalise(sql.as_bytes()).as_bytes()));
    // Simple protocol: literals differ, one shape.
    let mut p = connected();
    let ev = run(
        &mut p,
        &[
            (S, q("SELECT a FROM t WHERE id = 1")),
            (R, cat(&[complete("SELECT 1"), ready()])),
            (S, q("SELECT a FROM t WHERE id = 2")),
            (R, cat(&[complete("SELECT 1"), ready()])),
        ],
    );
    let shapes: Vec<_> = statements(&ev).iter().map(|s| s.shape).collect();
    assert_eq!(shapes, vec![want("SELECT a FROM t WHERE id = ?"); 2]);
    // Extended protocol, unnamed and then a named prepared statement bound later.
    let mut p = connected();
    let ev = run(
        &mut p,
        &[
            (
                S,
                cat(&[
                    parse("", "SELECT b FROM u WHERE x = $1"),
                    bind("", ""),
                    describe(""),
                    execute(""),
                    sync(),
                ]),
            ),
            (R, cat(&[complete("SELECT 1"), ready()])),
            (S, cat(&[parse("_pg3_0", "SELECT c FROM v WHERE y IN ($1, $2)"), sync()])),
            (R, ready()),
            (S, cat(&[bind("", "_pg3_0"), execute(""), sync()])),
            (R, cat(&[complete("SELECT 2"), ready()])),
        ],
    );
    let shapes: Vec<_> = statements(&ev).iter().map(|s| s.shape).collect();
    assert_eq!(shapes, vec![want("SELECT b FROM u WHERE x = ?"), want("SELECT c FROM v WHERE y IN (...)")]);
}

#[test]
fn every_statement_of_the_real_capture_has_a_shape() {
    let ev = replay(&fixture("postgres-django-views.jsonl"), usize::MAX);
    let st = statements(&ev);
    assert!(!st.is_empty());
    for s in &st {
        assert!(s.shape.is_some(), "{s:?}");
    }
    let distinct: std::collections::BTreeSet<_> = st.iter().map(|s| s.shape).collect();
    assert!(
        distinct.len() > 5 && distinct.len() < st.len(),
        "{} shapes for {} statements",
        distinct.len(),
        st.len()
    );
}

#[test]
fn shape_texts_are_kept_only_when_asked() {
    for keep in [false, true] {
        let mut p = PgParser::new(Limits { keep_shapes: keep, ..Limits::default() });
        run(&mut p, &[(S, startup("u", "d")), (R, cat(&[auth_ok(), ready()]))]);
        let ev = run(
            &mut p,
            &[(S, q("SELECT a FROM t WHERE id = 41")), (R, cat(&[complete("SELECT 1"), ready()]))],
        );
        let text = statements(&ev)[0].shape_text.clone();
        assert_eq!(text.as_deref(), keep.then_some("SELECT a FROM t WHERE id = ?"));
    }
}

/// A Query message of arbitrary bytes (no NUL: it ends the C string).
fn q_bytes(sql: &[u8]) -> Vec<u8> {
    let mut body = sql.to_vec();
    body.push(0);
    msg(b'Q', &body)
}

/// Statement text at and past SQL_HEAD: literals and quoted table names of any
/// characters (multi-byte ones wherever SQL_HEAD falls), or arbitrary bytes.
fn sql_text() -> impl Strategy<Value = Vec<u8>> {
    let text = "[^\0]{0,400}";
    prop_oneof![
        text.prop_map(|s| format!("SELECT '{}'", s.replace('\'', "''")).into_bytes()),
        (text, text).prop_map(|(t, s)| format!(
            "INSERT INTO \"{}\" VALUES ('{}')",
            t.replace('"', "\"\""),
            s.replace('\'', "''")
        )
        .into_bytes()),
        proptest::collection::vec(1u8..=255, 0..(3 * SQL_HEAD)),
    ]
}

use crate::protocol::fixtures::resplit;

proptest! {
    /// Simple-protocol statements whose text goes past SQL_HEAD with any characters or
    /// bytes, answered by success or a server error, with reads and writes split
    /// anywhere: every statement is counted once with its outcome, the same whatever the
    /// split, and a write's table name is whole text (never cut inside a character).
    #[test]
    fn statements_past_sql_head_in_any_split(
        stmts in proptest::collection::vec((sql_text(), any::<bool>()), 1..6),
        cuts in proptest::collection::vec(1usize..700, 1..8),
    ) {
        let mut steps = Vec::new();
        for (sql, fails) in &stmts {
            steps.push((S, q_bytes(sql)));
            let answer = if *fails { error("23505") } else { complete("INSERT 0 1") };
            steps.push((R, cat(&[answer, ready()])));
        }
        let whole = run(&mut connected(), &steps);
        let split = run(&mut connected(), &resplit(&steps, &cuts));
        let (w, s) = (summary(&whole), summary(&split));
        prop_assert_eq!(w.errors, 0);
        prop_assert_eq!(w.executes as usize, stmts.len());
        let fails = stmts.iter().filter(|(_, f)| *f).count() as u32;
        prop_assert_eq!(w.failures.get("UniqueViolation").copied().unwrap_or(0), fails);
        // A table name is whole text of the statement (never cut inside a character
        // nor made lossy), as PostgreSQL would name it (unquoted ones fold to lower case).
        // (A quoted name's doubled quotes stand for one.)
        let all: Vec<u8> = stmts
            .iter()
            .flat_map(|(sql, _)| String::from_utf8_lossy(sql).replace("\"\"", "\"").to_ascii_lowercase().into_bytes())
            .collect();
        for (_, table) in w.writes.keys() {
            let t = table.to_ascii_lowercase();
            prop_assert!(!t.is_empty() && t.len() <= 63, "{table:?}");
            prop_assert!(all.windows(t.len()).any(|x| x == t.as_bytes()), "{table:?}");
        }
        prop_assert_eq!(w, s);
    }
}

/// Found by the hostile end-to-end test ([9a]): an answer to the startup that cannot be
/// framed (a length of 0, 4 or 0xFFFFFFFF) is a failed connection attempt, as libpq
/// gives it up ("invalid message length"); so is an SSL answer other than S or N.
#[test]
fn an_unframable_startup_answer_is_a_failed_attempt() {
    for len in [0u32, 3, 0xFFFF_FFFF] {
        let mut bad = vec![b'R'];
        bad.extend_from_slice(&len.to_be_bytes());
        let mut p = PgParser::new(Limits::default());
        let ev = run(&mut p, &[(S, startup("u", "d")), (R, bad)]);
        assert_eq!(
            ev,
            vec![
                Event::Attempt { user: Some("u".into()), database: Some("d".into()) },
                Event::Error(ParseError::BadMessage),
                Event::AttemptFailed { sqlstate: None },
            ],
            "length {len}"
        );
    }
    let mut p = PgParser::new(Limits::default());
    let ev = run(&mut p, &[(S, ssl_request()), (R, b"X".to_vec())]);
    assert_eq!(
        ev,
        vec![
            Event::Error(ParseError::BadMessage),
            Event::Attempt { user: None, database: None },
            Event::AttemptFailed { sqlstate: None },
        ]
    );
}

/// Found by the hostile end-to-end test ([9a]): a statement whose answer breaks the
/// protocol fails with libpq's "lost synchronization" (psycopg's DatabaseError), and a
/// ReadyForQuery of the wrong length answers nothing.
#[test]
fn a_broken_answer_fails_the_statement_and_a_long_ready_completes_nothing() {
    let mut p = connected();
    let mut bad = vec![b'D'];
    bad.extend_from_slice(&0xFFFF_FFFFu32.to_be_bytes());
    let ev = run(
        &mut p,
        &[(S, q("SELECT 1")), (R, bad), (S, q("SELECT 2")), (R, cat(&[complete("SELECT 1"), ready()]))],
    );
    let st = statements(&ev);
    assert_eq!(st.len(), 2, "{ev:?}");
    assert_eq!(st[0].failure, Some(Failure::Desync));
    assert_eq!(st[1].failure, None);
    assert_eq!(errors(&ev), vec![ParseError::BadMessage]);

    let mut p = connected();
    let ev = run(&mut p, &[(S, q("SELECT 1")), (R, cat(&[complete("SELECT 1"), msg(b'Z', b"II")]))]);
    assert!(statements(&ev).is_empty(), "{ev:?}");
    assert_eq!(errors(&ev), vec![ParseError::BadMessage]);
}
