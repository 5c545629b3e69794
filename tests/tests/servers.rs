//! Every app server and mode a Django app runs under: one exact, monotonic series set per
//! app whatever the workers do (gunicorn sync recycling 4 workers, gunicorn with uvicorn
//! workers on the ASGI app, uvicorn, daphne, uwsgi processes and threads, gunicorn on a
//! Unix socket behind nginx's keep-alive upstream pool).

mod harness;

use std::{
    collections::BTreeSet,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use harness::{
    TempDir,
    django::{
        Metrics, ObserverRun, Response, free_port, raw_exchange, raw_exchange_over, read_response, root,
        venv_bin,
    },
    ebpf_available,
    mix::{Body, Req, assert_metrics, assert_metrics_over, req, single_requests},
    patience,
    tls::{Cert, Transport},
};

/// An app server we started (and stop, by its PID).
struct Server {
    child: Child,
    /// The signal that stops it cleanly.
    stop: i32,
}

impl Server {
    fn start(mut cmd: Command, stop: i32, ready: impl Fn() -> bool) -> Self {
        let child = cmd
            .current_dir(app_dir())
            .stdout(Stdio::null())
            .stderr(harness::child_log("server"))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        let mut s = Self { child, stop };
        let deadline = Instant::now() + patience(40);
        while !ready() {
            if let Ok(Some(status)) = s.child.try_wait() {
                panic!("{cmd:?} exited with {status}");
            }
            assert!(Instant::now() < deadline, "{cmd:?} did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its worker processes now.
    fn children(&self) -> BTreeSet<u32> {
        children_of(self.pid())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        harness::stop(&mut self.child, self.stop);
    }
}

fn app_dir() -> PathBuf {
    root().join("tests/apps/djangoapp")
}

fn tcp_ready(port: u16) -> impl Fn() -> bool {
    move || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

fn python(module_args: &[&str]) -> Command {
    let mut c = Command::new(venv_bin("python"));
    c.args(module_args);
    c
}

fn gunicorn(args: &[&str]) -> Command {
    let mut c = python(&[venv_bin("gunicorn").to_str().unwrap()]);
    c.args(["--log-level", "warning", "--timeout", &harness::gunicorn_timeout()]).args(args);
    c
}

/// The mix for ASGI servers: the WSGI mix plus async views.
fn asgi_requests() -> Vec<Req> {
    let mut v = single_requests();
    v.push(req("GET", "/async/"));
    v.push(req("GET", "/async/stream"));
    v
}

/// Sends `reqs` one per connection, then (when the server keeps connections alive) three
/// on one connection with idle gaps between them.
fn send(t: &Transport, port: u16, reqs: Vec<Req>, keep_alive: bool) -> Vec<(Req, Response)> {
    let mut done: Vec<(Req, Response)> = reqs
        .into_iter()
        .map(|r| {
            let resp = raw_exchange_over(t, port, &r.bytes(), &[r.method == "HEAD"]).remove(0);
            (r, resp)
        })
        .collect();
    if keep_alive {
        let mut reader = std::io::BufReader::new(t.connect(port));
        for (i, r) in
            [req("GET", "/"), req("GET", "/shop/items/1/"), req("GET", "/nope")].into_iter().enumerate()
        {
            if i > 0 {
                std::thread::sleep(Duration::from_millis(300));
            }
            reader.get_mut().write_all(&r.bytes()).unwrap();
            let resp = read_response(&mut reader, false);
            done.push((r, resp));
        }
    }
    done
}

/// Traces `server`, sends the mix and checks every family exactly.
fn check(server: &Server, port: u16, reqs: Vec<Req>, keep_alive: bool) -> (Vec<(Req, Response)>, Metrics) {
    check_over(&Transport::Plain, server, port, reqs, keep_alive)
}

/// [`check`] with the requests sent over `t` (HTTPS when TLS).
fn check_over(
    t: &Transport,
    server: &Server,
    port: u16,
    reqs: Vec<Req>,
    keep_alive: bool,
) -> (Vec<(Req, Response)>, Metrics) {
    let obs = ObserverRun::start(&["--pid", &server.pid().to_string()]);
    let done = send(t, port, reqs, keep_alive);
    let n = done.len() as f64;
    let m = obs.wait_until("every exchange", |m| {
        m.sum("django_http_responses_before_middlewares_total", &[]) >= n
            && m.sum("observer_http_exchanges_total", &[]) >= n
    });
    if std::env::var("DEBUG_SERVERS").is_ok() {
        for s in m.samples.iter().filter(|s| {
            s.name.contains("streaming")
                || s.name.contains("parse_errors")
                || s.name.contains("status_view_method")
        }) {
            eprintln!("DEBUG {s:?}");
        }
    }
    assert_metrics_over(&m, &done, matches!(t, Transport::Tls(_)));
    assert_eq!(m.sum("observer_targets", &[]), 1.0, "one app, one series set");
    assert_eq!(m.sum("observer_parse_errors_total", &[]), 0.0);
    (done, m)
}

#[test]
fn gunicorn_sync_4_workers_recycling_every_50_requests() {
    if !ebpf_available() {
        return;
    }
    let port = free_port();
    let server = Server::start(
        gunicorn(&[
            "--bind",
            &format!("127.0.0.1:{port}"),
            "--workers",
            "4",
            "--max-requests",
            "50",
            "--max-requests-jitter",
            "10",
            "testproj.wsgi:application",
        ]),
        libc::SIGTERM,
        tcp_ready(port),
    );
    let before = server.children();
    // 13 rounds of the mix: ~300 requests, every worker recycled at least once.
    let reqs: Vec<Req> = (0..13).flat_map(|_| single_requests()).collect();
    let (done, _) = check(&server, port, reqs, false);
    let after = server.children();
    assert_eq!(after.len(), 4);
    assert!(before.is_disjoint(&after), "all 4 workers were recycled ({before:?} -> {after:?})");
    eprintln!("gunicorn sync x4 --max-requests 50: {} requests sent and counted", done.len());
}

/// A supervisor that forks and execs its app server, as supervisord, honcho or a shell
/// wrapper do; SIGTERM is passed on.
const SUPERVISOR: &str = "import os, signal, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable] + sys.argv[1:])
signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGTERM))
os.waitpid(pid, 0)
";

/// [9k] A tree deeper than one fork, recycling while traced: the tracked root is a
/// supervisor, its child the gunicorn master, and the master's workers are replaced
/// every 30 requests or so, each new one forked two levels below the root after the
/// agent started. Every request is counted exactly, on every kernel of the matrix.
#[test]
fn a_supervisor_whose_gunicorn_recycles_its_workers() {
    if !ebpf_available() {
        return;
    }
    let port = free_port();
    let gunicorn_bin = venv_bin("gunicorn");
    let bind = format!("127.0.0.1:{port}");
    let server = Server::start(
        python(&[
            "-c",
            SUPERVISOR,
            gunicorn_bin.to_str().unwrap(),
            "--log-level",
            "warning",
            "--timeout",
            &harness::gunicorn_timeout(),
            "--bind",
            &bind,
            "--workers",
            "2",
            "--max-requests",
            "30",
            "--max-requests-jitter",
            "5",
            "testproj.wsgi:application",
        ]),
        libc::SIGTERM,
        tcp_ready(port),
    );
    let masters = server.children();
    assert_eq!(masters.len(), 1, "the supervisor's one child: {masters:?}");
    let workers = |m: &BTreeSet<u32>| -> BTreeSet<u32> { m.iter().flat_map(|&p| children_of(p)).collect() };
    let before = workers(&masters);
    // 6 rounds of the mix: ~140 requests, each of the 2 workers replaced at least twice.
    let reqs: Vec<Req> = (0..6).flat_map(|_| single_requests()).collect();
    let (done, _) = check(&server, port, reqs, false);
    let after = workers(&server.children());
    assert_eq!(server.children(), masters, "the master stayed");
    assert_eq!(after.len(), 2);
    assert!(before.is_disjoint(&after), "both workers were recycled ({before:?} -> {after:?})");
    eprintln!("supervisor -> gunicorn -> 2 recycling workers: {} requests sent and counted", done.len());
}

/// The children of `pid` now.
fn children_of(pid: u32) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
        if status.lines().any(|l| l == format!("PPid:\t{pid}")) {
            out.insert(p);
        }
    }
    out
}

#[test]
fn gunicorn_with_uvicorn_workers_on_the_asgi_app() {
    if !ebpf_available() {
        return;
    }
    let port = free_port();
    let server = Server::start(
        gunicorn(&[
            "--bind",
            &format!("127.0.0.1:{port}"),
            "--workers",
            "2",
            "--worker-class",
            "uvicorn_worker.UvicornWorker",
            "testproj.asgi:application",
        ]),
        libc::SIGTERM,
        tcp_ready(port),
    );
    let (done, _) = check(&server, port, asgi_requests(), true);
    eprintln!("gunicorn + uvicorn workers: {} requests", done.len());
}

#[test]
fn uvicorn_alone() {
    if !ebpf_available() {
        return;
    }
    let port = free_port();
    let server = Server::start(
        python(&[
            "-m",
            "uvicorn",
            "--port",
            &port.to_string(),
            "--log-level",
            "warning",
            "testproj.asgi:application",
        ]),
        libc::SIGTERM,
        tcp_ready(port),
    );
    let (done, _) = check(&server, port, asgi_requests(), true);
    eprintln!("uvicorn: {} requests", done.len());
}

/// uvicorn serving HTTPS itself (`--ssl-certfile`): asyncio's TLS runs OpenSSL on
/// memory BIOs (no socket syscall inside an `SSL_*` call), so the plaintext it reads is
/// tied to the socket the event loop read just before.
#[test]
fn uvicorn_alone_serving_https() {
    if !ebpf_available() {
        return;
    }
    let cert = Cert::new();
    let port = free_port();
    let server = Server::start(
        python(&[
            "-m",
            "uvicorn",
            "--port",
            &port.to_string(),
            "--log-level",
            "warning",
            "--ssl-certfile",
            &cert.crt,
            "--ssl-keyfile",
            &cert.key,
            "testproj.asgi:application",
        ]),
        libc::SIGTERM,
        tcp_ready(port),
    );
    let (done, m) = check_over(&Transport::Tls(cert.client()), &server, port, asgi_requests(), true);
    assert_eq!(m.sum("observer_records_lost_total", &[("reason", "tls_socket_unknown")]), 0.0);
    eprintln!("uvicorn over HTTPS: {} requests", done.len());
}

/// HTTPS served by gunicorn's sync workers, recycled while traced (`--max-requests`):
/// the uprobes (uretprobes included) stay on the library file whichever worker maps it,
/// and no request of a new worker is missed.
#[test]
fn gunicorn_serving_https_while_its_workers_recycle() {
    if !ebpf_available() {
        return;
    }
    let cert = Cert::new();
    let port = free_port();
    let server = Server::start(
        gunicorn(&[
            "--bind",
            &format!("127.0.0.1:{port}"),
            "--workers",
            "2",
            "--max-requests",
            "20",
            "--max-requests-jitter",
            "5",
            "--certfile",
            &cert.crt,
            "--keyfile",
            &cert.key,
            "testproj.wsgi:application",
        ]),
        libc::SIGTERM,
        tcp_ready(port),
    );
    let before = server.children();
    let reqs: Vec<Req> = (0..4).flat_map(|_| single_requests()).collect();
    let (done, m) = check_over(&Transport::Tls(cert.client()), &server, port, reqs, false);
    let after = server.children();
    assert!(before.is_disjoint(&after), "both workers were recycled ({before:?} -> {after:?})");
    assert_eq!(m.sum("observer_records_lost_total", &[("reason", "tls_socket_unknown")]), 0.0);
    eprintln!("gunicorn over HTTPS, 2 recycling workers: {} requests", done.len());
}

#[test]
fn daphne() {
    if !ebpf_available() {
        return;
    }
    let port = free_port();
    let server = Server::start(
        python(&[
            "-m",
            "daphne",
            "-b",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-v",
            "0",
            "testproj.asgi:application",
        ]),
        libc::SIGTERM,
        tcp_ready(port),
    );
    let (done, _) = check(&server, port, asgi_requests(), true);
    eprintln!("daphne: {} requests", done.len());
}

#[test]
fn uwsgi_processes_and_threads() {
    if !ebpf_available() {
        return;
    }
    let port = free_port();
    let mut cmd = Command::new("uwsgi");
    cmd.args(["--plugin", "python3", "--master", "--die-on-term", "--need-app", "--disable-logging"])
        .args(["--http-socket", &format!("127.0.0.1:{port}")])
        .args(["--virtualenv", root().join("target/venv").to_str().unwrap()])
        .args(["--chdir", app_dir().to_str().unwrap(), "--module", "testproj.wsgi:application"])
        .args(["--processes", "2", "--threads", "2"]);
    let server = Server::start(cmd, libc::SIGTERM, tcp_ready(port));
    let (done, _) = check(&server, port, single_requests(), false);
    eprintln!("uwsgi 2 processes x 2 threads: {} requests", done.len());
}

/// nginx in front of gunicorn on a Unix socket, the usual production layout.
fn nginx_conf(dir: &Path, listen: u16, socket: &Path) -> PathBuf {
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "user root;\n\
             worker_processes 1;\n\
             daemon off;\n\
             pid {dir}/nginx.pid;\n\
             error_log {dir}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n\
               access_log off;\n\
               client_body_temp_path {dir}/body;\n\
               proxy_temp_path {dir}/proxy;\n\
               upstream app {{ server unix:{socket}; keepalive 4; }}\n\
               server {{\n\
                 listen 127.0.0.1:{listen};\n\
                 location / {{\n\
                   proxy_pass http://app;\n\
                   proxy_http_version 1.1;\n\
                   proxy_set_header Connection \"\";\n\
                   proxy_set_header Host $host;\n\
                   proxy_set_header X-Forwarded-Proto https;\n\
                 }}\n\
               }}\n\
             }}\n",
            dir = dir.display(),
            socket = socket.display(),
        ),
    )
    .unwrap();
    conf
}

