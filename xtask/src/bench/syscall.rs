//! What the syscall tracepoints cost the app per syscall: the part of the overhead that
//! is paid inside the app's own syscalls, split by what the kernel programs do.
//!
//! A driver (built here with rustc) makes one kind of syscall in a loop on demand:
//! `getppid` (no program of ours is attached to it: what enabling syscall tracepoints at
//! all costs every syscall), `write` of 64 bytes to /dev/null (a traced syscall on a file
//! that is not a socket: the programs run and return at their socket lookup), and a
//! 64-byte `write` plus `read` over a loopback TCP connection to itself (traced syscalls
//! on sockets: records are written). ns per call, from two drivers run alternately: with
//! no observer (before it starts and after it stopped), with the observer tracing the
//! process, and with the observer running but not tracing it (the tracepoints fire for
//! every task; the programs return at their first lookup).

use std::{fs, path::Path, thread, time::Duration};

use anyhow::Result;
use serde::Serialize;

use super::{
    Observer, Plan,
    report::Spread,
    uprobe::{Driver, driver_source, rustc},
};

const DRIVER_HEAD: &str = r#"
use std::io::{Read, Write};
unsafe extern "C" { #[link_name = "getppid"] fn libc_getppid() -> i32; }
"#;

const DRIVER_SETUP: &str = r#"
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (mut server, _) = l.accept().unwrap();
    client.set_nodelay(true).unwrap();
    let mut null = std::fs::OpenOptions::new().write(true).open("/dev/null").unwrap();
    let msg = [7u8; 64];
    let mut buf = [0u8; 64];
"#;

const DRIVER_CALL: &str = r#"
    match what {
        // SAFETY: a syscall without arguments.
        "getppid" => { std::hint::black_box(unsafe { libc_getppid() }); }
        "devnull" => { null.write_all(&msg).unwrap(); }
        _ => { client.write_all(&msg).unwrap(); server.read_exact(&mut buf).unwrap(); }
    }
"#;

/// The kinds of call, as the driver names them, and as the report does.
pub const CALLS: [(&str, &str); 3] = [
    ("getppid", "`getppid` (no program attached)"),
    ("devnull", "`write` 64 B to /dev/null (traced syscall, not a socket)"),
    ("socket", "`write` + `read` 64 B on a loopback TCP socket (two records)"),
];

#[derive(Debug, Clone, Serialize)]
pub struct SyscallCost {
    pub calls_per_sample: u64,
    /// By [`CALLS`]: bare, traced, observer running but the process not traced.
    pub calls: Vec<(String, Spread, Spread, Spread)>,
}

pub fn measure(plan: &Plan, scratch: &Path) -> Result<SyscallCost> {
    let dir = scratch.join("syscall");
    fs::create_dir_all(&dir)?;
    fs::write(dir.join("driver.rs"), driver_source(DRIVER_HEAD, DRIVER_SETUP, DRIVER_CALL))?;
    rustc(&dir, &["-o", "driver", "driver.rs"])?;
    let n: u64 = if plan.quick { 100_000 } else { 400_000 };
    let (mut traced, mut other) = (Driver::start(&dir)?, Driver::start(&dir)?);
    let mut bare = vec![Vec::new(); CALLS.len()];
    let mut on = vec![Vec::new(); CALLS.len()];
    let mut off = vec![Vec::new(); CALLS.len()];
    for (what, _) in CALLS {
        traced.sample(what, n)?;
        other.sample(what, n)?;
    }
    let both = |into: &mut Vec<Vec<f64>>, a: &mut Driver, b: &mut Driver| -> Result<()> {
        for (i, (what, _)) in CALLS.iter().enumerate() {
            into[i].push(a.sample(what, n)?);
            into[i].push(b.sample(what, n)?);
        }
        Ok(())
    };
    for _ in 0..plan.rounds {
        both(&mut bare, &mut traced, &mut other)?;
    }
    let observer = Observer::start(&["--pid", &traced.pid().to_string()], scratch, false)?;
    // The driver's connection is known to the agent once it has seen its sockets.
    thread::sleep(Duration::from_secs(2));
    for _ in 0..plan.rounds {
        for (i, (what, _)) in CALLS.iter().enumerate() {
            on[i].push(traced.sample(what, n)?);
            off[i].push(other.sample(what, n)?);
        }
    }
    drop(observer);
    for _ in 0..plan.rounds {
        both(&mut bare, &mut traced, &mut other)?;
    }
    let calls = CALLS
        .iter()
        .enumerate()
        .map(|(i, (what, _))| {
            let c = (
                what.to_string(),
                Spread::of(bare[i].clone()),
                Spread::of(on[i].clone()),
                Spread::of(off[i].clone()),
            );
            eprintln!(
                "bench:   {what}: {:.0} ns bare, {:.0} ns traced, {:.0} ns with the observer running, not traced",
                c.1.median, c.2.median, c.3.median
            );
            c
        })
        .collect();
    Ok(SyscallCost { calls_per_sample: n, calls })
}
