//! `observer run` on the Django test app under gunicorn: a known mix of requests, and the
//! django_http_* values on /metrics must equal, family by family, what django-prometheus's
//! middlewares would have counted for that mix (shared/reference/django-metrics.md A.4).

mod harness;

use harness::{
    django::{Gunicorn, Metrics, ObserverRun},
    ebpf_available,
    mix::{assert_metrics, assert_metrics_over, drive, drive_over},
    tls::{Cert, Transport},
};

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

/// HTTPS served by gunicorn itself (`--certfile`): the requests' plaintext comes from the
/// OpenSSL its `ssl` module links, and every family is what django-prometheus counts
/// (`transport="https"`, Django's scheme on a TLS server).
fn run_https_mix(worker_class: &str, keep_alive: bool) {
    if !ebpf_available() {
        return;
    }
    let cert = Cert::new();
    let app = Gunicorn::start_https(worker_class, 2, &cert);
    let obs = ObserverRun::start(&["--pid", &app.pid().to_string()]);
    let done = drive_over(&Transport::Tls(cert.client()), app.port, keep_alive);
    let n = done.len() as f64;
    let m = obs.wait_until("every exchange", |m| {
        m.sum("django_http_responses_before_middlewares_total", &[]) >= n
            && m.sum("observer_http_exchanges_total", &[]) >= n
    });
    assert_metrics_over(&m, &done, true);
    assert_eq!(m.sum("observer_parse_errors_total", &[]), 0.0, "no parse errors on a clean run");
    assert!(
        m.sum("observer_tls_records_total", &[]) >= 2.0 * n,
        "each request and response was read from OpenSSL"
    );
}

#[test]
fn gunicorn_sync_workers_serving_https_give_exact_django_http_metrics() {
    run_https_mix("sync", false);
}

