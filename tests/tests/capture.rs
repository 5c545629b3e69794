//! The kernel capture, end to end: real sockets on loopback and Unix sockets, the real
//! observer (`observer trace --json`) on the real kernel, compared with what the traced
//! process says it did.

mod harness;

use harness::{Observer, Peer, TempDir, Trace, b64d, ebpf_available, patience};
use serde_json::Value;

/// Runs `scenario` in a sockpeer traced by an observer started with `args`.
fn traced(scenario: &str, family: &str, args: &[&str]) -> (u32, Value, Value, Trace) {
    let dir = TempDir::new(scenario);
    let peer = Peer::spawn(scenario, family, &dir, &[]);
    let pid = peer.pid;
    let hello = peer.hello.clone();
    let pid_s = pid.to_string();
    let mut all = vec!["--pid", pid_s.as_str()];
    all.extend_from_slice(args);
    let obs = Observer::start(&all);
    assert_eq!(obs.ready["pids"], serde_json::json!([pid]));
    let result = peer.go();
    (pid, hello, result, obs.stop())
}

fn ops(result: &Value) -> Vec<Value> {
    result["ops"].as_array().expect("ops").clone()
}

/// The records on one fd share one connection, with this role and these addresses.
fn assert_endpoint(records: &[&Value], endpoint: &Value, role: &str) -> u64 {
    let fd = &endpoint["fd"];
    let on_fd: Vec<&&Value> = records.iter().filter(|r| &r["fd"] == fd).collect();
    assert!(!on_fd.is_empty(), "no records on fd {fd}");
    let conn_id = on_fd[0]["conn_id"].as_u64().unwrap();
    for r in on_fd {
        assert_eq!(r["conn_id"], conn_id, "fd {fd} records span connections: {r}");
        let c = &r["conn"];
        assert_eq!(c["role"], role, "{r}");
        assert_eq!(c["local"], endpoint["local"], "local address of {role} fd {fd}: {r}");
        assert_eq!(c["peer"], endpoint["peer"], "peer address of {role} fd {fd}: {r}");
    }
    conn_id
}

fn each_syscall_exactly(family: &str) {
    if !ebpf_available() {
        return;
    }
    let (pid, _, result, trace) = traced("exchange", family, &[]);
    let matched = trace.assert_exact(pid, &ops(&result), usize::MAX);

    // Every kind of syscall was seen, in both directions where it applies.
    for (syscall, dir) in [
        ("write", "send"),
        ("read", "recv"),
        ("writev", "send"),
        ("readv", "recv"),
        ("sendto", "send"),
        ("recvfrom", "recv"),
        ("sendmsg", "send"),
        ("recvmsg", "recv"),
        ("sendmmsg", "send"),
        ("recvmmsg", "recv"),
        ("sendfile", "send"),
    ] {
        let n = matched.iter().filter(|r| r["syscall"] == syscall && r["dir"] == dir).count();
        assert!(n >= 2, "{syscall}/{dir}: {n} records");
    }
    for r in &matched {
        let counted = matches!(r["syscall"].as_str(), Some("sendmmsg" | "recvmmsg" | "sendfile"));
        assert_eq!(r["no_capture"], counted, "{r}");
        assert_eq!(r["truncated"], false, "{r}");
        assert_eq!(r["fault"], false, "{r}");
    }

    let client = assert_endpoint(&matched, &result["client"], "client");
    let server = assert_endpoint(&matched, &result["server"], "server");
    assert_ne!(client, server);
    if family != "unix" {
        let nb = &result["nonblocking"];
        assert_endpoint(&matched, &nb["client"], "client");
        assert_endpoint(&matched, &nb["server"], "server");
        let open = trace
            .of("open", pid)
            .into_iter()
            .find(|o| o["fd"] == nb["client"]["fd"] && o["role"] == "client")
            .expect("open record of the non-blocking connection");
        assert_eq!(open["in_progress"], nb["in_progress"]);
    }

    // Opens and closes: one of each per connection, matching roles.
    let conns = if family == "unix" { 2 } else { 4 };
    assert_eq!(trace.of("open", pid).len(), conns, "open records");
    assert_eq!(trace.of("close", pid).len(), conns, "close records");
    // The two MSG_PEEK calls were skipped, not recorded.
    assert_eq!(trace.counter("observer_peek_skipped_total"), result["peeks"].as_u64().unwrap());
    assert_eq!(trace.counter("observer_records_lost_total{reason=\"ring_buffer_full\"}"), 0);
    assert_eq!(trace.counter("observer_unknown_connection_records_total"), 0);
}

