//! The benchmark's results: per-arm figures with their spread across rounds, the ratios
//! measured within each round, the userspace replay figures from criterion, as JSON and
//! as the markdown table the README shows.

use std::{fmt::Write as _, fs, process::Command, time::Duration};

use anyhow::{Context as _, Result};
use serde::Serialize;

use super::{
    Arm, ENDPOINTS, Flood, Plan, Run, SQLITE_ENDPOINTS, TLS_ENDPOINTS,
    capacity::Capacity,
    scale::Memory,
    syscall::{CALLS, SyscallCost},
    uprobe::UprobeCost,
};
use crate::{cargo, root, run};

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cpus: usize,
    pub memory_bytes: u64,
    pub kernel: String,
    pub os: String,
}

impl Machine {
    pub fn read() -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, v)| v.trim().to_string()))
            .unwrap_or_default();
        let mem = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_bytes = mem
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:")?.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024;
        let os = fs::read_to_string("/etc/os-release")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME=").map(|v| v.trim_matches('"').to_string()))
            .unwrap_or_default();
        Self {
            cpu,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_bytes,
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string(),
            os,
        }
    }
}

/// Median and range across rounds.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(mut v: Vec<f64>) -> Self {
        v.retain(|x| x.is_finite());
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
        Self { median, min: v[0], max: v[n - 1] }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ArmSummary {
    pub arm: Arm,
    pub endpoint: &'static str,
    pub rps: Spread,
    pub p50_us: Spread,
    pub p99_us: Spread,
    pub app_cpu_us_per_request: Spread,
    pub observer: Option<ObserverSummary>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ObserverSummary {
    pub cpu_percent: Spread,
    pub cpu_us_per_request: Spread,
    pub kernel_ns_per_request: Spread,
    pub records_per_s: Spread,
    pub records_per_request: Spread,
    pub lost: f64,
    /// Exchanges counted over requests wrk completed (at least 1: the in-flight ones wrk
    /// abandoned at its deadline are answered and counted too).
    pub exchanges_per_request: Spread,
    pub peak_rss_bytes: u64,
    /// Kernel ns per run, by program (median across rounds), the costliest first.
    pub programs: Vec<(String, f64, f64)>,
}

/// Ratios to the plain app measured within each round, then summarised.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub endpoint: &'static str,
    pub c_over_a_rps: Spread,
    pub b_over_a_rps: Spread,
    pub c_over_a_p99: Spread,
    pub b_over_a_p99: Spread,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Replay {
    pub name: String,
    pub records_per_iteration: f64,
    pub ns_per_iteration: f64,
    pub records_per_s: f64,
    /// Heap allocations per record, over a pass after a warm one.
    #[serde(default)]
    pub allocations_per_record: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub unix_time: u64,
    pub commit: String,
    pub machine: Machine,
    pub plan: Plan,
    pub summary: Vec<ArmSummary>,
    pub ratios: Vec<Ratio>,
    /// Geometric means over the endpoints of the median ratios.
    pub overall: Overall,
    /// The same over the TLS part's endpoints.
    pub tls_overall: Option<Overall>,
    /// The same over the SQLite part's endpoints.
    #[serde(default)]
    pub sqlite_overall: Option<Overall>,
    pub uprobe: Option<UprobeCost>,
    #[serde(default)]
    pub syscall: Option<SyscallCost>,
    pub capacity: Option<Capacity>,
    pub memory: Option<Memory>,
    pub flood: Option<Flood>,
    pub replay: Vec<Replay>,
    pub elapsed_s: f64,
    pub runs: Vec<Run>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Overall {
    pub c_over_a_rps: f64,
    pub b_over_a_rps: f64,
    pub c_over_a_p99: f64,
    pub b_over_a_p99: f64,
}

fn geomean(v: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = v.filter(|x| *x > 0.0).fold((0.0, 0), |(s, n), x| (s + f64::ln(x), n + 1));
    if n == 0 { 0.0 } else { (sum / f64::from(n)).exp() }
}

impl Results {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        machine: Machine,
        plan: Plan,
        runs: Vec<Run>,
        capacity: Option<Capacity>,
        memory: Option<Memory>,
        flood: Option<Flood>,
        uprobe: Option<UprobeCost>,
        syscall: Option<SyscallCost>,
        replay: Vec<Replay>,
        elapsed: Duration,
    ) -> Self {
        let mut summary = Vec::new();
        let mut ratios = Vec::new();
        let ran = |e: &str| runs.iter().any(|r| r.endpoint == e);
        for (endpoint, _) in
            ENDPOINTS.iter().chain(TLS_ENDPOINTS).chain(SQLITE_ENDPOINTS).filter(|(e, _)| ran(e))
        {
            for arm in [Arm::A, Arm::B, Arm::C, Arm::D, Arm::K] {
                let rs: Vec<&Run> = runs.iter().filter(|r| r.arm == arm && r.endpoint == *endpoint).collect();
                if rs.is_empty() {
                    continue;
                }
                let f = |g: &dyn Fn(&Run) -> f64| Spread::of(rs.iter().map(|r| g(r)).collect());
                let per_req = |r: &Run, x: f64| x / r.load.requests.max(1) as f64;
                let secs = |r: &Run| r.load.duration_us as f64 / 1e6;
                let observer = matches!(arm, Arm::C | Arm::K).then(|| {
                    let o = |g: &dyn Fn(&Run, &super::ObserverCost) -> f64| {
                        Spread::of(rs.iter().filter_map(|r| Some(g(r, r.observer.as_ref()?))).collect())
                    };
                    let mut programs: Vec<(String, f64, f64)> = Vec::new();
                    let names: std::collections::BTreeSet<&String> = rs
                        .iter()
                        .filter_map(|r| r.observer.as_ref())
                        .flat_map(|c| c.programs.iter().map(|p| &p.0))
                        .collect();
                    for name in names {
                        let per_run = Spread::of(
                            rs.iter()
                                .filter_map(|r| r.observer.as_ref()?.programs.iter().find(|p| &p.0 == name))
                                .map(|p| 1e9 * p.2 / p.1.max(1.0))
                                .collect(),
                        );
                        let runs_per_req = Spread::of(
                            rs.iter()
                                .filter_map(|r| {
                                    let p = r.observer.as_ref()?.programs.iter().find(|p| &p.0 == name)?;
                                    Some(per_req(r, p.1))
                                })
                                .collect(),
                        );
                        programs.push((name.clone(), per_run.median, runs_per_req.median));
                    }
                    programs.sort_by(|a, b| (b.1 * b.2).total_cmp(&(a.1 * a.2)));
                    ObserverSummary {
                        cpu_percent: o(&|r, c| 100.0 * c.cpu_s / secs(r)),
                        cpu_us_per_request: o(&|r, c| 1e6 * per_req(r, c.cpu_s)),
                        kernel_ns_per_request: o(&|r, c| 1e9 * per_req(r, c.kernel_s)),
                        records_per_s: o(&|r, c| c.records / secs(r)),
                        records_per_request: o(&|r, c| per_req(r, c.records)),
                        lost: rs.iter().filter_map(|r| r.observer.as_ref()).map(|c| c.lost).sum(),
                        exchanges_per_request: o(&|r, c| per_req(r, c.exchanges)),
                        peak_rss_bytes: rs
                            .iter()
                            .filter_map(|r| r.observer.as_ref())
                            .map(|c| c.peak_rss_bytes)
                            .max()
                            .unwrap_or(0),
                        programs,
                    }
                });
                summary.push(ArmSummary {
                    arm,
                    endpoint,
                    rps: f(&|r| r.load.rps()),
                    p50_us: f(&|r| r.load.p50_us as f64),
                    p99_us: f(&|r| r.load.p99_us as f64),
                    app_cpu_us_per_request: f(&|r| 1e6 * per_req(r, r.app_cpu_s)),
                    observer,
                });
            }
            let within = |num: Arm, g: &dyn Fn(&Run) -> f64| {
                Spread::of(
                    (0..plan.rounds)
                        .filter_map(|round| {
                            let get = |arm| {
                                runs.iter()
                                    .find(|r| r.round == round && r.arm == arm && r.endpoint == *endpoint)
                            };
                            Some(g(get(num)?) / g(get(Arm::A)?))
                        })
                        .collect(),
                )
            };
            ratios.push(Ratio {
                endpoint,
                c_over_a_rps: within(Arm::C, &|r| r.load.rps()),
                b_over_a_rps: within(Arm::B, &|r| r.load.rps()),
                c_over_a_p99: within(Arm::C, &|r| r.load.p99_us as f64),
                b_over_a_p99: within(Arm::B, &|r| r.load.p99_us as f64),
            });
        }
        let overall_of = |endpoints: &[(&str, &str)]| {
            let rs: Vec<&Ratio> =
                ratios.iter().filter(|r| endpoints.iter().any(|e| e.0 == r.endpoint)).collect();
            (!rs.is_empty()).then(|| Overall {
                c_over_a_rps: geomean(rs.iter().map(|r| r.c_over_a_rps.median)),
                b_over_a_rps: geomean(rs.iter().map(|r| r.b_over_a_rps.median)),
                c_over_a_p99: geomean(rs.iter().map(|r| r.c_over_a_p99.median)),
                b_over_a_p99: geomean(rs.iter().map(|r| r.b_over_a_p99.median)),
            })
        };
        let overall = overall_of(ENDPOINTS).unwrap_or(Overall {
            c_over_a_rps: 0.0,
            b_over_a_rps: 0.0,
            c_over_a_p99: 0.0,
            b_over_a_p99: 0.0,
        });
        let tls_overall = overall_of(TLS_ENDPOINTS);
        let sqlite_overall = overall_of(SQLITE_ENDPOINTS);
        let commit = Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .current_dir(root())
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        Self {
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            commit,
            machine,
            plan,
            summary,
            ratios,
            overall,
            tls_overall,
            sqlite_overall,
            uprobe,
            syscall,
            capacity,
            memory,
            flood,
            replay,
            elapsed_s: elapsed.as_secs_f64(),
            runs,
        }
    }

    /// The README's Performance table.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        let sp = |x: Spread, scale: f64, digits: usize| {
            format!("{:.d$} ({:.d$}–{:.d$})", x.median / scale, x.min / scale, x.max / scale, d = digits)
        };
        let _ = writeln!(
            s,
            "Machine: {}, {} vCPU, {:.0} GiB, kernel {}, {}. Commit {}, `cargo xtask bench{}`: {} rounds × {} s per endpoint and arm, wrk 1 thread × {} connections, gunicorn {} sync workers. Median (min–max) across rounds.\n",
            m.cpu,
            m.cpus,
            m.memory_bytes as f64 / (1u64 << 30) as f64,
            m.kernel,
            m.os,
            self.commit,
            if self.plan.quick { " --quick" } else { "" },
            self.plan.rounds,
            self.plan.seconds,
            self.plan.connections,
            self.plan.workers
        );
        // The arms' tables only when the arms ran (`--only` may leave them out).
        if !self.runs.is_empty() {
            if self.runs.iter().any(|r| ENDPOINTS.iter().any(|e| e.0 == r.endpoint)) {
                let _ = writeln!(
                    s,
                    "Headline (geometric mean over the endpoints of the per-round ratios): **C/A throughput {:.3}, B/A throughput {:.3}; C/A p99 {:.3}, B/A p99 {:.3}.**\n",
                    self.overall.c_over_a_rps,
                    self.overall.b_over_a_rps,
                    self.overall.c_over_a_p99,
                    self.overall.b_over_a_p99
                );
            }
            if let Some(t) = &self.tls_overall {
                let _ = writeln!(
                    s,
                    "TLS (`db-tls`, `cache-tls`: PostgreSQL with `sslmode=require`, Redis over `rediss://`, the plaintext read from the app's OpenSSL): **C/A throughput {:.3}, B/A throughput {:.3}; C/A p99 {:.3}, B/A p99 {:.3}.**\n",
                    t.c_over_a_rps, t.b_over_a_rps, t.c_over_a_p99, t.b_over_a_p99
                );
            }
            if let Some(t) = &self.sqlite_overall {
                let _ = writeln!(
                    s,
                    "SQLite (`sqlite-10`: ten queries, `sqlite-rows`: one query of 10,000 rows; the calls read through uprobes on the app's libsqlite3): **C/A throughput {:.3}, B/A throughput {:.3}; C/A p99 {:.3}, B/A p99 {:.3}.**\n",
                    t.c_over_a_rps, t.b_over_a_rps, t.c_over_a_p99, t.b_over_a_p99
                );
            }
            let _ = writeln!(
                s,
                "| endpoint | C/A req/s | B/A req/s | C/A p99 | B/A p99 |\n|---|---|---|---|---|"
            );
            for r in &self.ratios {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} |",
                    r.endpoint,
                    sp(r.c_over_a_rps, 1.0, 3),
                    sp(r.b_over_a_rps, 1.0, 3),
                    sp(r.c_over_a_p99, 1.0, 3),
                    sp(r.b_over_a_p99, 1.0, 3)
                );
            }
            let _ = writeln!(
                s,
                "\n| endpoint | arm | req/s | p50 ms | p99 ms | app CPU µs/req | observer CPU µs/req | kernel ns/req | records/s | lost |\n|---|---|---|---|---|---|---|---|---|---|"
            );
            for a in &self.summary {
                let (ocpu, kns, rec, lost) = match &a.observer {
                    Some(o) => (
                        sp(o.cpu_us_per_request, 1.0, 0),
                        if o.kernel_ns_per_request.max > 0.0 {
                            sp(o.kernel_ns_per_request, 1.0, 0)
                        } else {
                            "–".into()
                        },
                        sp(o.records_per_s, 1.0, 0),
                        format!("{}", o.lost),
                    ),
                    None => ("–".into(), "–".into(), "–".into(), "–".into()),
                };
                let _ = writeln!(
                    s,
                    "| {} | {:?} {} | {} | {} | {} | {} | {ocpu} | {kns} | {rec} | {lost} |",
                    a.endpoint,
                    a.arm,
                    a.arm.describe(),
                    sp(a.rps, 1.0, 0),
                    sp(a.p50_us, 1000.0, 2),
                    sp(a.p99_us, 1000.0, 2),
                    sp(a.app_cpu_us_per_request, 1.0, 0)
                );
            }
            if let Some(o) = self
                .summary
                .iter()
                .find(|a| a.arm == Arm::K && a.endpoint == "db")
                .and_then(|a| a.observer.as_ref())
            {
                let _ = writeln!(
                    s,
                    "\nKernel programs on the `db` endpoint (median ns per run × runs per request), the costliest first:\n"
                );
                let _ = writeln!(s, "| program | ns/run | runs/req |\n|---|---|---|");
                for (name, ns, per) in o.programs.iter().take(10) {
                    let _ = writeln!(s, "| {name} | {ns:.0} | {per:.1} |");
                }
            }
        }
        if let Some(u) = &self.uprobe {
            let _ = writeln!(
                s,
                "\nOne probed library call ({} calls per sample, calls that move no bytes), ns per call:\n",
                u.calls_per_sample
            );
            let _ = writeln!(
                s,
                "| call | probes | bare | probed, process traced | probed, process not traced |\n|---|---|---|---|---|"
            );
            for (name, probes, c) in [("SSL_read", "entry + return", &u.read), ("SSL_free", "entry", &u.free)]
            {
                let _ = writeln!(
                    s,
                    "| `{name}` | {probes} | {} | {} | {} |",
                    sp(c.bare_ns, 1.0, 1),
                    sp(c.traced_ns, 1.0, 0),
                    sp(c.untraced_ns, 1.0, 0)
                );
            }
        }
        if let Some(c) = &self.syscall {
            let _ = writeln!(
                s,
                "\nOne syscall ({} calls per sample), ns per call, and what the observer adds:\n",
                c.calls_per_sample
            );
            let _ = writeln!(
                s,
                "| syscall | bare | traced | observer running, not traced | added, traced | added, not traced |\n|---|---|---|---|---|---|"
            );
            for ((_, bare, on, off), (_, name)) in c.calls.iter().zip(CALLS) {
                let _ = writeln!(
                    s,
                    "| {name} | {} | {} | {} | {:.0} | {:.0} |",
                    sp(*bare, 1.0, 0),
                    sp(*on, 1.0, 0),
                    sp(*off, 1.0, 0),
                    on.median - bare.median,
                    off.median - bare.median
                );
            }
        }
        if let Some(c) = &self.capacity {
            c.markdown(&mut s);
        }
        if let Some(mem) = &self.memory {
            let _ = writeln!(s, "\nMemory (observer RSS):\n");
            let _ = writeln!(s, "| situation | RSS MiB | note |\n|---|---|---|");
            mem.markdown(&mut s);
        }
        if let Some(f) = &self.flood {
            if self.memory.is_none() {
                let _ = writeln!(s, "\n| situation | RSS MiB | note |\n|---|---|---|");
            }
            let _ = writeln!(
                s,
                "| URL flood, {} distinct paths, routes unknown | {:.1} → {:.1} (peak {:.1}) | {} view labels overflowed to `<other>`, {} lost |",
                f.requests,
                mib(f.rss_before_bytes),
                mib(f.rss_after_bytes),
                mib(f.peak_rss_bytes),
                f.label_overflow,
                f.lost
            );
        }
        if !self.replay.is_empty() {
            let _ = writeln!(s, "\nUserspace replay of recorded streams (criterion, one core):\n");
            let _ = writeln!(
                s,
                "| stream | records per pass | records/s | allocations/record |\n|---|---|---|---|"
            );
            for r in &self.replay {
                let allocs = r.allocations_per_record.map_or("–".to_string(), |a| format!("{a:.2}"));
                let _ = writeln!(
                    s,
                    "| {} | {:.0} | {:.0} | {allocs} |",
                    r.name, r.records_per_iteration, r.records_per_s
                );
            }
        }
        s
    }
}

