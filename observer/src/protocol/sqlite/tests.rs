use proptest::prelude::*;

use super::*;
use crate::protocol::postgres::sql::WriteOp;

const DB: u64 = 0xd0;
const ST: u64 = 0x51;

fn call(op: SqliteOp, t: u64, handle: u64) -> SqliteCall<'static> {
    SqliteCall {
        enter_ns: t,
        exit_ns: t,
        tgid: 7,
        tid: 8,
        op,
        handle,
        arg: 0,
        ret: 0,
        text: b"",
        truncated: false,
    }
}

fn open(t: u64, file: &'static [u8], ret: i64) -> SqliteCall<'static> {
    SqliteCall { ret, text: file, ..call(SqliteOp::Open, t, DB) }
}

fn prepare(t: u64, stmt: u64, sql: &'static [u8]) -> SqliteCall<'static> {
    SqliteCall { exit_ns: t + 1, arg: DB, text: sql, ..call(SqliteOp::Prepare, t, stmt) }
}

fn errcode(t: u64, code: i64) -> SqliteCall<'static> {
    SqliteCall { ret: code, ..call(SqliteOp::Errcode, t, DB) }
}

fn run(calls: &[SqliteCall<'_>]) -> (Sqlite, Vec<Event>) {
    let mut s = Sqlite::default();
    let mut out = Vec::new();
    for c in calls {
        s.call(c, &mut out);
    }
    let events = out.into_iter().map(|e| e.event).collect();
    (s, events)
}

fn statements(events: &[Event]) -> Vec<&Statement> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Statement(s) => Some(s),
            _ => None,
        })
        .collect()
}

const INSERT: &[u8] = b"INSERT INTO \"shop_item\" (\"name\") VALUES (?) RETURNING \"shop_item\".\"id\"\0";

#[test]
fn an_execute_runs_from_its_prepare_to_its_row_id() {
    let (_, ev) = run(&[
        open(1, b"/srv/db.sqlite3\0", 0),
        prepare(10, ST, INSERT),
        call(SqliteOp::Bind, 13, ST),
        call(SqliteOp::Changes, 20, DB),
        call(SqliteOp::LastRowid, 21, DB),
    ]);
    assert_eq!(ev[0], Event::Attempt { file: "/srv/db.sqlite3".into(), failed: false });
    let st = statements(&ev);
    assert_eq!(st.len(), 1);
    let s = st[0];
    assert_eq!((s.executes, s.many, s.error, s.start_ns, s.end_ns), (1, false, None, 10, 21));
    assert_eq!(s.file.as_deref(), Some("/srv/db.sqlite3"));
    assert_eq!(s.writes, vec![(TableWrite { op: WriteOp::Insert, table: "shop_item".into() }, 1)]);
    assert!(s.shape.is_some());
}

#[test]
fn a_cached_statement_runs_from_its_bind() {
    let (s, ev) = run(&[
        open(1, b"/srv/db.sqlite3", 0),
        prepare(10, ST, b"SELECT 1"),
        call(SqliteOp::Bind, 11, ST),
        call(SqliteOp::LastRowid, 12, DB),
        call(SqliteOp::Bind, 100, ST),
        call(SqliteOp::LastRowid, 150, DB),
    ]);
    let st = statements(&ev);
    assert_eq!(st.len(), 2);
    assert_eq!((st[1].start_ns, st[1].end_ns), (100, 150));
    assert_eq!(st[0].shape, st[1].shape);
    assert_eq!(s.stats.unknown_statements, 0);
}

