//! What one probed library call costs the app: the budget of the TLS (and SQLite)
//! uprobes, measured, not assumed.
//!
//! A library with OpenSSL's I/O symbols that does nothing (each function returns at
//! once, built here with rustc) and a driver that calls `SSL_read` in a loop on demand.
//! The observer sets its real probes on that library (an entry and a return probe on
//! `SSL_read`, as on the real one) when it traces the driver. Three numbers, ns per call,
//! from drivers running alternately: no probes (before the observer starts and after it
//! stopped), probes with the calling process traced (the programs run to the end: the
//! call moved no bytes, so nothing is emitted), and probes with the calling process not
//! traced (another process mapping the same library file: the programs return at their
//! first lookup, but the traps are taken all the same: a uprobe is set on a file).
//! `SSL_read` has an entry and a return probe; `SSL_free` an entry probe only, which
//! splits the cost between the two kinds.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use super::{Observer, Plan, report::Spread};
use crate::services::{Guard, request, scalar};

const LIBRARY: &str = r#"
#[unsafe(no_mangle)]
pub extern "C" fn SSL_read(_ssl: *mut u8, _buf: *mut u8, _num: i32) -> i32 { -1 }
#[unsafe(no_mangle)]
pub extern "C" fn SSL_write(_ssl: *mut u8, _buf: *const u8, _num: i32) -> i32 { -1 }
#[unsafe(no_mangle)]
pub extern "C" fn SSL_read_ex(_ssl: *mut u8, _buf: *mut u8, _num: usize, _done: *mut usize) -> i32 { 0 }
#[unsafe(no_mangle)]
pub extern "C" fn SSL_write_ex(_ssl: *mut u8, _buf: *const u8, _num: usize, _done: *mut usize) -> i32 { 0 }
#[unsafe(no_mangle)]
pub extern "C" fn SSL_free(_ssl: *mut u8) {}
"#;

const DRIVER_HEAD: &str = r#"
#[link(name = "ssl-observer-bench")]
unsafe extern "C" {
    fn SSL_read(ssl: *mut u8, buf: *mut u8, num: i32) -> i32;
    fn SSL_free(ssl: *mut u8);
}
"#;

const DRIVER_SETUP: &str = "let mut buf = [0u8; 16];";

const DRIVER_CALL: &str = r#"
    // SAFETY: the bench's library ignores its arguments.
    unsafe {
        if what == "read" {
            std::hint::black_box(SSL_read(std::ptr::null_mut(), buf.as_mut_ptr(), 16));
        } else {
            SSL_free(std::hint::black_box(std::ptr::null_mut()));
        }
    }
"#;

/// A driver's source: `head` (items), then a main that runs `setup` once and, for each
/// "WHAT N" line on stdin, `call` (a block that reads `what`) N times, and prints the ns
/// they took.
pub(super) fn driver_source(head: &str, setup: &str, call: &str) -> String {
    format!(
        "{head}\nfn main() {{\n    use std::io::BufRead;\n    {setup}\n    \
         for line in std::io::stdin().lock().lines() {{\n        let line = line.unwrap();\n        \
         let (what, n) = line.trim().split_once(' ').unwrap();\n        let n: u64 = n.parse().unwrap();\n        \
         let t = std::time::Instant::now();\n        for _ in 0..n {{ {call} }}\n        \
         println!(\"{{}}\", t.elapsed().as_nanos());\n    }}\n}}\n"
    )
}

#[derive(Debug, Clone, Serialize)]
pub struct UprobeCost {
    pub calls_per_sample: u64,
    pub read: CallCost,
    pub free: CallCost,
}

/// ns per call of one function.
#[derive(Debug, Clone, Serialize)]
pub struct CallCost {
    pub bare_ns: Spread,
    pub traced_ns: Spread,
    pub untraced_ns: Spread,
}

#[derive(Default)]
struct Samples {
    bare: Vec<f64>,
    traced: Vec<f64>,
    untraced: Vec<f64>,
}

impl Samples {
    fn cost(self) -> CallCost {
        CallCost {
            bare_ns: Spread::of(self.bare),
            traced_ns: Spread::of(self.traced),
            untraced_ns: Spread::of(self.untraced),
        }
    }
}