#[test]
fn each_data_syscall_is_recorded_exactly_over_ipv4() {
    each_syscall_exactly("inet");
}

#[test]
fn each_data_syscall_is_recorded_exactly_over_ipv6() {
    each_syscall_exactly("inet6");
}

#[test]
fn each_data_syscall_is_recorded_exactly_over_unix_sockets() {
    each_syscall_exactly("unix");
}

#[test]
fn payload_larger_than_capture_keeps_true_length_and_exact_prefix() {
    if !ebpf_available() {
        return;
    }
    let (pid, _, result, trace) = traced("large", "inet", &["--capture-bytes", "256"]);
    let ops = ops(&result);
    let matched = trace.assert_exact(pid, &ops, 256);
    let truncated = ops.iter().filter(|o| o["total_len"].as_u64().unwrap() > 256).count() as u64;
    assert!(truncated >= 2, "the scenario moves 10000-byte payloads");
    for r in &matched {
        let total = r["total_len"].as_u64().unwrap();
        assert_eq!(r["truncated"], total > 256, "{r}");
        assert_eq!(r["cap_len"].as_u64().unwrap(), total.min(256), "{r}");
    }
    // The writev's 256-byte prefix spans three iovecs (100 + 200 + ...).
    let writev = matched.iter().find(|r| r["syscall"] == "writev").expect("writev record");
    let prefix = b64d(writev["data"].as_str().unwrap());
    let expected: Vec<u8> = (0..256u32).map(|i| b'a' + (i % 26) as u8).collect();
    assert_eq!(prefix, expected);
    assert_eq!(trace.counter("observer_capture_truncated_total"), truncated);
}

fn preexisting(family: &str) {
    if !ebpf_available() {
        return;
    }
    let (pid, hello, result, trace) = traced("preexisting", family, &[]);
    let matched = trace.assert_exact(pid, &ops(&result), usize::MAX);
    assert_endpoint(&matched, &hello["client"], "client");
    assert_endpoint(&matched, &hello["server"], "server");
    for r in &matched {
        assert_eq!(r["conn"]["preexisting"], true, "{r}");
    }
    assert!(trace.of("open", pid).is_empty(), "no open record: the connections predate the observer");
}

#[test]
fn connection_opened_before_start_is_traced_over_tcp() {
    preexisting("inet");
}

#[test]
fn connection_opened_before_start_is_traced_over_unix_sockets() {
    preexisting("unix");
}

/// A worker blocked in accept() when the agent attaches (prefork servers, the bench's
/// connection helper): its entry to accept was never seen, its connection still is.
fn blocked_accept(family: &str) {
    if !ebpf_available() {
        return;
    }
    let (pid, _, result, trace) = traced("blocked-accept", family, &[]);
    let matched = trace.assert_exact(pid, &ops(&result), usize::MAX);
    assert_endpoint(&matched, &result["client"], "client");
    assert_endpoint(&matched, &result["server"], "server");
    let opens = trace.of("open", pid);
    assert_eq!(opens.len(), 2, "the connect and the accept: {opens:?}");
    assert!(opens.iter().any(|o| o["role"] == "server" && o["fd"] == result["server"]["fd"]), "{opens:?}");
    assert_eq!(trace.counter("observer_unknown_connection_records_total"), 0);
}

#[test]
fn a_thread_blocked_in_accept_at_attach_gets_its_connection_traced_over_tcp() {
    blocked_accept("inet");
}

#[test]
fn a_thread_blocked_in_accept_at_attach_gets_its_connection_traced_over_unix_sockets() {
    blocked_accept("unix");
}

