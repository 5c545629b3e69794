//! `cargo xtask setup | test | demo | bench | soak | fuzz`: the project's build and test driver.
//!
//! `setup` installs everything the project needs on a fresh Debian 12 machine and is
//! idempotent (a second run only checks, in seconds). `test` and `demo` run it first.

mod bench;
mod demo;
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
    /// Set up, then run every check and test: fmt, clippy (host and bpf), unit and end-to-end.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
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
        /// Only these parts: arms, flood, capacity, memory, replay (default: all).
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
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only these targets (default: all).
        targets: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::all(),
        Cmd::Test { cargo_test_args } => test(&cargo_test_args),
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
        Cmd::Fuzz { seconds, targets } => fuzz(seconds, &targets),
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

fn test(extra: &[String]) -> Result<()> {
    setup::all()?;
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
/// object is not needed to fuzz parsers: AYA_BUILD_SKIP=1. Prints each target's
/// executions from libFuzzer's own count; full logs in target/fuzz/.
fn fuzz(seconds: u64, only: &[String]) -> Result<()> {
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
    let mut rows = Vec::new();
    for t in targets {
        let log_path = logs.join(format!("{t}.log"));
        let log = std::fs::File::create(&log_path)?;
        let fuzz = |args: &[&str]| {
            let mut c = Command::new("cargo");
            c.arg("+nightly")
                .arg("fuzz")
                .args(args)
                .current_dir(root().join("observer"))
                .env("AYA_BUILD_SKIP", "1");
            c
        };
        let budget = format!("-max_total_time={seconds}");
        run(fuzz(&["run", t, "--", &budget]).stderr(log))
            .with_context(|| format!("fuzz target {t} (log: {})", log_path.display()))?;
        let text = std::fs::read_to_string(&log_path)?;
        let runs = fuzz_runs(&text).with_context(|| format!("no run count in {}", log_path.display()))?;
        run(fuzz(&["cmin", t]).stderr(std::fs::File::create(logs.join(format!("{t}.cmin.log")))?))?;
        let kept = std::fs::read_dir(root().join("observer/fuzz/corpus").join(t))?.count();
        rows.push((t.clone(), runs, kept));
    }
    println!("| target | executions | seconds | corpus kept |\n|---|---:|---:|---:|");
    for (t, runs, kept) in rows {
        println!("| {t} | {runs} | {seconds} | {kept} |");
    }
    Ok(())
}

/// libFuzzer's closing line: `Done 1234567 runs in 60 second(s)`.
fn fuzz_runs(log: &str) -> Option<u64> {
    log.lines().rev().find_map(|l| l.strip_prefix("Done ")?.split_whitespace().next()?.parse().ok())
}
