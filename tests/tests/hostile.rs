//! Hostile input, each case against a traced server (tests/apps/hostile_server.py):
//! arbitrary bytes both ways, enormous heads, endless bodies, 100K pipelined requests,
//! slowloris partial heads, connection floods. The agent must stay up and answering, stay
//! inside its bounds (and say which bound bit), and count exactly again afterwards.

mod harness;

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use harness::{
    django::{Metrics, ObserverRun, free_port, http_status, root, venv_bin, wait_for_port},
    ebpf_available,
};

/// The traced server.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start() -> Self {
        let port = free_port();
        let mut child = Command::new(venv_bin("python"))
            .arg(root().join("tests/apps/hostile_server.py"))
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start hostile_server.py");
        wait_for_port(port, &mut child, "hostile_server.py");
        Self { child, port }
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        harness::stop(&mut self.child, libc::SIGKILL);
    }
}

/// The server traced by an agent with `extra` bounds; its RSS when idle.
fn traced(server: &Server, extra: &[&str]) -> (ObserverRun, u64) {
    let pid = server.child.id().to_string();
    let mut args = vec!["--pid", pid.as_str(), "--no-route-discovery", "--no-migrations"];
    args.extend_from_slice(extra);
    let obs = ObserverRun::start(&args);
    ok_requests(server, &obs, 3);
    let idle = obs.status_kib("VmRSS:");
    (obs, idle)
}

fn exchanges(m: &Metrics) -> f64 {
    m.sum("django_http_responses_before_middlewares_total", &[])
}

