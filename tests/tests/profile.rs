//! Per-view profile (beyond django-prometheus): every statement and cache lookup goes to
//! the request (and view) it was made for, the N+1 view is flagged and its fix is not, for
//! sync, gthread and ASGI workers, on PostgreSQL and on SQLite; and under concurrency (gthread, 4 threads, concurrent
//! clients) every statement lands on the right view.
//!
//! The known numbers come from django-prometheus in the same app: its
//! django_db_execute_total, read between views that run one at a time, is what each view
//! executes (connection setup included, whatever the driver does).

mod harness;

use std::{collections::BTreeMap, thread};

use harness::{
    TempDir,
    caches::Redis,
    django::{Gunicorn, Metrics, ObserverRun, free_port, http_get, http_status, migrate},
    ebpf_available,
    postgres::Postgres,
};
use serde_json::json;

const VIEWS: [(&str, &str); 4] = [
    ("/db/nplus1", "db-nplus1"),
    ("/db/nplus1-fixed", "db-nplus1-fixed"),
    ("/cache/hit", "cache"),
    ("/db/list", "db-list"),
];

fn hist(m: &Metrics, family: &str, view: &str, part: &str) -> f64 {
    m.sum(&format!("{family}_{part}"), &[("view", view)])
}

struct App {
    /// The database: PostgreSQL's server, or the SQLite file's directory.
    _db: (Option<Postgres>, Option<TempDir>),
    _redis: Redis,
    app: Gunicorn,
    obs: ObserverRun,
}

fn start(worker: &str) -> App {
    let pg = Postgres::start();
    let settings = pg.settings(json!({"failing_aliases": false, "conn_max_age": 0}));
    pg.migrate(&settings, &[]);
    start_on(worker, (Some(pg), None), ("OBSERVER_TEST_PG", settings))
}

/// The same app on a SQLite file (Django's default database).
fn start_sqlite(worker: &str) -> App {
    let dir = TempDir::new("profile-sqlite");
    let settings = json!({"name": format!("{}/db.sqlite3", dir.path()), "conn_max_age": 0}).to_string();
    migrate("OBSERVER_TEST_SQLITE", &settings, &[]);
    start_on(worker, (None, Some(dir)), ("OBSERVER_TEST_SQLITE", settings))
}

fn start_on(worker: &str, db: (Option<Postgres>, Option<TempDir>), (var, settings): (&str, String)) -> App {
    let redis = Redis::start();
    let cache = json!({
        "kind": "django_redis", "location": redis.url(),
        "down": format!("redis://127.0.0.1:{}/0", free_port()),
    });
    let env = [(var, settings.as_str()), ("OBSERVER_TEST_CACHE", &cache.to_string())];
    let app = Gunicorn::start_with(worker, 1, true, &env);
    let obs = ObserverRun::start(&["--pid", &app.pid().to_string()]);
    assert_eq!(http_status(app.port, "/db/seed-tags"), Some(200));
    App { _db: db, _redis: redis, app, obs }
}

/// Sends `n` requests to each view in turn and checks, per view: requests profiled,
/// statements per request equal to what django-prometheus counted for that view, N+1
/// flagged for the loop only, cache gets and hits. Returns statements per request by view.
fn sequential(a: &App, n: usize) -> BTreeMap<&'static str, f64> {
    let theirs = || Metrics::parse(&http_get(a.app.port, "/metrics"));
    let mut per_request = BTreeMap::new();
    for (path, view) in VIEWS {
        let before_theirs = theirs();
        let before = a.obs.metrics();
        for _ in 0..n {
            assert_eq!(http_status(a.app.port, path), Some(200), "{path}");
        }
        let after_theirs = theirs();
        let executed = after_theirs.sum("django_db_execute_total", &[])
            - before_theirs.sum("django_db_execute_total", &[]);
        let fam = "django_view_db_statements_per_request";
        let m = a.obs.wait_until(&format!("{n} profiles of {view}"), |m| {
            hist(m, fam, view, "count") - hist(&before, fam, view, "count") >= n as f64
        });
        let count = hist(&m, fam, view, "count") - hist(&before, fam, view, "count");
        let statements = hist(&m, fam, view, "sum") - hist(&before, fam, view, "sum");
        eprintln!("{view}: {n} requests, {statements} statements (django-prometheus: {executed})");
        assert_eq!(count, n as f64, "{view}: every request profiled");
        assert_eq!(statements, executed, "{view}: statements per request as django-prometheus counted them");
        let flagged = m.sum("django_view_n_plus_one_requests_total", &[("view", view)])
            - before.sum("django_view_n_plus_one_requests_total", &[("view", view)]);
        let gets = hist(&m, "django_view_cache_gets_per_request", view, "sum")
            - hist(&before, "django_view_cache_gets_per_request", view, "sum");
        let hits = m.sum("django_view_cache_get_hits_total", &[("view", view)])
            - before.sum("django_view_cache_get_hits_total", &[("view", view)]);
        match view {
            "db-nplus1" => {
                assert!(statements >= 13.0 * n as f64, "one for the tags, twelve for their items");
                assert_eq!(flagged, n as f64, "every N+1 request flagged");
            }
            "cache" => {
                assert_eq!((gets, hits), (n as f64, n as f64), "one get, a hit, per request");
                assert_eq!(flagged, 0.0);
            }
            _ => assert_eq!(flagged, 0.0, "{view} is no N+1"),
        }
        if view != "cache" {
            assert_eq!(gets, 0.0, "{view} reads no cache");
        }
        per_request.insert(view, statements / n as f64);
    }
    let nplus1 = per_request["db-nplus1"];
    let fixed = per_request["db-nplus1-fixed"];
    assert_eq!(nplus1 - fixed, 12.0, "the fix saves exactly the twelve item reads");
    let m = a.obs.metrics();
    assert_eq!(m.sum("observer_profile_unattributed_total", &[]), 0.0, "everything attributed");
    per_request
}

