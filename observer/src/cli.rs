//! Command line: `observer trace` (and, from the HTTP issue on, `observer run`).

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand};

use crate::{
    config::FileConfig,
    ebpf::{Options, Probe},
    pipeline::{self, Pipeline},
    pump::Pump,
    server::{Listen, TlsFiles},
    targets::Selector,
    trace::Printer,
};

/// Where /metrics is served unless told otherwise.
const DEFAULT_LISTEN: &str = "0.0.0.0:9807";

#[derive(Debug, Parser)]
#[command(
    name = "observer",
    version,
    about = "django-prometheus metrics for Django processes, from their socket syscalls (eBPF)",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// With no subcommand: `observer run`.
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Trace the Django processes and serve their django-prometheus metrics on /metrics
    /// (the default).
    Run(Box<RunArgs>),
    /// Print what the selected processes send and receive on their sockets, one record a line.
    Trace(TraceArgs),
    /// A live screen for the node: per app and view, requests/s, latency, database
    /// statements and time per request, cache hit ratio, and the statement shapes each
    /// view repeats (normalised, no literals; shown here and nowhere else).
    Top(TopArgs),
}

/// Which apps, and how their views are named: shared by `run` and `top`.
#[derive(Debug, Args)]
struct AppArgs {
    /// With no --pid, --comm or --port, Django processes are found automatically.
    #[command(flatten)]
    select: SelectArgs,
    /// Routes file (`PATTERN VIEW_NAME` lines) for apps whose routes cannot be discovered.
    #[arg(long, value_name = "FILE")]
    routes: Option<PathBuf>,
    /// Do not run the apps' interpreters to discover their URL routes.
    #[arg(long)]
    no_route_discovery: bool,
}

#[derive(Debug, Args)]
struct TopArgs {
    #[command(flatten)]
    app: AppArgs,
    /// Repeats of one statement shape in a request that make it an N+1 suspect.
    #[arg(long, value_name = "N")]
    n_plus_one_threshold: Option<u32>,
    /// Stop after this many seconds (default: until SIGINT/SIGTERM).
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    #[command(flatten)]
    probe: ProbeArgs,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Where /metrics and /healthz are served: ADDR:PORT, or unix:PATH for a Unix socket
    /// [default: 0.0.0.0:9807].
    #[arg(long, value_name = "ADDR:PORT|unix:PATH")]
    listen: Option<String>,
    /// Serve /metrics over TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The TLS certificate's private key (PEM); needs --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    #[command(flatten)]
    app: AppArgs,
    /// `job` label of every series [default: django].
    #[arg(long, value_name = "NAME")]
    job: Option<String>,
    /// `namespace` label of every series.
    #[arg(long, value_name = "NAME")]
    namespace: Option<String>,
    /// `pod` label of every series.
    #[arg(long, value_name = "NAME")]
    pod: Option<String>,
    /// `container` label of every series.
    #[arg(long, value_name = "NAME")]
    container: Option<String>,
    /// `instance` label of every series [default: HOST:PORT of each app's listener].
    #[arg(long, value_name = "NAME")]
    instance: Option<String>,
    /// In a Kubernetes cluster: watch this node's pods and label each app with its pod's
    /// namespace, pod and container, and its job from the pod's `observer/job`
    /// annotation or label.
    #[arg(long)]
    kubernetes: bool,
    /// This node's name (the pods watched are those scheduled on it).
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    node_name: Option<String>,
    /// Settings file (TOML, the same keys as these flags); flags win.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Distinct templated views per app when its routes are unknown [default: 500].
    #[arg(long, value_name = "N")]
    max_views: Option<usize>,
    /// Count django_model_* for these models only (comma-separated labels), created at 0
    /// [default: every model of the app].
    #[arg(long, value_name = "LABELS", value_delimiter = ',')]
    models: Vec<String>,
    /// Distinct model labels per app [default: 1000].
    #[arg(long, value_name = "N")]
    max_models: Option<usize>,
    /// Do not count the apps' migrations (django_migrations_*) with their interpreters.
    #[arg(long)]
    no_migrations: bool,
    /// Seconds between migration counts of each app [default: 300].
    #[arg(long, value_name = "SECS")]
    migrations_interval: Option<u64>,
    /// Database statements sent and not yet answered per connection (a pipeline's depth)
    /// [default: 4096].
    #[arg(long, value_name = "N")]
    max_pending_statements: Option<usize>,
    /// Failed PostgreSQL connects held for libpq's retry with the other encryption
    /// (`sslmode=prefer`/`allow`) at once; past it one counts as two attempts
    /// [default: 256].
    #[arg(long, value_name = "N")]
    max_held_connect_failures: Option<usize>,
    /// SQLite prepared statements remembered (their shape and table), over all traced
    /// processes; past it one is counted without its shape [default: 65536].
    #[arg(long, value_name = "N")]
    max_sqlite_statements: Option<usize>,
    /// SQLite connections remembered (their database file, which names the alias);
    /// past it one's statements are counted only if the app has one SQLite database
    /// [default: 16384].
    #[arg(long, value_name = "N")]
    max_sqlite_connections: Option<usize>,
    /// Redis and memcached commands sent and not yet answered per connection
    /// [default: 4096].
    #[arg(long, value_name = "N")]
    max_pending_cache_commands: Option<usize>,
    /// Longest HTTP head kept while incomplete [default: 32768].
    #[arg(long, value_name = "BYTES")]
    max_http_head_bytes: Option<usize>,
    /// Pipelined requests waiting for a response, per connection [default: 64].
    #[arg(long, value_name = "N")]
    max_pending_requests: Option<usize>,
    /// Connections with parser state at once [default: 65536].
    #[arg(long, value_name = "N")]
    max_parsers: Option<usize>,
    /// A request in which one statement shape (its SQL with literals and IN-lists
    /// normalised) ran at least this many times counts in
    /// django_view_n_plus_one_requests_total [default: 10; 0 turns it off].
    #[arg(long, value_name = "N")]
    n_plus_one_threshold: Option<u32>,
    /// Turn on the kernel's BPF run-time statistics while running and export each
    /// program's runs and kernel time (observer_bpf_program_*). Costs about 20-40 ns per
    /// program run: for measuring, not for every day.
    #[arg(long)]
    bpf_stats: bool,
    #[command(flatten)]
    probe: ProbeArgs,
}

