//! Memory at scale: the observer's resident memory with 10K and 100K open idle
//! connections, through a churn of many connections opened and closed, and (see
//! `flood` in the parent module) under a URL flood. The traced server and the untraced
//! client are this program again (`xtask bench-conns`), so that every connection is one
//! HTTP exchange that then stays open, or is closed, exactly as told.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::{Subcommand, ValueEnum};
use serde::Serialize;
use socket2::{Domain, Socket, Type};

use super::{Observer, Plan, probe};
use crate::services::Guard;

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Mode {
    /// Keep every connection open after its exchange.
    Hold,
    /// Close every connection after its exchange.
    Churn,
}

#[derive(Debug, Subcommand)]
pub enum Conns {
    /// Accept on a loopback port (printed on stdout), answer one request per connection.
    Serve {
        #[arg(long, value_enum)]
        mode: Mode,
    },
    /// Open `count` connections to the server, one exchange each; with `hold`, print
    /// `ready` and keep them until stdin closes.
    Connect {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        count: u32,
        #[arg(long, value_enum)]
        mode: Mode,
        /// Source address 127.0.0.K (for `hold`, at most PER_PROCESS connections).
        #[arg(long, default_value_t = 2)]
        source_ip: u8,
    },
}

const REQUEST: &[u8] = b"GET /idle HTTP/1.1\r\nHost: bench\r\n\r\n";
const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n";
/// Connections held per process: below the open-file limit these machines allow without
/// CAP_SYS_RESOURCE (20000), and below the ephemeral port range of one source address.
pub const PER_PROCESS: u32 = 18_000;
/// Server processes holding connections (forked from the traced one, so traced too).
const SERVERS: u32 = 7;

/// Raises the soft open-file limit to the hard one.
fn raise_fd_limit() -> Result<()> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            bail!("reading RLIMIT_NOFILE: {}", std::io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            bail!("raising RLIMIT_NOFILE: {}", std::io::Error::last_os_error());
        }
    }
    anyhow::ensure!(
        lim.rlim_cur > u64::from(PER_PROCESS) + 100,
        "open-file limit {} is too low",
        lim.rlim_cur
    );
    Ok(())
}

/// Reads until `n` bytes came (or the peer closed).
fn read_n(s: &mut TcpStream, n: usize) -> std::io::Result<()> {
    let mut buf = [0u8; 256];
    let mut got = 0;
    while got < n {
        let k = s.read(&mut buf)?;
        if k == 0 {
            break;
        }
        got += k;
    }
    Ok(())
}

