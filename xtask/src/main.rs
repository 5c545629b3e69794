//! `cargo xtask setup | test | demo | bench | soak | fuzz`: the project's build and test driver.
//!
//! `setup` installs everything the project needs on a fresh Debian 12 machine and is
//! idempotent (a second run only checks, in seconds). `test` and `demo` run it first.

mod bench;
mod demo;
mod kernels;
mod services;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install toolchain pieces, Debian packages and the Python venv the tests use.
    Setup,
    /// Set up, then run every check and test: fmt, clippy (host and bpf), unit and
    /// end-to-end on this machine's kernel, then the eBPF tests on each kernel of the
    /// matrix (Debian 12's 6.1 and 6.12) in a qemu guest.
    Test {
        /// Only these kernels: `host` (this machine's), `6.1`, `6.12`, or a path to a
        /// vmlinuz (modules under ../lib/modules). Default: all three.
        #[arg(long = "kernel", value_name = "KERNEL")]
        kernels: Vec<String>,
        /// What a guest runs: `core` (the kernel-facing tests; the default under software
        /// emulation) or `full` (every test; the default under KVM).
        #[arg(long, value_enum)]
        kernel_suite: Option<kernels::Suite>,
        /// Extra arguments for `cargo test` on the host (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        cargo_test_args: Vec<String>,
    },
    /// Set up, run the Django test app under gunicorn, trace it with `observer run`, send
    /// some traffic and summarise /metrics.
    Demo {
        /// Keep the app and the observer running until Ctrl-C.
        #[arg(long)]
        serve: bool,
    },
    /// Measure what the observer costs a Django app and itself, side by side with
    /// django-prometheus; results in target/bench/ and a markdown table on stdout.
    Bench {
        /// A short run (about 5 minutes): fewer rounds, shorter loads, a smaller churn.
        #[arg(long)]
        quick: bool,
        /// Only these parts: arms, tls, uprobe, flood, capacity, memory, replay (default: all).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Run the agent for a while under a URL flood, database and cache traffic and
    /// connection churn at once, with small bounds; print its RSS and the bounds that bit
    /// every interval; fail if its RSS grew after the warm-up. Results in target/soak/.
    Soak {
        /// How long.
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        /// Seconds between samples.
        #[arg(long, default_value_t = 30)]
        interval: u64,
    },
    /// The benchmark's connection helper (a traced server, an untraced client).
    #[command(hide = true)]
    BenchConns {
        #[command(subcommand)]
        cmd: bench::scale::Conns,
    },
    /// Run every fuzz target (observer/fuzz) for a time budget each.
    Fuzz {
        /// Seconds per target.
        #[arg(long, alias = "time", default_value_t = 60)]
        seconds: u64,
        /// Leave observer/fuzz/corpus as it is (CI): no `cargo fuzz cmin` afterwards.
        #[arg(long)]
        no_minimize: bool,
        /// Only these targets (default: all).
        targets: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => {
            setup::all()?;
            let names: Vec<String> = kernels::DEFAULT.iter().map(|k| k.name.to_string()).collect();
            kernels::setup(&names).map(drop)
        }
        Cmd::Test { kernels, kernel_suite, cargo_test_args } => {
            test(&kernels, kernel_suite, &cargo_test_args)
        }
        Cmd::Demo { serve } => {
            setup::all()?;
            demo::demo(serve)
        }
        Cmd::Bench { quick, only } => {
            setup::all()?;
            bench::bench(quick, &only)
        }
        Cmd::Soak { minutes, interval } => {
            setup::all()?;
            bench::soak::soak(minutes, interval)
        }
        Cmd::BenchConns { cmd } => bench::scale::helper(cmd),
        Cmd::Fuzz { seconds, no_minimize, targets } => fuzz(seconds, !no_minimize, &targets),
    }
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// Runs a command in the workspace root, failing on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    eprintln!("xtask: {shown}");
    if cmd.get_current_dir().is_none() {
        cmd.current_dir(root());
    }
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn test(wanted: &[String], suite: Option<kernels::Suite>, extra: &[String]) -> Result<()> {
    setup::all()?;
    let wanted: Vec<String> = if wanted.is_empty() {
        std::iter::once("host".to_string())
            .chain(kernels::DEFAULT.iter().map(|k| k.name.to_string()))
            .collect()
    } else {
        wanted.to_vec()
    };
    let guests: Vec<String> = wanted.iter().filter(|k| *k != "host").cloned().collect();
    // Fetched first, so that a kernel Debian lacks fails the run before the long part.
    let images = kernels::setup(&guests)?;
    if wanted.iter().any(|k| k == "host") {
        host_suite(extra)?;
    }
    if !images.is_empty() {
        kernels::matrix(&images, suite)?;
    }
    Ok(())
}

fn host_suite(extra: &[String]) -> Result<()> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    // The kernel programs, linted for their own target (host clippy does not see them).
    run(Command::new("rustup").args([
        "run",
        "nightly",
        "cargo",
        "clippy",
        "--package",
        "observer-ebpf",
        "--bin",
        "observer-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Zbuild-std=core",
        "--release",
        "--target-dir",
        "target/bpf-clippy",
        "--",
        "-D",
        "warnings",
    ]))?;
    let mut t = cargo();
    t.args(["test", "--workspace"]).args(extra);
    if ci {
        // In CI an eBPF test that cannot load is a failure, never a skip.
        t.env("OBSERVER_REQUIRE_EBPF", "1");
    }
    run(&mut t)
}