/// `n` ordinary requests, each on a new connection: counted exactly.
fn ok_requests(server: &Server, obs: &ObserverRun, n: usize) {
    let before = exchanges(&obs.metrics());
    for _ in 0..n {
        let mut s = server.connect();
        s.write_all(b"GET /ok HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let mut buf = [0u8; 128];
        let mut got = 0;
        while !buf[..got].ends_with(b"ok\n") {
            let k = s.read(&mut buf[got..]).expect("answer");
            assert!(k > 0, "closed before answering");
            got += k;
        }
    }
    let want = before + n as f64;
    let m = obs.wait_until("the ordinary requests", |m| exchanges(m) >= want);
    assert_eq!(exchanges(&m), want, "exactly the ordinary requests");
}

/// After a hostile case: alive, healthy, within `grown_mib` of its idle RSS, no panic in
/// its log, and exact on ordinary traffic again. Returns the last scrape.
fn still_sound(server: &Server, obs: &ObserverRun, idle_kib: u64, grown_mib: u64) -> Metrics {
    obs.wait_quiet(Duration::from_secs(60));
    assert_eq!(http_status(obs.port, "/healthz"), Some(200), "healthy:\n{}", obs.log());
    let (rss, peak) = (obs.status_kib("VmRSS:"), obs.status_kib("VmHWM:"));
    eprintln!("agent RSS {idle_kib} KiB idle, {peak} KiB at its peak, {rss} KiB after");
    assert!(peak <= idle_kib + grown_mib * 1024, "RSS peaked at {peak} KiB, {idle_kib} KiB idle");
    ok_requests(server, obs, 10);
    let log = obs.log();
    assert!(!log.contains("panicked") && !log.contains("ERROR"), "{log}");
    obs.metrics()
}

fn parse_errors(m: &Metrics, reason: &str) -> f64 {
    m.sum("observer_parse_errors_total", &[("protocol", "http"), ("reason", reason)])
}

#[test]
fn arbitrary_bytes_both_ways() {
    if !ebpf_available() {
        return;
    }
    let server = Server::start();
    let (obs, idle) = traced(&server, &[]);
    // Noise in (answered with noise), and requests answered with noise.
    for i in 0..200u64 {
        let mut s = server.connect();
        let head = if i % 2 == 0 {
            harness::noise(i, 4096)
        } else {
            b"GET /garbage HTTP/1.1\r\nHost: t\r\n\r\n".to_vec()
        };
        s.write_all(&head).unwrap();
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
    let m = still_sound(&server, &obs, idle, 64);
    let skipped = m.sum("observer_not_http_connections_total", &[]);
    let errors = m.sum("observer_parse_errors_total", &[("protocol", "http")]);
    eprintln!("not HTTP {skipped}, HTTP parse errors {errors}");
    assert!(skipped >= 100.0, "the noise connections were recognised as not HTTP ({skipped})");
    assert!(errors >= 100.0, "the noise answers were counted as errors ({errors})");
}

#[test]
fn enormous_heads_are_bounded() {
    if !ebpf_available() {
        return;
    }
    let server = Server::start();
    let (obs, idle) = traced(&server, &["--max-http-head-bytes", "16384"]);
    // 1 MiB heads that end (and are answered), then a 4 MiB head that never ends.
    let header = format!("X-Filler: {}\r\n", "f".repeat(8000));
    for _ in 0..20 {
        let mut s = server.connect();
        let mut head = b"GET /ok HTTP/1.1\r\nHost: t\r\n".to_vec();
        for _ in 0..128 {
            head.extend_from_slice(header.as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        s.write_all(&head).unwrap();
        let mut buf = [0u8; 256];
        assert!(s.read(&mut buf).unwrap() > 0);
    }
    {
        let mut s = server.connect();
        s.write_all(b"GET /sink HTTP/1.1\r\nHost: t\r\n").unwrap();
        for _ in 0..512 {
            s.write_all(header.as_bytes()).unwrap();
        }
    }
    let m = still_sound(&server, &obs, idle, 64);
    let bit = parse_errors(&m, "head_too_large") + parse_errors(&m, "head_not_captured");
    assert!(bit >= 20.0, "the heads were refused as too large or uncaptured ({bit})");
}

#[test]
fn endless_bodies_are_stepped_over() {
    if !ebpf_available() {
        return;
    }
    let server = Server::start();
    let (obs, idle) = traced(&server, &[]);
    // Three seconds each of a chunked body that never ends and of a body declared at a
    // petabyte: the parser counts lengths, it does not keep bytes.
    let chunk = format!("400\r\n{}\r\n", "b".repeat(1024));
    for head in [
        "POST /sink HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_string(),
        "POST /sink HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000000000000\r\n\r\n".to_string(),
    ] {
        let mut s = server.connect();
        s.write_all(head.as_bytes()).unwrap();
        let until = Instant::now() + Duration::from_secs(3);
        let mut sent = 0u64;
        while Instant::now() < until {
            s.write_all(chunk.as_bytes()).unwrap();
            sent += chunk.len() as u64;
        }
        eprintln!("{} MiB of body sent", sent >> 20);
    }
    still_sound(&server, &obs, idle, 64);
}

#[test]
fn a_hundred_thousand_pipelined_requests() {
    if !ebpf_available() {
        return;
    }
    let server = Server::start();
    let (obs, idle) = traced(&server, &[]);
    const N: usize = 100_000;
    let s = server.connect();
    let mut r = s.try_clone().unwrap();
    let reader = thread::spawn(move || {
        let answer = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n".len();
        let (mut got, mut buf) = (0usize, vec![0u8; 1 << 16]);
        while got < N * answer {
            let k = r.read(&mut buf).expect("answers");
            assert!(k > 0, "closed after {} answers", got / answer);
            got += k;
        }
        got / answer
    });
    let one = b"GET /ok HTTP/1.1\r\nHost: t\r\n\r\n";
    let mut w = s;
    for _ in 0..N / 1000 {
        w.write_all(&one.repeat(1000)).unwrap();
    }
    assert_eq!(reader.join().unwrap(), N);
    drop(w);
    let m = still_sound(&server, &obs, idle, 64);
    let counted = exchanges(&m) - 13.0;
    let overflow = parse_errors(&m, "pending_overflow") + parse_errors(&m, "head_not_captured");
    eprintln!("pipelined: {counted} exchanges counted, {overflow} beyond the bounds");
    // What lies beyond one read's capture, or beyond --max-pending-requests, is counted,
    // not buffered.
    assert!(counted <= N as f64);
    assert!(overflow > 0.0, "the bounds bit and said so");
    assert!(m.sum("observer_parser_states", &[]) <= 64.0);
}

#[test]
fn slowloris_partial_heads_hit_the_parser_bound() {
    if !ebpf_available() {
        return;
    }
    let server = Server::start();
    let (obs, idle) = traced(&server, &["--max-parsers", "100"]);
    // 300 connections, each dribbling a head one byte every 50 ms for 3 s.
    let mut conns: Vec<TcpStream> = (0..300).map(|_| server.connect()).collect();
    let head = b"GET /sink HTTP/1.1\r\nHost: t\r\nX-Slow: ";
    let until = Instant::now() + Duration::from_secs(3);
    let mut i = 0;
    while Instant::now() < until {
        for c in &mut conns {
            let b = head.get(i).copied().unwrap_or(b'a');
            c.write_all(&[b]).unwrap();
        }
        i += 1;
        thread::sleep(Duration::from_millis(50));
    }
    let m = obs.wait_until("the parser bound to bite", |m| {
        m.sum("observer_table_full_total", &[("table", "parsers")]) > 0.0
    });
    assert!(m.sum("observer_parser_states", &[]) <= 100.0, "parser states stay within --max-parsers");
    drop(conns);
    // Their states go when they close; ordinary traffic is parsed again.
    obs.wait_until("the slow connections gone", |m| m.sum("observer_parser_states", &[]) < 100.0);
    still_sound(&server, &obs, idle, 64);
}

#[test]
fn a_connection_flood_hits_the_connection_bound() {
    if !ebpf_available() {
        return;
    }
    raise_nofile(8192);
    let server = Server::start();
    let (obs, idle) = traced(&server, &["--max-connections", "1024"]);
    // 3000 connections open at once (the server holds each in /sink), then 20000 opened
    // and closed as fast as four clients can.
    let held: Vec<TcpStream> = (0..3000)
        .map(|_| {
            let mut s = server.connect();
            s.write_all(b"GET /sink HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
            s
        })
        .collect();
    let m = obs
        .wait_until("the connection table bound to bite", |m| m.sum("observer_table_full_total", &[]) > 0.0);
    eprintln!("table full: {:?}", m.family("observer_table_full_total", &[]));
    drop(held);
    let port = server.port;
    let churn: Vec<_> = (0..4)
        .map(|_| {
            thread::spawn(move || {
                for _ in 0..5000 {
                    if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
                        drop(s);
                    }
                }
            })
        })
        .collect();
    for t in churn {
        t.join().unwrap();
    }
    // The server still has churned connections in its accept backlog when the clients
    // are done: wait until it has taken and closed them all (a request that comes while
    // the table is full is rightly not traced), then the bound lets go.
    obs.wait_quiet(Duration::from_secs(60));
    obs.wait_until("the table drained", |m| m.sum("observer_connections", &[]) <= 4.0);
    still_sound(&server, &obs, idle, 64);
}

/// Raises this process's open-file limit (the flood's client ends) up to the hard limit.
fn raise_nofile(want: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a valid out-pointer.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    lim.rlim_cur = want.min(lim.rlim_max);
    // SAFETY: a valid rlimit.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
}
