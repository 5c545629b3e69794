//! PostgreSQL end to end: a private PostgreSQL started here, the test app's /db/ views
//! (create, save, delete, bulk_create, QuerySet.update, executemany, a list, a unique
//! violation caught and one uncaught, a missing table, a statement_timeout cancel, a
//! rolled back transaction, a closed port or missing socket, a wrong password, raw SQL,
//! a server-side cursor)
//! with django-prometheus's engine and model mixin inside the app and observer outside,
//! for each connection setup Django offers. Families the README calls exact must match
//! label set by label set; the derived ones differ exactly as the README says.

mod harness;

use std::collections::BTreeMap;

use harness::{
    django::{Gunicorn, Metrics, OURS_ONLY, ObserverRun, delta, family, http_get, http_status},
    ebpf_available,
    postgres::Postgres,
};
use serde_json::json;

/// The views, in order, and the status each answers.
const VIEWS: [(&str, u16); 16] = [
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
    ("timeout", 200),
    ("rollback", 200),
    ("broken", 200),
    ("wrongpw", 200),
    ("raw", 200),
    ("iterate", 200),
];

/// Counted exactly as django-prometheus counts them.
const EXACT: [&str; 6] = harness::django::DB_EXACT;

type Family = BTreeMap<String, f64>;

fn drive(port: u16) {
    for (view, status) in VIEWS {
        assert_eq!(http_status(port, &format!("/db/{view}")), Some(status), "/db/{view}");
    }
}

fn fam(pairs: &[(&str, f64)]) -> Family {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

struct Setup {
    name: &'static str,
    settings: String,
    /// Run the views once before observer starts (connections open before tracing).
    warm_up: bool,
    /// Django's psycopg pool: django-prometheus counts checkouts as new connections.
    pool: bool,
}

struct Outcome {
    /// django-prometheus's gains over the traced pass, by family.
    theirs: BTreeMap<&'static str, Family>,
    ours: Metrics,
    /// Sessions the server authorized for the app's user during the traced pass.
    authorized: usize,
}

fn side_by_side(pg: &Postgres, s: &Setup) -> Outcome {
    let app = Gunicorn::start_with("sync", 1, true, &[("OBSERVER_TEST_PG", &s.settings)]);
    if s.warm_up {
        drive(app.port);
    }
    let before = Metrics::parse(&http_get(app.port, "/metrics"));
    let obs = ObserverRun::start(&["--pid", &app.pid().to_string()]);
    let sessions = pg.authorized(harness::postgres::USER);
    drive(app.port);
    let authorized = pg.authorized(harness::postgres::USER) - sessions;
    let after = Metrics::parse(&http_get(app.port, "/metrics"));
    let mut theirs = BTreeMap::new();
    for name in EXACT.iter().chain(&["django_db_query_duration_seconds_sum"]) {
        theirs.insert(*name, delta(&after, &before, name));
    }
    for name in ["django_model_inserts_total", "django_model_updates_total", "django_model_deletes_total"] {
        theirs.insert(name, delta(&after, &before, name));
    }
    // Wait for observer to have it all (the exact families equal), then compare for real.
    let exact_now = |m: &Metrics| {
        EXACT.iter().all(|n| (s.pool && *n == "django_db_new_connections_total") || family(m, n) == theirs[n])
    };
    let deadline = std::time::Instant::now() + harness::patience(20);
    let mut ours = obs.metrics();
    while !exact_now(&ours) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
        ours = obs.metrics();
    }
    eprintln!("[{}] django-prometheus gained: {theirs:#?}", s.name);
    Outcome { theirs, ours, authorized }
}

