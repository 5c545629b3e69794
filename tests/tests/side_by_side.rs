//! The same app, the same traffic: django-prometheus inside the app and observer outside
//! it. Every family the README calls exact must match label set by label set; the only
//! differences allowed are the ones the README documents, each asserted here exactly.

mod harness;

use std::collections::BTreeMap;

use harness::{
    django::{Gunicorn, Metrics, ObserverRun, http_get},
    ebpf_available,
    mix::{drive, expected, view_of},
};

/// Target labels only observer adds.
const OURS_ONLY: [&str; 2] = ["job", "instance"];
const SCRAPE_VIEW: &str = "prometheus-django-metrics";

fn family(m: &Metrics, name: &str) -> BTreeMap<String, f64> {
    m.family(name, &OURS_ONLY)
}

/// `a` plus `delta` at one key.
fn plus(mut a: BTreeMap<String, f64>, key: &str, delta: f64) -> BTreeMap<String, f64> {
    *a.entry(key.into()).or_insert(0.0) += delta;
    a
}

fn buckets(m: &Metrics, name: &str) -> Vec<(f64, f64)> {
    let mut v: Vec<(f64, f64)> = m
        .samples
        .iter()
        .filter(|s| s.name == format!("{name}_bucket"))
        .map(|s| {
            let le = &s.labels["le"];
            (if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() }, s.value)
        })
        .collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v
}

/// Bucket counts after adding and removing single observations.
fn adjust(mut b: Vec<(f64, f64)>, add: &[u64], remove: &[u64]) -> Vec<(f64, f64)> {
    for (le, c) in &mut b {
        *c += add.iter().filter(|&&v| v as f64 <= *le).count() as f64;
        *c -= remove.iter().filter(|&&v| v as f64 <= *le).count() as f64;
    }
    b
}