#[test]
fn forked_child_is_traced_and_untracked_process_is_not() {
    if !ebpf_available() {
        return;
    }
    let dir = TempDir::new("fork");
    let tracked = Peer::spawn("fork", "inet", &dir, &[]);
    let bystander = Peer::spawn("exchange", "inet", &dir, &[]);
    let (pid, other) = (tracked.pid, bystander.pid);
    let obs = Observer::start(&["--pid", &pid.to_string()]);
    let other_result = bystander.go();
    let result = tracked.go();
    let trace = obs.stop();

    // The parent: exactly its own syscalls.
    trace.assert_exact(pid, &ops(&result), usize::MAX);
    let child = result["child"].as_u64().unwrap() as u32;
    assert!(
        trace.records.iter().any(|r| r["type"] == "fork" && r["pid"] == child && r["parent"] == pid),
        "fork record"
    );
    let child_data = trace.of("data", child);
    let parent_client = trace
        .of("data", pid)
        .into_iter()
        .find(|r| r["fd"] == result["client"]["fd"])
        .map(|r| r["conn_id"].clone())
        .expect("parent's client records");
    let inherited = child_data
        .iter()
        .find(|r| b64d(r["data"].as_str().unwrap()) == b"child on the inherited connection")
        .expect("the child's write on the inherited connection");
    assert_eq!(inherited["conn_id"], parent_client, "same socket, same connection id");
    let own = child_data
        .iter()
        .find(|r| b64d(r["data"].as_str().unwrap()) == b"child on its own connection")
        .expect("the child's write on its own connection");
    assert_eq!(own["conn"]["role"], "client");
    assert!(trace.of("open", child).iter().any(|o| o["conn_id"] == own["conn_id"]));
    assert_eq!(child_data.len(), 2);

    // The bystander on the same loopback ports is not traced at all.
    assert!(!ops(&other_result).is_empty());
    let leaked: Vec<&Value> = trace.records.iter().filter(|r| r["pid"] == other).collect();
    assert!(leaked.is_empty(), "untracked process traced: {leaked:?}");
}

#[test]
fn fd_reuse_after_close_dup2_and_close_range_never_mixes_connections() {
    if !ebpf_available() {
        return;
    }
    let (pid, _, result, trace) = traced("fdreuse", "inet", &[]);
    // Exactness includes "no other records": the file reads on reused fd numbers are not
    // recorded.
    let matched = trace.assert_exact(pid, &ops(&result), usize::MAX);
    let conn_of = |text: &[u8]| {
        matched
            .iter()
            .find(|r| b64d(r["data"].as_str().unwrap()) == text)
            .map(|r| r["conn_id"].as_u64().unwrap())
            .unwrap_or_else(|| panic!("no record of {}", String::from_utf8_lossy(text)))
    };
    assert_ne!(conn_of(b"A before close"), conn_of(b"B on a reused fd number"));
    let d = conn_of(b"D through dup");
    assert_eq!(d, conn_of(b"D through dup after the original closed"));
    assert_eq!(d, conn_of(b"D through fcntl F_DUPFD_CLOEXEC"));
    let dups = trace.of("dup", pid);
    assert_eq!(dups.len(), 2, "dup and fcntl(F_DUPFD_CLOEXEC)");
    assert!(dups.iter().all(|r| r["conn_id"] == d));
    // dup2 over the socket and close_range both closed a connection.
    let c = conn_of(b"C before dup2");
    let e = conn_of(b"E before close_range");
    let closed: Vec<u64> = trace.of("close", pid).iter().map(|r| r["conn_id"].as_u64().unwrap()).collect();
    assert!(closed.contains(&c), "dup2 closed C");
    assert!(closed.contains(&e), "close_range closed E");
}

