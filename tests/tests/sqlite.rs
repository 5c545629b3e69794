//! SQLite end to end: the test app on a SQLite file (Django's default database), its
//! /db/ views (create, save, delete, bulk_create, QuerySet.update, executemany, a list, a
//! unique violation caught and one uncaught, a missing table, a statement SQLite refuses,
//! a rolled back transaction, a database file that cannot be opened, raw SQL, an
//! iterator, a write refused because another process holds the write lock, a file that
//! is not a database, an in-memory database), django-prometheus's sqlite3 engine inside
//! the app and observer outside,
//! reading the app's libsqlite3 calls (uprobes). The exact families must match label
//! set by label set.

mod harness;

use std::collections::BTreeMap;

use harness::{
    TempDir,
    django::{Gunicorn, Metrics, ObserverRun, delta, family, http_get, http_status, migrate},
    ebpf_available,
};
use serde_json::json;

/// The views, in order, and the status each answers on SQLite.
const VIEWS: [(&str, u16); 18] = [
    ("create", 200),
    ("save", 200),
    ("delete", 200),
    ("bulk", 200),
    ("update", 200),
    ("executemany", 200),
    ("list", 200),
    ("unique-caught", 200),
    ("unique-uncaught", 500),
    ("missing-table", 500),
    // PostgreSQL's SET LOCAL is a syntax error on SQLite: an OperationalError, caught.
    ("timeout", 200),
    ("rollback", 200),
    ("broken", 200),
    ("raw", 200),
    ("iterate", 200),
    // Run while the test holds the write lock (see `drive`).
    ("locked", 200),
    ("notadb", 200),
    ("memory", 200),
];

/// Counted exactly as django-prometheus counts them.
const EXACT: [&str; 6] = harness::django::DB_EXACT;

type Family = BTreeMap<String, f64>;