#[test]
fn gunicorn_on_a_unix_socket_behind_nginx_keep_alive_upstreams() {
    if !ebpf_available() {
        return;
    }
    let dir = TempDir::new("nginx");
    let socket = dir.0.join("app.sock");
    let sock = socket.clone();
    let server = Server::start(
        gunicorn(&[
            "--bind",
            &format!("unix:{}", socket.display()),
            "--workers",
            "2",
            "--worker-class",
            "gthread",
            "--threads",
            "4",
            "--keep-alive",
            "60",
            "testproj.wsgi:application",
        ]),
        libc::SIGTERM,
        move || std::os::unix::net::UnixStream::connect(&sock).is_ok(),
    );
    let port = free_port();
    let conf = nginx_conf(&dir.0, port, &socket);
    let _nginx = Server::start(
        {
            let mut c = Command::new("nginx");
            c.args(["-c", conf.to_str().unwrap(), "-p", dir.path()]);
            c
        },
        libc::SIGQUIT,
        tcp_ready(port),
    );
    let obs = ObserverRun::start(&["--pid", &server.pid().to_string()]);
    // Three rounds with idle periods: nginx reuses its pooled upstream connections.
    let mut done = Vec::new();
    for round in 0..3 {
        if round > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        done.extend(send(&Transport::Plain, port, single_requests(), false));
    }
    let n = done.len() as f64;
    let m = obs.wait_until("every exchange", |m| {
        m.sum("django_http_responses_before_middlewares_total", &[]) >= n
            && m.sum("observer_http_exchanges_total", &[]) >= n
    });
    // What the app receives from nginx: X-Forwarded-Proto: https (the app's
    // SECURE_PROXY_SSL_HEADER makes every request secure, as django-prometheus counts it),
    // and request bodies buffered and sent with a Content-Length.
    let upstream: Vec<(Req, Response)> = done
        .into_iter()
        .map(|(mut r, resp)| {
            r.headers.retain(|(k, _)| *k != "X-Forwarded-Proto");
            r.headers.push(("X-Forwarded-Proto", "https"));
            if let Body::Chunked(sizes) = &r.body {
                r.body = Body::Length(sizes.iter().sum());
            }
            (r, resp)
        })
        .collect();
    assert_metrics(&m, &upstream);
    assert_eq!(m.sum("django_http_requests_total_by_transport_total", &[("transport", "https")]), n);
    // nginx reused its pooled upstream connections.
    let opened = m.sum("observer_connections_opened_total", &[]);
    assert!(opened > 0.0 && opened < n / 2.0, "{opened} upstream connections for {n} requests");
    let instance = m.samples.iter().find_map(|s| s.labels.get("instance").cloned()).unwrap();
    assert!(instance.ends_with(&format!(":{}", socket.display())), "instance {instance} names the socket");
    eprintln!("nginx -> unix socket -> gunicorn gthread: {n} requests");
}