#[test]
fn tiny_ring_buffer_loses_exactly_what_it_counts() {
    if !ebpf_available() {
        return;
    }
    let dir = TempDir::new("burst");
    let peer = Peer::spawn("burst", "inet", &dir, &["20000"]);
    let pid = peer.pid;
    let obs = Observer::start(&["--pid", &pid.to_string(), "--ring-buffer-bytes", "4096"]);
    let result = peer.go();
    let trace = obs.stop();
    let sent = result["data_syscalls"].as_u64().unwrap();
    let received = trace.of("data", pid).len() as u64;
    let lost = trace.counter("observer_records_lost_total{reason=\"ring_buffer_full\"}")
        + trace.counter("observer_records_lost_total{reason=\"program_skipped\"}");
    assert!(lost > 0, "a 4 KiB ring under a burst of {sent} records must overflow");
    assert_eq!(received + lost, sent, "received {received} + lost {lost} != sent {sent}");
    assert_eq!(trace.counter("observer_records_total"), received);
    // Each fd's record sequence shows where its holes are: strictly increasing, and the
    // holes it shows (all but trailing ones) add up to no more than what was lost.
    let mut next: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    let mut holes = 0;
    for r in trace.of("data", pid) {
        let seq = r["seq"].as_u64().expect("seq");
        let expected = next.entry(r["fd"].as_u64().unwrap()).or_insert(0);
        assert!(seq >= *expected, "sequence went back on fd {}: {r}", r["fd"]);
        holes += seq - *expected;
        *expected = seq + 1;
    }
    assert!(holes > 0 && holes <= lost, "holes {holes}, lost {lost}");
}

#[test]
fn port_selector_traces_the_listening_process() {
    if !ebpf_available() {
        return;
    }
    let dir = TempDir::new("port");
    let peer = Peer::spawn("preexisting", "inet", &dir, &[]);
    let pid = peer.pid;
    let port = peer.hello["server"]["local"].as_str().unwrap().rsplit(':').next().unwrap().to_string();
    let obs = Observer::start(&["--port", &port]);
    assert_eq!(obs.ready["pids"], serde_json::json!([pid]), "only the process listening on {port}");
    let result = peer.go();
    let trace = obs.stop();
    trace.assert_exact(pid, &ops(&result), usize::MAX);
}

#[test]
fn comm_selector_picks_up_a_process_that_starts_later() {
    if !ebpf_available() {
        return;
    }
    let dir = TempDir::new("comm");
    // The comm of a process is its executable's file name: a uniquely named link.
    let name = format!("sp{}", std::process::id() % 100_000_000);
    let link = dir.0.join(&name);
    std::os::unix::fs::symlink(Peer::bin(), &link).unwrap();
    let mut obs = Observer::start(&["--comm", &name]);
    assert_eq!(obs.ready["pids"], serde_json::json!([]), "nothing runs under that name yet");
    let peer = Peer::spawn_as(link.to_str().unwrap(), "exchange", "unix", &dir, &[]);
    let pid = peer.pid;
    obs.wait_for_log(&format!("pid={pid}"), patience(10));
    let result = peer.go();
    let trace = obs.stop();
    trace.assert_exact(pid, &ops(&result), usize::MAX);
}

fn refused(family: &str) {
    if !ebpf_available() {
        return;
    }
    let (pid, _, result, trace) = traced("refused", family, &[]);
    let failed: Vec<&Value> = trace.records.iter().filter(|r| r["type"] == "connect_failed").collect();
    let opened: Vec<&Value> =
        trace.records.iter().filter(|r| r["type"] == "open" && r["pid"] == pid).collect();
    for a in result["attempts"].as_array().unwrap() {
        let errno = a["errno"].as_i64().unwrap();
        if errno == libc::EINPROGRESS as i64 {
            // Fails later: traced as a connection that never moves a byte.
            assert!(opened.iter().any(|o| o["fd"] == a["fd"] && o["in_progress"] == true), "{a}: {opened:?}");
            continue;
        }
        assert_ne!(errno, 0, "{a}");
        let f = failed
            .iter()
            .find(|f| f["fd"] == a["fd"] && f["errno"] == errno)
            .unwrap_or_else(|| panic!("no connect_failed record for {a}: {failed:?}"));
        assert_eq!(f["pid"], pid);
        assert_eq!(f["peer"], result["peer"], "{f}");
    }
    // The blocking attempt always fails at once.
    assert!(!failed.is_empty());
}

