//! Harness for the end-to-end tests (a module of each test file): runs the real observer (as root, against the real
//! kernel) on real processes, and reads what it printed.
//!
//! eBPF tests call [`ebpf_available`] first. A test that cannot run here fails, saying
//! why, so that a green run always means the eBPF paths ran; with
//! `OBSERVER_ALLOW_SKIP=1` (and neither `CI=true` nor `OBSERVER_REQUIRE_EBPF=1`) it is
//! skipped instead, with a `SKIPPED` line on stderr. See [`skip`].
#![allow(dead_code, reason = "each test file uses part of the harness")]

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::mpsc::{Receiver, channel},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

pub mod caches;
pub mod django;
pub mod mix;
pub mod postgres;
pub mod prometheus;
pub mod tls;

/// Whether eBPF tests can run here. When they cannot, [`skip`] decides: a failure,
/// unless skipping was asked for.
pub fn ebpf_available() -> bool {
    let reason = if unsafe_geteuid() != 0 {
        Some("not root")
    } else if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        Some("no kernel BTF")
    } else {
        None
    };
    match reason {
        None => true,
        Some(r) => {
            skip(&format!("eBPF tests cannot run: {r}"));
            false
        }
    }
}

/// A test that cannot run here: panics (a failure) unless `OBSERVER_ALLOW_SKIP=1` asks
/// for skips, and always in CI (`CI=true` or `OBSERVER_REQUIRE_EBPF=1`), where every
/// test must run. A skip prints a `SKIPPED` line naming the test; the caller returns.
pub fn skip(why: &str) {
    let flag = |name: &str| std::env::var(name).is_ok_and(|v| v == "1" || v == "true");
    let required = flag("OBSERVER_REQUIRE_EBPF") || flag("CI");
    let test = thread::current().name().unwrap_or("this test").to_string();
    if required || !flag("OBSERVER_ALLOW_SKIP") {
        let hint = if required { "required in CI" } else { "set OBSERVER_ALLOW_SKIP=1 to skip it" };
        panic!("{test} cannot run here: {why} ({hint})");
    }
    eprintln!("SKIPPED {test}: {why}");
}

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// A temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("observer-test-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }

    pub fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where a child's stderr goes: a new file under `OBSERVER_TEST_LOG_DIR` when it is set
/// (the kernel matrix keeps them with each guest's logs), else nowhere.
pub fn child_log(name: &str) -> std::process::Stdio {
    let Some(dir) = std::env::var_os("OBSERVER_TEST_LOG_DIR") else { return std::process::Stdio::null() };
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::path::Path::new(&dir).join(format!("{}-{n}-{name}.log", std::process::id()));
    std::fs::File::create(&path).map_or_else(|_| std::process::Stdio::null(), std::process::Stdio::from)
}

/// gunicorn's `--timeout` (a worker silent this long is killed; 30 s by default), scaled
/// like every wait: under emulation a worker importing Django takes longer than that.
pub fn gunicorn_timeout() -> String {
    patience(30).as_secs().to_string()
}

/// How long to wait for something that takes `secs` seconds at most on this machine:
/// scaled by `OBSERVER_TEST_SLOWDOWN` (an integer, 1 when unset), which the kernel matrix
/// (`cargo xtask test --kernel`) sets for guests under software emulation, where every
/// process runs many times slower. Waits only: what a test counts never scales.
pub fn patience(secs: u64) -> Duration {
    let slowdown =
        std::env::var("OBSERVER_TEST_SLOWDOWN").ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(1);
    Duration::from_secs(secs.saturating_mul(slowdown.max(1)))
}

/// Stops a child we started: `signal`, then SIGKILL if it has not exited within 10 s.
pub fn stop(child: &mut Child, signal: i32) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, signal) };
    let deadline = Instant::now() + patience(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Reads lines from a child's pipe on a thread.
fn line_reader(pipe: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A `sockpeer` process: prints its pid, waits for "go", runs a scenario, reports.
pub struct Peer {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    pub pid: u32,
    /// The first line it printed (pid, and for `preexisting` the endpoints).
    pub hello: Value,
}

impl Peer {
    pub fn spawn(scenario: &str, family: &str, dir: &TempDir, extra: &[&str]) -> Self {
        Self::spawn_as(env!("CARGO_BIN_EXE_sockpeer"), scenario, family, dir, extra)
    }

    /// The sockpeer binary's path.
    pub fn bin() -> &'static str {
        env!("CARGO_BIN_EXE_sockpeer")
    }

    /// Runs sockpeer through `program` (e.g. a symlink, whose name becomes the comm).
    pub fn spawn_as(program: &str, scenario: &str, family: &str, dir: &TempDir, extra: &[&str]) -> Self {
        let mut child = Command::new(program)
            .args([scenario, family, dir.path()])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn sockpeer");
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("sockpeer hello");
        let hello: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("sockpeer hello {line:?}: {e}"));
        let pid = hello["pid"].as_u64().expect("pid") as u32;
        Self { child, stdin, stdout, pid, hello }
    }

    /// Lets it run; returns its report once it exited.
    pub fn go(mut self) -> Value {
        let mut stdin = self.stdin.take().expect("stdin");
        stdin.write_all(b"go\n").expect("go");
        drop(stdin);
        let mut out = String::new();
        self.stdout.read_to_string(&mut out).expect("sockpeer result");
        let status = self.child.wait().expect("wait sockpeer");
        assert!(status.success(), "sockpeer failed: {status}");
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("sockpeer result {out:?}: {e}"))
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `observer trace --json`.
pub struct Observer {
    child: Child,
    stdout: Receiver<String>,
    stderr: Receiver<String>,
    seen_stderr: Vec<String>,
    /// The `ready` line.
    pub ready: Value,
}

/// What an observer printed, after it stopped.
#[derive(Debug)]
pub struct Trace {
    pub records: Vec<Value>,
    pub counters: BTreeMap<String, u64>,
    pub stderr: Vec<String>,
}

pub fn observer_bin() -> &'static str {
    env!("CARGO_BIN_EXE_observer-under-test")
}