#[test]
fn statements_per_request_and_n_plus_one_for_sync_workers() {
    if !ebpf_available() {
        return;
    }
    sequential(&start("sync"), 5);
}

#[test]
fn statements_per_request_and_n_plus_one_on_sqlite() {
    if !ebpf_available() {
        return;
    }
    for worker in ["sync", "gthread"] {
        sequential(&start_sqlite(worker), 5);
    }
}

#[test]
fn statements_per_request_and_n_plus_one_for_asgi_workers() {
    if !ebpf_available() {
        return;
    }
    sequential(&start("asgi"), 5);
}

#[test]
fn gthread_attribution_under_concurrency() {
    if !ebpf_available() {
        return;
    }
    let a = start("gthread");
    let per_request = sequential(&a, 3);
    // Four clients at once, each through every view several times.
    let before = a.obs.metrics();
    const ROUNDS: usize = 6;
    let port = a.app.port;
    let clients: Vec<_> = (0..4)
        .map(|i| {
            thread::spawn(move || {
                for r in 0..ROUNDS {
                    // A different order per client, so that views overlap.
                    for k in 0..VIEWS.len() {
                        let (path, _) = VIEWS[(i + r + k) % VIEWS.len()];
                        assert_eq!(http_status(port, path), Some(200), "{path}");
                    }
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let fam = "django_view_db_statements_per_request";
    let n = (4 * ROUNDS) as f64;
    let m = a.obs.wait_until("every concurrent request", |m| {
        VIEWS.iter().all(|(_, v)| hist(m, fam, v, "count") - hist(&before, fam, v, "count") >= n)
    });
    for (_, view) in VIEWS {
        let statements = hist(&m, fam, view, "sum") - hist(&before, fam, view, "sum");
        assert_eq!(statements, per_request[view] * n, "{view}: each statement on its own view");
    }
    let flagged = m.sum("django_view_n_plus_one_requests_total", &[("view", "db-nplus1")])
        - before.sum("django_view_n_plus_one_requests_total", &[("view", "db-nplus1")]);
    assert_eq!(flagged, n);
    assert_eq!(m.sum("observer_profile_unattributed_total", &[]), 0.0);
    assert!(m.sum("observer_profile_attributed_total", &[("kind", "db")]) > 0.0);
}

/// `observer top` in a terminal (tmux, on a socket of its own), on the same app.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(cmd: &[&str]) -> Self {
        let socket = format!("observer-test-{}", std::process::id());
        let line = cmd.iter().map(|a| format!("'{a}'")).collect::<Vec<_>>().join(" ");
        let ok = std::process::Command::new("tmux")
            .args(["-L", &socket, "new-session", "-d", "-x", "200", "-y", "60", &line])
            .status()
            .expect("run tmux (cargo xtask setup installs it)");
        assert!(ok.success());
        Self { socket }
    }

    fn screen(&self) -> String {
        let out = std::process::Command::new("tmux")
            .args(["-L", &self.socket, "capture-pane", "-p"])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        // The server on our own socket: it ends the session and the observer in it.
        let _ = std::process::Command::new("tmux").args(["-L", &self.socket, "kill-server"]).status();
    }
}

#[test]
fn observer_top_shows_each_view_and_the_shape_it_repeats() {
    if !ebpf_available() {
        return;
    }
    let a = start("sync");
    let pid = a.app.pid().to_string();
    let tmux = Tmux::start(&[harness::observer_bin(), "top", "--pid", &pid]);
    // Until it traces (its first screen).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !tmux.screen().contains("observer top:") {
        assert!(std::time::Instant::now() < deadline, "no screen:\n{}", tmux.screen());
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    for _ in 0..5 {
        for (path, _) in VIEWS {
            assert_eq!(http_status(a.app.port, path), Some(200), "{path}");
        }
    }
    let row = |screen: &str, view: &str| -> Option<Vec<String>> {
        screen
            .lines()
            .find(|l| l.split_whitespace().next() == Some(view))
            .map(|l| l.split_whitespace().map(String::from).collect())
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let screen = loop {
        let s = tmux.screen();
        if VIEWS.iter().all(|(_, v)| row(&s, v).is_some()) && s.contains("12x") {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "views never all shown:\n{s}");
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    eprintln!("{screen}");
    // Columns: view, req/s, p50, p99, statements/request, DB ms/request, cache hit.
    let nplus1 = row(&screen, "db-nplus1").unwrap();
    let fixed = row(&screen, "db-nplus1-fixed").unwrap();
    let cache = row(&screen, "cache").unwrap();
    let stmts = |r: &[String]| r[4].parse::<f64>().unwrap();
    assert_eq!(stmts(&nplus1) - stmts(&fixed), 12.0, "{screen}");
    assert_eq!(cache[6], "100%", "{screen}");
    assert_eq!(fixed[6], "-", "{screen}");
    // The repeated shape, normalised, under its view, and nowhere a literal.
    let lines: Vec<&str> = screen.lines().collect();
    let at = lines.iter().position(|l| l.split_whitespace().next() == Some("db-nplus1")).unwrap();
    let shape = lines[at + 1];
    assert!(shape.trim_start().starts_with("12x  SELECT"), "{screen}");
    assert!(shape.contains("\"shop_item\"") && shape.contains("= ?"), "{shape}");
    assert!(!lines.iter().any(|l| l.contains("tagged-")), "no literal on screen:\n{screen}");
}
