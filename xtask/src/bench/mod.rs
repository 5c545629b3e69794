//! `cargo xtask bench`: what the observer costs a Django app, what the agent itself costs,
//! and how far it goes, side by side with django-prometheus.
//!
//! Three arms run in alternating rounds on the same machine, against the same private
//! PostgreSQL and Redis: (A) the plain test app under gunicorn, (B) the same app with
//! django-prometheus (middlewares, DB engine, cache backend), (C) the plain app traced by
//! `observer run`. Each round starts the arms in a rotated order and loads four endpoints
//! with wrk on loopback. Then a capacity ramp (nginx traced, no Django in the way), the
//! observer's memory at scale, and the userspace replay benchmarks (criterion). The TLS
//! part runs the same three arms with PostgreSQL (`sslmode=require`) and Redis
//! (`rediss://`) over TLS, the observer reading their plaintext from the app's OpenSSL;
//! the uprobe part measures what one probed library call costs. Results
//! go to target/bench/ as JSON and to stdout as the README's table.

mod capacity;
mod load;
mod probe;
mod report;
pub mod scale;
pub mod soak;
mod syscall;
mod uprobe;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use crate::{
    cargo, root, run,
    services::{Guard, Postgres, free_port, request, start_redis, start_redis_tls, wait_port},
};
use load::{Load, Wrk};
use probe::ObserverCounters;

/// How long and how often.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub quick: bool,
    pub rounds: usize,
    pub seconds: u64,
    pub connections: u32,
    pub workers: u32,
    pub capacity_seconds: u64,
    pub idle_connections: Vec<u32>,
    pub churn_connections: u32,
    pub flood_seconds: u64,
}

