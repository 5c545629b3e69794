//! `observer run` on the Django test app under gunicorn: a known mix of requests, and the
//! django_http_* values on /metrics must equal, family by family, what django-prometheus's
//! middlewares would have counted for that mix (shared/reference/django-metrics.md A.4).

mod harness;

use std::collections::BTreeMap;

use harness::{
    django::{Gunicorn, Metrics, ObserverRun, Response},
    ebpf_available,
    mix::{Expected, Req, drive, expected},
};

fn key(pairs: &[(&str, &str)]) -> String {
    let mut p: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    p.sort();
    p.join(",")
}

fn count(map: &mut BTreeMap<String, f64>, pairs: &[(&str, &str)]) {
    *map.entry(key(pairs)).or_insert(0.0) += 1.0;
}

/// Cumulative bucket counts of a PowersOf(2, 30) histogram for these observations.
fn body_buckets(values: &[u64]) -> BTreeMap<u64, f64> {
    let mut bounds: Vec<u64> = vec![0];
    bounds.extend((0..30).map(|i| 1u64 << i));
    bounds.into_iter().map(|b| (b, values.iter().filter(|&&v| v <= b).count() as f64)).collect()
}

fn buckets(m: &Metrics, name: &str) -> BTreeMap<u64, f64> {
    let mut out = BTreeMap::new();
    for s in m.samples.iter().filter(|s| s.name == name) {
        let le = &s.labels["le"];
        if le != "+Inf" {
            out.insert(le.parse::<f64>().unwrap() as u64, s.value);
        }
    }
    out
}

/// Every family, exactly.
fn assert_metrics(m: &Metrics, done: &[(Req, Response)]) {
    let ex: Vec<Expected> = done.iter().map(|(r, resp)| expected(r, resp)).collect();
    let n = ex.len() as f64;
    let ignore = ["job", "instance"];
    assert_eq!(m.sum("django_http_requests_before_middlewares_total", &[]), n);
    assert_eq!(m.sum("django_http_responses_before_middlewares_total", &[]), n);
    assert_eq!(m.sum("django_http_requests_latency_including_middlewares_seconds_count", &[]), n);
    assert!(m.sum("django_http_requests_latency_including_middlewares_seconds_sum", &[]) > 0.0);
    assert_eq!(m.sum("django_http_requests_unknown_latency_total", &[]), 0.0);
    assert_eq!(m.sum("django_http_ajax_requests_total", &[]), ex.iter().filter(|e| e.ajax).count() as f64);
    assert_eq!(
        m.sum("django_http_responses_streaming_total", &[]),
        ex.iter().filter(|e| e.streaming).count() as f64
    );

    let mut by_method = BTreeMap::new();
    let mut by_transport = BTreeMap::new();
    let mut by_vtm = BTreeMap::new();
    let mut by_status = BTreeMap::new();
    let mut by_svm = BTreeMap::new();
    let mut by_charset = BTreeMap::new();
    let mut latency = BTreeMap::new();
    for e in &ex {
        count(&mut by_method, &[("method", &e.method)]);
        count(&mut by_transport, &[("transport", e.transport)]);
        if e.resolved {
            count(&mut by_vtm, &[("view", &e.view), ("transport", e.transport), ("method", &e.method)]);
        }
        count(&mut by_status, &[("status", &e.status)]);
        count(&mut by_svm, &[("status", &e.status), ("view", &e.view), ("method", &e.method)]);
        count(&mut by_charset, &[("charset", &e.charset)]);
        count(&mut latency, &[("view", &e.view), ("method", &e.raw_method)]);
    }
    for (family, want) in [
        ("django_http_requests_total_by_method_total", &by_method),
        ("django_http_requests_total_by_transport_total", &by_transport),
        ("django_http_requests_total_by_view_transport_method_total", &by_vtm),
        ("django_http_responses_total_by_status_total", &by_status),
        ("django_http_responses_total_by_status_view_method_total", &by_svm),
        ("django_http_responses_total_by_charset_total", &by_charset),
        ("django_http_requests_latency_seconds_by_view_method_count", &latency),
    ] {
        assert_eq!(&m.family(family, &ignore), want, "{family}");
    }

    let req_bodies: Vec<u64> = ex.iter().map(|e| e.request_body).collect();
    assert_eq!(m.sum("django_http_requests_body_total_bytes_count", &[]), n);
    assert_eq!(
        m.sum("django_http_requests_body_total_bytes_sum", &[]),
        req_bodies.iter().sum::<u64>() as f64
    );
    assert_eq!(buckets(m, "django_http_requests_body_total_bytes_bucket"), body_buckets(&req_bodies));
    let resp_bodies: Vec<u64> = ex.iter().filter_map(|e| e.response).collect();
    assert_eq!(m.sum("django_http_responses_body_total_bytes_count", &[]), resp_bodies.len() as f64);
    assert_eq!(
        m.sum("django_http_responses_body_total_bytes_sum", &[]),
        resp_bodies.iter().sum::<u64>() as f64
    );
    assert_eq!(buckets(m, "django_http_responses_body_total_bytes_bucket"), body_buckets(&resp_bodies));

    // Every series carries the target labels.
    for s in m.samples.iter().filter(|s| s.name.starts_with("django_http_")) {
        assert_eq!(s.labels.get("job").map(String::as_str), Some("django"), "{s:?}");
        assert!(s.labels.contains_key("instance"), "{s:?}");
    }
}