fn check(s: &Setup, o: &Outcome) {
    let (ours, theirs) = (&o.ours, &o.theirs);
    // psycopg2's executemany() is one query per parameter set on the wire, as separate
    // execute() calls are: counted as executes (as django-prometheus does), not as one
    // executemany (README: the known differences).
    let psycopg2 = s.name.contains("psycopg2");
    let many = ["django_db_execute_many_total", "django_db_query_duration_seconds_count"];
    for name in EXACT {
        if s.pool && name == "django_db_new_connections_total" || psycopg2 && many.contains(&name) {
            continue;
        }
        assert_eq!(family(ours, name), theirs[name], "[{}] {name}", s.name);
    }
    if psycopg2 {
        let key = "alias=default,vendor=postgresql";
        assert_eq!(theirs["django_db_execute_many_total"], fam(&[(key, 4.0)]), "[{}]", s.name);
        assert!(family(ours, "django_db_execute_many_total").is_empty(), "[{}]", s.name);
        // The four queries are four observations, where django-prometheus has one.
        let theirs_n = theirs["django_db_query_duration_seconds_count"][key];
        assert_eq!(family(ours, "django_db_query_duration_seconds_count"), fam(&[(key, theirs_n + 3.0)]));
        return;
    }
    // The same traffic every time: the numbers django-prometheus gives for one pass.
    let errors = fam(&[
        ("alias=default,type=QueryCanceled,vendor=postgresql", 1.0),
        ("alias=default,type=UndefinedTable,vendor=postgresql", 1.0),
        ("alias=default,type=UniqueViolation,vendor=postgresql", 2.0),
    ]);
    assert_eq!(family(ours, "django_db_errors_total"), errors, "[{}]", s.name);
    assert_eq!(
        family(ours, "django_db_execute_many_total"),
        fam(&[("alias=default,vendor=postgresql", 4.0)]),
        "[{}]",
        s.name
    );
    assert_eq!(
        family(ours, "django_db_new_connection_errors_total"),
        fam(&[("alias=broken,vendor=postgresql", 1.0), ("alias=wrongpw,vendor=postgresql", 1.0)]),
        "[{}]",
        s.name
    );

    // Derived: the duration is the wire time of each statement, inside the time
    // django-prometheus measures around execute().
    let key = "alias=default,vendor=postgresql";
    let our_sum = family(ours, "django_db_query_duration_seconds_sum")[key];
    let their_sum = theirs["django_db_query_duration_seconds_sum"][key];
    assert!(our_sum > 0.0 && our_sum <= their_sum, "[{}] duration sum {our_sum} vs {their_sum}", s.name);

    // Derived: model counters count INSERT/UPDATE/DELETE statements on the model's table;
    // django-prometheus counts save()/create()/delete() of instances. Here: bulk_create
    // (one INSERT) and executemany (four) add inserts, QuerySet.update() one update.
    assert_eq!(theirs["django_model_inserts_total"], fam(&[("model=item", 8.0)]), "[{}]", s.name);
    assert_eq!(family(ours, "django_model_inserts_total"), fam(&[("model=item", 8.0 + 5.0)]), "[{}]", s.name);
    assert_eq!(theirs["django_model_updates_total"], fam(&[("model=item", 1.0)]));
    assert_eq!(family(ours, "django_model_updates_total"), fam(&[("model=item", 1.0 + 1.0)]), "[{}]", s.name);
    assert_eq!(
        family(ours, "django_model_deletes_total"),
        theirs["django_model_deletes_total"],
        "[{}]",
        s.name
    );
}

/// One connection per request, over each kind of socket (the kernel-facing half; the
/// kernel matrix runs this one).
#[test]
fn postgres_metrics_match_django_prometheus_over_tcp_and_unix_sockets() {
    if !ebpf_available() {
        return;
    }
    let pg = Postgres::start();
    pg.migrate(&pg.settings(json!({})), &[]);
    let setups = [
        Setup { name: "tcp, CONN_MAX_AGE=0", settings: pg.settings(json!({})), warm_up: false, pool: false },
        Setup {
            name: "unix socket, CONN_MAX_AGE=0",
            settings: pg.unix_settings(json!({})),
            warm_up: false,
            pool: false,
        },
    ];
    side_by_side_for_each(&pg, &setups);
}