#[test]
fn observer_matches_django_prometheus_family_by_family() {
    if !ebpf_available() {
        return;
    }
    // One worker: django-prometheus keeps per-process counters (the [2a] issue), so only
    // a single worker gives it one consistent set to compare with.
    let app = Gunicorn::start("sync", 1, true);
    let obs = ObserverRun::start(&["--pid", &app.pid().to_string()]);
    let done = drive(app.port, false);
    let n = done.len() as f64;
    obs.wait_until("every exchange", |m| m.sum("django_http_responses_before_middlewares_total", &[]) >= n);

    // django-prometheus renders its /metrics while that request is in flight: its
    // request is counted (before middlewares, by method, by view/transport/method), its
    // response is not yet. observer sees the whole scrape exchange.
    let body = http_get(app.port, "/metrics");
    let scrape_len = body.len() as u64;
    let theirs = Metrics::parse(&body);
    let ours = obs.wait_until("the scrape exchange", |m| {
        m.sum("django_http_responses_before_middlewares_total", &[]) >= n + 1.0
    });

    // --- exact, label set by label set ------------------------------------------------
    for name in [
        "django_http_requests_before_middlewares_total",
        "django_http_requests_total_by_method_total",
        "django_http_requests_total_by_transport_total",
        "django_http_ajax_requests_total",
        "django_http_responses_streaming_total",
        "django_http_requests_unknown_latency_total",
        "django_http_requests_unknown_latency_including_middlewares_total",
        "django_http_requests_body_total_bytes_count",
        "django_http_requests_body_total_bytes_sum",
        "django_http_requests_body_total_bytes_bucket",
    ] {
        assert_eq!(family(&ours, name), family(&theirs, name), "{name}");
        assert!(!family(&ours, name).is_empty(), "{name} present");
    }

    // --- by view/transport/method: django-prometheus counts in process_view, which a
    // middleware answering first skips (here CsrfViewMiddleware's 403 to unsafe methods
    // on views that are not csrf_exempt); observer counts every resolved request. -------
    let mut want = family(&theirs, "django_http_requests_total_by_view_transport_method_total");
    let safe = ["GET", "HEAD", "OPTIONS", "TRACE"];
    let mut csrf = 0;
    for (r, resp) in &done {
        let e = expected(r, resp);
        if resp.status == 403 && !safe.contains(&r.method) && e.resolved {
            csrf += 1;
            *want
                .entry(format!("method={},transport={},view={}", e.method, e.transport, e.view))
                .or_insert(0.0) += 1.0;
        }
    }
    assert_eq!(csrf, 2, "the mix sends PROPFIND and DELETE to views that are not csrf_exempt");
    assert_eq!(family(&ours, "django_http_requests_total_by_view_transport_method_total"), want);

    // --- exact once the in-flight scrape response is accounted for ---------------------
    let scrape_key = format!("method=GET,status=200,view={SCRAPE_VIEW}");
    assert_eq!(
        family(&ours, "django_http_responses_before_middlewares_total"),
        plus(family(&theirs, "django_http_responses_before_middlewares_total"), "", 1.0)
    );
    assert_eq!(
        family(&ours, "django_http_requests_latency_including_middlewares_seconds_count"),
        plus(family(&theirs, "django_http_requests_latency_including_middlewares_seconds_count"), "", 1.0)
    );
    assert_eq!(
        family(&ours, "django_http_responses_total_by_status_total"),
        plus(family(&theirs, "django_http_responses_total_by_status_total"), "status=200", 1.0)
    );
    assert_eq!(
        family(&ours, "django_http_responses_total_by_status_view_method_total"),
        plus(family(&theirs, "django_http_responses_total_by_status_view_method_total"), &scrape_key, 1.0)
    );
    assert_eq!(
        family(&ours, "django_http_responses_total_by_charset_total"),
        plus(family(&theirs, "django_http_responses_total_by_charset_total"), "charset=utf-8", 1.0)
    );

    // --- response body sizes: the APPEND_SLASH redirect hides the 404 body django-prometheus
    // measured; observer adds the scrape's response. ------------------------------------
    let appended: Vec<u64> = done
        .iter()
        .filter(|(r, resp)| resp.status == 301 && view_of(&r.path).is_none())
        .map(|_| {
            // Django's 404 page has the same length for every path (DEBUG=False).
            let nope = done.iter().find(|(r, _)| r.path == "/nope/nothing").expect("a plain 404 in the mix");
            nope.1.header("content-length").unwrap().parse().unwrap()
        })
        .collect();
    assert_eq!(appended.len(), 1, "the mix has one APPEND_SLASH redirect");
    assert_eq!(
        buckets(&ours, "django_http_responses_body_total_bytes"),
        adjust(buckets(&theirs, "django_http_responses_body_total_bytes"), &[scrape_len], &appended)
    );
    assert_eq!(
        ours.sum("django_http_responses_body_total_bytes_sum", &[]),
        theirs.sum("django_http_responses_body_total_bytes_sum", &[]) + scrape_len as f64
            - appended.iter().sum::<u64>() as f64
    );

    // --- latency by view: django-prometheus observes a request twice when its view
    // raises (process_exception and process_response); observer once. ------------------
    let raising: Vec<String> = done
        .iter()
        .map(|(r, resp)| expected(r, resp))
        .filter(|e| e.view == "boom" || e.view == "missing")
        .map(|e| format!("method={},view={}", e.raw_method, e.view))
        .collect();
    assert_eq!(raising.len(), 2, "the mix has a ValueError view and an Http404 view");
    let mut want = family(&theirs, "django_http_requests_latency_seconds_by_view_method_count");
    for k in &raising {
        *want.get_mut(k).expect("raising view observed") /= 2.0;
    }
    let want = plus(want, &format!("method=GET,view={SCRAPE_VIEW}"), 1.0);
    assert_eq!(family(&ours, "django_http_requests_latency_seconds_by_view_method_count"), want);

    // --- absent from observer, present in django-prometheus: what the wire cannot see ---
    for name in [
        "django_http_responses_total_by_templatename_total",
        "django_http_exceptions_total_by_type_total",
        "django_http_exceptions_total_by_view_total",
    ] {
        assert!(!family(&theirs, name).is_empty(), "{name}: django-prometheus has it");
        assert!(family(&ours, name).is_empty(), "{name}: observer leaves it out");
    }
    // Every django_ family observer exports is one django-prometheus has, but for its own
    // per-view families (django_view_*), whose names django-prometheus never uses.
    let their_names: std::collections::BTreeSet<&str> =
        theirs.samples.iter().map(|s| s.name.as_str()).collect();
    for s in ours.samples.iter().filter(|s| s.name.starts_with("django_")) {
        if s.name.starts_with("django_view_") {
            assert!(!their_names.iter().any(|t| t.starts_with("django_view_")), "{} clashes", s.name);
            continue;
        }
        assert!(their_names.contains(s.name.as_str()), "{} is not a django-prometheus series", s.name);
    }
    assert!(
        ours.samples.iter().any(|s| s.name.starts_with("django_view_")),
        "the per-view families are there"
    );
}