fn fam(pairs: &[(&str, f64)]) -> Family {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// One pass over the views; `skip` are left out.
fn drive(port: u16, file: &str, skip: &[&str]) {
    for (view, status) in VIEWS.iter().filter(|(v, _)| !skip.contains(v)) {
        let _lock = (*view == "locked").then(|| Locker::hold(file));
        assert_eq!(http_status(port, &format!("/db/{view}")), Some(*status), "/db/{view}");
    }
}

/// Another process (not traced) holding `file`'s write lock until dropped.
struct Locker(std::process::Child);

impl Locker {
    fn hold(file: &str) -> Self {
        use std::io::BufRead;
        let script = "import sqlite3, sys\n\
            c = sqlite3.connect(sys.argv[1], isolation_level=None)\n\
            c.execute('BEGIN IMMEDIATE')\n\
            print('locked', flush=True)\n\
            sys.stdin.read()\n";
        let mut child = std::process::Command::new("python3")
            .args(["-c", script, file])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the locker");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "locked", "the locker holds the lock");
        Self(child)
    }
}

impl Drop for Locker {
    fn drop(&mut self) {
        // Its stdin closes: it exits, releasing the lock.
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

struct Setup {
    name: &'static str,
    worker: &'static str,
    conn_max_age: u32,
    /// Run the views once before observer starts (connections open before tracing).
    warm_up: bool,
}

/// A database file, a file that is not one, and the app's settings for them.
fn databases(dir: &TempDir, conn_max_age: u32) -> (String, String) {
    let file = format!("{}/db.sqlite3", dir.path());
    let notadb = format!("{}/notadb.sqlite3", dir.path());
    std::fs::write(&notadb, "this is not a database\n".repeat(200)).unwrap();
    let settings =
        json!({"name": file, "conn_max_age": conn_max_age, "timeout": 0.1, "notadb": notadb}).to_string();
    migrate("OBSERVER_TEST_SQLITE", &settings, &[]);
    (file, settings)
}

/// What django-prometheus counted for one pass, by family.
type Counted = BTreeMap<&'static str, Family>;

fn side_by_side(s: &Setup) -> Counted {
    let dir = TempDir::new("sqlite");
    let (file, settings) = databases(&dir, s.conn_max_age);
    let app = Gunicorn::start_with(s.worker, 1, true, &[("OBSERVER_TEST_SQLITE", &settings)]);
    if s.warm_up {
        // Not the in-memory database nor the file that is not one: a connection opened
        // before tracing is taken for the one SQLite database file its process has open
        // (a limitation, in the README).
        drive(app.port, &file, &["memory", "notadb"]);
    }
    let before = Metrics::parse(&http_get(app.port, "/metrics"));
    let obs = ObserverRun::start(&["--pid", &app.pid().to_string()]);
    drive(app.port, &file, &[]);
    let after = Metrics::parse(&http_get(app.port, "/metrics"));
    let mut theirs = BTreeMap::new();
    for name in EXACT.iter().chain(&[
        "django_db_query_duration_seconds_sum",
        "django_model_inserts_total",
        "django_model_updates_total",
        "django_model_deletes_total",
    ]) {
        theirs.insert(*name, delta(&after, &before, name));
    }
    let exact_now = |m: &Metrics| EXACT.iter().all(|n| family(m, n) == theirs[n]);
    let deadline = std::time::Instant::now() + harness::patience(20);
    let mut ours = obs.metrics();
    while !exact_now(&ours) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
        ours = obs.metrics();
    }
    eprintln!("[{}] django-prometheus gained: {theirs:#?}", s.name);
    for name in EXACT {
        assert_eq!(family(&ours, name), theirs[name], "[{}] {name}", s.name);
    }
    // The same traffic every time: what django-prometheus counts for one pass.
    let key = "alias=default,vendor=sqlite";
    assert_eq!(
        theirs["django_db_errors_total"],
        fam(&[
            ("alias=default,type=IntegrityError,vendor=sqlite", 2.0),
            // A missing table, a syntax error, a write refused by another's lock.
            ("alias=default,type=OperationalError,vendor=sqlite", 3.0),
            // A query on a file that is not a database.
            ("alias=notadb,type=DatabaseError,vendor=sqlite", 1.0),
        ]),
        "[{}]",
        s.name
    );
    assert_eq!(theirs["django_db_execute_many_total"], fam(&[(key, 4.0)]), "[{}]", s.name);
    // The in-memory database, under its alias: three statements on one connection.
    assert_eq!(theirs["django_db_execute_total"]["alias=memory,vendor=sqlite"], 3.0, "[{}]", s.name);
    assert_eq!(theirs["django_db_new_connections_total"]["alias=memory,vendor=sqlite"], 1.0, "[{}]", s.name);
    assert_eq!(
        theirs["django_db_new_connection_errors_total"],
        fam(&[("alias=broken,vendor=sqlite", 1.0)]),
        "[{}]",
        s.name
    );
    // The duration: from the statement's first library call to its last, inside the
    // time django-prometheus measures around execute().
    let our_sum = family(&ours, "django_db_query_duration_seconds_sum")[key];
    let their_sum = theirs["django_db_query_duration_seconds_sum"][key];
    eprintln!("[{}] duration sums: ours {our_sum:.6} s, django-prometheus {their_sum:.6} s", s.name);
    assert!(our_sum > 0.0 && our_sum <= their_sum, "[{}] duration sum {our_sum} vs {their_sum}", s.name);
    // Derived, as on PostgreSQL: model counters count INSERT/UPDATE/DELETE statements on
    // the model's table (from the prepared SQL); django-prometheus counts save()/create()/
    // delete() of instances, refused or not. bulk_create (one INSERT) and executemany
    // (four) add inserts,
    // QuerySet.update() one update.
    assert_eq!(theirs["django_model_inserts_total"], fam(&[("model=item", 9.0)]), "[{}]", s.name);
    if !s.warm_up {
        // Statements cached by Python before tracing have no text, so no table.
        assert_eq!(family(&ours, "django_model_inserts_total"), fam(&[("model=item", 14.0)]), "[{}]", s.name);
        assert_eq!(family(&ours, "django_model_updates_total"), fam(&[("model=item", 2.0)]), "[{}]", s.name);
        assert_eq!(
            family(&ours, "django_model_deletes_total"),
            theirs["django_model_deletes_total"],
            "[{}]",
            s.name
        );
    }
    // Django's connect statements (the in-memory connection's at least) were seen and
    // left out, and said so.
    let m = obs.wait_until("connect statements counted", |m| {
        family(m, "observer_sqlite_executes_total").contains_key("kind=connect_statement")
    });
    eprintln!(
        "[{}] observer_sqlite_executes_total: {:?}",
        s.name,
        family(&m, "observer_sqlite_executes_total")
    );
    theirs
}

/// The worker processes of a gunicorn master now.
fn workers(master: u32) -> String {
    std::fs::read_to_string(format!("/proc/{master}/task/{master}/children")).unwrap_or_default()
}

/// The same pass on Django's own sqlite3 backend (no django-prometheus in the app),
/// two sync workers each recycled after 4 requests: what observer counts must be what
/// django-prometheus counted for the pass in one long-lived worker.
fn recycled(expected: &Counted) {
    let dir = TempDir::new("sqlite-recycled");
    let (file, settings) = databases(&dir, 0);
    let recycle = ["--max-requests", "4", "--max-requests-jitter", "0"];
    let app = Gunicorn::start_full(&[], "sync", 2, false, &[("OBSERVER_TEST_SQLITE", &settings)], &recycle);
    let first = workers(app.pid());
    let obs = ObserverRun::start(&["--pid", &app.pid().to_string()]);
    drive(app.port, &file, &[]);
    let exact_now = |m: &Metrics| EXACT.iter().all(|n| family(m, n) == expected[n]);
    let deadline = std::time::Instant::now() + harness::patience(20);
    let mut ours = obs.metrics();
    while !exact_now(&ours) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
        ours = obs.metrics();
    }
    let last = workers(app.pid());
    eprintln!("[recycled] workers {first:?} at the start, {last:?} at the end");
    assert!(first.split_whitespace().all(|w| !last.contains(w)), "every worker was recycled");
    for name in EXACT {
        assert_eq!(family(&ours, name), expected[name], "[recycled] {name}");
    }
}

#[test]
fn sqlite_metrics_match_django_prometheus() {
    if !ebpf_available() {
        return;
    }
    for s in [
        Setup { name: "sync, CONN_MAX_AGE=0", worker: "sync", conn_max_age: 0, warm_up: false },
        Setup {
            name: "gthread, persistent, opened before tracing",
            worker: "gthread",
            conn_max_age: 600,
            warm_up: true,
        },
    ] {
        let counted = side_by_side(&s);
        if s.name.starts_with("sync") {
            recycled(&counted);
        }
    }
}

/// SQLite linked statically into the program (as python.org builds link it into
/// `_sqlite3`): its functions are found in the ELF's static symbol table, the probes set
/// on the executable itself, and the calls read as from a shared libsqlite3.
#[test]
fn sqlite_calls_are_read_from_a_statically_linked_sqlite() {
    use std::io::{BufRead as _, Write as _};
    if !ebpf_available() {
        return;
    }
    let dir = TempDir::new("static-sqlite");
    let exe = dir.0.join("static-sqlite-client");
    let out = std::process::Command::new("gcc")
        .args(["-O1", "-o"])
        .arg(&exe)
        .arg(harness::django::root().join("tests/apps/static_sqlite/client.c"))
        .args(["/usr/lib/x86_64-linux-gnu/libsqlite3.a", "-lm", "-ldl", "-lpthread"])
        .output()
        .expect("gcc (cargo xtask setup installs it and libsqlite3-dev)");
    assert!(out.status.success(), "gcc: {}", String::from_utf8_lossy(&out.stderr));
    let file = format!("{}/static.sqlite3", dir.path());
    let mut client = std::process::Command::new(&exe)
        .arg(&file)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the static client");
    let pid = client.id();
    let mut obs = harness::Observer::start(&["--pid", &pid.to_string()]);
    obs.wait_for_log("uprobes set on a library", harness::patience(10));
    client.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut said = String::new();
    std::io::BufReader::new(client.stdout.take().unwrap()).read_line(&mut said).unwrap();
    let status = client.wait().unwrap();
    let trace = obs.stop();
    assert!(status.success() && said.trim() == "done", "client: {status} {said:?}");
    let calls: Vec<(String, String, i64)> = trace
        .of("sqlite", pid)
        .iter()
        .map(|r| {
            (
                r["op"].as_str().unwrap().to_string(),
                r["text"].as_str().unwrap().to_string(),
                r["ret"].as_i64().unwrap(),
            )
        })
        .collect();
    eprintln!("{calls:#?}");
    let ops: Vec<&str> = calls.iter().map(|c| c.0.as_str()).collect();
    // CREATE TABLE re-reads the schema from inside its step (sqlite3_exec of a prepare
    // of its own): not the program's, not seen.
    let execute = ["Prepare", "Bind", "Readonly", "Changes", "LastRowid", "Finalize"];
    let want: Vec<&str> =
        ["Open"].into_iter().chain(execute).chain(execute).chain(["Prepare", "Errcode", "Close"]).collect();
    assert_eq!(ops, want);
    assert_eq!(calls[0].1, file);
    assert!(calls[7].1.starts_with("INSERT INTO t (n) VALUES (?)"), "{:?}", calls[7]);
    assert_eq!((calls[13].2, calls[14].2), (1, 1), "the failed prepare and its error code");
    assert_eq!(trace.counters["observer_uprobe_libraries_attached_total"], 1, "the executable itself");
}
