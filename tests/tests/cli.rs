//! The command line fails with one clear line, never a backtrace.

mod harness;

use std::process::Command;

use harness::{ebpf_available, observer_bin};

/// Runs the observer; returns (exit code, stderr lines).
fn run(cmd: &mut Command) -> (i32, Vec<String>) {
    let out = cmd.output().expect("run observer");
    let stderr = String::from_utf8_lossy(&out.stderr).lines().map(String::from).collect();
    (out.status.code().unwrap_or(-1), stderr)
}

fn assert_one_line(stderr: &[String], expected: &str) {
    assert_eq!(stderr.len(), 1, "one line expected: {stderr:#?}");
    assert!(stderr[0].starts_with("observer: "), "{stderr:?}");
    assert!(stderr[0].contains(expected), "{:?} lacks {expected:?}", stderr[0]);
    assert!(!stderr[0].contains("panicked"), "{stderr:?}");
}

#[test]
fn trace_without_a_selector_says_what_is_missing() {
    let (code, err) = run(Command::new(observer_bin()).arg("trace"));
    assert_eq!(code, 1);
    assert_one_line(&err, "--pid PID, --comm NAME or --port PORT");
}

#[test]
fn unknown_pid_is_refused() {
    let (code, err) = run(Command::new(observer_bin()).args(["trace", "--pid", "4000000"]));
    assert_eq!(code, 1);
    assert_one_line(&err, "no process with pid 4000000");
}

#[test]
fn unprivileged_user_is_told_to_run_as_root() {
    if !ebpf_available() {
        return;
    }
    // Drop to nobody with no capabilities.
    let (code, err) = run(Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups", "--inh-caps=-all"])
        .arg(observer_bin())
        .args(["trace", "--pid", "1"]));
    assert_eq!(code, 1);
    assert_one_line(&err, "needs root");
}

#[test]
fn invalid_bounds_are_refused_with_the_flag_name() {
    if !ebpf_available() {
        return;
    }
    let pid = std::process::id().to_string();
    for (flag, value, expected) in [
        ("--capture-bytes", "100000", "--capture-bytes must be at most 8192"),
        ("--ring-buffer-bytes", "5000", "--ring-buffer-bytes must be a power of two"),
        ("--max-connections", "0", "--max-connections must be positive"),
    ] {
        let (code, err) = run(Command::new(observer_bin()).args(["trace", "--pid", &pid, flag, value]));
        assert_eq!(code, 1, "{flag} {value}");
        assert_one_line(&err, expected);
    }
}