/// Sends `n` requests; returns how many.
fn burst(port: u16, n: usize) -> f64 {
    for i in 0..n {
        let r = raw_exchange(
            port,
            format!("GET /shop/items/{i}/ HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes(),
            &[false],
        );
        assert_eq!(r[0].status, 200);
    }
    n as f64
}

#[test]
fn workers_crash_and_scale_while_the_series_stay_exact_until_the_app_goes() {
    if !ebpf_available() {
        return;
    }
    // No selector: the observer finds the app, and later its restarted self.
    let obs = ObserverRun::start(&[]);
    let port = free_port();
    let bind = format!("127.0.0.1:{port}");
    let suffix = format!(":{port}");
    // This app's series only (other tests' apps may be found too).
    let count = move |m: &Metrics| {
        m.samples
            .iter()
            .filter(|s| {
                s.name == "django_http_requests_before_middlewares_total"
                    && s.labels.get("instance").is_some_and(|i| i.ends_with(&suffix))
            })
            .map(|s| s.value)
            .sum::<f64>()
    };
    let start = || {
        let s = Server::start(
            gunicorn(&["--bind", &bind, "--workers", "2", "testproj.wsgi:application"]),
            libc::SIGTERM,
            tcp_ready(port),
        );
        let deadline = Instant::now() + patience(20);
        while !obs.log().contains(&format!("pid={} why=\"started and runs gunicorn\"", s.pid())) {
            assert!(Instant::now() < deadline, "the app was not traced:\n{}", obs.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    };
    let wait_workers = |s: &Server, n: usize| {
        let deadline = Instant::now() + patience(20);
        while s.children().len() != n {
            assert!(Instant::now() < deadline, "gunicorn did not get to {n} workers");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let mut server = start();
    wait_workers(&server, 2);
    let mut sent = burst(port, 30);
    let mut seen = vec![count(&obs.wait_until("first burst", |m| count(m) >= sent))];
    // A worker crashes; the master forks a new one.
    let victim = *server.children().iter().next().unwrap();
    // SAFETY: a worker of the gunicorn we started.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(500));
    wait_workers(&server, 2);
    sent += burst(port, 30);
    seen.push(count(&obs.wait_until("after the crash", |m| count(m) >= sent)));
    // One more worker (TTIN), then one less (TTOU).
    // SAFETY: signalling the master we started.
    unsafe { libc::kill(server.pid() as i32, libc::SIGTTIN) };
    wait_workers(&server, 3);
    sent += burst(port, 30);
    seen.push(count(&obs.wait_until("after TTIN", |m| count(m) >= sent)));
    // SAFETY: as above.
    unsafe { libc::kill(server.pid() as i32, libc::SIGTTOU) };
    wait_workers(&server, 2);
    sent += burst(port, 30);
    seen.push(count(&obs.wait_until("after TTOU", |m| count(m) >= sent)));
    assert_eq!(seen, vec![30.0, 60.0, 90.0, 120.0], "exact and monotonic through a crash and scaling");

    // The app goes away: so do its series.
    // SAFETY: signalling the master we started.
    unsafe { libc::kill(server.pid() as i32, libc::SIGTERM) };
    let _ = server.child.wait();
    let gone = obs.wait_until("the app's series to go", |m| {
        !m.samples.iter().any(|s| s.labels.get("instance").is_some_and(|i| i.ends_with(&format!(":{port}"))))
    });
    assert_eq!(count(&gone), 0.0);

    // A new master on the same port: the same label set from zero, a counter reset.
    let _restarted = start();
    let again = burst(port, 5);
    let m = obs.wait_until("the restarted app", |m| count(m) >= again);
    assert_eq!(count(&m), again);
}