impl Observer {
    /// Starts `observer trace --json ARGS` and waits until its programs are attached.
    pub fn start(args: &[&str]) -> Self {
        let mut child = Command::new(observer_bin())
            .args(["trace", "--json"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn observer");
        let stdout = line_reader(child.stdout.take().expect("stdout"));
        let stderr = line_reader(child.stderr.take().expect("stderr"));
        let deadline = Instant::now() + patience(60);
        loop {
            match stdout.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    let v: Value = serde_json::from_str(&line).expect("observer JSON line");
                    assert_eq!(v["type"], "ready", "first line must be ready: {line}");
                    return Self { child, stdout, stderr, seen_stderr: Vec::new(), ready: v };
                }
                Err(_) if Instant::now() < deadline => {
                    if let Ok(Some(status)) = child.try_wait() {
                        let err: Vec<String> = stderr.try_iter().collect();
                        panic!("observer exited with {status} before ready: {}", err.join("\n"));
                    }
                }
                Err(_) => panic!("observer not ready within 60s"),
            }
        }
    }

    /// Waits until a line of its log (stderr) contains `needle`; returns that line.
    /// Lines read meanwhile are kept for [`Trace::stderr`].
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(line) = self.stderr.recv_timeout(Duration::from_millis(100)) {
                self.seen_stderr.push(line.clone());
                if line.contains(needle) {
                    return line;
                }
            }
        }
        panic!("no log line with {needle:?} within {timeout:?}: {:#?}", self.seen_stderr);
    }

    /// Stops it with SIGINT and collects everything it printed.
    pub fn stop(mut self) -> Trace {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().expect("wait observer");
        let mut stderr = std::mem::take(&mut self.seen_stderr);
        stderr.extend(self.stderr.iter());
        assert!(status.success(), "observer exited with {status}: {}", stderr.join("\n"));
        let mut records = Vec::new();
        let mut counters = BTreeMap::new();
        for line in self.stdout.iter() {
            let v: Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON line {line:?}: {e}"));
            if v["type"] == "counters" {
                counters = serde_json::from_value(v["counters"].clone()).expect("counters map");
            } else {
                records.push(v);
            }
        }
        assert!(!counters.is_empty(), "observer printed no counters");
        Trace { records, counters, stderr }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Trace {
    /// Records of a type (`data`, `open`, `close`, ...) from one process.
    pub fn of(&self, kind: &str, pid: u32) -> Vec<&Value> {
        self.records.iter().filter(|r| r["type"] == kind && r["pid"] == pid).collect()
    }

    /// A counter by series name, e.g. `observer_capture_truncated_total`.
    pub fn counter(&self, series: &str) -> u64 {
        *self.counters.get(series).unwrap_or_else(|| panic!("no counter {series} in {:?}", self.counters))
    }

    /// Asserts that the data records of `pid` are exactly `ops` (the peer's ground truth:
    /// fd, syscall, direction, total length and bytes), one record per op, each holding
    /// the first `cap` bytes of what the syscall moved. Returns each op's record.
    pub fn assert_exact(&self, pid: u32, ops: &[Value], cap: usize) -> Vec<&Value> {
        let data = self.of("data", pid);
        let mut used = vec![false; data.len()];
        let mut matched = Vec::new();
        for op in ops {
            let bytes = b64d(op["data"].as_str().expect("op data"));
            let counted_only = matches!(op["syscall"].as_str(), Some("sendmmsg" | "recvmmsg" | "sendfile"));
            let want = if counted_only { Vec::new() } else { bytes[..bytes.len().min(cap)].to_vec() };
            let found = data.iter().enumerate().position(|(i, r)| {
                !used[i]
                    && r["fd"] == op["fd"]
                    && r["syscall"] == op["syscall"]
                    && r["dir"] == op["dir"]
                    && r["total_len"] == op["total_len"]
                    && b64d(r["data"].as_str().unwrap_or_default()) == want
            });
            match found {
                Some(i) => {
                    used[i] = true;
                    matched.push(data[i]);
                }
                None => panic!(
                    "no record for op {op}\nrecords of pid {pid}:\n{}",
                    data.iter().map(|r| r.to_string()).collect::<Vec<_>>().join("\n")
                ),
            }
        }
        let extra: Vec<String> =
            data.iter().zip(&used).filter(|(_, u)| !**u).map(|(r, _)| r.to_string()).collect();
        assert!(extra.is_empty(), "records with no matching syscall:\n{}", extra.join("\n"));
        matched
    }
}

/// Decodes base64 (the observer's and the peer's encoding of bytes).
pub fn b64d(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).expect("base64")
}

/// Deterministic bytes (xorshift), so that a failure can be replayed.
pub fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