#[test]
fn executemany_counts_each_parameter_set_and_ends_at_its_last_step() {
    let mut s = Sqlite::default();
    let mut out = Vec::new();
    for c in [
        open(1, b"/srv/db.sqlite3", 0),
        prepare(10, ST, INSERT),
        call(SqliteOp::Readonly, 12, ST),
        call(SqliteOp::Bind, 13, ST),
        call(SqliteOp::Changes, 14, DB),
        call(SqliteOp::Bind, 15, ST),
        call(SqliteOp::Changes, 16, DB),
        call(SqliteOp::Bind, 17, ST),
        call(SqliteOp::Changes, 18, DB),
    ] {
        s.call(&c, &mut out);
    }
    assert_eq!(out.len(), 1, "the batch is still open");
    s.quiesce(7, 8, &mut out);
    let Event::Statement(st) = &out[1].event else { panic!() };
    assert_eq!((st.executes, st.many, st.start_ns, st.end_ns), (3, true, 10, 18));
    assert_eq!(st.writes[0].1, 3);
    // Another thread's socket I/O is not this batch's end; idleness is.
    let mut s2 = Sqlite::default();
    let mut out2 = Vec::new();
    s2.call(&call(SqliteOp::Readonly, 1, ST), &mut out2);
    s2.quiesce(7, 9, &mut out2);
    assert!(out2.is_empty());
    s2.expire(BATCH_IDLE_NS + 1, &mut out2);
    assert_eq!(out2.len(), 1);
    let Event::Statement(st) = &out2[0].event else { panic!() };
    assert_eq!((st.executes, st.many), (0, true), "executemany([]) is observed too");
}

#[test]
fn an_execute_after_executemany_of_the_same_statement_is_told_apart_by_its_row_id() {
    let (_, ev) = run(&[
        call(SqliteOp::Readonly, 10, ST),
        call(SqliteOp::Bind, 11, ST),
        call(SqliteOp::Changes, 12, DB),
        call(SqliteOp::Bind, 13, ST),
        call(SqliteOp::Changes, 14, DB),
        call(SqliteOp::Bind, 30, ST),
        call(SqliteOp::Changes, 31, DB),
        call(SqliteOp::LastRowid, 32, DB),
    ]);
    let st = statements(&ev);
    assert_eq!(st.len(), 2);
    assert_eq!((st[0].executes, st[0].many, st[0].end_ns), (2, true, 14));
    assert_eq!((st[1].executes, st[1].many, st[1].start_ns, st[1].end_ns), (1, false, 30, 32));
}

#[test]
fn errors_are_the_class_python_raises() {
    let (_, ev) = run(&[
        prepare(10, ST, INSERT),
        call(SqliteOp::Bind, 11, ST),
        errcode(12, 2067),
        // A statement that does not compile: no statement, the error follows the prepare.
        SqliteCall { ret: 1, ..prepare(20, 0, b"SELECT * FROM nope") },
        errcode(22, 1),
    ]);
    let st = statements(&ev);
    assert_eq!(st.len(), 2);
    assert_eq!((st[0].error, st[0].executes, st[0].end_ns), (Some("IntegrityError"), 1, 12));
    assert_eq!((st[1].error, st[1].executes, st[1].start_ns), (Some("OperationalError"), 1, 20));
}

#[test]
fn a_failed_open_is_a_failed_attempt_and_its_error_no_execute() {
    let (_, ev) = run(&[open(1, b"/nonexistent/dir/db.sqlite3", 14), errcode(2, 14)]);
    assert_eq!(ev, vec![Event::Attempt { file: "/nonexistent/dir/db.sqlite3".into(), failed: true }]);
}

#[test]
fn djangos_own_connect_statements_are_not_counted() {
    let (s, ev) = run(&[
        open(1, b":memory:", 0),
        prepare(2, 1, b"PRAGMA foreign_keys = ON\0"),
        call(SqliteOp::Bind, 3, 1),
        call(SqliteOp::LastRowid, 4, DB),
        prepare(5, 2, b"PRAGMA legacy_alter_table = OFF\0"),
        call(SqliteOp::Bind, 6, 2),
        call(SqliteOp::LastRowid, 7, DB),
        prepare(8, 3, b"SELECT 1\0"),
        call(SqliteOp::Bind, 9, 3),
        call(SqliteOp::LastRowid, 10, DB),
    ]);
    let st = statements(&ev);
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].file.as_deref(), Some(":memory:"));
    assert_eq!(s.stats.connect_statements, 2);
}