pub fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

impl Capacity {
    fn markdown(&self, s: &mut String) {
        let c = self;
        let _ = writeln!(
            s,
            "\nCapacity (nginx traced, wrk ramping connections): **{:.0} req/s followed with zero loss on keep-alive connections, {:.0} req/s with a new connection per request**; observer peak RSS {:.1} MiB.\n",
            c.keepalive_rps,
            c.close_rps,
            mib(c.observer_peak_rss_bytes)
        );
        let _ = writeln!(
            s,
            "| mode | connections | req/s | records/s | observer CPU % | lost | followed |\n|---|---|---|---|---|---|---|"
        );
        for st in &c.steps {
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} | {:.0} | {:.1} | {} | {} |",
                st.mode,
                st.connections,
                st.rps,
                st.records_per_s,
                st.observer_cpu_percent,
                st.lost,
                if st.followed { "yes" } else { "no" }
            );
        }
    }
}

impl Memory {
    fn markdown(&self, s: &mut String) {
        let mem = self;
        let _ = writeln!(s, "| traced server, no connections | {:.1} | |", mib(mem.idle_baseline_rss_bytes));
        for p in &mem.idle {
            let _ = writeln!(
                s,
                "| {} open idle connections | {:.1} | {} tracked, {} refused by a full table |",
                p.open,
                mib(p.rss_bytes),
                p.tracked,
                p.table_full
            );
        }
        let _ = writeln!(s, "| after that server exited | {:.1} | |", mib(mem.idle_after_exit_rss_bytes));
        let ch = &mem.churn;
        let _ = writeln!(
            s,
            "| {} connections opened and closed | {:.1} → {:.1} (peak {:.1}) | {:.0} s, {} exchanges, {} lost, {} left tracked |",
            ch.connections,
            mib(ch.rss_start_bytes),
            mib(ch.rss_end_bytes),
            mib(ch.peak_rss_bytes),
            ch.seconds,
            ch.exchanges,
            ch.lost,
            ch.tracked_after
        );
    }
}