/// Connections that outlive requests: persistent ones opened before tracing, and a pool.
#[test]
fn postgres_metrics_match_django_prometheus_for_persistent_and_pooled_connections() {
    if !ebpf_available() {
        return;
    }
    let pg = Postgres::start();
    pg.migrate(&pg.settings(json!({})), &[]);
    let setups = [
        Setup {
            name: "tcp, persistent, server-side binding, opened before tracing",
            settings: pg.settings(json!({"conn_max_age": 600, "server_side_binding": true})),
            warm_up: true,
            pool: false,
        },
        Setup {
            name: "tcp, psycopg pool",
            settings: pg.settings(json!({"pool": true})),
            warm_up: false,
            pool: true,
        },
    ];
    side_by_side_for_each(&pg, &setups);
}

/// Each setup side by side with django-prometheus, then the new-connection counts that
/// depend on how the setup holds its connections.
fn side_by_side_for_each(pg: &Postgres, setups: &[Setup]) {
    for s in setups {
        let o = side_by_side(pg, s);
        check(s, &o);
        let conns = family(&o.ours, "django_db_new_connections_total");
        let mut want =
            fam(&[("alias=broken,vendor=postgresql", 1.0), ("alias=wrongpw,vendor=postgresql", 1.0)]);
        match s.name {
            // One connection per request that used the database.
            n if n.contains("CONN_MAX_AGE=0") => {
                want.insert("alias=default,vendor=postgresql".into(), 14.0);
                // The server-side cursor's DECLARE/FETCH/CLOSE are not counted (psycopg's
                // ServerCursor is not the cursor class django-prometheus wraps); psycopg2's
                // named cursor is, and its DECLARE is that execute(); its executemany()
                // is four queries.
                let (executes, durations) =
                    if s.name.contains("psycopg2") { (37.0, 37.0) } else { (36.0, 33.0) };
                assert_eq!(
                    family(&o.ours, "django_db_execute_total"),
                    fam(&[("alias=default,vendor=postgresql", executes)])
                );
                assert_eq!(
                    family(&o.ours, "django_db_query_duration_seconds_count"),
                    fam(&[("alias=default,vendor=postgresql", durations)])
                );
            }
            // The connection opened in the warm-up pass serves the requests; Django may
            // replace it (a connection left unusable by an error is closed at the next
            // request boundary: once here, twice when a loaded machine makes the
            // statement-timeout view's cancel land late), and both sides count those.
            n if n.contains("persistent") => {
                if let Some(&count) =
                    o.theirs["django_db_new_connections_total"].get("alias=default,vendor=postgresql")
                {
                    assert!(count <= 3.0, "[{}] persistent connection replaced {count} times", s.name);
                    want.insert("alias=default,vendor=postgresql".into(), count);
                }
            }
            // observer counts the pool's connections (as many as the server authorized),
            // not checkouts.
            _ => {
                assert!(o.authorized >= 1);
                want.insert("alias=default,vendor=postgresql".into(), o.authorized as f64);
                assert_eq!(
                    o.theirs["django_db_new_connections_total"]["alias=default,vendor=postgresql"], 14.0,
                    "django-prometheus counts a pool checkout per request"
                );
            }
        }
        assert_eq!(conns, want, "[{}] new connections", s.name);
        assert_eq!(conns.get("alias=default,vendor=postgresql").copied().unwrap_or(0.0), o.authorized as f64);
    }
}

