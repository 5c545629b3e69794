//! The /metrics endpoint: GET and HEAD only, TLS when given a certificate, a Unix socket
//! when asked; a handshake that never finishes holds up nobody.

mod harness;

use std::{
    io::Read as _,
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use harness::{
    TempDir,
    django::{ObserverRun, free_port},
    ebpf_available, observer_bin,
};

/// A process to trace that does nothing (the endpoint needs the agent running).
struct Idle(Child);

impl Idle {
    fn start() -> Self {
        Self(Command::new("sleep").arg("300").spawn().expect("start sleep"))
    }
    fn pid(&self) -> String {
        self.0.id().to_string()
    }
}

impl Drop for Idle {
    fn drop(&mut self) {
        harness::stop(&mut self.0, libc::SIGKILL);
    }
}

/// `observer run` started by hand (the harness's helper speaks plain TCP only).
struct Agent(Child);

impl Agent {
    fn start(args: &[&str]) -> Self {
        let child = Command::new(observer_bin())
            .arg("run")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start observer run");
        Self(child)
    }

    /// Polls `curl` with `args` until /healthz answers 200.
    fn wait_healthy(&mut self, curl_args: &[&str], url: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = curl(curl_args, &format!("{url}/healthz"));
            if out.status.success() && String::from_utf8_lossy(&out.stdout).ends_with("200") {
                return;
            }
            if let Ok(Some(status)) = self.0.try_wait() {
                let mut err = String::new();
                self.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
                panic!("observer exited with {status}:\n{err}");
            }
            assert!(Instant::now() < deadline, "never healthy: {}", String::from_utf8_lossy(&out.stderr));
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        harness::stop(&mut self.0, libc::SIGTERM);
    }
}

/// curl with `args` on `url`; stdout ends with the status code.
fn curl(args: &[&str], url: &str) -> Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .expect("run curl")
}

fn status_of(out: &Output) -> u16 {
    let text = String::from_utf8_lossy(&out.stdout);
    text[text.len().saturating_sub(3)..].parse().unwrap_or(0)
}

#[test]
fn only_get_and_head_are_answered() {
    if !ebpf_available() {
        return;
    }
    let idle = Idle::start();
    let obs = ObserverRun::start(&["--pid", &idle.pid()]);
    let url = format!("http://127.0.0.1:{}", obs.port);
    let get = curl(&[], &format!("{url}/metrics"));
    assert_eq!(status_of(&get), 200);
    assert!(String::from_utf8_lossy(&get.stdout).contains("observer_records_total"));
    let head = curl(&["-I"], &format!("{url}/metrics"));
    assert!(String::from_utf8_lossy(&head.stdout).starts_with("HTTP/1.1 200"));
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"] {
        for path in ["/metrics", "/healthz"] {
            let out =
                curl(&["-X", method, "-D", "-", "-o", "/dev/null", "--data", "x=1"], &format!("{url}{path}"));
            let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
            assert!(text.ends_with("405"), "{method} {path}: {text}");
            assert!(text.contains("allow: get,head"), "{method} {path}: {text}");
        }
    }
    for path in ["/", "/metrics/", "/debug/pprof", "/../etc/passwd"] {
        assert_eq!(
            status_of(&curl(&["--path-as-is", "-o", "/dev/null"], &format!("{url}{path}"))),
            404,
            "{path}"
        );
    }
}

