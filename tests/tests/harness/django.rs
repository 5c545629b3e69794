//! The Django test app under gunicorn, `observer run` on it, a raw HTTP client that can
//! pipeline and speak any method, and /metrics scraping.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use observer::django::expo;

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf()
}

/// A binary of the test venv (`cargo xtask setup` makes it).
pub fn venv_bin(name: &str) -> PathBuf {
    let p = root().join("target/venv/bin").join(name);
    assert!(p.exists(), "{} is missing: run `cargo xtask setup`", p.display());
    p
}

/// The django_db_* families observer counts exactly as django-prometheus does.
pub const DB_EXACT: [&str; 6] = [
    "django_db_new_connections_total",
    "django_db_new_connection_errors_total",
    "django_db_execute_total",
    "django_db_execute_many_total",
    "django_db_errors_total",
    "django_db_query_duration_seconds_count",
];

/// `manage.py migrate` of the test app with `args`, its database given by the
/// environment variable `var` (OBSERVER_TEST_PG, OBSERVER_TEST_SQLITE).
pub fn migrate(var: &str, settings: &str, args: &[&str]) {
    let out = Command::new(venv_bin("python"))
        .arg("manage.py")
        .arg("migrate")
        .args(args)
        .current_dir(root().join("tests/apps/djangoapp"))
        .env(var, settings)
        .output()
        .expect("run manage.py migrate");
    assert!(
        out.status.success(),
        "migrate: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn wait_for_port(port: u16, child: &mut Child, what: &str) {
    let deadline = Instant::now() + super::patience(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited with {status} before listening");
        }
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// gunicorn serving tests/apps/djangoapp on a free loopback port.
pub struct Gunicorn {
    child: Child,
    pub port: u16,
}

impl Gunicorn {
    /// `worker_class` is `sync`, `gthread`, or `asgi` (uvicorn's worker on the ASGI app).
    pub fn start(worker_class: &str, workers: u32, django_prometheus: bool) -> Self {
        Self::start_with(worker_class, workers, django_prometheus, &[])
    }

    /// With extra environment (e.g. OBSERVER_TEST_PG).
    pub fn start_with(
        worker_class: &str,
        workers: u32,
        django_prometheus: bool,
        env: &[(&str, &str)],
    ) -> Self {
        Self::start_prefixed(&[], worker_class, workers, django_prometheus, env)
    }

    /// Run through `prefix` (commands that exec the rest: unshare, setpriv).
    pub fn start_prefixed(
        prefix: &[&str],
        worker_class: &str,
        workers: u32,
        django_prometheus: bool,
        env: &[(&str, &str)],
    ) -> Self {
        Self::start_full(prefix, worker_class, workers, django_prometheus, env, &[])
    }

    /// Serving HTTPS itself (`--certfile`/`--keyfile`).
    pub fn start_https(worker_class: &str, workers: u32, cert: &super::tls::Cert) -> Self {
        let args = ["--certfile", cert.crt.as_str(), "--keyfile", cert.key.as_str()];
        Self::start_full(&[], worker_class, workers, false, &[], &args)
    }

    /// With extra gunicorn arguments (e.g. `--max-requests`).
    pub fn start_full(
        prefix: &[&str],
        worker_class: &str,
        workers: u32,
        django_prometheus: bool,
        env: &[(&str, &str)],
        extra: &[&str],
    ) -> Self {
        let port = free_port();
        let python = venv_bin("python");
        let mut cmd = match prefix.split_first() {
            Some((p, rest)) => {
                let mut c = Command::new(p);
                c.args(rest).arg(&python);
                c
            }
            None => Command::new(&python),
        };
        // ASGI: gunicorn with uvicorn's worker on the ASGI application.
        let (worker_class, application) = match worker_class {
            "asgi" => ("uvicorn_worker.UvicornWorker", "testproj.asgi:application"),
            w => (w, "testproj.wsgi:application"),
        };
        cmd.arg(venv_bin("gunicorn"))
            .args(["--chdir", root().join("tests/apps/djangoapp").to_str().unwrap()])
            .args(["--bind", &format!("127.0.0.1:{port}")])
            .args(["--workers", &workers.to_string(), "--worker-class", worker_class, "--threads", "4"])
            .args(["--keep-alive", "30", "--log-level", "warning"])
            .args(["--timeout", &super::gunicorn_timeout()])
            .args(extra)
            .arg(application)
            .stdout(Stdio::null())
            .stderr(super::child_log("gunicorn"));
        if django_prometheus {
            cmd.env("OBSERVER_TEST_DJANGO_PROMETHEUS", "1");
        }
        cmd.envs(env.iter().copied());
        let mut child = cmd.spawn().expect("start gunicorn");
        wait_for_port(port, &mut child, "gunicorn");
        Self { child, port }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Gunicorn {
    fn drop(&mut self) {
        // SIGTERM to the master we started: it stops its workers.
        super::stop(&mut self.child, libc::SIGTERM);
    }
}

/// `observer run` (the binary under test) with a /metrics port.
pub struct ObserverRun {
    child: Child,
    pub port: u16,
    log: PathBuf,
}

impl ObserverRun {
    pub fn start(args: &[&str]) -> Self {
        Self::start_with_env(args, &[])
    }

    /// With extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_wrapped(&[], args, env)
    }

    /// Run through `wrapper` (a command that execs its arguments, e.g. setpriv).
    pub fn start_wrapped(wrapper: &[&str], args: &[&str], env: &[(&str, &str)]) -> Self {
        let port = free_port();
        // Its log goes to a file, printed if the test fails.
        let log_dir = root().join("target/test-logs");
        std::fs::create_dir_all(&log_dir).unwrap();
        let log = log_dir.join(format!("observer-run-{port}.log"));
        let (program, pre): (&str, &[&str]) = match wrapper.split_first() {
            Some((w, rest)) => (w, rest),
            None => (super::observer_bin(), &[]),
        };
        let mut cmd = Command::new(program);
        cmd.args(pre);
        if !wrapper.is_empty() {
            cmd.arg(super::observer_bin());
        }
        let mut child = cmd
            .arg("run")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(args)
            .env("RUST_LOG", std::env::var("OBSERVER_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start observer run");
        wait_for_port(port, &mut child, "observer run");
        let obs = Self { child, port, log };
        // /healthz turns 200 once the pump runs: the selected processes are traced.
        let deadline = Instant::now() + super::patience(30);
        while http_status(port, "/healthz") != Some(200) {
            assert!(Instant::now() < deadline, "observer run never became healthy:\n{}", obs.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        obs
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops it the way an operator does (SIGTERM: its shutdown path runs) and returns
    /// everything it logged.
    pub fn stop_with_log(mut self) -> String {
        // SAFETY: signalling our own child, not reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        self.log()
    }

    /// SIGKILL: no shutdown path runs (what an OOM kill or a node crash does).
    pub fn kill(&mut self) {
        super::stop(&mut self.child, libc::SIGKILL);
    }

    /// Waits until it has taken in everything: its record count holds still across two
    /// of its once-a-second reports. Fails if it does not within `within`.
    pub fn wait_quiet(&self, within: Duration) {
        let records = |m: &Metrics| m.sum("observer_records_total", &[]);
        let deadline = Instant::now() + within;
        let mut last = records(&self.metrics());
        loop {
            std::thread::sleep(Duration::from_millis(2100));
            let now = records(&self.metrics());
            if now == last {
                return;
            }
            assert!(Instant::now() < deadline, "the agent never caught up");
            last = now;
        }
    }

    /// A size line of its /proc/PID/status, in KiB (`VmRSS:` now, `VmHWM:` its peak).
    pub fn status_kib(&self, key: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("agent alive");
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} line"))
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn metrics(&self) -> Metrics {
        Metrics::parse(&http_get(self.port, "/metrics"))
    }

    /// Polls /metrics until `f` holds (e.g. route discovery finished).
    pub fn wait_until(&self, what: &str, f: impl Fn(&Metrics) -> bool) -> Metrics {
        let deadline = Instant::now() + super::patience(30);
        loop {
            let m = self.metrics();
            if f(&m) {
                return m;
            }
            if Instant::now() >= deadline {
                let shown: Vec<String> = m
                    .samples
                    .iter()
                    .filter(|s| {
                        s.name.starts_with("observer_") && s.value != 0.0
                            || s.name == "django_http_responses_before_middlewares_total"
                    })
                    .map(|s| format!("{} {:?} {}", s.name, s.labels, s.value))
                    .collect();
                panic!("timed out waiting for {what}; last scrape:\n{}", shown.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for ObserverRun {
    fn drop(&mut self) {
        // Only a child not reaped yet: a reaped one's PID may belong to someone else now.
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- observer run log ---\n{}", self.log());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A scrape: series (labels sorted, see `Sample::series`) -> value.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub samples: Vec<expo::Sample>,
}

impl Metrics {
    pub fn parse(text: &str) -> Self {
        Self { samples: expo::parse_text(text) }
    }

    /// Sum of a family's samples whose labels include all of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    /// A family's samples keyed by their labels minus `ignore` (target labels).
    pub fn family(&self, name: &str, ignore: &[&str]) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for s in self.samples.iter().filter(|s| s.name == name) {
            let key: Vec<String> = s
                .labels
                .iter()
                .filter(|(k, _)| !ignore.contains(&k.as_str()))
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            *out.entry(key.join(",")).or_insert(0.0) += s.value;
        }
        out
    }
}

/// Labels only observer adds (its target labels), left out when comparing with
/// django-prometheus.
pub const OURS_ONLY: [&str; 2] = ["job", "instance"];

/// A family's series with a non-zero value, keyed by their labels minus [`OURS_ONLY`].
pub fn family(m: &Metrics, name: &str) -> BTreeMap<String, f64> {
    m.family(name, &OURS_ONLY).into_iter().filter(|(_, v)| *v != 0.0).collect()
}

/// What a family gained between two scrapes (series that did not move left out).
pub fn delta(after: &Metrics, before: &Metrics, name: &str) -> BTreeMap<String, f64> {
    let b = family(before, name);
    family(after, name)
        .into_iter()
        .map(|(k, v)| {
            let d = v - b.get(&k).copied().unwrap_or(0.0);
            (k, d)
        })
        .filter(|(_, v)| *v != 0.0)
        .collect()
}

/// A response as the client read it.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body_len: usize,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Reads one response; `head_request` means no body.
pub fn read_response<R: std::io::Read>(r: &mut BufReader<R>, head_request: bool) -> Response {
    loop {
        let mut line = String::new();
        r.read_line(&mut line).expect("status line");
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line {line:?}"));
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            r.read_line(&mut h).expect("header");
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        if (100..200).contains(&status) {
            continue; // interim response
        }
        let mut resp = Response { status, headers, body_len: 0 };
        if head_request || status == 204 || status == 304 {
            return resp;
        }
        if resp.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            loop {
                let mut size = String::new();
                r.read_line(&mut size).expect("chunk size");
                let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                    .expect("chunk size");
                let mut buf = vec![0u8; n + 2];
                r.read_exact(&mut buf).expect("chunk");
                if n == 0 {
                    break;
                }
                resp.body_len += n;
            }
        } else if let Some(n) = resp.header("content-length").and_then(|v| v.parse::<usize>().ok()) {
            let mut buf = vec![0u8; n];
            r.read_exact(&mut buf).expect("body");
            resp.body_len = n;
        } else {
            let mut buf = Vec::new();
            r.read_to_end(&mut buf).expect("body until close");
            resp.body_len = buf.len();
        }
        return resp;
    }
}

/// Sends raw bytes on a new connection and reads `n` responses (`heads`: which are
/// answers to HEAD).
pub fn raw_exchange(port: u16, bytes: &[u8], heads: &[bool]) -> Vec<Response> {
    raw_exchange_over(&super::tls::Transport::Plain, port, bytes, heads)
}

/// [`raw_exchange`] over `t` (TLS or not).
pub fn raw_exchange_over(
    t: &super::tls::Transport,
    port: u16,
    bytes: &[u8],
    heads: &[bool],
) -> Vec<Response> {
    let mut s = t.connect(port);
    s.write_all(bytes).expect("send");
    let mut r = BufReader::new(s);
    heads.iter().map(|&h| read_response(&mut r, h)).collect()
}

/// The status of a GET, `None` if the connection fails.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(super::patience(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_whitespace().nth(1)?.parse().ok()
}

/// A plain GET; returns the body.
pub fn http_get(port: u16, path: &str) -> String {
    http_get_with(port, path, "")
}

/// A GET with extra header lines (each ending in CRLF); returns the body.
pub fn http_get_with(port: u16, path: &str, headers: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(super::patience(20))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
}