fn run_mix(worker_class: &str, keep_alive: bool) {
    if !ebpf_available() {
        return;
    }
    let app = Gunicorn::start(worker_class, 2, false);
    let obs = ObserverRun::start(&["--pid", &app.pid().to_string()]);
    let done = drive(app.port, keep_alive);
    let n = done.len() as f64;
    // The self metrics are published once a second: wait for them too.
    let m = obs.wait_until("every exchange", |m| {
        m.sum("django_http_responses_before_middlewares_total", &[]) >= n
            && m.sum("observer_http_exchanges_total", &[]) >= n
    });
    assert_metrics(&m, &done);
    // The same numbers in OpenMetrics, when the scraper asks for it.
    let om = harness::django::http_get_with(
        obs.port,
        "/metrics",
        "Accept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n",
    );
    assert!(om.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    assert!(om.contains("# TYPE django_http_requests_total_by_method counter"));
    let om = Metrics::parse(&om);
    for family in [
        "django_http_responses_total_by_status_view_method_total",
        "django_http_requests_body_total_bytes_bucket",
    ] {
        assert_eq!(om.family(family, &[]), m.family(family, &[]), "{family} in OpenMetrics");
    }
    let instance = m.samples.iter().find_map(|s| s.labels.get("instance").cloned()).unwrap();
    assert!(instance.ends_with(&format!(":{}", app.port)), "instance {instance} names the app's port");
    assert_eq!(m.sum("observer_parse_errors_total", &[]), 0.0, "no parse errors on a clean run");
    assert_eq!(m.sum("observer_targets", &[]), 1.0, "master and workers are one app");
    assert_eq!(
        m.sum("observer_route_discovery_total", &[("result", "success")]),
        1.0,
        "routes discovered with the first exchange"
    );
}

#[test]
fn gunicorn_sync_workers_give_exact_django_http_metrics() {
    run_mix("sync", false);
}

#[test]
fn gunicorn_gthread_workers_with_keep_alive_and_pipelining_give_exact_django_http_metrics() {
    run_mix("gthread", true);
}

#[test]
fn django_apps_are_found_without_selectors_including_ones_started_later() {
    if !ebpf_available() {
        return;
    }
    let obs = ObserverRun::start(&[]);
    // Started after the observer: found from its exec.
    let app = Gunicorn::start("sync", 2, false);
    let instance_suffix = format!(":{}", app.port);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !obs.log().contains(&format!("pid={} why=\"started and runs gunicorn\"", app.pid())) {
        assert!(std::time::Instant::now() < deadline, "the new app was not traced:\n{}", obs.log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for _ in 0..3 {
        harness::django::raw_exchange(app.port, b"GET /shop/items/3/ HTTP/1.1\r\nHost: t\r\n\r\n", &[false]);
    }
    let m = obs.wait_until("3 requests", |m| {
        m.samples.iter().any(|s| {
            s.name == "django_http_responses_total_by_status_view_method_total"
                && s.labels.get("instance").is_some_and(|i| i.ends_with(&instance_suffix))
                && s.labels.get("view").map(String::as_str) == Some("shop:item")
                && s.value == 3.0
        })
    });
    assert!(m.sum("observer_targets", &[]) >= 1.0);
}
