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
    // The parsers' bounds hold at least one entry (0 would break the bound they state).
    for flag in [
        "--max-http-head-bytes",
        "--max-pending-requests",
        "--max-pending-statements",
        "--max-pending-cache-commands",
        "--max-parsers",
    ] {
        run_fails(
            &["run", "--pid", &pid, "--listen", "127.0.0.1:0", flag, "0"],
            &format!("{flag} must be positive"),
        );
    }
}

/// `observer run` with `args`, expected to fail at once with one line containing `expected`.
fn run_fails(args: &[&str], expected: &str) {
    let (code, err) = run(Command::new("timeout").arg("20").arg(observer_bin()).args(args));
    assert_ne!(code, 124, "{args:?} ran instead of failing");
    assert!(code == 1 || code == 2, "{args:?} exited {code}");
    assert_one_line(&err, expected);
}

#[test]
fn bad_flags_and_values_get_one_line() {
    run_fails(&["run", "--no-such-flag"], "unexpected argument '--no-such-flag'");
    run_fails(&["run", "--max-views", "lots"], "invalid value 'lots' for '--max-views <N>'");
    run_fails(
        &["run", "--listen", "localhost"],
        "--listen: \"localhost\" is neither ADDR:PORT nor unix:PATH",
    );
    run_fails(&["run", "--tls-cert", "/etc/hostname"], "--tls-key <FILE>");
    run_fails(&["frobnicate", "now"], "unrecognized subcommand 'frobnicate'");
}

#[test]
fn unreadable_or_malformed_config_and_routes_files_are_named() {
    let dir = harness::TempDir::new("cli-files");
    let file = |name: &str, text: &str| {
        let p = format!("{}/{name}", dir.path());
        std::fs::write(&p, text).unwrap();
        p
    };
    let missing = format!("{}/absent.toml", dir.path());
    run_fails(&["run", "--config", &missing], &format!("reading {missing}: No such file"));
    let bad = file("bad.toml", "job = \"shop\"\nmax_views = \"many\"\n");
    run_fails(&["run", "--config", &bad], &format!("{bad}: line 2: invalid type"));
    let unknown = file("unknown.toml", "lisen = \"0.0.0.0:1\"\n");
    run_fails(&["run", "--config", &unknown], "unknown field `lisen`");
    let missing = format!("{}/absent.routes", dir.path());
    run_fails(&["run", "--routes", &missing], &format!("reading the routes file {missing}: No such file"));
    let routes = file("bad.routes", "/shop/ shop:index\n/items/<int:pk oops\n");
    run_fails(&["run", "--routes", &routes], "line 2");
    // A file it cannot read (a directory stands in for a mode it has no right to).
    run_fails(&["run", "--config", dir.path()], &format!("reading {}", dir.path()));
    let cert = file("cert.pem", "not a certificate\n");
    run_fails(
        &["run", "--listen", "127.0.0.1:0", "--tls-cert", &cert, "--tls-key", &cert],
        "no certificate in",
    );
}

#[test]
fn run_refuses_a_pid_that_does_not_exist() {
    run_fails(&["run", "--pid", "4000000"], "no process with pid 4000000");
}

#[test]
fn a_port_in_use_is_refused_before_anything_is_traced() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    run_fails(
        &["run", "--listen", &addr, "--pid", &std::process::id().to_string()],
        &format!("listening on {addr}: the address is already in use"),
    );
}
