//! SQLite end to end: the test app on a SQLite file (Django's default database), its
//! /db/ views (create, save, delete, bulk_create, QuerySet.update, executemany, a list, a
//! unique violation caught and one uncaught, a missing table, a statement SQLite refuses,
//! a rolled back transaction, a database file that cannot be opened, raw SQL, an
//! iterator), django-prometheus's sqlite3 engine inside the app and observer outside,
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
const VIEWS: [(&str, u16); 15] = [
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
];

/// Counted exactly as django-prometheus counts them.
const EXACT: [&str; 6] = harness::django::DB_EXACT;

type Family = BTreeMap<String, f64>;

fn fam(pairs: &[(&str, f64)]) -> Family {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

fn drive(port: u16) {
    for (view, status) in VIEWS {
        assert_eq!(http_status(port, &format!("/db/{view}")), Some(status), "/db/{view}");
    }
}

struct Setup {
    name: &'static str,
    worker: &'static str,
    conn_max_age: u32,
    /// Run the views once before observer starts (connections open before tracing).
    warm_up: bool,
}

fn side_by_side(s: &Setup) {
    let dir = TempDir::new("sqlite");
    let file = format!("{}/db.sqlite3", dir.path());
    let settings = json!({"name": file, "conn_max_age": s.conn_max_age}).to_string();
    migrate("OBSERVER_TEST_SQLITE", &settings, &[]);
    let app = Gunicorn::start_with(s.worker, 1, true, &[("OBSERVER_TEST_SQLITE", &settings)]);
    if s.warm_up {
        drive(app.port);
    }
    let before = Metrics::parse(&http_get(app.port, "/metrics"));
    let obs = ObserverRun::start(&["--pid", &app.pid().to_string()]);
    drive(app.port);
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
            ("alias=default,type=OperationalError,vendor=sqlite", 2.0)
        ]),
        "[{}]",
        s.name
    );
    assert_eq!(theirs["django_db_execute_many_total"], fam(&[(key, 4.0)]), "[{}]", s.name);
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
    // delete() of instances. bulk_create (one INSERT) and executemany (four) add inserts,
    // QuerySet.update() one update.
    assert_eq!(theirs["django_model_inserts_total"], fam(&[("model=item", 8.0)]), "[{}]", s.name);
    if !s.warm_up {
        // Statements cached by Python before tracing have no text, so no table.
        assert_eq!(family(&ours, "django_model_inserts_total"), fam(&[("model=item", 13.0)]), "[{}]", s.name);
        assert_eq!(family(&ours, "django_model_updates_total"), fam(&[("model=item", 2.0)]), "[{}]", s.name);
        assert_eq!(
            family(&ours, "django_model_deletes_total"),
            theirs["django_model_deletes_total"],
            "[{}]",
            s.name
        );
    }
    let m = obs.metrics();
    eprintln!(
        "[{}] observer_sqlite_executes_total: {:?}",
        s.name,
        family(&m, "observer_sqlite_executes_total")
    );
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
        side_by_side(&s);
    }
}