pub fn helper(cmd: Conns) -> Result<()> {
    raise_fd_limit()?;
    match cmd {
        Conns::Serve { mode } => {
            let l = TcpListener::bind("127.0.0.1:0")?;
            println!("{}", l.local_addr()?.port());
            std::io::stdout().flush()?;
            if mode == Mode::Hold {
                // Prefork, like gunicorn: each process accepts until it holds its share.
                for _ in 0..SERVERS {
                    // SAFETY: this process is single-threaded here; the child only uses
                    // its own copy of the listener and exits with the parent.
                    match unsafe { libc::fork() } {
                        0 => {
                            // SAFETY: prctl with plain integer arguments.
                            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
                            let mut held = Vec::new();
                            while held.len() < PER_PROCESS as usize {
                                let (mut s, _) = l.accept()?;
                                if read_n(&mut s, REQUEST.len()).is_ok() && s.write_all(RESPONSE).is_ok() {
                                    held.push(s);
                                }
                            }
                            loop {
                                thread::sleep(Duration::from_secs(3600));
                            }
                        }
                        -1 => bail!("fork: {}", std::io::Error::last_os_error()),
                        _ => {}
                    }
                }
                drop(l);
                loop {
                    thread::sleep(Duration::from_secs(3600));
                }
            }
            loop {
                let (mut s, _) = l.accept()?;
                if read_n(&mut s, REQUEST.len()).is_ok() && s.write_all(RESPONSE).is_ok() {
                    // Until the client's close (a reset).
                    let _ = read_n(&mut s, 1);
                }
            }
        }
        Conns::Connect { port, count, mode, source_ip } => {
            let mut held = Vec::with_capacity(if mode == Mode::Hold { count as usize } else { 0 });
            let to: SocketAddr = (Ipv4Addr::LOCALHOST, port).into();
            for i in 0..count {
                let k = match mode {
                    Mode::Hold => 0,
                    // Closed with a reset: no TIME_WAIT, but spread them anyway.
                    Mode::Churn => (i % 8) as u8,
                };
                let from: SocketAddr = (Ipv4Addr::new(127, 0, 0, source_ip + k), 0).into();
                let sock = Socket::new(Domain::IPV4, Type::STREAM, None)?;
                sock.bind(&from.into())?;
                sock.connect(&to.into()).with_context(|| format!("connection {i} from {from}"))?;
                let mut s: TcpStream = sock.into();
                s.write_all(REQUEST)?;
                read_n(&mut s, RESPONSE.len())?;
                match mode {
                    Mode::Hold => held.push(s),
                    Mode::Churn => {
                        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
                    }
                }
            }
            println!("ready");
            std::io::stdout().flush()?;
            if mode == Mode::Hold {
                let mut sink = Vec::new();
                let _ = std::io::stdin().read_to_end(&mut sink);
            }
            Ok(())
        }
    }
}

fn helper_cmd() -> Result<Command> {
    let mut c = Command::new(std::env::current_exe()?);
    c.arg("bench-conns");
    Ok(c)
}

/// An untraced client opening and closing `count` connections to `port`, one exchange each.
fn churn_client(port: u16, count: u32) -> Result<Child> {
    Ok(helper_cmd()?
        .args(["connect", "--port", &port.to_string(), "--count", &count.to_string()])
        .args(["--mode", "churn"])
        .stdout(Stdio::null())
        .spawn()?)
}

/// Runs a churn of `count` connections to completion.
pub(super) fn churn(port: u16, count: u32) -> Result<()> {
    let status = Guard(churn_client(port, count)?).0.wait()?;
    if !status.success() {
        bail!("the churn client failed: {status}");
    }
    Ok(())
}

/// The traced server: its PID and port.
pub(super) fn serve(mode: Mode) -> Result<(Guard, u16)> {
    let mut child = helper_cmd()?
        .args(["serve", "--mode", if mode == Mode::Hold { "hold" } else { "churn" }])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let port = line.trim().parse().with_context(|| format!("server said {line:?}"))?;
    Ok((Guard(child), port))
}

