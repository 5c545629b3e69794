//! `cargo xtask setup`: everything the project needs, installed only when missing.
//!
//! - rust-src for the nightly toolchain (the eBPF crate is built with -Zbuild-std=core);
//! - Debian packages: LLVM 22 (bpf-linker links against it), the services the tests run
//!   (postgresql, redis-server, memcached, prometheus for promtool and a real server,
//!   nginx and uwsgi with its Python 3 plugin for the app-server tests),
//!   python3-venv, bpftool and strace;
//! - bpf-linker 0.13.0 built against LLVM 22 (the nightly's LLVM major);
//! - a Python venv at target/venv from tests/apps/requirements.txt (pinned).

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{root, run};

const DEBIAN_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "postgresql",
    "redis-server",
    "memcached",
    "prometheus",
    "nginx",
    "uwsgi",
    "uwsgi-plugin-python3",
    "python3-venv",
    "bpftool",
    "strace",
    "openssl",
    // A TLS library the agent does not probe (GnuTLS, through libcurl): the tests of
    // connections it cannot decrypt.
    "libcurl3-gnutls",
    // A client with OpenSSL linked in statically (its symbols in .symtab only).
    "gcc",
    "libssl-dev",
    // ... and one with SQLite linked in statically (libsqlite3.a).
    "libsqlite3-dev",
    // deploy checks: systemd-analyze verify; setpriv and unshare for the capability test.
    "systemd",
    "util-linux",
    // observer top's test drives it in a terminal.
    "tmux",
    // The kernel matrix: qemu guests by virtme-ng, whose initramfs is busybox; depmod.
    "qemu-system-x86",
    "busybox-static",
    "kmod",
    // cargo xtask bench: the load generator, and perf for its profile.
    "wrk",
    "linux-perf",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const PYTHON: &str = "/usr/bin/python3";

pub fn all() -> Result<()> {
    let started = Instant::now();
    rust_src()?;
    debian_packages()?;
    bpf_linker()?;
    venv()?;
    eprintln!("xtask: setup complete in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn rust_src() -> Result<()> {
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("the nightly toolchain is missing (rustup toolchain install nightly)")?;
    let core = Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core");
    if core.is_dir() {
        return Ok(());
    }
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-q"]).env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn bpf_linker() -> Result<()> {
    if output(Command::new("bpf-linker").arg("--version")).is_some_and(|v| v.contains(BPF_LINKER_VERSION)) {
        return Ok(());
    }
    let path = format!("{LLVM_PREFIX}/bin:{}", std::env::var("PATH").unwrap_or_default());
    run(Command::new("cargo")
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .env("PATH", path))?;
    if output(Command::new("bpf-linker").arg("--version")).is_none() {
        bail!("bpf-linker was installed but is not on PATH (add ~/.cargo/bin to PATH)");
    }
    Ok(())
}

/// The venv's requirements, hashed, mark a venv as up to date.
fn venv() -> Result<()> {
    let root = root();
    let reqs = root.join("tests/apps/requirements.txt");
    let venv = root.join("target/venv");
    let marker = venv.join(".requirements");
    let wanted = fs::read_to_string(&reqs).with_context(|| format!("reading {}", reqs.display()))?;
    if fs::read_to_string(&marker).is_ok_and(|have| have == wanted) && venv.join("bin/python").exists() {
        return Ok(());
    }
    if venv.exists() {
        fs::remove_dir_all(&venv).context("removing the outdated venv")?;
    }
    run(Command::new(PYTHON).arg("-m").arg("venv").arg(&venv))?;
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "-q", "--disable-pip-version-check", "-r"])
        .arg(&reqs))?;
    fs::write(&marker, wanted).context("writing the venv marker")?;
    Ok(())
}

/// cargo-fuzz, for `cargo xtask fuzz` (not needed by the tests).
pub fn cargo_fuzz() -> Result<()> {
    if output(Command::new("cargo").args(["fuzz", "--version"])).is_some() {
        return Ok(());
    }
    run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
}
