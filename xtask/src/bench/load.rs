//! The load generator: wrk (Debian), driven with a Lua script that writes its summary
//! as JSON, so that nothing is scraped from its human-readable output.

use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

/// wrk's `done()` hook: totals, errors and latency percentiles (microseconds).
const DONE: &str = r#"
done = function(summary, latency, requests)
  local f = assert(io.open(os.getenv("OBSERVER_BENCH_OUT"), "w"))
  local e = summary.errors
  f:write(string.format('{"requests":%d,"duration_us":%d,"bytes":%d,"errors":%d,"non_2xx":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}',
    summary.requests, summary.duration, summary.bytes, e.connect + e.read + e.write + e.timeout,
    e.status, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
  f:close()
end
"#;

/// Every request to a new path (`PREFIX<n>`): a URL flood.
const FLOOD: &str = r#"
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", os.getenv("OBSERVER_BENCH_PREFIX") .. n)
end
"#;

/// What one wrk run measured.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Load {
    pub requests: u64,
    pub duration_us: u64,
    pub bytes: u64,
    pub errors: u64,
    pub non_2xx: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl Load {
    pub fn rps(&self) -> f64 {
        self.requests as f64 / (self.duration_us.max(1) as f64 / 1e6)
    }
}

/// How to load one URL.
pub struct Wrk<'a> {
    pub port: u16,
    pub path: &'a str,
    pub connections: u32,
    pub threads: u32,
    pub seconds: u64,
    /// Send every request to a new path under `path` (a URL flood).
    pub flood: bool,
    /// `Connection: close`: a new connection per request.
    pub close: bool,
}

impl Wrk<'_> {
    pub fn run(&self, scratch: &Path) -> Result<Load> {
        // Files of their own: the soak runs several wrk at once.
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let script = scratch.join(format!("wrk-{n}.lua"));
        let out = scratch.join(format!("wrk-{n}.json"));
        fs::write(&script, if self.flood { format!("{FLOOD}{DONE}") } else { DONE.to_string() })?;
        let _ = fs::remove_file(&out);
        // Loopback only: the URL is always 127.0.0.1.
        let url = format!("http://127.0.0.1:{}{}", self.port, self.path);
        let res = Command::new("wrk")
            .args(["-t", &self.threads.to_string(), "-c", &self.connections.to_string()])
            .args(["-d", &format!("{}s", self.seconds), "--timeout", "10s"])
            .args(if self.close { &["-H", "Connection: close"][..] } else { &[] })
            .arg("-s")
            .arg(&script)
            .arg(&url)
            .env("OBSERVER_BENCH_OUT", &out)
            .env("OBSERVER_BENCH_PREFIX", self.path)
            .output()
            .context("running wrk (cargo xtask setup installs it)")?;
        if !res.status.success() {
            bail!("wrk {url} failed: {}", String::from_utf8_lossy(&res.stderr));
        }
        let text = fs::read_to_string(&out).with_context(|| format!("wrk wrote no summary for {url}"))?;
        serde_json::from_str(&text).with_context(|| format!("wrk summary {text}"))
    }
}