const FUNCTIONS: [&str; 2] = ["read", "free"];

/// A driver process, waiting for a number of calls to make: reads "WHAT N", makes N
/// calls of WHAT, prints the ns they took (the syscall part drives its own the same way).
pub(super) struct Driver {
    guard: Guard,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Driver {
    pub(super) fn start(dir: &Path) -> Result<Self> {
        let mut child: Child = Command::new(dir.join("driver"))
            .env("LD_LIBRARY_PATH", dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the uprobe driver")?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("stdout")?);
        Ok(Self { guard: Guard(child), stdin, stdout })
    }

    pub(super) fn pid(&self) -> u32 {
        self.guard.0.id()
    }

    /// ns per call of `what` over `n` calls.
    pub(super) fn sample(&mut self, what: &str, n: u64) -> Result<f64> {
        writeln!(self.stdin, "{what} {n}")?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let ns: f64 = line.trim().parse().with_context(|| format!("driver said {line:?}"))?;
        Ok(ns / n as f64)
    }
}

pub(super) fn rustc(dir: &Path, args: &[&str]) -> Result<()> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let out = Command::new(rustc).current_dir(dir).args(["--edition", "2024", "-O"]).args(args).output()?;
    if !out.status.success() {
        bail!("rustc {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

pub fn measure(plan: &Plan, scratch: &Path) -> Result<UprobeCost> {
    let dir = scratch.join("uprobe");
    fs::create_dir_all(&dir)?;
    fs::write(dir.join("lib.rs"), LIBRARY)?;
    fs::write(dir.join("driver.rs"), driver_source(DRIVER_HEAD, DRIVER_SETUP, DRIVER_CALL))?;
    // Named like OpenSSL's library, so the observer looks at it first.
    rustc(&dir, &["--crate-type", "cdylib", "-o", "libssl-observer-bench.so", "lib.rs"])?;
    rustc(&dir, &["-L", ".", "-l", "dylib=ssl-observer-bench", "-o", "driver", "driver.rs"])?;
    let n: u64 = if plan.quick { 200_000 } else { 1_000_000 };
    let (mut traced, mut other) = (Driver::start(&dir)?, Driver::start(&dir)?);
    let mut samples = [Samples::default(), Samples::default()];
    // Warm: page faults, CPU frequency.
    for what in FUNCTIONS {
        traced.sample(what, n)?;
        other.sample(what, n)?;
    }
    for _ in 0..plan.rounds {
        for (what, s) in FUNCTIONS.iter().zip(&mut samples) {
            s.bare.push(traced.sample(what, n)?);
            s.bare.push(other.sample(what, n)?);
        }
    }
    let observer = Observer::start(&["--pid", &traced.pid().to_string()], scratch, false)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, text) = request(observer.port, "GET", "/metrics", "", "")?;
        if scalar(&text, "observer_uprobe_libraries_attached_total") >= 1.0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the observer set no uprobes on the bench's library");
        }
        thread::sleep(Duration::from_millis(100));
    }
    for _ in 0..plan.rounds {
        for (what, s) in FUNCTIONS.iter().zip(&mut samples) {
            s.traced.push(traced.sample(what, n)?);
            s.untraced.push(other.sample(what, n)?);
        }
    }
    drop(observer);
    // The probes go with the observer: the same processes, bare again.
    for _ in 0..plan.rounds {
        for (what, s) in FUNCTIONS.iter().zip(&mut samples) {
            s.bare.push(traced.sample(what, n)?);
            s.bare.push(other.sample(what, n)?);
        }
    }
    let [read, free] = samples.map(Samples::cost);
    for (name, c) in [("SSL_read", &read), ("SSL_free", &free)] {
        eprintln!(
            "bench:   {name}: {:.1} ns bare, {:.0} ns probed in a traced process, {:.0} ns probed in another process",
            c.bare_ns.median, c.traced_ns.median, c.untraced_ns.median
        );
    }
    Ok(UprobeCost { calls_per_sample: n, read, free })
}