impl Plan {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                quick,
                rounds: 2,
                seconds: 4,
                connections: 4,
                workers: 2,
                capacity_seconds: 3,
                idle_connections: vec![10_000, 100_000],
                churn_connections: 100_000,
                flood_seconds: 5,
            }
        } else {
            Self {
                quick,
                rounds: 5,
                seconds: 10,
                connections: 4,
                workers: 2,
                capacity_seconds: 5,
                idle_connections: vec![10_000, 100_000],
                churn_connections: 1_000_000,
                flood_seconds: 20,
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Arm {
    /// The plain app.
    A,
    /// The app with django-prometheus.
    B,
    /// The plain app, traced by the observer.
    C,
    /// C with the kernel's BPF statistics on (`--bpf-stats`), run once after the rounds
    /// for the per-program kernel time only: the statistics themselves cost about a
    /// clock read per program run, so C runs without them.
    K,
    /// The plain app with the observer tracing another, idle process: what the syscall
    /// tracepoints, which run for every task on the node, cost a process that is not
    /// traced ([11]'s breakdown: C minus D is what tracing the app itself costs).
    D,
}

impl Arm {
    fn describe(self) -> &'static str {
        match self {
            Arm::A => "plain app",
            Arm::B => "django-prometheus",
            Arm::C => "plain app + observer",
            Arm::K => "observer, BPF statistics on",
            Arm::D => "plain app, observer tracing another process",
        }
    }
}

/// The endpoints loaded, by name: a cheap view, a database view, a cache view, a large
/// response.
pub const ENDPOINTS: &[(&str, &str)] =
    &[("page", "/"), ("db", "/db/list"), ("cache", "/cache/hit"), ("large", "/big")];

/// The TLS part's endpoints: the same database and cache views, their PostgreSQL and
/// Redis connections over TLS.
pub const TLS_ENDPOINTS: &[(&str, &str)] = &[("db-tls", "/db/list"), ("cache-tls", "/cache/hit")];

/// The SQLite part's endpoints (the app's database a SQLite file, read through uprobes
/// on its libsqlite3): a view making ten queries, and one reading 10,000 rows.
pub const SQLITE_ENDPOINTS: &[(&str, &str)] = &[("sqlite-10", "/db/ten"), ("sqlite-rows", "/db/rows")];

/// One wrk run of one endpoint in one arm, and what it cost.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub round: usize,
    pub arm: Arm,
    pub endpoint: &'static str,
    pub load: Load,
    /// CPU seconds of gunicorn's master and workers during the run.
    pub app_cpu_s: f64,
    /// Only in arm C.
    pub observer: Option<ObserverCost>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ObserverCost {
    pub cpu_s: f64,
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
    /// Time in our kernel programs (bpf_stats run_time_ns) and their runs.
    pub kernel_s: f64,
    pub kernel_runs: f64,
    /// Per program: (runs, seconds), for the programs that ran.
    pub programs: Vec<(String, f64, f64)>,
    pub records: f64,
    pub lost: f64,
    pub exchanges: f64,
    pub db_statements: f64,
    pub cache_gets: f64,
}

/// A scratch directory removed at the end.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The parts of the benchmark, in the order they run.
pub const PARTS: &[&str] =
    &["arms", "tls", "sqlite", "uprobe", "syscall", "flood", "capacity", "memory", "replay"];

pub fn bench(quick: bool, only: &[String]) -> Result<()> {
    if let Some(bad) = only.iter().find(|p| !PARTS.contains(&p.as_str())) {
        bail!("no benchmark part {bad}; have: {}", PARTS.join(", "));
    }
    let on = |part: &str| only.is_empty() || only.iter().any(|p| p == part);
    let plan = Plan::new(quick);
    let started = Instant::now();
    run(cargo().args(["build", "--release", "--quiet", "--package", "observer", "--package", "xtask"]))?;
    let scratch = Scratch(std::env::temp_dir().join(format!("observer-bench-{}", std::process::id())));
    fs::create_dir_all(&scratch.0)?;
    let machine = report::Machine::read();
    eprintln!("bench: {} on {} CPUs, kernel {}", machine.cpu, machine.cpus, machine.kernel);

    let mut runs = Vec::new();
    let mut flood_result = None;
    if on("arms") || on("flood") {
        let pg = Postgres::start()?;
        let env = AppEnv::postgres(&pg)?;
        migrate(&env)?;
        let (redis, redis_port) = start_redis(&pg.dir)?;
        let env = AppEnv { redis_port, ..env };
        if on("arms") {
            runs.extend(rounds(&plan, &env, ENDPOINTS, &scratch.0, &[Arm::A, Arm::B, Arm::C, Arm::D])?);
            eprintln!("bench: arm K ({}), once", Arm::K.describe());
            runs.extend(run_arm(&plan, 0, Arm::K, &env, ENDPOINTS, &scratch.0)?);
        }
        if on("flood") {
            eprintln!("bench: URL flood (routes unknown: the templated-view bound)");
            flood_result = Some(flood(&plan, &env, &scratch.0)?);
        }
        drop(redis);
        drop(pg);
    }
    if on("tls") {
        eprintln!("bench: the arms again, PostgreSQL and Redis over TLS");
        let pg = Postgres::start_tls()?;
        let env = AppEnv::postgres(&pg)?;
        migrate(&env)?;
        let (redis, redis_port) = start_redis_tls(&pg.dir)?;
        let env = AppEnv { redis_port, redis_tls: true, ..env };
        runs.extend(rounds(&plan, &env, TLS_ENDPOINTS, &scratch.0, &[Arm::A, Arm::B, Arm::C])?);
        drop(redis);
        drop(pg);
    }
    if on("sqlite") {
        eprintln!("bench: the arms on a SQLite database (10,000 rows)");
        let dir = scratch.0.join("sqlite");
        fs::create_dir_all(&dir)?;
        let (redis, redis_port) = start_redis(&dir)?;
        let file = dir.join("db.sqlite3");
        let settings = serde_json::json!({"name": file, "conn_max_age": 600}).to_string();
        let env = AppEnv {
            db: ("OBSERVER_TEST_SQLITE", settings),
            redis_port,
            redis_tls: false,
            down_port: free_port()?,
        };
        migrate(&env)?;
        manage(
            &env,
            &[
                "shell",
                "-c",
                "from shop.models import Item; Item.objects.bulk_create([Item(name='row-%d' % i, price=i % 100) for i in range(10000)], batch_size=500)",
            ],
        )?;
        runs.extend(rounds(&plan, &env, SQLITE_ENDPOINTS, &scratch.0, &[Arm::A, Arm::B, Arm::C])?);
        drop(redis);
    }
    let uprobe = if on("uprobe") {
        eprintln!("bench: the cost of one probed library call");
        Some(uprobe::measure(&plan, &scratch.0)?)
    } else {
        None
    };
    let syscall = if on("syscall") {
        eprintln!("bench: the cost of the syscall tracepoints per syscall");
        Some(syscall::measure(&plan, &scratch.0)?)
    } else {
        None
    };
    let capacity = if on("capacity") {
        eprintln!("bench: capacity ramp (nginx traced by the observer)");
        Some(capacity::ramp(&plan, &scratch.0)?)
    } else {
        None
    };
    let memory = if on("memory") {
        eprintln!("bench: memory at scale");
        Some(scale::memory(&plan, &scratch.0)?)
    } else {
        None
    };
    let replay = if on("replay") {
        eprintln!("bench: userspace replay (criterion)");
        report::replay(quick)?
    } else {
        Vec::new()
    };

    let results = report::Results::new(
        machine,
        plan,
        runs,
        capacity,
        memory,
        flood_result,
        uprobe,
        syscall,
        replay,
        started.elapsed(),
    );
    let dir = root().join("target/bench");
    fs::create_dir_all(&dir)?;
    let json = serde_json::to_string_pretty(&results)?;
    let name = format!("bench-{}.json", results.unix_time);
    fs::write(dir.join(&name), &json)?;
    fs::write(dir.join("latest.json"), &json)?;
    println!("{}", results.markdown());
    eprintln!(
        "bench: results in target/bench/{name} (and latest.json), {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Where the app's database and cache are.
struct AppEnv {
    /// The test app's settings variable for its database and their JSON.
    db: (&'static str, String),
    redis_port: u16,
    /// Redis serves TLS (`rediss://`).
    redis_tls: bool,
    down_port: u16,
}

impl AppEnv {
    /// On `pg`, its failing aliases left out; the cache's port set by the caller.
    fn postgres(pg: &Postgres) -> Result<Self> {
        let mut settings: serde_json::Value = serde_json::from_str(&pg.settings())?;
        settings["failing_aliases"] = false.into();
        let db = ("OBSERVER_TEST_PG", settings.to_string());
        Ok(Self { db, redis_port: 0, redis_tls: false, down_port: free_port()? })
    }
}

/// `arms` in alternating rounds, each round in a rotated order.
fn rounds(
    plan: &Plan,
    env: &AppEnv,
    endpoints: &[(&'static str, &'static str)],
    scratch: &Path,
    arms: &[Arm],
) -> Result<Vec<Run>> {
    let mut runs = Vec::new();
    for round in 0..plan.rounds {
        for i in 0..arms.len() {
            let arm = arms[(round + i) % arms.len()];
            eprintln!("bench: round {}/{}, arm {arm:?} ({})", round + 1, plan.rounds, arm.describe());
            runs.extend(run_arm(plan, round, arm, env, endpoints, scratch)?);
        }
    }
    Ok(runs)
}

fn venv() -> PathBuf {
    root().join("target/venv/bin")
}

fn app_dir() -> PathBuf {
    root().join("tests/apps/djangoapp")
}

fn migrate(env: &AppEnv) -> Result<()> {
    manage(env, &["migrate", "--verbosity", "0"])
}

/// `manage.py ARGS` of the test app on `env`'s database.
fn manage(env: &AppEnv, args: &[&str]) -> Result<()> {
    let out = Command::new(venv().join("python"))
        .arg("manage.py")
        .args(args)
        .current_dir(app_dir())
        .env(env.db.0, &env.db.1)
        .output()
        .context("manage.py (cargo xtask setup makes the venv)")?;
    if !out.status.success() {
        bail!("manage.py {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The test app under gunicorn (sync workers, persistent database connections).
fn start_app(plan: &Plan, arm: Arm, env: &AppEnv, port: u16) -> Result<Guard> {
    // rediss:// with the server's certificate not checked (made by the bench).
    let location = if env.redis_tls {
        format!("rediss://127.0.0.1:{}/0?ssl_cert_reqs=none", env.redis_port)
    } else {
        format!("redis://127.0.0.1:{}/0", env.redis_port)
    };
    let cache = format!(
        r#"{{"kind": "django_redis", "location": "{location}", "down": "redis://127.0.0.1:{}/0"}}"#,
        env.down_port
    );
    let mut cmd = Command::new(venv().join("python"));
    cmd.arg(venv().join("gunicorn"))
        .args(["--chdir", app_dir().to_str().context("path")?])
        .args(["--bind", &format!("127.0.0.1:{port}"), "--workers", &plan.workers.to_string()])
        .args(["--log-level", "warning", "--backlog", "2048"])
        .arg("testproj.wsgi:application")
        .env(env.db.0, &env.db.1)
        .env("OBSERVER_TEST_CACHE", cache)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if arm == Arm::B {
        cmd.env("OBSERVER_TEST_DJANGO_PROMETHEUS", "1");
    }
    let app = Guard(cmd.spawn().context("starting gunicorn (cargo xtask setup makes the venv)")?);
    wait_port(port)?;
    Ok(app)
}

/// `observer run` (release build) with `args`; its /metrics on a free port.
pub struct Observer {
    guard: Guard,
    pub port: u16,
    log: PathBuf,
}

impl Observer {
    pub fn start(args: &[&str], scratch: &Path, bpf_stats: bool) -> Result<Self> {
        let port = free_port()?;
        let log = scratch.join(format!("observer-{port}.log"));
        let child = Command::new(root().join("target/release/observer"))
            .args(["run", "--listen", &format!("127.0.0.1:{port}")])
            .args(if bpf_stats { &["--bpf-stats"][..] } else { &[] })
            .args(args)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .context("starting observer run")?;
        let me = Self { guard: Guard(child), port, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if wait_port(port).is_ok() && request(port, "GET", "/healthz", "", "").is_ok_and(|r| r.0 == 200) {
                return Ok(me);
            }
            if Instant::now() > deadline {
                bail!("the observer did not become healthy:\n{}", fs::read_to_string(&me.log)?);
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn pid(&self) -> u32 {
        self.guard.0.id()
    }

    pub fn counters(&self) -> Result<ObserverCounters> {
        ObserverCounters::read(self.port)
    }

    /// The counters once they stopped moving (the agent publishes them once a second).
    pub fn settled(&self) -> Result<ObserverCounters> {
        let mut last = self.counters()?;
        for _ in 0..60 {
            thread::sleep(Duration::from_millis(1100));
            let now = self.counters()?;
            if now.records == last.records && now.exchanges == last.exchanges {
                return Ok(now);
            }
            last = now;
        }
        bail!("the observer's counters kept moving for a minute after the load stopped")
    }
}

fn run_arm(
    plan: &Plan,
    round: usize,
    arm: Arm,
    env: &AppEnv,
    endpoints: &[(&'static str, &'static str)],
    scratch: &Path,
) -> Result<Vec<Run>> {
    let port = free_port()?;
    let app = start_app(plan, arm, env, port)?;
    let app_pid = app.0.id();
    let observer = match arm {
        Arm::C | Arm::K => Some(Observer::start(&["--pid", &app_pid.to_string()], scratch, arm == Arm::K)?),
        _ => None,
    };
    // Arm D: the observer runs, tracing an idle process of its own.
    let _elsewhere = match arm {
        Arm::D => {
            let idle = Guard(Command::new("sleep").arg("3600").spawn().context("starting sleep")?);
            let o = Observer::start(&["--pid", &idle.0.id().to_string()], scratch, false)?;
            Some((o, idle))
        }
        _ => None,
    };
    // Warm up every endpoint (imports, connections; in C the app's discovery).
    for (_, path) in endpoints {
        let w = Wrk {
            port,
            path,
            connections: plan.connections,
            threads: 1,
            seconds: 1,
            flood: false,
            close: false,
        };
        let l = w.run(scratch)?;
        if l.errors > 0 || l.non_2xx > 0 || l.requests == 0 {
            bail!("warm-up of {path} in arm {arm:?}: {l:?}");
        }
    }
    if let Some(o) = &observer {
        let deadline = Instant::now() + Duration::from_secs(30);
        while o.counters()?.exchanges == 0.0 {
            if Instant::now() > deadline {
                bail!("the observer counted no exchange after the warm-up:\n{}", fs::read_to_string(&o.log)?);
            }
            thread::sleep(Duration::from_millis(200));
        }
    }
    let mut out = Vec::new();
    for (endpoint, path) in endpoints {
        let before = observer.as_ref().map(Observer::settled).transpose()?;
        let obs_cpu0 = observer.as_ref().map_or(0.0, |o| probe::cpu_seconds(o.pid()));
        let app0 = probe::tree_cpu(app_pid);
        let w = Wrk {
            port,
            path,
            connections: plan.connections,
            threads: 1,
            seconds: plan.seconds,
            flood: false,
            close: false,
        };
        let load = w.run(scratch)?;
        let app1 = probe::tree_cpu(app_pid);
        let obs_cpu1 = observer.as_ref().map_or(0.0, |o| probe::cpu_seconds(o.pid()));
        if load.errors > 0 || load.non_2xx > 0 {
            bail!("{path} in arm {arm:?}: {load:?}");
        }
        let cost = match (&observer, before) {
            (Some(o), Some(before)) => {
                let after = o.settled()?;
                let programs = after.programs_since(&before);
                let (kernel_runs, kernel_s) =
                    programs.iter().fold((0.0, 0.0), |(r, t), p| (r + p.1, t + p.2));
                let (rss_bytes, peak_rss_bytes) = probe::rss(o.pid());
                Some(ObserverCost {
                    cpu_s: obs_cpu1 - obs_cpu0,
                    rss_bytes,
                    peak_rss_bytes,
                    kernel_s,
                    kernel_runs,
                    programs,
                    records: after.records - before.records,
                    lost: after.lost - before.lost,
                    exchanges: after.exchanges - before.exchanges,
                    db_statements: after.db_statements - before.db_statements,
                    cache_gets: after.cache_gets - before.cache_gets,
                })
            }
            _ => None,
        };
        // An arm whose observer counted none of the endpoint's statements or lookups
        // (TLS not decrypted, say) would measure nothing: an error, not a number.
        if let Some(c) = &cost {
            let (what, n) = if path.starts_with("/db/") {
                ("database statements", c.db_statements)
            } else if path.starts_with("/cache/") {
                ("cache gets", c.cache_gets)
            } else {
                ("exchanges", c.exchanges)
            };
            if n < load.requests as f64 {
                bail!(
                    "{path} in arm {arm:?}: the observer counted {n} {what} for {} requests",
                    load.requests
                );
            }
        }
        eprintln!(
            "bench:   {endpoint:9} {:>8.0} req/s  p50 {:>6} us  p99 {:>6} us{}",
            load.rps(),
            load.p50_us,
            load.p99_us,
            cost.as_ref().map_or(String::new(), |c| format!(
                "  observer {:.1}% CPU,{} {:.0} records/s, {} lost",
                100.0 * c.cpu_s / (load.duration_us as f64 / 1e6),
                if c.kernel_runs > 0.0 {
                    format!(" kernel {:.0} ns/req,", 1e9 * c.kernel_s / load.requests.max(1) as f64)
                } else {
                    String::new()
                },
                c.records / (load.duration_us as f64 / 1e6),
                c.lost
            ))
        );
        out.push(Run {
            round,
            arm,
            endpoint,
            load,
            app_cpu_s: probe::cpu_delta(&app0, &app1),
            observer: cost,
        });
    }
    drop(observer);
    drop(app);
    Ok(out)
}

/// The observer under a URL flood: every request to a new path, routes unknown, so the
/// only thing between the flood and the view label is `--max-views`.
#[derive(Debug, Clone, Serialize)]
pub struct Flood {
    pub requests: u64,
    pub rps: f64,
    pub exchanges: f64,
    pub lost: f64,
    pub label_overflow: f64,
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    pub peak_rss_bytes: u64,
}

fn flood(plan: &Plan, env: &AppEnv, scratch: &Path) -> Result<Flood> {
    let port = free_port()?;
    let app = start_app(plan, Arm::A, env, port)?;
    let observer =
        Observer::start(&["--pid", &app.0.id().to_string(), "--no-route-discovery"], scratch, false)?;
    request(port, "GET", "/", "", "")?;
    let before = observer.settled()?;
    let rss_before = probe::rss(observer.pid()).0;
    let w = Wrk {
        port,
        path: "/flood-",
        connections: plan.connections,
        threads: 1,
        seconds: plan.flood_seconds,
        flood: true,
        close: false,
    };
    let load = w.run(scratch)?;
    let after = observer.settled()?;
    let (rss_after, peak) = probe::rss(observer.pid());
    let f = Flood {
        requests: load.requests,
        rps: load.rps(),
        exchanges: after.exchanges - before.exchanges,
        lost: after.lost - before.lost,
        label_overflow: after.label_overflow - before.label_overflow,
        rss_before_bytes: rss_before,
        rss_after_bytes: rss_after,
        peak_rss_bytes: peak,
    };
    eprintln!(
        "bench:   {} distinct paths: observer RSS {:.1} -> {:.1} MiB, {} exchanges, {} view labels overflowed to <other>",
        f.requests,
        rss_before as f64 / 1048576.0,
        rss_after as f64 / 1048576.0,
        f.exchanges,
        f.label_overflow
    );
    drop(observer);
    drop(app);
    Ok(f)
}
