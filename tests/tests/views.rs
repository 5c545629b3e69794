//! View labels without the app's own routes: a routes file, the fallback when discovery
//! fails, and the hard cap on templated paths under a URL flood.

mod harness;

use std::{
    collections::BTreeSet,
    io::Write as _,
    process::{Command, Stdio},
};

use harness::{
    TempDir,
    django::{Gunicorn, Metrics, ObserverRun, free_port, raw_exchange},
    ebpf_available,
};

fn views(m: &Metrics) -> BTreeSet<String> {
    m.samples
        .iter()
        .filter(|s| s.name == "django_http_responses_total_by_status_view_method_total")
        .map(|s| s.labels["view"].clone())
        .collect()
}

#[test]
fn url_flood_stays_under_the_view_cap_and_is_counted() {
    if !ebpf_available() {
        return;
    }
    let app = Gunicorn::start("gthread", 1, false);
    let obs =
        ObserverRun::start(&["--pid", &app.pid().to_string(), "--no-route-discovery", "--max-views", "50"]);
    // 2000 distinct paths, pipelined 40 per connection (one read of them fits in the
    // capture, and 40 is under the pending-request bound).
    let total = 2000;
    let mut sent = 0;
    for batch in 0..50 {
        let mut bytes = Vec::new();
        for i in 0..40 {
            write!(bytes, "GET /flood/p{batch}x{i}/item HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        }
        let responses = raw_exchange(app.port, &bytes, &[false; 40]);
        assert!(responses.iter().all(|r| r.status == 404));
        sent += responses.len();
    }
    assert_eq!(sent, total);
    // The self metrics are published once a second: wait for them too.
    let m = obs.wait_until("every request", |m| {
        m.sum("django_http_responses_before_middlewares_total", &[]) >= total as f64
            && m.sum("observer_label_overflow_total", &[("label", "view")]) >= (total - 50) as f64
    });
    assert_eq!(
        m.sum("django_http_responses_before_middlewares_total", &[]),
        total as f64,
        "counts stay exact"
    );
    let v = views(&m);
    assert_eq!(v.len(), 51, "50 templated paths and <other>: {v:?}");
    assert!(v.contains("<other>"));
    assert_eq!(m.sum("observer_label_overflow_total", &[("label", "view")]), (total - 50) as f64);
    assert_eq!(m.sum("observer_parse_errors_total", &[]), 0.0);
}

#[test]
fn routes_file_names_views_when_discovery_is_off() {
    if !ebpf_available() {
        return;
    }
    let dir = TempDir::new("routes");
    let routes = dir.0.join("routes.txt");
    std::fs::write(
        &routes,
        "# the test app, by hand\nshop/items/<int:pk>/ shop:item\nre:^plain$ plain-from-file\n",
    )
    .unwrap();
    let app = Gunicorn::start("sync", 1, false);
    let obs = ObserverRun::start(&[
        "--pid",
        &app.pid().to_string(),
        "--no-route-discovery",
        "--routes",
        routes.to_str().unwrap(),
    ]);
    for path in ["/shop/items/5/", "/plain", "/thing/"] {
        raw_exchange(app.port, format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes(), &[false]);
    }
    let m =
        obs.wait_until("3 requests", |m| m.sum("django_http_responses_before_middlewares_total", &[]) >= 3.0);
    let v = views(&m);
    assert_eq!(
        v,
        BTreeSet::from(["shop:item".into(), "plain-from-file".into(), "<unnamed view>".into()]),
        "{v:?}"
    );
    assert_eq!(m.sum("observer_route_discovery_total", &[]), 0.0, "discovery was off");
}

#[test]
fn failed_discovery_is_counted_and_falls_back_to_the_routes_file() {
    if !ebpf_available() {
        return;
    }
    // Not a Django app: discovery cannot load any settings.
    let dir = TempDir::new("fallback");
    std::fs::write(dir.0.join("index.html"), "hello\n").unwrap();
    let routes = dir.0.join("routes.txt");
    std::fs::write(&routes, "index.html static-index\n").unwrap();
    let port = free_port();
    let mut server = Command::new("/usr/bin/python3")
        .args(["-m", "http.server", "--bind", "127.0.0.1", &port.to_string()])
        .current_dir(&dir.0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let obs = ObserverRun::start(&["--pid", &server.id().to_string(), "--routes", routes.to_str().unwrap()]);
    // Discovery runs with the app's first exchange, which waits for its result.
    raw_exchange(port, b"GET /index.html HTTP/1.1\r\nHost: t\r\n\r\n", &[false]);
    let m = obs.wait_until("the request, after discovery failed", |m| {
        m.sum("observer_route_discovery_total", &[("result", "failure")]) == 1.0
            && m.sum("django_http_responses_before_middlewares_total", &[]) >= 1.0
    });
    assert_eq!(views(&m), BTreeSet::from(["static-index".to_string()]));
    assert!(obs.log().contains("route discovery failed"), "the failure is logged");
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn discovery_enters_the_apps_mount_namespace() {
    if !ebpf_available() {
        return;
    }
    // The app lives on a tmpfs mounted only inside its own mount namespace (as in a
    // container): the observer cannot see its files; discovery must enter the namespace.
    let dir = TempDir::new("mntns");
    let hidden = dir.0.join("hidden");
    std::fs::create_dir_all(&hidden).unwrap();
    let port = free_port();
    let app_dir = harness::django::root().join("tests/apps/djangoapp");
    let script = format!(
        "mount -t tmpfs observer-test {hidden} && cp -r {app} {hidden}/app && exec {py} {gunicorn} --chdir {hidden}/app \
         --bind 127.0.0.1:{port} --workers 1 --log-level warning testproj.wsgi:application",
        hidden = hidden.display(),
        app = app_dir.display(),
        py = harness::django::venv_bin("python").display(),
        gunicorn = harness::django::venv_bin("gunicorn").display(),
    );
    let mut app = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "/bin/sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "the app in its namespace did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(!hidden.join("app").exists(), "outside the namespace the app's files are not there");
    let obs = ObserverRun::start(&["--pid", &app.id().to_string()]);
    raw_exchange(port, b"GET /shop/items/9/ HTTP/1.1\r\nHost: t\r\n\r\n", &[false]);
    let m = obs.wait_until("the request", |m| {
        m.sum("django_http_responses_before_middlewares_total", &[]) >= 1.0
            && m.sum("observer_route_discovery_total", &[("result", "success")]) == 1.0
    });
    assert_eq!(views(&m), BTreeSet::from(["shop:item".to_string()]));
    // SAFETY: signalling our own child (gunicorn, exec'd by sh).
    unsafe { libc::kill(app.id() as i32, libc::SIGTERM) };
    let _ = app.wait();
}
