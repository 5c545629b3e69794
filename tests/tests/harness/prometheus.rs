//! A private Prometheus server (Debian's) for a test: a config written by the test, its
//! TSDB in a temp dir, on a free loopback port; stopped (exactly the PID we started) on
//! drop. Queried through its HTTP API.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use super::{
    TempDir,
    django::{free_port, http_status},
};

pub struct Prometheus {
    child: Child,
    pub port: u16,
    pub dir: TempDir,
}

/// A GET as HTTP/1.0 (so the body is never chunked); returns the body.
fn get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to prometheus");
    s.set_read_timeout(Some(super::patience(30))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("prometheus response");
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
}

/// Percent-encodes a query parameter.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Prometheus {
    /// Starts it with `config` (YAML) written to prometheus.yml; `files` are written next
    /// to it first (rule files the config names).
    pub fn start(config: &str, files: &[(&str, String)]) -> Self {
        let dir = TempDir::new("prometheus");
        for (name, text) in files {
            std::fs::write(Path::new(dir.path()).join(name), text).unwrap();
        }
        let cfg = format!("{}/prometheus.yml", dir.path());
        std::fs::write(&cfg, config).unwrap();
        let out = Command::new("promtool").args(["check", "config", &cfg]).output().expect("run promtool");
        assert!(
            out.status.success(),
            "promtool check config: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let log = std::fs::File::create(format!("{}/prometheus.log", dir.path())).unwrap();
        let mut child = Command::new("prometheus")
            .arg(format!("--config.file={cfg}"))
            .arg(format!("--storage.tsdb.path={}/data", dir.path()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus (cargo xtask setup installs it)");
        let deadline = Instant::now() + super::patience(30);
        while http_status(port, "/-/ready") != Some(200) {
            if let Ok(Some(s)) = child.try_wait() {
                panic!(
                    "prometheus exited with {s}: {}",
                    std::fs::read_to_string(format!("{}/prometheus.log", dir.path())).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "prometheus did not become ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { child, port, dir }
    }

    /// `GET /api/v1/<path>`'s `data`; panics on an API error.
    pub fn api(&self, path: &str) -> Value {
        let body = get(self.port, &format!("/api/v1/{path}"));
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        assert_eq!(v["status"], "success", "{path}: {body}");
        v["data"].clone()
    }

    /// An instant query's result vector (or an error string).
    pub fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let body = get(self.port, &format!("/api/v1/query?query={}", encode(promql)));
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if v["status"] != "success" {
            return Err(v["error"].as_str().unwrap_or(&body).to_string());
        }
        match &v["data"]["result"] {
            Value::Array(a) => Ok(a.clone()),
            // A scalar result is data too.
            other => Ok(vec![other.clone()]),
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        super::stop(&mut self.child, libc::SIGTERM);
    }
}
