//! `cargo xtask soak`: the agent under hours-in-minutes of abuse, bounded in time. One
//! agent traces the test app (private PostgreSQL and Redis, routes unknown so every new
//! path is a candidate view) and a churn server, while three loads run side by side until
//! the deadline: a URL flood of distinct paths, database and cache traffic, and
//! connections opened and closed as fast as one client can. Every interval it prints the
//! agent's RSS and the counters of each bound that bit; at the end it says whether the RSS
//! stayed flat after the warm-up and fails if it grew.

use std::{
    fs,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use super::{AppEnv, Arm, Observer, Plan, Scratch, load::Wrk, migrate, probe, scale, start_app};
use crate::{
    cargo, root, run,
    services::{Postgres, free_port, request, start_redis},
};

/// The bounds the soak runs with: small, so that each one bites within minutes.
const ARGS: &[&str] =
    &["--no-route-discovery", "--no-migrations", "--max-views", "100", "--max-connections", "4096"];
/// RSS growth after the warm-up that counts as not flat.
const GROWTH_LIMIT: f64 = 0.15;

#[derive(Debug, Clone, Serialize)]
struct Sample {
    seconds: f64,
    rss_bytes: u64,
    connections: f64,
    parser_states: f64,
    exchanges: f64,
    db_statements: f64,
    cache_gets: f64,
    table_full: f64,
    label_overflow: f64,
    lost: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    minutes: f64,
    args: Vec<String>,
    samples: Vec<Sample>,
    /// Every non-zero series of the bound and loss families at the end.
    bounds: Vec<(String, f64)>,
    warm_rss_bytes: u64,
    peak_rss_bytes: u64,
    end_rss_bytes: u64,
    growth: f64,
}

pub fn soak(minutes: f64, interval: u64) -> Result<()> {
    run(cargo().args(["build", "--release", "--quiet", "--package", "observer", "--package", "xtask"]))?;
    let scratch = Scratch(std::env::temp_dir().join(format!("observer-soak-{}", std::process::id())));
    fs::create_dir_all(&scratch.0)?;
    let plan = Plan::new(true);
    let pg = Postgres::start()?;
    let env = AppEnv::postgres(&pg)?;
    migrate(&env)?;
    let (redis, redis_port) = start_redis(&pg.dir)?;
    let env = AppEnv { redis_port, ..env };
    let app_port = free_port()?;
    let app = start_app(&plan, Arm::A, &env, app_port)?;
    let (churn_server, churn_port) = scale::serve(scale::Mode::Churn)?;
    let (app_pid, churn_pid) = (app.0.id().to_string(), churn_server.0.id().to_string());
    // Routes unknown (so the flood meets the view bound) means settings unknown: the cache
    // server comes from the config file instead.
    let config = scratch.0.join("observer.toml");
    fs::write(
        &config,
        format!("[[caches]]\nbackend = \"redis\"\nservers = [\"redis://127.0.0.1:{redis_port}/0\"]\n"),
    )?;
    let config = config.to_str().context("scratch path")?.to_string();
    let mut args: Vec<&str> = vec!["--pid", &app_pid, "--pid", &churn_pid, "--config", &config];
    args.extend_from_slice(ARGS);
    let observer = Observer::start(&args, &scratch.0, false)?;
    request(app_port, "GET", "/", "", "")?;
    eprintln!("soak: {minutes} minutes; the agent runs with {}", ARGS.join(" "));

    let deadline = Instant::now() + Duration::from_secs_f64(minutes * 60.0);
    let stop = Arc::new(AtomicBool::new(false));
    let until = move || Instant::now() < deadline;
    let mut loads = Vec::new();
    // A URL flood: every request a path never seen before.
    for (path, flood) in [("/flood-", true), ("/db/list", false), ("/cache/hit", false)] {
        let (stop, dir) = (stop.clone(), scratch.0.clone());
        loads.push(thread::spawn(move || -> Result<u64> {
            let mut requests = 0;
            while until() && !stop.load(Ordering::Relaxed) {
                let left = deadline.saturating_duration_since(Instant::now()).as_secs().clamp(1, 20);
                let w = Wrk {
                    port: app_port,
                    path,
                    connections: 2,
                    threads: 1,
                    seconds: left,
                    flood,
                    close: false,
                };
                requests += w.run(&dir)?.requests;
            }
            Ok(requests)
        }));
    }
    // Connections opened and closed, 20000 at a time.
    {
        let stop = stop.clone();
        loads.push(thread::spawn(move || -> Result<u64> {
            let mut opened = 0;
            while until() && !stop.load(Ordering::Relaxed) {
                scale::churn(churn_port, 20_000)?;
                opened += 20_000;
            }
            Ok(opened)
        }));
    }

    let started = Instant::now();
    let mut samples = Vec::new();
    println!(
        "| min | RSS MiB | connections | parser states | exchanges | DB statements | cache gets | table full | label overflow | lost |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let result = (|| -> Result<()> {
        while until() {
            thread::sleep(
                Duration::from_secs(interval).min(deadline.saturating_duration_since(Instant::now())),
            );
            if let Some(done) = loads.iter().position(thread::JoinHandle::is_finished) {
                let r = loads.remove(done).join().map_err(|_| anyhow::anyhow!("a load panicked"))?;
                r.context("a load failed")?;
                bail!("a load stopped early");
            }
            let c = observer.counters()?;
            let s = Sample {
                seconds: started.elapsed().as_secs_f64(),
                rss_bytes: probe::rss(observer.pid()).0,
                connections: c.connections,
                parser_states: c.parser_states,
                exchanges: c.exchanges,
                db_statements: c.db_statements,
                cache_gets: c.cache_gets,
                table_full: c.table_full,
                label_overflow: c.label_overflow,
                lost: c.lost,
            };
            println!(
                "| {:.1} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} |",
                s.seconds / 60.0,
                s.rss_bytes as f64 / 1048576.0,
                s.connections,
                s.parser_states,
                s.exchanges,
                s.db_statements,
                s.cache_gets,
                s.table_full,
                s.label_overflow,
                s.lost
            );
            samples.push(s);
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    let mut totals = Vec::new();
    for l in loads {
        totals.push(l.join().map_err(|_| anyhow::anyhow!("a load panicked"))??);
    }
    result?;
    let end = observer.settled()?;
    let (end_rss, peak) = probe::rss(observer.pid());
    let (_, text) = request(observer.port, "GET", "/metrics", "", "")?;
    let bounds = bound_series(&text);
    eprintln!(
        "soak: {} flood, {} DB, {} cache requests; {} connections churned; {} exchanges counted",
        totals[0], totals[1], totals[2], totals[3], end.exchanges
    );
    println!("\nBounds that bit, and losses (non-zero series at the end):\n");
    for (series, v) in &bounds {
        println!("- `{series}` {v}");
    }
    if samples.len() < 3 {
        bail!("too short to judge: {} samples (raise --minutes or lower --interval)", samples.len());
    }
    // Warm-up: the first fifth (the tables and the kernel's socket caches fill); flat means
    // the last third never rises past what the warm-up reached.
    let warm_end = (samples.len() / 5).max(1);
    let warm = samples[..warm_end].iter().map(|s| s.rss_bytes).max().unwrap_or(0);
    let last = &samples[samples.len() * 2 / 3..];
    let late = last.iter().map(|s| s.rss_bytes).max().unwrap_or(0);
    let growth = late as f64 / warm.max(1) as f64 - 1.0;
    let report = Report {
        minutes,
        args: ARGS.iter().map(|s| s.to_string()).collect(),
        samples,
        bounds,
        warm_rss_bytes: warm,
        peak_rss_bytes: peak,
        end_rss_bytes: end_rss,
        growth,
    };
    let dir = root().join("target/soak");
    fs::create_dir_all(&dir)?;
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let json = serde_json::to_string_pretty(&report)?;
    fs::write(dir.join(format!("soak-{stamp}.json")), &json)?;
    fs::write(dir.join("latest.json"), &json)?;
    println!(
        "\nRSS after the warm-up {:.1} MiB, in the last third at most {:.1} MiB ({:+.1}%), peak {:.1} MiB, at the end {:.1} MiB",
        warm as f64 / 1048576.0,
        late as f64 / 1048576.0,
        growth * 100.0,
        peak as f64 / 1048576.0,
        end_rss as f64 / 1048576.0
    );
    drop(observer);
    drop(churn_server);
    drop(app);
    drop(redis);
    drop(pg);
    if growth > GROWTH_LIMIT {
        bail!(
            "the agent's RSS grew {:.1}% after the warm-up (limit {:.0}%)",
            growth * 100.0,
            GROWTH_LIMIT * 100.0
        );
    }
    Ok(())
}

/// The non-zero series of the families that say a bound bit or something was lost.
fn bound_series(text: &str) -> Vec<(String, f64)> {
    const FAMILIES: &[&str] = &[
        "observer_table_full_total",
        "observer_label_overflow_total",
        "observer_records_lost_total",
        "observer_control_records_lost_total",
        "observer_parse_errors_total",
        "observer_discovery_backlog_dropped_total",
        "observer_unknown_connection_records_total",
    ];
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let name = series.split('{').next()?;
            let v: f64 = v.parse().ok()?;
            (FAMILIES.contains(&name) && v != 0.0).then(|| (series.to_string(), v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn bound_series_keeps_the_non_zero_bound_and_loss_series() {
        let text = "# HELP x\nobserver_table_full_total{table=\"sockets\"} 12\nobserver_table_full_total{table=\"processes\"} 0\nobserver_records_total 99\nobserver_label_overflow_total{label=\"view\"} 3\n";
        assert_eq!(
            super::bound_series(text),
            vec![
                ("observer_table_full_total{table=\"sockets\"}".to_string(), 12.0),
                ("observer_label_overflow_total{label=\"view\"}".to_string(), 3.0)
            ]
        );
    }
}