#[test]
fn refused_connects_are_reported_over_tcp() {
    refused("inet");
}

#[test]
fn refused_connects_are_reported_over_unix_sockets() {
    refused("unix");
}

/// A TLS server for [`tls_plaintext_is_read_from_the_apps_openssl`]: answers each line
/// with "echo: " and the line, over TLS, until the client closes.
const TLS_ECHO: &str = r#"
import socket, ssl, sys, threading
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen()
print(srv.getsockname()[1], flush=True)
def serve(c):
    with ctx.wrap_socket(c, server_side=True) as t:
        f = t.makefile("rb")
        for line in f:
            t.sendall(b"echo: " + line)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// [`TLS_ECHO`] started with `cert`, and the port it listens on.
fn tls_echo_server(cert: &harness::tls::Cert) -> (std::process::Child, String) {
    use std::io::BufRead as _;
    let mut server = std::process::Command::new("/usr/bin/python3")
        .args(["-c", TLS_ECHO, &cert.crt, &cert.key])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the TLS server");
    let mut port = String::new();
    std::io::BufReader::new(server.stdout.take().unwrap()).read_line(&mut port).unwrap();
    (server, port.trim().to_string())
}

/// Tells a client waiting on its stdin to go; its exit status and the line it printed.
fn go(client: &mut std::process::Child) -> (std::process::ExitStatus, String) {
    use std::io::{BufRead as _, Write as _};
    client.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut line = String::new();
    std::io::BufReader::new(client.stdout.take().unwrap()).read_line(&mut line).unwrap();
    (client.wait().unwrap(), line)
}

/// The traced client: waits for "go" on stdin, then imports `ssl` (so OpenSSL is loaded
/// after tracing started, as a worker's first request does), and over two connections
/// sends lines and reads their echoes.
const TLS_CLIENT: &str = r#"
import os, socket, sys
sys.stdin.readline()
import ssl, time
# The probes are set a few ms after the library is mapped (README: TLS); an app that
# calls OpenSSL sooner than that loses its first exchange to it. (Under emulation, as
# in the kernel matrix, everything is OBSERVER_TEST_SLOWDOWN times slower.)
time.sleep(0.2 * float(os.environ.get("OBSERVER_TEST_SLOWDOWN", "1")))
ctx = ssl.create_default_context(cafile=sys.argv[2])
for conn in range(2):
    with socket.create_connection(("127.0.0.1", int(sys.argv[1]))) as s:
        with ctx.wrap_socket(s, server_hostname="127.0.0.1") as t:
            f = t.makefile("rb")
            for i in range(3):
                t.sendall(b"line %d.%d\n" % (conn, i))
                assert f.readline() == b"echo: line %d.%d\n" % (conn, i)
print("done", flush=True)
"#;

