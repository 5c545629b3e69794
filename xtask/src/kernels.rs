//! The kernel matrix: the eBPF tests on the kernels users run, each booted in a qemu guest
//! by virtme-ng over a read-only view of this machine's root filesystem (the build, the
//! venv and the Debian services are this machine's; the guest writes to overlays).
//!
//! Kernels come from Debian by package name (Debian 12's stock `linux-image-amd64`, and
//! the 6.12 LTS that bookworm carries as `linux-image-6.12-amd64`), downloaded and
//! unpacked into target/kernels/ without installing them: the host's boot setup is not
//! touched. Guests run under KVM where it can boot them; otherwise (no /dev/kvm, or a
//! KVM that cannot run unmodified kernels, such as PVM in a nested sandbox) under
//! qemu's software emulation, said loudly, with every wait of the tests scaled by
//! `OBSERVER_TEST_SLOWDOWN` and the lean `core` suite instead of the whole one.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{root, run};

/// A kernel of the default matrix: its short name and Debian's meta package for it.
pub struct Kernel {
    pub name: &'static str,
    pub meta: &'static str,
}

/// Debian 12's stock kernel (6.1) and the 6.12 LTS from bookworm's security archive.
pub const DEFAULT: &[Kernel] = &[
    Kernel { name: "6.1", meta: "linux-image-amd64" },
    Kernel { name: "6.12", meta: "linux-image-6.12-amd64" },
];

/// virtme-ng, pinned, in its own venv (target/vng).
const VIRTME_NG: &str = "virtme-ng==1.42";

/// How much slower a guest under software emulation runs the tests than this machine
/// (measured: the recycling test took 65 s in a 6.1 guest, 2.8 s here).
const TCG_SLOWDOWN: u32 = 25;

/// The tests a guest runs: (test binary, name filter; empty for all of them).
/// `core` is what software emulation affords: every kernel-facing path once (every data
/// syscall over IPv4, IPv6 and Unix sockets, forks and fd reuse, the ring buffer's loss
/// accounting, refused connects, attaching to open connections), fork tracking under
/// recycling two levels deep, PostgreSQL, Redis and memcached end to end, and a killed
/// agent leaving nothing attached. `full` is every test. (Left out of `core`: the
/// 10,000 short-lived processes of the uprobes' lifecycle, a userspace bound that takes
/// 17 s here and would take minutes emulated; `full` runs it.)
const CORE: &[(&str, &str)] = &[
    ("observer-lib", "ebpf::"),
    ("capture", "--skip ten_thousand_short_lived_processes"),
    ("servers", "gunicorn_sync_4_workers_recycling_every_50_requests"),
    ("servers", "a_supervisor_whose_gunicorn_recycles_its_workers"),
    ("postgres", "postgres_metrics_match_django_prometheus_over_tcp_and_unix_sockets"),
    ("cache", "django_redis_matches_django_prometheus"),
    ("cache", "memcached_matches_django_prometheus_except_failures"),
    // Every SQLite program (the exec depth included) on a static build: seconds, where
    // the Django side-by-side takes a quarter of an hour under emulation.
    ("sqlite", "sqlite_calls_are_read_from_a_statically_linked_sqlite"),
    ("faults", "a_killed_agent_leaves_nothing_attached_and_a_new_one_picks_up_open_connections"),
];

/// What one guest is asked to run.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Suite {
    Core,
    Full,
}

/// A kernel image ready to boot.
pub struct Image {
    pub name: String,
    pub vmlinuz: PathBuf,
}

/// virtme-ng and qemu's pieces; the images of `wanted` (names of DEFAULT, or paths to a
/// vmlinuz whose modules sit under ../lib/modules, as in an unpacked .deb).
pub fn setup(wanted: &[String]) -> Result<Vec<Image>> {
    vng()?;
    wanted.iter().map(|w| image(w)).collect()
}

fn vng_bin() -> PathBuf {
    root().join("target/vng/bin/vng")
}

fn vng() -> Result<()> {
    let venv = root().join("target/vng");
    let marker = venv.join(".installed");
    if fs::read_to_string(&marker).is_ok_and(|v| v == VIRTME_NG) && vng_bin().exists() {
        return Ok(());
    }
    if venv.exists() {
        fs::remove_dir_all(&venv)?;
    }
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run(Command::new(venv.join("bin/pip")).args([
        "install",
        "-q",
        "--disable-pip-version-check",
        VIRTME_NG,
    ]))?;
    fs::write(&marker, VIRTME_NG)?;
    Ok(())
}