/// Runs the criterion replay benchmarks and reads their estimates.
pub fn replay(quick: bool) -> Result<Vec<Replay>> {
    let secs = if quick { "2" } else { "5" };
    let counted = root().join("target/bench/replay-allocations.txt");
    fs::create_dir_all(root().join("target/bench"))?;
    let _ = fs::remove_file(&counted);
    run(cargo()
        .env("OBSERVER_REPLAY_ALLOCATIONS", &counted)
        .args(["bench", "--package", "observer", "--bench", "replay", "--"])
        .args(["--warm-up-time", "1", "--measurement-time", secs, "--noplot"]))?;
    let dir = root().join("target/criterion/replay");
    let mut out = Vec::new();
    for e in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "report" {
            continue;
        }
        let read = |f: &str| -> Result<serde_json::Value> {
            let p = e.path().join("new").join(f);
            Ok(serde_json::from_str(&fs::read_to_string(&p).with_context(|| format!("{}", p.display()))?)?)
        };
        let est = read("estimates.json")?;
        let meta = read("benchmark.json")?;
        let ns = est["mean"]["point_estimate"].as_f64().unwrap_or(0.0);
        let records = meta["throughput"]["Elements"].as_f64().unwrap_or(0.0);
        let allocations_per_record = fs::read_to_string(&counted).ok().and_then(|t| {
            t.lines().find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                match f.as_slice() {
                    [n, records, allocs] if *n == name => {
                        Some(allocs.parse::<f64>().ok()? / records.parse::<f64>().ok()?.max(1.0))
                    }
                    _ => None,
                }
            })
        });
        out.push(Replay {
            allocations_per_record,
            name,
            records_per_iteration: records,
            ns_per_iteration: ns,
            records_per_s: if ns > 0.0 { records / (ns / 1e9) } else { 0.0 },
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}