/// TLS, kernel-facing: the uprobes on the OpenSSL a traced process loads after the agent
/// started (found from its mmap), each SSL_write/SSL_read's plaintext exact, tied to the
/// socket it went over, and that socket's own records marked as TLS records.
#[test]
fn tls_plaintext_is_read_from_the_apps_openssl() {
    if !ebpf_available() {
        return;
    }
    let cert = harness::tls::Cert::new();
    let python = "/usr/bin/python3";
    let (mut server, port) = tls_echo_server(&cert);
    let mut client = std::process::Command::new(python)
        .args(["-c", TLS_CLIENT, &port, &cert.crt])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the TLS client");
    let pid = client.id();
    let mut obs = Observer::start(&["--pid", &pid.to_string()]);
    let (status, out) = go(&mut client);
    obs.wait_for_log("uprobes set on a library", patience(10));
    let trace = obs.stop();
    harness::stop(&mut server, libc::SIGKILL);
    assert!(status.success() && out.trim() == "done", "client: {status} {out:?}");

    let data = trace.of("data", pid);
    let plain: Vec<&&Value> =
        data.iter().filter(|r| r["syscall"].as_str().unwrap().starts_with("SSL_")).collect();
    let text = |r: &Value| String::from_utf8(b64d(r["data"].as_str().unwrap())).unwrap();
    let mut conns = Vec::new();
    for c in 0..2 {
        for i in 0..3 {
            let sent = format!("line {c}.{i}\n");
            let w = plain
                .iter()
                .find(|r| r["syscall"] == "SSL_write" && text(r) == sent)
                .unwrap_or_else(|| panic!("no SSL_write of {sent:?}: {plain:?}"));
            let r = plain
                .iter()
                .find(|r| r["syscall"] == "SSL_read" && text(r) == format!("echo: {sent}"))
                .unwrap_or_else(|| panic!("no SSL_read of the echo of {sent:?}"));
            assert_eq!(w["conn_id"], r["conn_id"], "both directions on one connection");
            assert_eq!((w["dir"].as_str(), r["dir"].as_str()), (Some("send"), Some("recv")));
            assert_eq!(w["total_len"].as_u64(), Some(sent.len() as u64));
            conns.push(w["conn_id"].as_u64().unwrap());
        }
    }
    assert!(conns[..3].iter().all(|c| *c == conns[0]) && conns[3..].iter().all(|c| *c == conns[3]));
    assert_ne!(conns[0], conns[3], "two connections");
    // Each connection's socket records: TLS records, none captured; the plaintext is tied
    // to the socket they went over.
    for conn in [conns[0], conns[3]] {
        let socket: Vec<&&Value> = data
            .iter()
            .filter(|r| r["conn_id"] == conn && !r["syscall"].as_str().unwrap().starts_with("SSL_"))
            .collect();
        assert!(!socket.is_empty());
        assert!(socket.iter().all(|r| r["ciphertext"] == true && r["cap_len"] == 0), "{socket:?}");
        let fd = &socket[0]["fd"];
        assert!(plain.iter().filter(|r| r["conn_id"] == conn).all(|r| &r["fd"] == fd));
    }
    assert_eq!(trace.counters["observer_records_lost_total{reason=\"tls_socket_unknown\"}"], 0);
    assert_eq!(trace.counters["observer_tls_records_total"], plain.len() as u64);
    assert_eq!(trace.counters["observer_uprobe_libraries_attached_total"], 1);
}

/// A process that maps OpenSSL and starts short-lived processes: forks that exit at once
/// (a prefork server's workers, many times over) and execs of a binary that maps the
/// same library file.
const SHORT_LIVED: &str = r#"
import os, ssl, subprocess, sys
sys.stdin.readline()
for _ in range(int(sys.argv[1])):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
for _ in range(int(sys.argv[2])):
    subprocess.run(["/usr/bin/openssl", "version"], stdout=subprocess.DEVNULL, check=True)
print("done", flush=True)
sys.stdin.readline()
"#;

/// The agent's perf-event and BPF-link file descriptors: its kernel objects per probe.
fn probe_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|l| {
                    let l = l.to_string_lossy();
                    l.contains("perf_event") || l.contains("bpf-link") || l.contains("bpf_link")
                })
                .count()
        })
        .unwrap_or(0)
}

