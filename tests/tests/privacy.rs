//! Privacy: what the app's traffic carries (query text and its literals, database error
//! messages, cache keys and values, header values, cookies, bodies) never reaches the
//! agent's logs, errors or /metrics. Traffic full of a marker string goes through a traced
//! app, with the agent at its most verbose log level; then its whole output is searched.

mod harness;

use harness::{
    caches::Redis,
    django::{Gunicorn, ObserverRun, free_port, http_get_with, raw_exchange},
    ebpf_available,
    postgres::Postgres,
};
use serde_json::json;

/// Nothing in the app, the agent or the test names this but the traffic below.
const MARKER: &str = "Zq7marker4Privacy";

#[test]
fn payload_never_reaches_logs_errors_or_metrics() {
    if !ebpf_available() {
        return;
    }
    let pg = Postgres::start();
    let settings = pg.settings(json!({"failing_aliases": false}));
    pg.migrate(&settings, &[]);
    let redis = Redis::start();
    let cache = json!({
        "kind": "django_redis", "location": redis.url(),
        "down": format!("redis://127.0.0.1:{}/0", free_port()),
    });
    let app = Gunicorn::start_with(
        "gthread",
        1,
        false,
        &[("OBSERVER_TEST_PG", &settings), ("OBSERVER_TEST_CACHE", &cache.to_string())],
    );
    let obs = ObserverRun::start_with_env(&["--pid", &app.pid().to_string()], &[("RUST_LOG", "trace")]);

    // The marker in the query string (a SQL literal, a unique violation's message, cache
    // keys and values, response header, cookie and body), in request headers and bodies,
    // in a path no route matches, and in bytes that are not HTTP at all.
    for _ in 0..3 {
        let body = http_get_with(
            app.port,
            &format!("/db/echo?m={MARKER}"),
            &format!("Cookie: session={MARKER}\r\nAuthorization: Bearer {MARKER}\r\nX-Custom: {MARKER}\r\n"),
        );
        assert!(body.contains(MARKER), "the view echoed the marker: {body}");
    }
    let post = format!(
        "POST /upload HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Custom: {MARKER}\r\nConnection: close\r\n\r\n{MARKER}",
        MARKER.len()
    );
    raw_exchange(app.port, post.as_bytes(), &[false]);
    raw_exchange(
        app.port,
        format!("GET /nowhere/{MARKER}/ HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        &[false],
    );
    raw_exchange(app.port, format!("{MARKER} is not HTTP\r\n\r\n").as_bytes(), &[false]);

    // Counted (so the agent did read it all)...
    let m = obs.wait_until("the echo views", |m| {
        m.sum("django_http_responses_total_by_status_view_method_total", &[("view", "db-echo")]) == 3.0
            && m.sum("django_db_errors_total", &[]) >= 3.0
            && m.sum("django_cache_get_hits_total", &[]) >= 3.0
    });
    assert!(m.sum("django_db_execute_total", &[]) >= 9.0);
    // ...and said nowhere.
    let metrics = harness::django::http_get(obs.port, "/metrics");
    let open_metrics =
        http_get_with(obs.port, "/metrics", "Accept: application/openmetrics-text;version=1.0.0\r\n");
    // Its log, including what it says when it stops.
    let log = obs.stop_with_log();
    let texts = [("/metrics", metrics), ("/metrics (OpenMetrics)", open_metrics), ("the log", log)];
    for (what, text) in &texts {
        assert!(!text.is_empty(), "{what} is empty");
        for needle in [MARKER, &MARKER.to_lowercase(), &MARKER.to_uppercase()] {
            assert!(!text.contains(needle), "{what} carries the payload marker:\n{}", context(text, needle));
        }
    }
    let log_lines = texts[2].1.lines().count();
    eprintln!("searched /metrics and {log_lines} log lines at trace level");
    assert!(log_lines > 10, "the log at trace level says something");
    drop(redis);
}

/// The lines around the first occurrence of `needle`, for the failure message.
fn context(text: &str, needle: &str) -> String {
    text.lines().filter(|l| l.contains(needle)).take(5).collect::<Vec<_>>().join("\n")
}
