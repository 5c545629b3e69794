//! The apps traced. `lifecycle`: an app from its first process to its last (its
//! processes, labels, families, the backlog while it is discovered, adoption and sweep);
//! `background`: what is learnt of it off the pump (discovery, migrations).
//!
//! The rest asks the app itself: small Python scripts run with the target's own
//! interpreter, environment, working directory, user and mount namespace, without
//! changing the app. `discover` reads its URL resolver, settings, databases and models;
//! `migrations` counts its applied and unapplied migrations. A failure is reported (and
//! counted by the caller), never fatal.

pub mod background;
pub mod discover;
pub mod lifecycle;
#[cfg(test)]
mod lifecycle_tests;
pub mod migrations;
pub mod tls;

use std::{
    ffi::{CString, OsString},
    fs,
    io::Read as _,
    os::unix::{ffi::OsStringExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::targets::detect::HELPER_ENV;

/// Largest output read from a helper.
const MAX_OUTPUT: usize = 32 << 20;
/// The longest error message of a helper (the app's exception text) the agent logs.
const MAX_ERROR: usize = 512;

/// The start every helper script shares: finding the settings, `django.setup()`, and
/// printing the marked result.
const COMMON: &str = include_str!("common.py");

/// How to run Python as the target does.
#[derive(Debug, Clone)]
struct Launch {
    python: PathBuf,
    argv: Vec<String>,
    env: Vec<(OsString, OsString)>,
    cwd: PathBuf,
    uid: u32,
    gid: u32,
    /// The target's mount namespace, when it is not ours.
    mnt_ns: Option<PathBuf>,
}

fn nul_split(b: &[u8]) -> Vec<String> {
    b.split(|&c| c == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect()
}

fn status_id(status: &str, key: &str) -> Option<u32> {
    status.lines().find_map(|l| l.strip_prefix(key))?.split_whitespace().next()?.parse().ok()
}

fn is_python(path: &str) -> bool {
    Path::new(path).file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("python"))
}

fn launch_for(pid: u32) -> Result<Launch, String> {
    let proc_ = format!("/proc/{pid}");
    let argv = nul_split(&fs::read(format!("{proc_}/cmdline")).map_err(|e| format!("cmdline: {e}"))?);
    // The environment exactly as the app has it (its values are any bytes), so that the
    // helper imports the same settings from the same paths.
    let env: Vec<(OsString, OsString)> = fs::read(format!("{proc_}/environ"))
        .map_err(|e| format!("environ: {e}"))?
        .split(|&c| c == 0)
        .filter_map(|kv| {
            let eq = kv.iter().position(|&c| c == b'=')?;
            Some((OsString::from_vec(kv[..eq].to_vec()), OsString::from_vec(kv[eq + 1..].to_vec())))
        })
        .collect();
    let cwd = fs::read_link(format!("{proc_}/cwd")).map_err(|e| format!("cwd: {e}"))?;
    let status = crate::targets::read_proc_text(format!("{proc_}/status")).ok_or("status unreadable")?;
    // The interpreter named in the command line (a virtualenv's bin/python), not
    // /proc/PID/exe (the base interpreter, which misses the virtualenv).
    let exe = fs::read_link(format!("{proc_}/exe")).ok();
    // uwsgi embeds Python: its virtualenv is an option.
    let uwsgi_home = argv
        .windows(2)
        .find(|w| matches!(w[0].as_str(), "--virtualenv" | "--venv" | "--home" | "--pyhome" | "-H"))
        .map(|w| Path::new(&w[1]).join("bin/python"));
    let python = match (argv.first(), uwsgi_home) {
        (Some(a), _) if is_python(a) => PathBuf::from(a),
        (_, Some(home)) => home,
        _ => match env.iter().find(|(k, _)| k == "VIRTUAL_ENV") {
            Some((_, venv)) => Path::new(venv).join("bin/python"),
            None => match exe {
                Some(e) if is_python(&e.to_string_lossy()) => e,
                _ => PathBuf::from("python3"),
            },
        },
    };
    let ours = fs::read_link("/proc/self/ns/mnt").ok();
    let theirs = fs::read_link(format!("{proc_}/ns/mnt")).ok();
    Ok(Launch {
        python,
        argv,
        env,
        cwd,
        uid: status_id(&status, "Uid:").ok_or("no Uid")?,
        gid: status_id(&status, "Gid:").ok_or("no Gid")?,
        mnt_ns: (ours != theirs).then(|| PathBuf::from(format!("{proc_}/ns/mnt"))),
    })
}

/// Runs `script` as the app `pid` belongs to would run Python, and returns the JSON
/// that follows the last line starting with `marker` in its output.
fn run_script(pid: u32, script: &str, marker: &str, timeout: Duration) -> Result<String, String> {
    let l = launch_for(pid)?;
    let mut cmd = Command::new(&l.python);
    cmd.arg("-B").arg("-c").arg(script);
    cmd.env_clear().envs(l.env.iter().map(|(k, v)| (k, v)));
    cmd.env(HELPER_ENV, serde_json::to_string(&l.argv).unwrap_or_default());
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());

    let ns_fd = match &l.mnt_ns {
        Some(p) => Some(fs::File::open(p).map_err(|e| format!("mount namespace: {e}"))?),
        None => None,
    };
    let cwd = CString::new(l.cwd.as_os_str().as_encoded_bytes()).map_err(|_| "cwd has a NUL")?;
    let (uid, gid) = (l.uid, l.gid);
    let ns_raw = ns_fd.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe syscalls (setns, chdir, setgroups, setgid, setuid) on values
    // prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = ns_raw
                && libc::setns(fd, libc::CLONE_NEWNS) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::chdir(cwd.as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::geteuid() == 0 && uid != 0 {
                // Never run the app's code with more rights than the app has.
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    // Its own process group, so that what the app's code starts (a subprocess in a
    // settings module, a daemon thread's child) ends with it and cannot hold the pipe.
    cmd.process_group(0);
    let mut child = cmd.spawn().map_err(|e| format!("starting {}: {e}", l.python.display()))?;
    drop(ns_fd);
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = (&mut stdout).take(MAX_OUTPUT as u64).read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    let deadline = Instant::now() + timeout;
    let exited = loop {
        if exited_unreaped(child.id()) {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // The helper is a zombie or still running: its pid, and so its group's id, cannot
    // have been reused yet. Whatever is left in the group is ended.
    // SAFETY: kill(2) on the process group this function created.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    let _ = child.wait();
    if !exited {
        return Err(format!("timed out after {timeout:?}"));
    }
    // A process that left the group (setsid) may still hold the pipe: the reader is
    // abandoned then, not waited for.
    let out = rx.recv_timeout(Duration::from_secs(1)).map_err(|_| "the helper's output stayed open")?;
    marked_line(&String::from_utf8_lossy(&out), marker).map(str::to_string)
}

/// Whether `pid` (a child of this process) has exited, leaving it unreaped.
fn exited_unreaped(pid: u32) -> bool {
    // SAFETY: waitid with WNOWAIT only reads the child's state; info is a valid out-pointer.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let r = libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT);
        // With WNOHANG, a child still running leaves si_pid 0; an error (no such child)
        // means there is nothing left to wait for.
        r != 0 || info.si_pid() != 0
    }
}

/// The JSON after the last `marker` in a helper's output (the app may print too).
fn marked_line<'a>(out: &'a str, marker: &str) -> Result<&'a str, String> {
    out.lines().rev().find_map(|l| l.strip_prefix(marker)).ok_or_else(|| "no helper output".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in app: a Python process whose launch the helper copies.
    struct App(std::process::Child);

    impl App {
        fn start() -> App {
            // python3 is part of the machine's base system, as the agent's helpers need it.
            let child = Command::new("python3")
                .args(["-c", "import time; time.sleep(60)"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .expect("python3");
            App(child)
        }
    }

    impl Drop for App {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn running(pid: u32) -> bool {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with(['R', 'S', 'D'])))
            .unwrap_or(false)
    }

    #[test]
    fn a_subprocess_started_by_the_apps_code_neither_holds_the_helper_nor_outlives_it() {
        let app = App::start();
        let script = "import subprocess\np = subprocess.Popen(['sleep', '30'])\nprint('MARK' + str(p.pid), flush=True)";
        let started = Instant::now();
        let out = run_script(app.0.id(), script, "MARK", Duration::from_secs(20)).expect("helper result");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the helper waited on its grandchild: {:?}",
            started.elapsed()
        );
        let sleeper: u32 = out.trim().parse().expect("the grandchild's pid");
        let gone = Instant::now() + Duration::from_secs(5);
        while running(sleeper) && Instant::now() < gone {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!running(sleeper), "the app's subprocess outlived the helper");
    }

    #[test]
    fn a_helper_that_never_ends_is_ended_at_its_timeout() {
        let app = App::start();
        let script = "import time\ntime.sleep(60)";
        let started = Instant::now();
        let err = run_script(app.0.id(), script, "MARK", Duration::from_millis(500)).unwrap_err();
        assert!(err.contains("timed out"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    }
}