/// Bounds of the kernel side; each has a counter in the loss report when it bites.
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Bytes captured per syscall; the rest is counted, not copied [default: 4096].
    #[arg(long, value_name = "N")]
    capture_bytes: Option<u32>,
    /// Size of the kernel-to-userspace ring buffer, a power of two [default: 8388608].
    #[arg(long, value_name = "BYTES")]
    ring_buffer_bytes: Option<u32>,
    /// Sockets of traced processes the kernel tables can hold [default: 65536].
    #[arg(long, value_name = "N")]
    max_connections: Option<u32>,
    /// Processes that can be traced at once [default: 8192].
    #[arg(long, value_name = "N")]
    max_processes: Option<u32>,
    /// Syscalls in flight at once, one per thread of a traced process [default: 16384].
    #[arg(long, value_name = "N")]
    max_inflight_syscalls: Option<u32>,
    /// Library files whose symbol tables are remembered (what they are, where the
    /// uprobes go) [default: 8192].
    #[arg(long, value_name = "N")]
    max_library_files: Option<usize>,
    /// How long a library no traced process maps keeps its uprobes [default: 30].
    #[arg(long, value_name = "SECS")]
    uprobe_idle_grace: Option<u64>,
}

impl ProbeArgs {
    fn options(&self, file: &FileConfig) -> Options {
        let d = Options::default();
        Options {
            capture_bytes: self.capture_bytes.or(file.capture_bytes).unwrap_or(d.capture_bytes),
            ring_bytes: self.ring_buffer_bytes.or(file.ring_buffer_bytes).unwrap_or(d.ring_bytes),
            max_connections: self.max_connections.or(file.max_connections).unwrap_or(d.max_connections),
            max_processes: self.max_processes.or(file.max_processes).unwrap_or(d.max_processes),
            max_inflight: self.max_inflight_syscalls.or(file.max_inflight_syscalls).unwrap_or(d.max_inflight),
            libraries: crate::libs::Bounds {
                max_files: self
                    .max_library_files
                    .or(file.max_library_files)
                    .unwrap_or(d.libraries.max_files)
                    .max(1),
                idle_grace: self
                    .uprobe_idle_grace
                    .or(file.uprobe_idle_grace)
                    .map_or(d.libraries.idle_grace, Duration::from_secs),
            },
        }
    }
}

