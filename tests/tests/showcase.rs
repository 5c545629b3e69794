//! Why per-app series matter: gunicorn with 4 recycling workers and django-prometheus in
//! its default setup (no PROMETHEUS_MULTIPROC_DIR). Each worker keeps its own counters and
//! a scrape reads whichever worker answers, so django-prometheus's counter jumps around
//! and resets; observer's equals the number of requests sent, exactly, at every scrape.

mod harness;

use harness::{
    django::{Metrics, ObserverRun, free_port, http_get, raw_exchange, root, venv_bin},
    ebpf_available,
};

#[test]
fn many_recycling_workers_django_prometheus_jumps_observer_is_exact() {
    if !ebpf_available() {
        return;
    }
    let port = free_port();
    let mut app = std::process::Command::new(venv_bin("python"))
        .arg(venv_bin("gunicorn"))
        .args(["--chdir", root().join("tests/apps/djangoapp").to_str().unwrap()])
        .args(["--bind", &format!("127.0.0.1:{port}"), "--workers", "4"])
        .args(["--max-requests", "50", "--max-requests-jitter", "10", "--log-level", "warning"])
        .arg("testproj.wsgi:application")
        .env("OBSERVER_TEST_DJANGO_PROMETHEUS", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let obs = ObserverRun::start(&["--pid", &app.id().to_string()]);

    let mut sent = 0u32;
    let mut rows = Vec::new();
    for round in 0..20 {
        for i in 0..20 {
            let r = raw_exchange(
                port,
                format!("GET /shop/items/{}/ HTTP/1.1\r\nHost: t\r\n\r\n", round * 20 + i).as_bytes(),
                &[false],
            );
            assert_eq!(r[0].status, 200);
            sent += 1;
        }
        // django-prometheus's own endpoint: whichever worker answers, counting itself.
        let theirs = Metrics::parse(&http_get(port, "/metrics"))
            .sum("django_http_requests_before_middlewares_total", &[]);
        sent += 1;
        let ours = obs
            .wait_until("every request so far", |m| {
                m.sum("django_http_requests_before_middlewares_total", &[]) >= f64::from(sent)
            })
            .sum("django_http_requests_before_middlewares_total", &[]);
        rows.push((sent, theirs, ours));
    }
    eprintln!("requests sent | django-prometheus (default setup) | observer");
    for (s, t, o) in &rows {
        eprintln!("{s:>13} | {t:>33} | {o:>8}");
    }
    for (s, _, o) in &rows {
        assert_eq!(*o, f64::from(*s), "observer counts every request, at every scrape");
    }
    let wrong = rows.iter().filter(|(s, t, _)| *t != f64::from(*s)).count();
    let drops = rows.windows(2).filter(|w| w[1].1 < w[0].1).count();
    assert!(wrong >= rows.len() - 1, "django-prometheus reads one worker's counters: {rows:?}");
    assert!(
        drops > 0,
        "django-prometheus's counter goes back between scrapes (worker switch or recycle): {rows:?}"
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(app.id() as i32, libc::SIGTERM) };
    let _ = app.wait();
}