/// 10,000 short-lived processes mapping one OpenSSL: one set of uprobes, set once, no
/// kernel object and no tracked process left over per process; and when the last
/// process mapping it is gone, the probes go too (after `--uprobe-idle-grace`).
#[test]
fn ten_thousand_short_lived_processes_keep_one_set_of_uprobes() {
    use std::io::{BufRead as _, Write as _};
    if !ebpf_available() {
        return;
    }
    let mut parent = std::process::Command::new("/usr/bin/python3")
        .args(["-c", SHORT_LIVED, "10000", "300"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the parent");
    let obs =
        harness::django::ObserverRun::start(&["--pid", &parent.id().to_string(), "--uprobe-idle-grace", "1"]);
    let baseline = {
        // The probes are set when the parent is tracked (it mapped OpenSSL already).
        let m = obs.wait_until("the parent's probes", |m| {
            m.sum("observer_uprobe_libraries_attached_total", &[]) >= 1.0
        });
        assert_eq!(m.sum("observer_uprobe_libraries_attached_total", &[]), 1.0);
        probe_fds(obs.pid())
    };
    let mut stdin = parent.stdin.take().unwrap();
    stdin.write_all(b"go\n").unwrap();
    let mut line = String::new();
    std::io::BufReader::new(parent.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "done");
    let m = obs.wait_until("the children gone", |m| m.sum("observer_processes", &[]) <= 1.0);
    assert_eq!(m.sum("observer_uprobe_libraries_attached_total", &[]), 1.0, "set once");
    assert_eq!(m.sum("observer_uprobe_libraries_detached_total", &[]), 0.0, "the parent still maps it");
    assert_eq!(m.sum("observer_uprobe_attach_errors_total", &[]), 0.0);
    assert_eq!(probe_fds(obs.pid()), baseline, "no kernel object per process");
    // The last process mapping it goes: its probes go after the grace (and the next sweep).
    stdin.write_all(b"end\n").unwrap();
    parent.wait().unwrap();
    obs.wait_until("the probes removed", |m| m.sum("observer_uprobe_libraries_detached_total", &[]) >= 1.0);
    let left = probe_fds(obs.pid());
    eprintln!("the agent's perf-event and BPF-link fds: {baseline} with the probes, {left} without");
    assert!(left < baseline, "the probes' file descriptors are closed ({left} of {baseline} left)");
}

/// OpenSSL linked statically into the binary (as into an interpreter or an extension
/// module): its functions are found in the ELF's static symbol table, the probes set on
/// the executable itself, and the plaintext read as from a shared libssl.
#[test]
fn tls_plaintext_is_read_from_a_statically_linked_openssl() {
    if !ebpf_available() {
        return;
    }
    let dir = TempDir::new("static-tls");
    let exe = dir.0.join("static-tls-client");
    let src = harness::django::root().join("tests/apps/static_tls/client.c");
    let lib = |n: &str| format!("/usr/lib/x86_64-linux-gnu/{n}");
    let out = std::process::Command::new("gcc")
        .args(["-O1", "-o"])
        .arg(&exe)
        .arg(&src)
        .args([lib("libssl.a"), lib("libcrypto.a"), "-lpthread".into(), "-ldl".into()])
        .output()
        .expect("gcc (cargo xtask setup installs it and libssl-dev)");
    assert!(out.status.success(), "gcc: {}", String::from_utf8_lossy(&out.stderr));
    let cert = harness::tls::Cert::new();
    let (mut server, port) = tls_echo_server(&cert);
    let mut client = std::process::Command::new(&exe)
        .arg(&port)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the static client");
    let pid = client.id();
    let mut obs = Observer::start(&["--pid", &pid.to_string()]);
    obs.wait_for_log("uprobes set on a library", patience(10));
    let (status, said) = go(&mut client);
    let trace = obs.stop();
    harness::stop(&mut server, libc::SIGKILL);
    assert!(status.success() && said.trim() == "done", "client: {status} {said:?}");
    let data = trace.of("data", pid);
    let text = |r: &Value| String::from_utf8(b64d(r["data"].as_str().unwrap())).unwrap();
    let writes: Vec<String> = data.iter().filter(|r| r["syscall"] == "SSL_write").map(|r| text(r)).collect();
    assert_eq!(writes, ["static 0\n", "static 1\n", "static 2\n"]);
    let read: String = data.iter().filter(|r| r["syscall"] == "SSL_read").map(|r| text(r)).collect();
    assert_eq!(read, "echo: static 0\necho: static 1\necho: static 2\n");
    let conn = &data.iter().find(|r| r["syscall"] == "SSL_write").unwrap()["conn_id"];
    assert!(
        data.iter()
            .filter(|r| r["syscall"].as_str().unwrap().starts_with("SSL_"))
            .all(|r| &r["conn_id"] == conn)
    );
    assert_eq!(trace.counters["observer_uprobe_libraries_attached_total"], 1, "the executable itself");
}
