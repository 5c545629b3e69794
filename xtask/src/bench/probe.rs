//! What the benchmark reads about processes and the observer: CPU time and resident
//! memory from /proc, and the observer's own counters from its /metrics.

use std::{collections::BTreeMap, fs};

use crate::services::request;

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// User + system CPU seconds of one process (all its threads).
pub fn cpu_seconds(pid: u32) -> f64 {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // After the parenthesised comm: utime is the 12th field, stime the 13th.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / clock_ticks())
        })
        .unwrap_or(0.0)
}

/// The process and its descendants (gunicorn's master and workers).
pub fn tree(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() && out.len() < 4096 {
        let p = out[i];
        if let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                let children = fs::read_to_string(t.path().join("children")).unwrap_or_default();
                out.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
            }
        }
        i += 1;
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// CPU seconds of every process in the tree, by PID (so that a worker that exits or
/// appears between two readings is not counted as negative time).
pub fn tree_cpu(pid: u32) -> BTreeMap<u32, f64> {
    tree(pid).into_iter().map(|p| (p, cpu_seconds(p))).collect()
}

/// CPU seconds the tree used between two readings.
pub fn cpu_delta(before: &BTreeMap<u32, f64>, after: &BTreeMap<u32, f64>) -> f64 {
    after.iter().map(|(p, a)| a - before.get(p).copied().unwrap_or(0.0)).filter(|d| *d > 0.0).sum()
}

/// `VmRSS` and `VmHWM` (peak) of a process, in bytes.
pub fn rss(pid: u32) -> (u64, u64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (kb("VmRSS:"), kb("VmHWM:"))
}

/// The observer's counters that the benchmark compares between two readings.
#[derive(Debug, Clone, Default)]
pub struct ObserverCounters {
    pub records: f64,
    pub lost: f64,
    pub exchanges: f64,
    pub db_statements: f64,
    pub cache_gets: f64,
    pub table_full: f64,
    pub label_overflow: f64,
    pub connections: f64,
    pub parser_states: f64,
    /// Per kernel program: (runs, seconds), with --bpf-stats.
    pub programs: BTreeMap<String, (f64, f64)>,
}

impl ObserverCounters {
    pub fn read(metrics_port: u16) -> anyhow::Result<Self> {
        let (status, text) = request(metrics_port, "GET", "/metrics", "", "")?;
        anyhow::ensure!(status == 200, "observer /metrics answered {status}");
        Ok(Self::parse(&text))
    }

    pub fn parse(text: &str) -> Self {
        let mut c = Self::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else { continue };
            let Ok(v) = value.parse::<f64>() else { continue };
            let name = series.split('{').next().unwrap_or(series);
            match name {
                "observer_records_total" => c.records += v,
                "observer_records_lost_total" | "observer_control_records_lost_total" => c.lost += v,
                "observer_http_exchanges_total" => c.exchanges += v,
                "observer_db_statements_total" => c.db_statements += v,
                "observer_cache_gets_total" => c.cache_gets += v,
                "observer_table_full_total" => c.table_full += v,
                "observer_label_overflow_total" => c.label_overflow += v,
                "observer_connections" => c.connections = v,
                "observer_parser_states" => c.parser_states = v,
                "observer_bpf_program_runs_total" | "observer_bpf_program_run_seconds_total" => {
                    let Some(program) = series.split("program=\"").nth(1).and_then(|r| r.split('"').next())
                    else {
                        continue;
                    };
                    let e = c.programs.entry(program.to_string()).or_default();
                    if name.ends_with("runs_total") {
                        e.0 = v;
                    } else {
                        e.1 = v;
                    }
                }
                _ => {}
            }
        }
        c
    }

    /// Per program that ran since `before`: (name, runs, kernel seconds).
    pub fn programs_since(&self, before: &Self) -> Vec<(String, f64, f64)> {
        self.programs
            .iter()
            .map(|(name, (r, s))| {
                let (r0, s0) = before.programs.get(name).copied().unwrap_or_default();
                (name.clone(), r - r0, s - s0)
            })
            .filter(|p| p.1 > 0.0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_counters_the_benchmark_compares() {
        let text = "# HELP x\nobserver_records_total 10\nobserver_records_lost_total{reason=\"ring_buffer_full\"} 2\n\
            observer_records_lost_total{reason=\"undecodable\"} 1\nobserver_control_records_lost_total{reason=\"ring_buffer_full\"} 3\n\
            observer_bpf_program_runs_total{program=\"sys_exit_read\"} 7\n\
            observer_bpf_program_run_seconds_total{program=\"sys_exit_read\"} 0.5\n";
        let c = ObserverCounters::parse(text);
        assert_eq!(c.records, 10.0);
        assert_eq!(c.lost, 6.0);
        assert_eq!(c.programs["sys_exit_read"], (7.0, 0.5));
        assert_eq!(
            c.programs_since(&ObserverCounters::default()),
            vec![("sys_exit_read".to_string(), 7.0, 0.5)]
        );
        assert!(c.programs_since(&c).is_empty(), "nothing ran since itself");
    }

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let me = std::process::id();
        let x: u64 = (0..2_000_000u64).map(|i| i ^ (i >> 3)).sum();
        assert!(x > 0);
        assert!(cpu_seconds(me) >= 0.0);
        assert!(rss(me).0 > 0);
        assert!(tree(me).contains(&me));
    }
}