/// The concrete package a meta package depends on (`linux-image-amd64` ->
/// `linux-image-6.1.0-57-amd64`), from the local package lists.
fn resolve(meta: &str) -> Option<String> {
    let out = Command::new("apt-cache").args(["depends", meta]).stderr(Stdio::null()).output().ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let dep = l.trim().strip_prefix("Depends: ")?;
        dep.starts_with("linux-image-").then(|| dep.to_string())
    })
}

fn image(wanted: &str) -> Result<Image> {
    if wanted.contains('/') {
        let vmlinuz = PathBuf::from(wanted);
        if !vmlinuz.is_file() {
            bail!("no kernel image at {wanted}");
        }
        return Ok(Image { name: wanted.to_string(), vmlinuz });
    }
    let Some(k) = DEFAULT.iter().find(|k| k.name == wanted) else {
        let names: Vec<&str> = DEFAULT.iter().map(|k| k.name).collect();
        bail!("unknown kernel {wanted:?}: give one of {names:?} or a path to a vmlinuz");
    };
    let package = match resolve(k.meta) {
        Some(p) => p,
        None => {
            run(Command::new("apt-get").args(["update", "-q"]))?;
            resolve(k.meta).with_context(|| format!("Debian has no {}", k.meta))?
        }
    };
    let dir = root().join("target/kernels").join(&package);
    if !dir.join("boot").is_dir() {
        let debs = root().join("target/kernels/debs");
        fs::create_dir_all(&debs)?;
        run(Command::new("apt-get").args(["download", "-q", &package]).current_dir(&debs))?;
        let deb = fs::read_dir(&debs)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_"))))
            .with_context(|| format!("apt-get download {package} left no .deb"))?;
        let partial = root().join("target/kernels").join(format!("{package}.partial"));
        let _ = fs::remove_dir_all(&partial);
        fs::create_dir_all(&partial)?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
        fs::rename(&partial, &dir)?;
        fs::remove_file(&deb)?;
    }
    let vmlinuz = fs::read_dir(dir.join("boot"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        .with_context(|| format!("{package} has no vmlinuz"))?;
    Ok(Image { name: format!("{} ({package})", k.name), vmlinuz })
}

/// How guests run here, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// KVM when it can boot an unmodified kernel, which a short boot shows.
pub fn accel(probe: &Image) -> (Accel, String) {
    if !Path::new("/dev/kvm").exists() {
        return (Accel::Tcg, "no /dev/kvm".into());
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        // PVM runs only guests built for it; a distribution kernel stops in its first
        // instructions (a KVM emulation failure, or a silent hang).
        return (Accel::Tcg, "this machine's KVM is PVM, which runs only PVM guest kernels".into());
    }
    let out = root().join("target/kernels/probe");
    let _ = fs::remove_dir_all(&out);
    if fs::create_dir_all(&out).is_err() {
        return (Accel::Tcg, "cannot write target/kernels".into());
    }
    if fs::write(out.join("run.sh"), "echo ok > /tmp/kernels-out/ok\n").is_err() {
        return (Accel::Tcg, "cannot write target/kernels".into());
    }
    let mut cmd = guest(probe, Accel::Kvm, &out, "1G");
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    match run_for(&mut cmd, Duration::from_secs(60)) {
        Ok(()) if out.join("ok").exists() => (Accel::Kvm, "KVM boots this kernel".into()),
        _ => (Accel::Tcg, "KVM could not boot a distribution kernel here".into()),
    }
}

/// A virtme-ng guest of `image` running `out`/run.sh as root; `out` is mounted read-write
/// at /tmp/kernels-out, the repository is an overlay (writable in the guest only). The
/// script is a file: virtme-ng passes `--exec` on the kernel command line, which a long
/// one overflows (2 KiB on x86), and the guest then hangs.
fn guest(image: &Image, accel: Accel, out: &Path, memory: &str) -> Command {
    let mut c = Command::new(vng_bin());
    c.env(
        "PATH",
        format!("{}:{}", root().join("target/vng/bin").display(), std::env::var("PATH").unwrap_or_default()),
    )
    .arg("--run")
    .arg(&image.vmlinuz)
    .args(["--cpus", "2", "--memory", memory])
    .arg(format!("--rwdir=/tmp/kernels-out={}", out.display()))
    .arg(format!("--overlay-rwdir={}", root().display()))
    .arg(format!("--cwd={}", root().display()));
    if accel == Accel::Tcg {
        c.arg("--disable-kvm");
    }
    c.arg("--exec").arg("sh /tmp/kernels-out/run.sh").stdin(Stdio::null());
    c
}

/// Runs `cmd` and kills it (and its process group) past `limit`. Its exit status says
/// little (virtme-ng exits 255 when the guest lacks its script ports and falls back to
/// the console); what the guest wrote to its output directory says what ran.
fn run_for(cmd: &mut Command, limit: Duration) -> Result<()> {
    use std::os::unix::process::CommandExt as _;
    cmd.process_group(0);
    let mut child = cmd.spawn().context("starting virtme-ng")?;
    let start = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        if start.elapsed() > limit {
            // SAFETY: kill(2) on the process group of the child this function started.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            bail!("the guest ran past {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The test executables of the workspace's last `cargo test --no-run`, by target name.
pub fn test_binaries() -> Result<Vec<(String, PathBuf)>> {
    let out = crate::cargo()
        .args(["test", "--workspace", "--no-run", "--message-format=json", "-q"])
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the tests failed");
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if v["reason"] != "compiler-artifact" || v["profile"]["test"] != true {
            continue;
        }
        let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str()) else {
            continue;
        };
        // An integration test by its file name; a crate's own tests as `<crate>-lib` or
        // `<crate>-bin` (observer has both).
        let kinds = v["target"]["kind"].as_array().cloned().unwrap_or_default();
        let key = if kinds.iter().any(|k| k == "test") {
            name.to_string()
        } else if kinds.iter().any(|k| k == "bin") {
            format!("{name}-bin")
        } else {
            format!("{name}-lib")
        };
        bins.push((key, PathBuf::from(exe)));
    }
    Ok(bins)
}

/// The shell script a guest runs: each test binary with its filter, one at a time, each
/// one's output and exit status into /tmp/kernels-out.
fn script(bins: &[(String, PathBuf)], suite: Suite, slowdown: u32) -> Result<String> {
    let mut s = format!(
        "cd {root}\nexport CI=true OBSERVER_REQUIRE_EBPF=1 OBSERVER_TEST_SLOWDOWN={slowdown} \
         OBSERVER_TEST_LOG_DIR=/tmp/kernels-out/children RUST_BACKTRACE=1 PATH=\"$PATH:/usr/sbin:/sbin\"\n\
         mkdir -p /tmp/kernels-out/children\nuname -r > /tmp/kernels-out/uname\n",
        root = root().display()
    );
    // One test binary that hangs must not take the guest's whole budget: each gets what
    // its slowest test needs here (under a minute) scaled by the slowdown, and exit 124
    // (timeout's) in the results when it ran out.
    let limit = 60 * u64::from(slowdown);
    let picks: Vec<(String, &Path, &str)> = match suite {
        Suite::Full => bins
            .iter()
            .filter(|(n, _)| !n.starts_with("xtask"))
            .enumerate()
            .map(|(i, (n, p))| (format!("{i:02}-{n}"), p.as_path(), ""))
            .collect(),
        Suite::Core => CORE
            .iter()
            .enumerate()
            .map(|(i, (name, filter))| {
                let (_, p) =
                    bins.iter().find(|(n, _)| n == name).with_context(|| format!("no test binary {name}"))?;
                Ok((format!("{i:02}-{name}"), p.as_path(), *filter))
            })
            .collect::<Result<_>>()?,
    };
    for (tag, bin, filter) in picks {
        s.push_str(&format!(
            "timeout -k 10 {limit} {bin} {filter} --test-threads=1 > /tmp/kernels-out/{tag}.log 2>&1\n\
             echo \"{tag} $?\" >> /tmp/kernels-out/results\n",
            bin = bin.display()
        ));
    }
    s.push_str("echo done > /tmp/kernels-out/finished\n");
    Ok(s)
}

/// Runs the suite in a guest of each image, in sequence; fails if any test failed.
pub fn matrix(images: &[Image], suite: Option<Suite>) -> Result<()> {
    let bins = test_binaries()?;
    let (accel, why) = accel(&images[0]);
    let (slowdown, suite) = match accel {
        Accel::Kvm => (2, suite.unwrap_or(Suite::Full)),
        Accel::Tcg => {
            eprintln!(
                "xtask: *** kernel matrix under software emulation (qemu TCG), about {TCG_SLOWDOWN}x slower: {why}; \
                 running the core suite unless --kernel-suite full ***"
            );
            (TCG_SLOWDOWN, suite.unwrap_or(Suite::Core))
        }
    };
    let mut failed = Vec::new();
    for image in images {
        let out = root().join("target/kernels/runs").join(image.vmlinuz.file_name().unwrap_or_default());
        let _ = fs::remove_dir_all(&out);
        fs::create_dir_all(&out)?;
        let started = Instant::now();
        eprintln!("xtask: kernel {}: {suite:?} suite under {accel:?}", image.name);
        fs::write(out.join("run.sh"), script(&bins, suite, slowdown)?)?;
        let mut cmd = guest(image, accel, &out, "6G");
        cmd.stdout(fs::File::create(out.join("console.log"))?);
        cmd.stderr(fs::File::create(out.join("vng.log"))?);
        let limit = Duration::from_secs(match (accel, suite) {
            (Accel::Kvm, _) => 3600,
            (Accel::Tcg, Suite::Core) => 1800,
            (Accel::Tcg, Suite::Full) => 6 * 3600,
        });
        let ran = run_for(&mut cmd, limit);
        let results = fs::read_to_string(out.join("results")).unwrap_or_default();
        let uname = fs::read_to_string(out.join("uname")).unwrap_or_default();
        let finished = out.join("finished").exists();
        for line in results.lines() {
            let Some((tag, rc)) = line.rsplit_once(' ') else { continue };
            let ok = rc == "0";
            let summary = fs::read_to_string(out.join(format!("{tag}.log")))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.starts_with("test result:"))
                .map(|l| l.trim_start_matches("test result: ").to_string())
                .collect::<Vec<_>>()
                .join("; ");
            eprintln!("xtask:   {} {tag}: {summary}", if ok { "ok    " } else { "FAILED" });
            if !ok {
                failed.push(format!(
                    "{} {tag} (log: {})",
                    image.name,
                    out.join(format!("{tag}.log")).display()
                ));
            }
        }
        if !finished {
            failed.push(format!(
                "{}: the guest did not finish ({}; console: {})",
                image.name,
                ran.err().map_or_else(|| "no error".into(), |e| format!("{e:#}")),
                out.join("console.log").display()
            ));
        }
        eprintln!(
            "xtask: kernel {} (uname {}) done in {:.0} s",
            image.name,
            uname.trim(),
            started.elapsed().as_secs_f64()
        );
    }
    if !failed.is_empty() {
        bail!("kernel matrix failures:\n  {}", failed.join("\n  "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_core_suite_names_binaries_and_tests_that_exist() {
        let bins: Vec<(String, PathBuf)> =
            ["observer-lib", "capture", "servers", "postgres", "cache", "sqlite", "faults"]
                .iter()
                .map(|n| (n.to_string(), PathBuf::from(format!("/b/{n}"))))
                .collect();
        let s = script(&bins, Suite::Core, 25).unwrap();
        assert!(s.contains("OBSERVER_TEST_SLOWDOWN=25"));
        assert!(s.contains("/b/servers a_supervisor_whose_gunicorn_recycles_its_workers --test-threads=1"));
        assert_eq!(s.matches("echo \"").count(), CORE.len());
        // Every named test exists in its file, so that a rename cannot empty the suite.
        for (bin, filter) in CORE.iter().filter(|(b, f)| *b != "observer-lib" && !f.is_empty()) {
            let src = fs::read_to_string(root().join(format!("tests/tests/{bin}.rs"))).unwrap();
            let name = filter.trim_start_matches("--skip ");
            assert!(src.contains(&format!("fn {name}")), "{bin}.rs has no test {name}");
        }
        assert!(script(&bins[..2], Suite::Core, 1).is_err(), "a missing binary is an error");
    }
}