#[test]
fn a_failed_connect_statement_is_a_failed_connection_not_an_execute() {
    // Django runs its PRAGMAs in get_new_connection: a failure there is what
    // django-prometheus counts as a connection error (the open itself succeeded).
    let (s, ev) = run(&[
        open(1, b"/srv/db.sqlite3\0", 0),
        SqliteCall { ret: 26, ..prepare(2, 0, b"PRAGMA foreign_keys = ON\0") },
        errcode(3, 26),
        prepare(4, 2, b"PRAGMA legacy_alter_table = OFF\0"),
        call(SqliteOp::Bind, 5, 2),
        errcode(6, 5),
    ]);
    let failed = Event::ConnectFailed { file: Some("/srv/db.sqlite3".into()), db: DB };
    assert_eq!(ev[1..], [failed.clone(), failed]);
    assert_eq!(s.stats.connect_statements, 2);
}

#[test]
fn a_statement_finalized_on_another_thread() {
    // Python may free a statement (its cursor collected) on any thread; the handle is
    // then reused by a new prepare.
    let mut s = Sqlite::default();
    let mut out = Vec::new();
    let other = |c: SqliteCall<'static>| SqliteCall { tid: 9, ..c };
    s.call(&prepare(1, ST, INSERT), &mut out);
    s.call(&call(SqliteOp::Bind, 2, ST), &mut out);
    s.call(&other(call(SqliteOp::Finalize, 3, ST + 1)), &mut out);
    s.call(&call(SqliteOp::LastRowid, 4, DB), &mut out);
    s.call(&other(call(SqliteOp::Finalize, 5, ST)), &mut out);
    s.call(&prepare(6, ST, b"DELETE FROM \"shop_item\" WHERE id = ?\0"), &mut out);
    s.call(&call(SqliteOp::Bind, 7, ST), &mut out);
    s.call(&call(SqliteOp::LastRowid, 8, DB), &mut out);
    let events: Vec<Event> = out.into_iter().map(|e| e.event).collect();
    let st = statements(&events);
    assert_eq!(st.len(), 2);
    assert_eq!((st[0].start_ns, st[0].end_ns, st[0].writes[0].0.op), (1, 4, WriteOp::Insert));
    assert_eq!((st[1].start_ns, st[1].writes[0].0.op), (6, WriteOp::Delete));
    assert_eq!(s.stats.unknown_statements, 0);
}

#[test]
fn a_process_forked_with_a_statement_open() {
    // The child has the parent's handles at the same addresses: its calls are its own
    // (statements unknown to it), and its finalize does not touch the parent's.
    let mut s = Sqlite::default();
    let mut out = Vec::new();
    let child = |c: SqliteCall<'static>| SqliteCall { tgid: 70, tid: 70, ..c };
    s.call(&prepare(1, ST, INSERT), &mut out);
    s.call(&call(SqliteOp::Bind, 2, ST), &mut out);
    s.call(&child(call(SqliteOp::Bind, 3, ST)), &mut out);
    s.call(&child(call(SqliteOp::LastRowid, 4, DB)), &mut out);
    s.call(&child(call(SqliteOp::Finalize, 5, ST)), &mut out);
    s.call(&call(SqliteOp::LastRowid, 6, DB), &mut out);
    s.process_gone(70, &mut out);
    let got: Vec<(u32, u64, bool)> = out
        .iter()
        .filter_map(|e| match &e.event {
            Event::Statement(st) => Some((e.tgid, st.start_ns, st.shape.is_some())),
            _ => None,
        })
        .collect();
    assert_eq!(got, vec![(70, 3, false), (7, 1, true)]);
    assert_eq!(s.stats.unknown_statements, 1);
    assert_eq!(s.sizes().1, 1, "the parent's statement stays");
}