#[test]
fn migration_gauges_match_django_prometheus() {
    if !ebpf_available() {
        return;
    }
    let pg = Postgres::start();
    // django-prometheus computes them at startup, and fails to start when an alias cannot
    // connect: no failing aliases here. One migration of the app is left unapplied.
    let settings = pg.settings(json!({"export_migrations": true, "failing_aliases": false}));
    pg.migrate(&settings, &[]);
    pg.migrate(&settings, &["shop", "0001"]);
    let app = Gunicorn::start_with("sync", 1, true, &[("OBSERVER_TEST_PG", &settings)]);
    let theirs = Metrics::parse(&http_get(app.port, "/metrics"));
    // No traffic: observer discovers the app after a while anyway. Counted every second.
    let obs = ObserverRun::start(&["--pid", &app.pid().to_string(), "--migrations-interval", "1"]);
    let ours =
        obs.wait_until("the migration gauges", |m| !family(m, "django_migrations_applied_total").is_empty());
    for name in ["django_migrations_applied_total", "django_migrations_unapplied_total"] {
        assert_eq!(ours.family(name, &OURS_ONLY), theirs.family(name, &OURS_ONLY), "{name}");
    }
    assert_eq!(ours.sum("django_migrations_unapplied_total", &[("connection", "default")]), 1.0);
    assert!(ours.sum("django_migrations_applied_total", &[("connection", "default")]) >= 2.0);

    // Applying the rest shows on the next count.
    pg.migrate(&settings, &[]);
    obs.wait_until("no unapplied migration", |m| {
        m.family("django_migrations_unapplied_total", &OURS_ONLY).get("connection=default") == Some(&0.0)
    });
    assert_eq!(obs.metrics().sum("observer_migrations_checks_total", &[("result", "failure")]), 0.0);
}

/// The `type` label table equals what the installed psycopg raises, code by code, and
/// for codes it does not know.
#[test]
fn sqlstate_classes_equal_installed_psycopg() {
    use observer::protocol::postgres::sqlstate::{SqlState, table};
    let script = r#"
import json
from psycopg import errors
known = {k: v.__name__ for k, v in errors._sqlcodes.items() if getattr(v, "sqlstate", None) == k}
probe = [c + "ZZZ" for c in ["08","0A","10","20","21","22","23","24","25","26","27","28","2B","2D","2F",
         "34","38","39","3B","3D","3F","40","42","44","53","54","55","57","58","F0","HV","P0","XX","99","Q1"]]
print(json.dumps({"known": known, "fallback": {p: errors._class_for_state(p).__name__ for p in probe}}))
"#;
    let out = std::process::Command::new(harness::django::venv_bin("python"))
        .args(["-c", script])
        .output()
        .expect("run the venv's python");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let theirs: BTreeMap<String, String> = serde_json::from_value(v["known"].clone()).unwrap();
    let ours: BTreeMap<String, String> =
        table().into_iter().map(|(k, n)| (k.to_string(), n.to_string())).collect();
    assert_eq!(ours, theirs);
    for (code, name) in v["fallback"].as_object().unwrap() {
        assert_eq!(SqlState::parse(code.as_bytes()).unwrap().class_name(), name.as_str().unwrap(), "{code}");
    }
}

/// PostgreSQL with TLS on, at each `sslmode` users run: libpq encrypts every connection
/// (psycopg's binary wheel bundles its own libpq and OpenSSL), and the plaintext read
/// from that OpenSSL gives every family exactly as on plaintext. The wheel's libraries
/// are loaded by the first request (Django imports its database backend then), after
/// the agent started: their probes are set when the loader maps them.
#[test]
fn postgres_over_tls_matches_django_prometheus() {
    if !ebpf_available() {
        return;
    }
    let pg = Postgres::start_tls();
    pg.migrate(&pg.settings(json!({})), &[]);
    let ca = pg.certificate();
    let setups = [
        Setup {
            name: "tls, sslmode=prefer, CONN_MAX_AGE=0",
            settings: pg.settings(json!({})),
            warm_up: false,
            pool: false,
        },
        Setup {
            name: "tls, sslmode=require, CONN_MAX_AGE=0",
            settings: pg.settings(json!({"sslmode": "require"})),
            warm_up: false,
            pool: false,
        },
        Setup {
            name: "tls, psycopg2, sslmode=require, CONN_MAX_AGE=0",
            settings: pg.settings(json!({"sslmode": "require", "driver": "psycopg2"})),
            warm_up: false,
            pool: false,
        },
        Setup {
            name: "tls, sslmode=verify-full, persistent, opened before tracing",
            settings: pg.settings(json!({"sslmode": "verify-full", "sslrootcert": ca, "conn_max_age": 600})),
            warm_up: true,
            pool: false,
        },
    ];
    side_by_side_for_each(&pg, &setups);
}
