//! Capacity: the highest request rate the observer follows with zero loss. Django on two
//! cores saturates long before the agent does, so the traced server here is nginx
//! answering a fixed 200 (one worker): the same syscalls, HTTP heads and pipeline as an
//! app, at tens of thousands of requests a second. wrk ramps the number of connections
//! until the rate stops growing or a record is lost; each step checks that every
//! request became an exchange.

use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, Result};
use serde::Serialize;

use super::{Observer, Plan, load::Wrk, probe};
use crate::services::{Guard, free_port, wait_port};

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub mode: &'static str,
    pub connections: u32,
    pub rps: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub requests: u64,
    pub exchanges: f64,
    pub records_per_s: f64,
    pub lost: f64,
    pub observer_cpu_percent: f64,
    /// No record lost and every request counted as an exchange.
    pub followed: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Capacity {
    pub steps: Vec<Step>,
    /// The highest rate followed with zero loss, per mode.
    pub keepalive_rps: f64,
    pub close_rps: f64,
    pub observer_peak_rss_bytes: u64,
}

fn nginx(dir: &Path, port: u16) -> Result<Guard> {
    let conf = dir.join("nginx.conf");
    fs::write(
        &conf,
        format!(
            "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\n\
             events {{ worker_connections 4096; }}\n\
             http {{ access_log off; keepalive_requests 10000000;\n\
               client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;\n\
               uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
               server {{ listen 127.0.0.1:{port}; location / {{ return 200 \"ok\\n\"; }} }} }}\n",
            d = dir.display()
        ),
    )?;
    let child = Command::new("nginx")
        .args(["-c", conf.to_str().context("path")?, "-p", dir.to_str().context("path")?])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting nginx (cargo xtask setup installs it)")?;
    let g = Guard(child);
    wait_port(port)?;
    Ok(g)
}

pub fn ramp(plan: &Plan, scratch: &Path) -> Result<Capacity> {
    let dir = scratch.join("nginx");
    fs::create_dir_all(&dir)?;
    let port = free_port()?;
    let server = nginx(&dir, port)?;
    let observer = Observer::start(
        &["--pid", &server.0.id().to_string(), "--no-route-discovery", "--no-migrations"],
        scratch,
        false,
    )?;
    let mut steps = Vec::new();
    for (mode, path) in [("keepalive", "/k"), ("close", "/c")] {
        let mut best = 0.0f64;
        for connections in [1u32, 2, 4, 8, 16, 32, 64, 128] {
            let before = observer.settled()?;
            let cpu0 = probe::cpu_seconds(observer.pid());
            let w = Wrk {
                port,
                path,
                connections,
                threads: 1,
                seconds: plan.capacity_seconds,
                flood: false,
                close: mode == "close",
            };
            let load = w.run(scratch)?;
            let cpu1 = probe::cpu_seconds(observer.pid());
            let after = observer.settled()?;
            let secs = load.duration_us as f64 / 1e6;
            let exchanges = after.exchanges - before.exchanges;
            let lost = after.lost - before.lost;
            // wrk abandons the requests in flight when its time is up; the server may
            // still answer them.
            let followed = lost == 0.0
                && exchanges >= load.requests as f64
                && exchanges <= (load.requests + u64::from(connections)) as f64
                && load.errors == 0;
            let step = Step {
                mode,
                connections,
                rps: load.rps(),
                p50_us: load.p50_us,
                p99_us: load.p99_us,
                requests: load.requests,
                exchanges,
                records_per_s: (after.records - before.records) / secs,
                lost,
                observer_cpu_percent: 100.0 * (cpu1 - cpu0) / secs,
                followed,
            };
            eprintln!(
                "bench:   {mode:9} c={connections:<3} {:>8.0} req/s  {:>8.0} records/s  observer {:>5.1}% CPU  lost {}  {}",
                step.rps,
                step.records_per_s,
                step.observer_cpu_percent,
                step.lost,
                if followed { "followed" } else { "NOT followed" }
            );
            let grew = step.rps > best * 1.03;
            if followed {
                best = best.max(step.rps);
            }
            steps.push(step);
            if !followed || !grew {
                break;
            }
        }
    }
    let best =
        |mode: &str| steps.iter().filter(|s| s.mode == mode && s.followed).map(|s| s.rps).fold(0.0, f64::max);
    let (_, peak) = probe::rss(observer.pid());
    Ok(Capacity {
        keepalive_rps: best("keepalive"),
        close_rps: best("close"),
        observer_peak_rss_bytes: peak,
        steps,
    })
}