#[test]
fn an_execute_python_abandoned_before_its_step_is_a_programming_error() {
    let (s, ev) = run(&[
        call(SqliteOp::Bind, 1, ST),
        call(SqliteOp::Bind, 5, ST + 1),
        call(SqliteOp::LastRowid, 6, DB),
    ]);
    let st = statements(&ev);
    assert_eq!(st.len(), 2);
    assert_eq!(st[0].error, Some("ProgrammingError"));
    assert_eq!(st[1].error, None);
    assert_eq!((s.stats.abandoned, s.stats.unknown_statements), (1, 2));
}

#[test]
fn threads_do_not_mix() {
    let mut s = Sqlite::default();
    let mut out = Vec::new();
    let other = |c: SqliteCall<'static>| SqliteCall { tid: 9, ..c };
    s.call(&call(SqliteOp::Bind, 1, ST), &mut out);
    s.call(&other(call(SqliteOp::Bind, 2, ST + 1)), &mut out);
    s.call(&other(call(SqliteOp::LastRowid, 3, DB)), &mut out);
    s.call(&call(SqliteOp::LastRowid, 4, DB), &mut out);
    let ends: Vec<(u32, u64, u64)> = out
        .iter()
        .map(|e| match &e.event {
            Event::Statement(st) => (e.tid, st.start_ns, st.end_ns),
            _ => panic!(),
        })
        .collect();
    assert_eq!(ends, vec![(9, 2, 3), (8, 1, 4)]);
}

#[test]
fn the_tables_are_bounded_and_say_so() {
    let mut s = Sqlite::new(Limits { max_connections: 1, max_statements: 2, keep_shapes: false });
    let mut out = Vec::new();
    for i in 0..4u64 {
        s.call(&SqliteCall { handle: 100 + i, ..open(i, b"/a", 0) }, &mut out);
        s.call(&prepare(10 + i, 200 + i, b"SELECT 1"), &mut out);
    }
    assert_eq!(s.sizes().0, 1);
    assert_eq!(s.sizes().1, 2);
    assert_eq!((s.stats.connections_full, s.stats.statements_full), (3, 2));
    s.call(&call(SqliteOp::Finalize, 20, 200), &mut out);
    s.process_gone(7, &mut out);
    assert_eq!(s.sizes(), (0, 0, 0));
}

fn any_call() -> impl Strategy<Value = (u8, u64, u64, i64, Vec<u8>, u32)> {
    (0u8..9, 0u64..4, 0u64..1000, -2i64..3000, proptest::collection::vec(any::<u8>(), 0..64), 0u32..3)
}

proptest! {
    /// Any sequence of calls, in any order, with any texts: no panic, one event at
    /// most per call (plus the batch it closes), tables within their bounds.
    #[test]
    fn any_sequence_is_followed_without_panic(calls in proptest::collection::vec(any_call(), 0..200)) {
        let ops = [SqliteOp::Open, SqliteOp::Prepare, SqliteOp::Bind, SqliteOp::Readonly, SqliteOp::Changes,
            SqliteOp::LastRowid, SqliteOp::Errcode, SqliteOp::Finalize, SqliteOp::Close];
        let mut s = Sqlite::new(Limits { max_connections: 3, max_statements: 3, keep_shapes: true });
        let mut out = Vec::new();
        let mut t = 0;
        for (op, handle, dt, ret, text, tid) in &calls {
            t += dt;
            let c = SqliteCall { enter_ns: t, exit_ns: t + dt, tgid: 1, tid: *tid, op: ops[*op as usize],
                handle: *handle, arg: handle ^ 1, ret: *ret, text, truncated: false };
            let before = out.len();
            s.call(&c, &mut out);
            prop_assert!(out.len() - before <= 3);
            if tid % 2 == 0 { s.quiesce(1, *tid, &mut out); }
            let (conns, stmts, _) = s.sizes();
            prop_assert!(conns <= 3 && stmts <= 3);
        }
        for e in &out {
            if let Event::Statement(st) = &e.event {
                prop_assert!(st.end_ns >= st.start_ns);
                prop_assert!(st.many || st.executes == 1);
            }
        }
        s.expire(u64::MAX, &mut out);
        s.process_gone(1, &mut out);
        prop_assert_eq!(s.sizes(), (0, 0, 0));
    }
}