/// A client holding connections open until dropped.
struct Holder {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Holder {
    /// `count` connections (at most PER_PROCESS) from 127.0.0.`source_ip`.
    fn open(port: u16, count: u32, source_ip: u8) -> Result<Self> {
        let mut child = helper_cmd()?
            .args(["connect", "--port", &port.to_string(), "--count", &count.to_string()])
            .args(["--mode", "hold", "--source-ip", &source_ip.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take();
        let out: ChildStdout = child.stdout.take().context("stdout")?;
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        if line.trim() != "ready" {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the client did not open {count} connections");
        }
        Ok(Self { child, stdin })
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub open: u32,
    /// observer_connections: the connections the agent tracks.
    pub tracked: f64,
    pub rss_bytes: u64,
    /// observer_table_full_total: connections the bounded tables did not take.
    pub table_full: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Churn {
    pub connections: u32,
    pub seconds: f64,
    pub rss_start_bytes: u64,
    pub rss_end_bytes: u64,
    pub peak_rss_bytes: u64,
    /// (seconds since the start, RSS) every half second.
    pub rss_samples: Vec<(f64, u64)>,
    pub exchanges: f64,
    pub lost: f64,
    pub tracked_after: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    pub idle_baseline_rss_bytes: u64,
    pub idle: Vec<Point>,
    /// After the server with every held connection exited.
    pub idle_after_exit_rss_bytes: u64,
    pub churn: Churn,
}

fn wait_tracked(o: &Observer, at_least: f64) -> Result<probe::ObserverCounters> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let c = o.settled()?;
        if c.connections + c.table_full >= at_least || Instant::now() > deadline {
            return Ok(c);
        }
    }
}

pub fn memory(plan: &Plan, scratch: &Path) -> Result<Memory> {
    let quiet = ["--no-route-discovery", "--no-migrations"];
    // Idle connections.
    let (server, port) = serve(Mode::Hold)?;
    let observer =
        Observer::start(&[&quiet[..], &["--pid", &server.0.id().to_string()]].concat(), scratch, false)?;
    let baseline = {
        let _ = observer.settled()?;
        probe::rss(observer.pid()).0
    };
    let mut idle = Vec::new();
    let mut holders = Vec::new();
    let mut open = 0u32;
    let mut next_ip = 2u8;
    for &target in &plan.idle_connections {
        while open < target {
            let n = (target - open).min(PER_PROCESS);
            holders.push(Holder::open(port, n, next_ip)?);
            next_ip += 1;
            open += n;
        }
        let c = wait_tracked(&observer, f64::from(open))?;
        let p = Point {
            open,
            tracked: c.connections,
            rss_bytes: probe::rss(observer.pid()).0,
            table_full: c.table_full,
        };
        eprintln!(
            "bench:   {open} idle connections: {} tracked, observer RSS {:.1} MiB, table full {}",
            p.tracked,
            p.rss_bytes as f64 / 1048576.0,
            p.table_full
        );
        idle.push(p);
    }
    drop(holders);
    drop(server);
    thread::sleep(Duration::from_secs(2));
    let _ = observer.settled()?;
    let after_exit = probe::rss(observer.pid()).0;
    drop(observer);

    // Churn.
    let (server, port) = serve(Mode::Churn)?;
    let observer =
        Observer::start(&[&quiet[..], &["--pid", &server.0.id().to_string()]].concat(), scratch, false)?;
    let before = observer.settled()?;
    let rss_start = probe::rss(observer.pid()).0;
    let started = Instant::now();
    let mut client = churn_client(port, plan.churn_connections)?;
    let mut samples = Vec::new();
    let deadline = started + Duration::from_secs(900);
    let status = loop {
        if let Some(s) = client.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = client.kill();
            let _ = client.wait();
            bail!("the churn client did not finish in 15 minutes");
        }
        samples.push((started.elapsed().as_secs_f64(), probe::rss(observer.pid()).0));
        thread::sleep(Duration::from_millis(500));
    };
    let seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("the churn client failed: {status}");
    }
    let after = observer.settled()?;
    let (rss_end, peak) = probe::rss(observer.pid());
    let churn = Churn {
        connections: plan.churn_connections,
        seconds,
        rss_start_bytes: rss_start,
        rss_end_bytes: rss_end,
        peak_rss_bytes: peak,
        rss_samples: samples,
        exchanges: after.exchanges - before.exchanges,
        lost: after.lost - before.lost,
        tracked_after: after.connections,
    };
    eprintln!(
        "bench:   churn of {} connections in {seconds:.0} s: observer RSS {:.1} -> {:.1} MiB (peak {:.1}), {} exchanges, {} lost, {} still tracked",
        churn.connections,
        rss_start as f64 / 1048576.0,
        rss_end as f64 / 1048576.0,
        peak as f64 / 1048576.0,
        churn.exchanges,
        churn.lost,
        churn.tracked_after
    );
    drop(observer);
    drop(server);
    Ok(Memory { idle_baseline_rss_bytes: baseline, idle, idle_after_exit_rss_bytes: after_exit, churn })
}