/// Which processes to trace.
#[derive(Debug, Args)]
struct SelectArgs {
    /// Trace this process and its descendants (repeatable).
    #[arg(long, value_name = "PID")]
    pid: Vec<u32>,
    /// Trace processes with this exact name (/proc/PID/comm), now and when they start.
    #[arg(long, value_name = "NAME")]
    comm: Vec<String>,
    /// Trace processes listening on this TCP port.
    #[arg(long, value_name = "PORT")]
    port: Vec<u16>,
}

impl SelectArgs {
    /// The selector, with the config file's selectors added.
    fn selector(&self, file: &FileConfig) -> Selector {
        let mut s = Selector {
            pids: [self.pid.as_slice(), &file.pid].concat(),
            comms: [self.comm.as_slice(), &file.comm].concat(),
            ports: [self.port.as_slice(), &file.port].concat(),
            detect_django: false,
        };
        s.detect_django = s.is_empty();
        s
    }
}

#[derive(Debug, Args)]
struct TraceArgs {
    #[command(flatten)]
    select: SelectArgs,
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
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            eprintln!("observer: {} (see observer --help)", usage_error(&e.render().to_string()));
            return ExitCode::from(2);
        }
    };
    // top owns the terminal: only warnings and errors interleave with its screen.
    let default_level = if matches!(cli.command, Some(Command::Top(_))) { "warn" } else { "info" };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_level.into()),
        )
        .init();
    // A parser that panics costs its connection, not the agent (and prints no payload).
    crate::fault::install_hook();
    let result = match cli.command {
        Some(Command::Top(args)) => run_async(top(args)),
        Some(Command::Trace(args)) => run_async(trace(args)),
        Some(Command::Run(args)) => run_async(run(*args)),
        None => run_async(run(cli.run)),
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

/// clap's message without its `error: ` prefix, usage and tips: one line, like every
/// other failure of the agent.
fn usage_error(rendered: &str) -> String {
    // The message is the first paragraph ("...not provided:" lists the flags under it).
    let message: Vec<&str> =
        rendered.lines().map(str::trim).skip_while(|l| l.is_empty()).take_while(|l| !l.is_empty()).collect();
    let message = message.join(" ");
    let message = message.trim_start_matches("error: ");
    if message.is_empty() { "bad arguments".into() } else { message.to_string() }
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

/// A routes file, read and checked now (a bad one stops the agent at start).
fn load_routes(path: Option<&PathBuf>) -> Result<Option<std::sync::Arc<str>>> {
    let Some(p) = path else { return Ok(None) };
    let text =
        std::fs::read_to_string(p).with_context(|| format!("reading the routes file {}", p.display()))?;
    let table = crate::views::RouteTable::from_routes_file(&text)
        .map_err(|e| anyhow::anyhow!("routes file {}: {e}", p.display()))?;
    tracing::info!(routes = table.len(), file = %p.display(), "routes file loaded");
    Ok(Some(std::sync::Arc::<str>::from(text)))
}

/// The terminal's width, when stdout is one.
fn terminal_width() -> Option<usize> {
    let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ fills a winsize we own.
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    (ok && ws.ws_col > 0).then_some(usize::from(ws.ws_col))
}

async fn top(args: TopArgs) -> Result<()> {
    let selector = args.app.select.selector(&FileConfig::default());
    check_pids(&selector)?;
    let d = pipeline::Settings::default();
    let settings = pipeline::Settings {
        routes_file: load_routes(args.app.routes.as_ref())?,
        discover_routes: !args.app.no_route_discovery,
        migrations: false,
        n_plus_one_threshold: args.n_plus_one_threshold.unwrap_or(d.n_plus_one_threshold),
        // The only place shapes' texts are kept.
        postgres: crate::protocol::postgres::Limits { keep_shapes: true, ..d.postgres },
        ..d
    };
    let duration = args.duration.map(Duration::from_secs_f64);
    let shutdown = Shutdown::install()?;
    let opts = args.probe.options(&FileConfig::default());
    let probe = Probe::load(&opts)?;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let screen = crate::top::Top::new(Box::new(std::io::stdout()), tty, terminal_width().unwrap_or(160));
    let shared = std::sync::Arc::new(std::sync::Mutex::new(crate::server::Exposition::default()));
    let mut pipeline = Pipeline::new(settings, shared).with_top(screen);
    let mut pump = Pump::new(probe, selector, &opts, false);
    pump.start(&mut pipeline);
    pump.run(&mut pipeline, shutdown.wait(duration)).await.context("reading the ring buffer")?;
    Ok(())
}

/// A --pid that names no process is a typo, not a process to wait for (PIDs are not
/// reused on purpose).
fn check_pids(selector: &Selector) -> Result<()> {
    for &pid in &selector.pids {
        if crate::targets::read_process(pid).is_none() {
            bail!("no process with pid {pid}");
        }
    }
    Ok(())
}

async fn trace(args: TraceArgs) -> Result<()> {
    // trace has no detection: it needs an explicit selector.
    let selector = args.select.selector(&FileConfig::default());
    if selector.detect_django {
        bail!("say what to trace: --pid PID, --comm NAME or --port PORT");
    }
    check_pids(&selector)?;
    let duration = args.duration.map(Duration::from_secs_f64);
    let shutdown = Shutdown::install()?;
    let opts = args.probe.options(&FileConfig::default());
    let probe = Probe::load(&opts)?;
    // Statistics stay on while this fd is open (kernel.bpf_stats_enabled is reference counted).
    let stats_on = if args.program_stats {
        Some(aya::sys::enable_stats(aya::sys::Stats::RunTime).context("enabling BPF run-time statistics")?)
    } else {
        None
    };
    let mut pump = Pump::new(probe, selector, &opts, true);
    let mut printer = Printer::new(args.json, args.preview_bytes);
    let pids = pump.start(&mut printer);
    if pids.is_empty() {
        tracing::warn!("no process matches the selectors yet; waiting for one");
    }
    printer.ready(&pids.iter().copied().collect::<Vec<_>>(), opts.capture_bytes);
    pump.run(&mut printer, shutdown.wait(duration)).await.context("reading the ring buffer")?;
    printer.counters(&pump.loss());
    if stats_on.is_some() {
        printer.programs(&pump.probe().program_stats());
    }
    Ok(())
}

async fn run(args: RunArgs) -> Result<()> {
    let file = match &args.config {
        Some(p) => FileConfig::load(p).map_err(anyhow::Error::msg)?,
        None => FileConfig::default(),
    };
    let pick = |a: &Option<String>, f: &Option<String>| a.clone().or_else(|| f.clone());
    let selector = args.app.select.selector(&file);
    check_pids(&selector)?;
    let listen: Listen = pick(&args.listen, &file.listen)
        .unwrap_or_else(|| DEFAULT_LISTEN.to_string())
        .parse()
        .map_err(|e| anyhow::anyhow!("--listen: {e}"))?;
    let tls = match (
        args.tls_cert.as_ref().or(file.tls_cert.as_ref()),
        args.tls_key.as_ref().or(file.tls_key.as_ref()),
    ) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert: cert.clone(), key: key.clone() }),
        (None, None) => None,
        _ => bail!("TLS needs both a certificate and a key (tls_cert and tls_key)"),
    };
    let routes_file = load_routes(args.app.routes.as_ref().or(file.routes.as_ref()))?;
    let d = pipeline::Settings::default();
    let http = crate::protocol::http1::Limits {
        max_head_bytes: args
            .max_http_head_bytes
            .or(file.max_http_head_bytes)
            .unwrap_or(d.http.max_head_bytes),
        max_pending: args.max_pending_requests.or(file.max_pending_requests).unwrap_or(d.http.max_pending),
    };
    let mut settings = pipeline::Settings {
        job: pick(&args.job, &file.job).unwrap_or(d.job),
        namespace: pick(&args.namespace, &file.namespace).unwrap_or_default(),
        pod: pick(&args.pod, &file.pod).unwrap_or_default(),
        container: pick(&args.container, &file.container).unwrap_or_default(),
        instance: pick(&args.instance, &file.instance),
        kubernetes: None,
        routes_file,
        discover_routes: !args.app.no_route_discovery && file.route_discovery.unwrap_or(true),
        discovery_timeout: d.discovery_timeout,
        max_views: args.max_views.or(file.max_views).unwrap_or(d.max_views),
        http,
        max_parsers: args.max_parsers.or(file.max_parsers).unwrap_or(d.max_parsers),
        postgres: crate::protocol::postgres::Limits {
            max_pending: args
                .max_pending_statements
                .or(file.max_pending_statements)
                .unwrap_or(d.postgres.max_pending),
            ..d.postgres
        },
        models: if args.models.is_empty() { file.models.clone() } else { Some(args.models.clone()) },
        max_models: args.max_models.or(file.max_models).unwrap_or(d.max_models),
        cache_commands: args
            .max_pending_cache_commands
            .or(file.max_pending_cache_commands)
            .unwrap_or(d.cache_commands),
        db_aliases: file.databases.clone(),
        caches: file.caches.clone(),
        migrations: !args.no_migrations && file.migrations.unwrap_or(true),
        migrations_interval: args
            .migrations_interval
            .or(file.migrations_interval)
            .map_or(d.migrations_interval, Duration::from_secs),
        discovery_delay: d.discovery_delay,
        n_plus_one_threshold: args
            .n_plus_one_threshold
            .or(file.n_plus_one_threshold)
            .unwrap_or(d.n_plus_one_threshold),
        max_held_connect_failures: args
            .max_held_connect_failures
            .or(file.max_held_connect_failures)
            .unwrap_or(d.max_held_connect_failures),
        sqlite: crate::protocol::sqlite::Limits {
            max_statements: args
                .max_sqlite_statements
                .or(file.max_sqlite_statements)
                .unwrap_or(d.sqlite.max_statements),
            max_connections: args
                .max_sqlite_connections
                .or(file.max_sqlite_connections)
                .unwrap_or(d.sqlite.max_connections),
            ..d.sqlite
        },
    };
    // A bound of 0 would hold nothing, and the parsers' bounds are at least one entry.
    for (flag, v) in [
        ("--max-http-head-bytes", settings.http.max_head_bytes),
        ("--max-pending-requests", settings.http.max_pending),
        ("--max-pending-statements", settings.postgres.max_pending),
        ("--max-pending-cache-commands", settings.cache_commands),
        ("--max-parsers", settings.max_parsers),
        ("--max-held-connect-failures", settings.max_held_connect_failures),
        ("--max-sqlite-statements", settings.sqlite.max_statements),
        ("--max-sqlite-connections", settings.sqlite.max_connections),
    ] {
        if v == 0 {
            bail!("{flag} must be positive");
        }
    }
    if args.kubernetes || file.kubernetes.unwrap_or(false) {
        let node = pick(&args.node_name, &file.node_name).context(
            "--kubernetes needs the node's name: --node-name or NODE_NAME (the downward API's spec.nodeName)",
        )?;
        match crate::k8s::spawn(&node).await {
            Ok(store) => {
                tracing::info!(
                    node,
                    "watching this node's pods for the apps' namespace, pod and container labels"
                );
                settings.kubernetes = Some(store);
            }
            Err(e) => tracing::error!(error = %e, "cannot reach the Kubernetes API: apps get no pod labels"),
        }
    }
    let shutdown = Shutdown::install()?;
    // Bound before the programs load: a port in use or a bad certificate stops the agent
    // before it touches the kernel. /healthz says 503 until the pump reports.
    let shared = std::sync::Arc::new(std::sync::Mutex::new(crate::server::Exposition::default()));
    let bound = crate::server::serve(&listen, tls.as_ref(), shared.clone()).await?;
    tracing::info!(address = %bound, tls = tls.is_some(), "serving /metrics and /healthz");
    let opts = args.probe.options(&file);
    let probe = Probe::load(&opts)?;
    // Statistics stay on while this fd is open (kernel.bpf_stats_enabled is reference counted).
    let _stats_on = if args.bpf_stats {
        Some(aya::sys::enable_stats(aya::sys::Stats::RunTime).context("enabling BPF run-time statistics")?)
    } else {
        None
    };
    if selector.detect_django {
        tracing::info!("no --pid, --comm or --port: tracing the Django processes found on this host");
    }
    let mut pipeline = Pipeline::new(settings, shared);
    let mut pump = Pump::new(probe, selector, &opts, false);
    pump.start(&mut pipeline);
    pump.run(&mut pipeline, shutdown.wait(None)).await.context("reading the ring buffer")?;
    tracing::info!("stopped");
    Ok(())
}