#[test]
fn gunicorn_gthread_workers_serving_https_with_keep_alive_and_pipelining_give_exact_django_http_metrics() {
    run_https_mix("gthread", true);
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

/// Closes `s` with a TCP reset (SO_LINGER 0), mid-whatever it was sending.
fn reset(s: std::net::TcpStream) {
    use std::os::fd::AsRawFd as _;
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid socket fd and a linger struct of the size given.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
}

/// Hostile TLS against a traced HTTPS server: garbage inside TLS (a well-formed TLS
/// session whose plaintext is random bytes), TLS records cut by a reset (in the
/// handshake, and in the middle of a request record), and many short sessions whose
/// `SSL*` the server frees and reuses. The agent stays up, parses none of it as Django
/// traffic, and then counts the request mix exactly.
#[test]
fn hostile_tls_is_counted_as_nothing_and_the_next_requests_exactly() {
    use std::io::{Read as _, Write as _};
    if !ebpf_available() {
        return;
    }
    let cert = Cert::new();
    let app = Gunicorn::start_https("sync", 2, &cert);
    let obs = ObserverRun::start(&["--pid", &app.pid().to_string()]);
    let tls = Transport::Tls(cert.client());
    for i in 0..10u64 {
        // Random plaintext inside TLS: gunicorn answers 400 or closes.
        let mut s = tls.connect(app.port);
        let _ = s.write_all(&harness::noise(i + 1, 4096));
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
        // A reset in the middle of the handshake's first record.
        let mut t = std::net::TcpStream::connect(("127.0.0.1", app.port)).unwrap();
        let mut hello = vec![0x16, 0x03, 0x01, 0x02, 0x00];
        hello.extend(harness::noise(i + 100, 60));
        t.write_all(&hello).unwrap();
        reset(t);
    }
    // A request cut by a reset inside TLS: raw TLS records are not reachable through the
    // client, so the reset comes after part of a request's plaintext was written.
    for _ in 0..5 {
        let mut s = tls.connect(app.port);
        s.write_all(b"GET /shop/items/1/ HTTP/1.1\r\nHost: x\r\nX-Pad: ").unwrap();
        drop(s);
    }
    // Many short sessions (the server's SSL objects freed and their memory reused).
    for _ in 0..30 {
        assert_eq!(
            harness::django::raw_exchange_over(
                &tls,
                app.port,
                b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                &[false]
            )[0]
            .status,
            200
        );
    }
    let warm = obs.wait_until("the short sessions", |m| {
        m.sum("django_http_responses_before_middlewares_total", &[]) >= 30.0
    });
    assert_eq!(
        warm.sum("django_http_responses_before_middlewares_total", &[]),
        30.0,
        "only the real requests"
    );
    let before = obs.metrics();
    let done = drive_over(&tls, app.port, true);
    let n = done.len() as f64 + 30.0;
    let m = obs.wait_until("every exchange", |m| {
        m.sum("django_http_responses_before_middlewares_total", &[]) >= n
            && m.sum("observer_http_exchanges_total", &[]) >= n
    });
    assert_eq!(m.sum("django_http_responses_before_middlewares_total", &[]), n);
    assert!(
        m.sum("observer_tls_connections_total", &[]) >= before.sum("observer_tls_connections_total", &[])
    );
    assert!(m.sum("observer_tls_ciphertext_bytes_total", &[]) > 0.0);
    assert_eq!(m.sum("observer_parser_faults_total", &[]), 0.0);
}

/// TLS the agent cannot decrypt is counted under its app, by which connection it was and
/// why: sessions closed after their handshake (served, `no_plaintext`), HTTPS requests the
/// app makes with GnuTLS in a worker whose OpenSSL is probed (`not_tied`), and the same
/// from a child process that maps no OpenSSL at all (`no_probed_library`, as a Go or
/// rustls client would be). None of it is parsed; the requests around it are counted.
#[test]
fn tls_nobody_decrypts_is_counted_under_its_app_with_the_reason() {
    if !ebpf_available() {
        return;
    }
    let cert = Cert::new();
    // Three workers: one calls the app itself while another serves that call.
    let app = Gunicorn::start_https("sync", 3, &cert);
    let obs = ObserverRun::start(&["--pid", &app.pid().to_string()]);
    let tls = Transport::Tls(cert.client());
    for _ in 0..3 {
        tls.handshake_only(app.port);
    }
    // A child process mapping a "libssl" that is none (no SSL_* functions: a stripped
    // or foreign build under OpenSSL's name).
    let dir = harness::TempDir::new("fake-libssl");
    let fake = dir.0.join("libssl-0badc0de.so.3");
    std::fs::copy("/usr/lib/x86_64-linux-gnu/libz.so.1", &fake).unwrap();
    let url = format!("https://127.0.0.1:{}/", app.port);
    let stripped = format!("&child=1&preload={}", fake.display());
    for child in ["", "&child=1", "", "&child=1", stripped.as_str()] {
        let req = format!("GET /gnutls?url={url}{child} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let r = harness::django::raw_exchange_over(&tls, app.port, req.as_bytes(), &[false]);
        assert_eq!(r[0].status, 200, "the GnuTLS request{child} succeeded");
    }
    let opaque = |m: &Metrics, connection: &str, reason: &str| {
        m.sum("observer_tls_opaque_connections_total", &[("connection", connection), ("reason", reason)])
    };
    // 5 requests to /gnutls, and the 5 HEADs they made to /.
    let m = obs.wait_until("the requests and the opaque connections", |m| {
        m.sum("django_http_responses_before_middlewares_total", &[]) >= 10.0
            && m.sum("observer_tls_opaque_connections_total", &[]) >= 8.0
            // The agent's own counters are published once a second.
            && m.sum("observer_uprobe_libraries_without_symbols_total", &[]) >= 1.0
    });
    assert_eq!(m.sum("django_http_responses_before_middlewares_total", &[]), 10.0);
    assert_eq!(m.sum("django_http_requests_total_by_method_total", &[("method", "HEAD")]), 5.0);
    assert_eq!(
        opaque(&m, "served", "no_plaintext"),
        3.0,
        "{:?}",
        m.family("observer_tls_opaque_connections_total", &[])
    );
    assert_eq!(opaque(&m, "other", "not_tied"), 2.0);
    assert_eq!(opaque(&m, "other", "no_probed_library"), 2.0);
    assert_eq!(opaque(&m, "other", "library_unprobeable"), 1.0);
    assert_eq!(m.sum("observer_tls_opaque_connections_total", &[]), 8.0, "nothing else is opaque");
    assert_eq!(m.sum("observer_uprobe_libraries_without_symbols_total", &[]), 1.0);
    // Under the app's own target labels, like its django_* series.
    let s = m.samples.iter().find(|s| s.name == "observer_tls_opaque_connections_total").unwrap();
    assert!(
        s.labels.get("instance").is_some_and(|i| i.ends_with(&format!(":{}", app.port))),
        "{:?}",
        s.labels
    );
    assert_eq!(s.labels.get("job").map(String::as_str), Some("django"));
    assert_eq!(m.sum("observer_parse_errors_total", &[]), 0.0, "none of it was parsed");
}