/// A real pass: the test app's /db/ views (and a write refused by another process's
/// lock, a file that is not a database, an in-memory alias twice) on one gunicorn sync
/// worker with django-prometheus's sqlite3 engine, its calls recorded with `observer trace
/// --json` (and the worker's socket records, which close a batch). Replayed, the counts
/// are what django-prometheus counted in the app for the same pass.
#[test]
fn a_recorded_pass_counts_what_django_prometheus_counted() {
    use base64::Engine as _;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/src/protocol/testdata/sqlite-django-pass.jsonl");
    let mut s = Sqlite::default();
    let mut out = Vec::new();
    for line in std::fs::read_to_string(path).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let n = |k: &str| v[k].as_u64().unwrap();
        let tid = n("tid") as u32;
        if v.get("io_ns").is_some() {
            s.quiesce(1, tid, &mut out);
            continue;
        }
        let op = match v["op"].as_str().unwrap() {
            "Open" => SqliteOp::Open,
            "Prepare" => SqliteOp::Prepare,
            "Bind" => SqliteOp::Bind,
            "Readonly" => SqliteOp::Readonly,
            "Changes" => SqliteOp::Changes,
            "LastRowid" => SqliteOp::LastRowid,
            "Errcode" => SqliteOp::Errcode,
            "Finalize" => SqliteOp::Finalize,
            "Close" => SqliteOp::Close,
            o => panic!("op {o}"),
        };
        let text = base64::engine::general_purpose::STANDARD.decode(v["data"].as_str().unwrap()).unwrap();
        let c = SqliteCall {
            enter_ns: n("enter_ns"),
            exit_ns: n("exit_ns"),
            tgid: 1,
            tid,
            op,
            handle: n("handle"),
            arg: n("arg"),
            ret: v["ret"].as_i64().unwrap(),
            text: &text,
            truncated: v["truncated"].as_bool().unwrap(),
        };
        s.call(&c, &mut out);
    }
    let alias = |file: &str| match file {
        "/tmp/fx/db.sqlite3" => "default",
        "/tmp/fx/notadb.sqlite3" => "notadb",
        ":memory:" => "memory",
        "/nonexistent-observer-dir/broken.sqlite3" => "broken",
        f => panic!("file {f}"),
    };
    let mut got: std::collections::BTreeMap<String, u64> = Default::default();
    let mut add = |k: String, n: u64| *got.entry(k).or_default() += n;
    for e in &out {
        match &e.event {
            Event::Attempt { file, failed } => {
                add(format!("new_connections {}", alias(file)), 1);
                if *failed {
                    add(format!("new_connection_errors {}", alias(file)), 1);
                }
            }
            Event::ConnectFailed { .. } => panic!("no connect statement failed"),
            Event::Statement(st) => {
                let a = alias(st.file.as_deref().expect("every connection opened while traced"));
                add(format!("execute {a}"), u64::from(st.executes));
                if st.many {
                    add(format!("execute_many {a}"), u64::from(st.executes));
                }
                if let Some(t) = st.error {
                    add(format!("errors {a} {t}"), 1);
                }
                add(format!("duration_count {a}"), 1);
            }
        }
    }
    // django-prometheus's deltas over the same pass (its /metrics before and after).
    let theirs: std::collections::BTreeMap<String, u64> = [
        ("errors default IntegrityError", 2),
        ("errors default OperationalError", 3),
        ("errors notadb DatabaseError", 1),
        ("execute_many default", 4),
        ("execute default", 26),
        ("execute memory", 6),
        ("execute notadb", 1),
        ("new_connection_errors broken", 1),
        ("new_connections broken", 1),
        ("new_connections default", 15),
        ("new_connections memory", 1),
        ("new_connections notadb", 1),
        ("duration_count default", 23),
        ("duration_count memory", 6),
        ("duration_count notadb", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(got, theirs);
    assert_eq!((s.stats.unmatched_ends, s.stats.abandoned, s.stats.unknown_statements), (0, 0, 0));
    assert!(s.stats.connect_statements > 0);
}
