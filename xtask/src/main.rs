//! `cargo xtask setup | test | demo`: the project's build and test driver.
//!
//! `setup` installs everything the project needs on a fresh Debian 12 machine and is
//! idempotent (a second run only checks, in seconds). `test` and `demo` run it first.

mod demo;
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
    /// Set up, then trace a small HTTP server and client with `observer trace`.
    Demo,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::all(),
        Cmd::Test { cargo_test_args } => test(&cargo_test_args),
        Cmd::Demo => {
            setup::all()?;
            demo::demo()
        }
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
    let status = cmd.current_dir(root()).status().with_context(|| format!("starting {shown}"))?;
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
