//! Command line: `observer trace` (and, from the HTTP issue on, `observer run`).

use std::{process::ExitCode, time::Duration};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand};

use crate::{
    ebpf::{Options, Probe},
    pump::Pump,
    targets::Selector,
    trace::Printer,
};

#[derive(Debug, Parser)]
#[command(
    name = "observer",
    version,
    about = "django-prometheus metrics for Django processes, from their socket syscalls (eBPF)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print what the selected processes send and receive on their sockets, one record a line.
    Trace(TraceArgs),
}

/// Bounds of the kernel side; each has a counter in the loss report when it bites.
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Bytes captured per syscall (the rest is counted, not copied).
    #[arg(long, default_value_t = crate::DEFAULT_CAPTURE_BYTES, value_name = "N")]
    capture_bytes: u32,
    /// Size of the kernel-to-userspace ring buffer (a power of two).
    #[arg(long, default_value_t = 8 << 20, value_name = "BYTES")]
    ring_buffer_bytes: u32,
    /// Sockets of traced processes the kernel tables can hold.
    #[arg(long, default_value_t = 65_536, value_name = "N")]
    max_connections: u32,
    /// Processes that can be traced at once.
    #[arg(long, default_value_t = 8_192, value_name = "N")]
    max_processes: u32,
    /// Syscalls in flight at once (one per thread of a traced process).
    #[arg(long, default_value_t = 16_384, value_name = "N")]
    max_inflight_syscalls: u32,
}

impl ProbeArgs {
    fn options(&self) -> Options {
        Options {
            capture_bytes: self.capture_bytes,
            ring_bytes: self.ring_buffer_bytes,
            max_connections: self.max_connections,
            max_processes: self.max_processes,
            max_inflight: self.max_inflight_syscalls,
        }
    }
}

#[derive(Debug, Args)]
struct TraceArgs {
    /// Trace this process and its descendants (repeatable).
    #[arg(long, value_name = "PID")]
    pid: Vec<u32>,
    /// Trace processes with this exact name (/proc/PID/comm), now and when they start.
    #[arg(long, value_name = "NAME")]
    comm: Vec<String>,
    /// Trace processes listening on this TCP port.
    #[arg(long, value_name = "PORT")]
    port: Vec<u16>,
    /// JSON lines with the full captured bytes (base64), for test fixtures.
    #[arg(long)]
    json: bool,
    /// Bytes of payload shown per line in text mode.
    #[arg(long, default_value_t = 64, value_name = "N")]
    preview_bytes: usize,
    /// Turn on the kernel's BPF run-time statistics while tracing and print, at exit, how
    /// often each program ran and its average cost.
    #[arg(long)]
    program_stats: bool,
    /// Stop after this many seconds (default: until SIGINT/SIGTERM).
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    #[command(flatten)]
    probe: ProbeArgs,
}

/// Entry point of the `observer` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let result = match cli.command {
        Command::Trace(args) => run_async(trace(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes.
            let chain: Vec<String> = e.chain().map(ToString::to_string).collect();
            eprintln!("observer: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}

fn run_async(fut: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(fut)
}

/// SIGINT/SIGTERM handlers, installed before anything is traced so that a signal is never
/// taken with its default action (which would skip the final drain and counters).
struct Shutdown {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Shutdown {
    fn install() -> Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }

    /// Resolves on SIGINT or SIGTERM, or after `duration`.
    async fn wait(mut self, duration: Option<Duration>) {
        let timer = async {
            match duration {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
            () = timer => {}
        }
    }
}

async fn trace(args: TraceArgs) -> Result<()> {
    let selector = Selector { pids: args.pid.clone(), comms: args.comm.clone(), ports: args.port.clone() };
    if selector.is_empty() {
        bail!("say what to trace: --pid PID, --comm NAME or --port PORT");
    }
    for &pid in &args.pid {
        if crate::targets::read_process(pid).is_none() {
            bail!("no process with pid {pid}");
        }
    }
    let duration = args.duration.map(Duration::from_secs_f64);
    let shutdown = Shutdown::install()?;
    let opts = args.probe.options();
    let probe = Probe::load(&opts)?;
    // Statistics stay on while this fd is open (kernel.bpf_stats_enabled is reference counted).
    let stats_on = if args.program_stats {
        Some(aya::sys::enable_stats(aya::sys::Stats::RunTime).context("enabling BPF run-time statistics")?)
    } else {
        None
    };
    let mut pump = Pump::new(probe, selector, opts.max_connections as usize, true);
    let pids = pump.start();
    if pids.is_empty() {
        tracing::warn!("no process matches the selectors yet; waiting for one");
    }
    let mut printer = Printer::new(args.json, args.preview_bytes);
    printer.ready(&pids.iter().copied().collect::<Vec<_>>(), opts.capture_bytes);
    pump.run(&mut printer, shutdown.wait(duration)).await.context("reading the ring buffer")?;
    printer.counters(&pump.loss());
    if stats_on.is_some() {
        printer.programs(&pump.probe().program_stats());
    }
    Ok(())
}