/// `cargo fuzz` on every target of observer/fuzz (its own workspace, nightly), then
/// `cargo fuzz cmin` so that observer/fuzz/corpus keeps the smallest set with the same
/// coverage (committed; `cargo test` replays it, see observer::fuzzing). The kernel
/// object is not needed to fuzz parsers: AYA_BUILD_SKIP=1. Every target runs even when
/// one fails, and the run fails at the end if any did, naming the crashing input that
/// libFuzzer kept (observer/fuzz/artifacts/<target>/): copy it to
/// observer/fuzz/regressions/<target>/ under a name saying what broke, so that `cargo
/// test` replays it. Prints each target's executions and final coverage from
/// libFuzzer's own lines; full logs in target/fuzz/.
fn fuzz(seconds: u64, minimize: bool, only: &[String]) -> Result<()> {
    setup::all()?;
    setup::cargo_fuzz()?;
    let manifest = std::fs::read_to_string(root().join("observer/fuzz/Cargo.toml"))?;
    let all: Vec<String> = manifest
        .lines()
        .filter_map(|l| l.strip_prefix("name = \"")?.strip_suffix('"').map(String::from))
        .filter(|n| n != "observer-fuzz")
        .collect();
    let targets: Vec<&String> = all.iter().filter(|t| only.is_empty() || only.contains(t)).collect();
    if targets.is_empty() {
        bail!("no such fuzz target; have: {}", all.join(", "));
    }
    let logs = root().join("target/fuzz");
    std::fs::create_dir_all(&logs)?;
    let fuzz = |args: &[&str]| {
        let mut c = Command::new("cargo");
        c.arg("+nightly")
            .arg("fuzz")
            .args(args)
            .current_dir(root().join("observer"))
            .env("AYA_BUILD_SKIP", "1");
        c
    };
    // Built once up front, so that each target's budget is spent fuzzing.
    run(&mut fuzz(&["build"]))?;
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for t in targets {
        let log_path = logs.join(format!("{t}.log"));
        let log = std::fs::File::create(&log_path)?;
        let budget = format!("-max_total_time={seconds}");
        let outcome = run(fuzz(&["run", t, "--", &budget]).stderr(log));
        let text = std::fs::read_to_string(&log_path)?;
        if let Err(e) = outcome {
            let artifact = text
                .lines()
                .find_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim().to_string()))
                .unwrap_or_else(|| "no artifact".into());
            eprintln!("xtask: fuzz target {t} failed: {e:#}; input: {artifact}; log: {}", log_path.display());
            failed.push(format!("{t} ({artifact})"));
            continue;
        }
        let done = fuzz_done(&text).with_context(|| format!("no closing line in {}", log_path.display()))?;
        if minimize {
            run(fuzz(&["cmin", t]).stderr(std::fs::File::create(logs.join(format!("{t}.cmin.log")))?))?;
        }
        let kept = std::fs::read_dir(root().join("observer/fuzz/corpus").join(t))?.count();
        rows.push((t.clone(), done, kept));
    }
    println!("| target | seconds | executions | cov | ft | corpus kept |\n|---|---:|---:|---:|---:|---:|");
    for (t, d, kept) in rows {
        println!("| {t} | {seconds} | {} | {} | {} | {kept} |", d.runs, d.cov, d.ft);
    }
    if !failed.is_empty() {
        bail!("fuzz targets failed: {}", failed.join(", "));
    }
    Ok(())
}

/// What libFuzzer says at the end of a run.
#[derive(Debug, PartialEq)]
struct FuzzDone {
    runs: u64,
    /// Coverage points (edges) and features reached, from its last status line.
    cov: u64,
    ft: u64,
}

/// libFuzzer's last status line (`#1234567 DONE cov: 812 ft: 3018 corp: ...`) and its
/// closing line (`Done 1234567 runs in 60 second(s)`).
fn fuzz_done(log: &str) -> Option<FuzzDone> {
    let runs =
        log.lines().rev().find_map(|l| l.strip_prefix("Done ")?.split_whitespace().next()?.parse().ok())?;
    let status = log.lines().rev().find(|l| l.contains(" cov: ") && l.contains(" ft: "))?;
    let field = |name: &str| -> Option<u64> {
        let mut words = status.split_whitespace();
        words.find(|w| *w == name)?;
        words.next()?.parse().ok()
    };
    Some(FuzzDone { runs, cov: field("cov:")?, ft: field("ft:")? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuzz_done_reads_libfuzzers_last_lines() {
        let log = "INFO: Seed: 1\n#2\tINITED cov: 10 ft: 11 corp: 1/1b\n\
                   #65536\tpulse  cov: 700 ft: 2900 corp: 90/3Kb\n\
                   #99001\tDONE   cov: 812 ft: 3018 corp: 93/4Kb lim: 4096 exec/s: 1650 rss: 60Mb\n\
                   Done 99001 runs in 60 second(s)\n";
        assert_eq!(fuzz_done(log), Some(FuzzDone { runs: 99001, cov: 812, ft: 3018 }));
        assert_eq!(fuzz_done("==1== ERROR: libFuzzer: deadly signal\n"), None);
    }
}