#[test]
fn tls_serves_metrics_and_a_stalled_handshake_blocks_nobody() {
    if !ebpf_available() {
        return;
    }
    let dir = TempDir::new("tls");
    let (cert, key) = (format!("{}/tls.crt", dir.path()), format!("{}/tls.key", dir.path()));
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
        .args(["-days", "1", "-subj", "/CN=observer", "-addext", "subjectAltName=IP:127.0.0.1"])
        .args(["-keyout", &key, "-out", &cert])
        .output()
        .expect("run openssl");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let idle = Idle::start();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut agent =
        Agent::start(&["--listen", &listen, "--tls-cert", &cert, "--tls-key", &key, "--pid", &idle.pid()]);
    let url = format!("https://127.0.0.1:{port}");
    agent.wait_healthy(&["--cacert", &cert, "-o", "/dev/null"], &url);

    // Clients that connect and never speak: the handshakes wait, the scrape does not.
    let stalled: Vec<_> = (0..8).map(|_| std::net::TcpStream::connect(&listen).unwrap()).collect();
    let out = curl(&["--cacert", &cert], &format!("{url}/metrics"));
    assert_eq!(status_of(&out), 200, "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("observer_records_total"));
    drop(stalled);

    // Plain HTTP gets no metrics; neither does a client that does not trust the certificate.
    let plain = curl(&["-o", "/dev/null"], &format!("http://127.0.0.1:{port}/metrics"));
    assert_ne!(status_of(&plain), 200);
    let untrusted = curl(&["-o", "/dev/null"], &format!("{url}/metrics"));
    assert!(!untrusted.status.success());
    assert_eq!(status_of(&curl(&["--cacert", &cert, "-X", "POST"], &format!("{url}/metrics"))), 405);
}

#[test]
fn a_unix_socket_serves_metrics_replaces_a_stale_one_and_refuses_a_live_one() {
    if !ebpf_available() {
        return;
    }
    let dir = TempDir::new("unix");
    let path = format!("{}/metrics.sock", dir.path());
    // A socket file left behind by an agent that was killed.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(Path::new(&path).exists());
    let idle = Idle::start();
    let listen = format!("unix:{path}");
    let mut agent = Agent::start(&["--listen", &listen, "--pid", &idle.pid()]);
    agent.wait_healthy(&["--unix-socket", &path, "-o", "/dev/null"], "http://observer");
    let out = curl(&["--unix-socket", &path], "http://observer/metrics");
    assert_eq!(status_of(&out), 200);
    assert!(String::from_utf8_lossy(&out.stdout).contains("observer_records_total"));

    // A second agent on the same path: refused, the first keeps serving.
    let second = Command::new("timeout")
        .args(["20", observer_bin(), "run", "--listen", &listen, "--pid", &idle.pid()])
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.trim().lines().count() == 1 && err.contains("another process is serving on it"), "{err}");
    assert_eq!(
        status_of(&curl(&["--unix-socket", &path, "-o", "/dev/null"], "http://observer/metrics")),
        200
    );

    // Neither TLS on a Unix socket nor a path that is not a socket.
    let file = format!("{}/plain", dir.path());
    std::fs::write(&file, "x").unwrap();
    let out = Command::new(observer_bin())
        .args(["run", "--listen", &format!("unix:{file}"), "--pid", &idle.pid()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the path exists and is not a socket"));
}

/// The agent is gone within a second of SIGINT or SIGTERM, whatever its scrape clients
/// do: one idle on a kept-alive connection, one in the middle of a head, one that asked
/// and never reads. (Perf-event tracepoints once held the exit for 3.8 s: each detach
/// waited for RCU grace periods, one after the other.)
#[test]
fn it_exits_within_a_second_of_a_signal_whatever_the_clients_do() {
    use std::io::Write as _;
    if !ebpf_available() {
        return;
    }
    let idle = Idle::start();
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut agent = Agent::start(&["--listen", &listen, "--pid", &idle.pid()]);
        agent.wait_healthy(&["-o", "/dev/null"], &format!("http://{listen}"));
        let mut kept = std::net::TcpStream::connect(&listen).unwrap();
        kept.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        kept.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut first = [0u8; 12];
        kept.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"HTTP/1.1 200");
        let mut half = std::net::TcpStream::connect(&listen).unwrap();
        half.write_all(b"GET /metrics HTTP/1.1\r\nHo").unwrap();
        let mut asked = std::net::TcpStream::connect(&listen).unwrap();
        asked.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(300));

        let sent = Instant::now();
        // SAFETY: signalling our own child, not reaped yet.
        unsafe { libc::kill(agent.0.id() as i32, signal) };
        let status = loop {
            if let Some(status) = agent.0.try_wait().unwrap() {
                break status;
            }
            assert!(sent.elapsed() < Duration::from_secs(5), "still running 5 s after signal {signal}");
            std::thread::sleep(Duration::from_millis(5));
        };
        let took = sent.elapsed();
        eprintln!("signal {signal}: exited in {took:?} with {status}");
        assert!(status.success(), "signal {signal}: {status}");
        assert!(took < Duration::from_secs(1), "signal {signal}: exit took {took:?}");
        drop((kept, half, asked));
    }
}
