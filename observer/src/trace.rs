//! `observer trace`: prints every record of the selected processes, one line each, or as
//! JSON lines (`--json`, with the full captured bytes in base64) that can become parser
//! test fixtures. On exit it prints the loss counters.
//!
//! This is a local debugging tool: unlike logs and /metrics it shows payload bytes, which
//! is its purpose.

use std::{
    io::{self, Write},
    time::{Duration, UNIX_EPOCH},
};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::{
    conns::ConnInfo,
    events::{Data, Record},
    loss::LossReport,
    pump::Sink,
};

/// Output format and options.
pub struct Printer {
    json: bool,
    preview_bytes: usize,
    /// CLOCK_REALTIME minus CLOCK_MONOTONIC, to turn kernel timestamps into wall time.
    realtime_offset_ns: i128,
    /// Flushed after each ring-buffer batch (see `Sink::flush`), not per line.
    out: io::BufWriter<io::Stdout>,
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

impl Printer {
    pub fn new(json: bool, preview_bytes: usize) -> Self {
        Self {
            json,
            preview_bytes,
            realtime_offset_ns: clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC),
            out: io::BufWriter::with_capacity(64 * 1024, io::stdout()),
        }
    }

    fn unix_ns(&self, mono_ns: u64) -> u64 {
        u64::try_from(i128::from(mono_ns) + self.realtime_offset_ns).unwrap_or(0)
    }

    fn emit(&mut self, line: &str) {
        if writeln!(self.out, "{line}").is_err() {
            Self::reader_gone();
        }
    }

    /// The reader went away (e.g. `observer trace | head`): exiting closes our BPF fds,
    /// which detaches every program.
    fn reader_gone() -> ! {
        std::process::exit(0);
    }

    fn flush_out(&mut self) {
        if self.out.flush().is_err() {
            Self::reader_gone();
        }
    }

    /// The first line: what is traced, once the programs are attached.
    pub fn ready(&mut self, pids: &[u32], capture_bytes: u32) {
        if self.json {
            let line = json!({"type": "ready", "pids": pids, "capture_bytes": capture_bytes}).to_string();
            self.emit(&line);
            self.flush_out();
        } else {
            eprintln!(
                "observer: tracing {} process(es) {:?}, capturing {capture_bytes} bytes per syscall; Ctrl-C to stop",
                pids.len(),
                pids
            );
        }
    }

    /// The last lines: every loss counter.
    pub fn counters(&mut self, report: &LossReport) {
        if self.json {
            let line = json!({"type": "counters", "counters": report.as_map()}).to_string();
            self.emit(&line);
            self.flush_out();
        } else {
            self.flush_out();
            let mut err = io::stderr().lock();
            for c in &report.counters {
                let _ = writeln!(err, "{} {}", c.series(), c.value);
            }
        }
    }

    /// Per-program run counts and average cost (with `--program-stats`).
    pub fn programs(&mut self, stats: &std::collections::BTreeMap<String, crate::ebpf::ProgramStats>) {
        if self.json {
            let map: serde_json::Map<String, Value> = stats
                .iter()
                .map(|(name, s)| {
                    let v = json!({"run_cnt": s.run_cnt, "run_time_ns": s.run_time_ns, "recursion_misses": s.recursion_misses});
                    (name.clone(), v)
                })
                .collect();
            let line = json!({"type": "programs", "programs": map}).to_string();
            self.emit(&line);
            self.flush_out();
        } else {
            let mut err = io::stderr().lock();
            for (name, s) in stats.iter().filter(|(_, s)| s.run_cnt > 0) {
                let avg = s.run_time_ns / s.run_cnt;
                let _ = writeln!(
                    err,
                    "program {name} runs={} avg_ns={avg} recursion_misses={}",
                    s.run_cnt, s.recursion_misses
                );
            }
        }
    }

    fn wall(&self, mono_ns: u64) -> String {
        let t = UNIX_EPOCH + Duration::from_nanos(self.unix_ns(mono_ns));
        let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        let day = secs.as_secs() % 86_400;
        format!("{:02}:{:02}:{:02}.{:06}", day / 3600, day / 60 % 60, day % 60, secs.subsec_micros())
    }

    fn preview(&self, bytes: &[u8]) -> String {
        let shown = &bytes[..bytes.len().min(self.preview_bytes)];
        let mut s = shown.escape_ascii().to_string();
        if shown.len() < bytes.len() {
            s.push_str("...");
        }
        s
    }
}

fn addr_str(a: Option<&crate::events::SockAddr>) -> String {
    a.map_or_else(|| "?".to_string(), ToString::to_string)
}

fn conn_json(conn: Option<&ConnInfo>) -> Value {
    match conn {
        Some(c) => json!({
            "role": c.role.as_str(),
            "local": c.local.as_ref().map(ToString::to_string),
            "peer": c.peer.as_ref().map(ToString::to_string),
            "family": c.peer.as_ref().or(c.local.as_ref()).map(|a| a.family()),
            "preexisting": c.preexisting,
        }),
        None => Value::Null,
    }
}

fn conn_text(conn: Option<&ConnInfo>) -> String {
    match conn {
        Some(c) => {
            format!("{} {} <-> {}", c.role.as_str(), addr_str(c.local.as_ref()), addr_str(c.peer.as_ref()))
        }
        None => "unknown connection".to_string(),
    }
}

impl Printer {
    fn data(&mut self, d: &Data<'_>, conn: Option<&ConnInfo>) {
        let line = if self.json {
            let mut v = json!({
                "type": "data",
                "time_unix_ns": self.unix_ns(d.exit_ns),
                "enter_ns": d.enter_ns,
                "exit_ns": d.exit_ns,
                "pid": d.tgid,
                "tid": d.tid,
                "fd": d.fd,
                "conn_id": d.conn_id,
                "dir": d.dir.as_str(),
                "syscall": d.syscall.name(),
                "total_len": d.total_len,
                "cap_len": d.bytes.len(),
                "truncated": d.truncated(),
                "fault": d.fault,
                "no_capture": d.no_capture,
                "ciphertext": d.ciphertext,
                "seq": d.seq,
                "data": base64::engine::general_purpose::STANDARD.encode(d.bytes),
            });
            v["conn"] = conn_json(conn);
            v.to_string()
        } else {
            let arrow = match d.dir {
                crate::events::Direction::Send => "send",
                crate::events::Direction::Recv => "recv",
            };
            let mut flags = String::new();
            if d.truncated() && !d.no_capture {
                flags.push_str(" truncated");
            }
            if d.fault {
                flags.push_str(" fault");
            }
            if d.ciphertext {
                flags.push_str(" tls");
            }
            format!(
                "{} pid={}/{} conn={:#x} [{}] {arrow} {} {}/{}{flags} \"{}\"",
                self.wall(d.exit_ns),
                d.tgid,
                d.tid,
                d.conn_id,
                conn_text(conn),
                d.syscall.name(),
                d.total_len,
                d.bytes.len(),
                self.preview(d.bytes)
            )
        };
        self.emit(&line);
    }
}

impl Sink for Printer {
    fn flush(&mut self, _conns: &crate::conns::ConnTable) {
        self.flush_out();
    }

    fn record(&mut self, rec: &Record<'_>, conn: Option<&ConnInfo>) {
        let line = match rec {
            Record::Data(d) => return self.data(d, conn),
            Record::ConnOpen(o) if self.json => {
                let mut v = json!({"type": "open", "ts_ns": o.ts_ns, "pid": o.tgid, "tid": o.tid, "fd": o.fd,
                    "conn_id": o.conn_id, "role": o.role.as_str(), "in_progress": o.in_progress});
                v["conn"] = conn_json(conn);
                v.to_string()
            }
            Record::ConnOpen(o) => format!(
                "{} pid={}/{} conn={:#x} [{}] open fd={}{}",
                self.wall(o.ts_ns),
                o.tgid,
                o.tid,
                o.conn_id,
                conn_text(conn),
                o.fd,
                if o.in_progress { " (in progress)" } else { "" }
            ),
            Record::ConnFailed(f) if self.json => json!({"type": "connect_failed", "ts_ns": f.ts_ns, "pid": f.tgid,
                "tid": f.tid, "fd": f.fd, "errno": f.errno, "peer": f.peer.as_ref().map(ToString::to_string)})
            .to_string(),
            Record::ConnFailed(f) => format!(
                "{} pid={}/{} connect fd={} to {} failed: errno {}",
                self.wall(f.ts_ns),
                f.tgid,
                f.tid,
                f.fd,
                f.peer.as_ref().map_or_else(|| "?".to_string(), ToString::to_string),
                f.errno
            ),
            Record::ConnClose(c) | Record::ConnDup(c) => {
                let what = if matches!(rec, Record::ConnClose(_)) { "close" } else { "dup" };
                if self.json {
                    json!({"type": what, "ts_ns": c.ts_ns, "pid": c.tgid, "tid": c.tid, "fd": c.fd, "conn_id": c.conn_id}).to_string()
                } else {
                    format!("{} pid={}/{} conn={:#x} [{}] {what} fd={}", self.wall(c.ts_ns), c.tgid, c.tid, c.conn_id, conn_text(conn), c.fd)
                }
            }
            Record::FdEpoch(e) if self.json => {
                json!({"type": "fd_epoch", "ts_ns": e.ts_ns, "pid": e.tgid, "lo": e.lo, "hi": e.hi, "epoch": e.epoch}).to_string()
            }
            Record::FdEpoch(e) => format!("{} pid={} close_range {}..={}", self.wall(e.ts_ns), e.tgid, e.lo, e.hi),
            Record::ProcFork { pid, parent, ts_ns } if self.json => {
                json!({"type": "fork", "ts_ns": ts_ns, "pid": pid, "parent": parent}).to_string()
            }
            Record::ProcFork { pid, parent, ts_ns } => format!("{} pid={parent} fork child={pid}", self.wall(*ts_ns)),
            Record::ProcExec { pid, ts_ns, .. } if self.json => json!({"type": "exec", "ts_ns": ts_ns, "pid": pid}).to_string(),
            Record::ProcExec { pid, ts_ns, .. } => format!("{} pid={pid} exec", self.wall(*ts_ns)),
            Record::ProcExit { pid, ts_ns } if self.json => json!({"type": "exit", "ts_ns": ts_ns, "pid": pid}).to_string(),
            Record::ProcExit { pid, ts_ns } => format!("{} pid={pid} exit", self.wall(*ts_ns)),
            Record::ProcMap { pid, ts_ns } if self.json => {
                json!({"type": "map_exec", "ts_ns": ts_ns, "pid": pid}).to_string()
            }
            Record::ProcMap { pid, ts_ns } => format!("{} pid={pid} mapped a file executable", self.wall(*ts_ns)),
            Record::Sqlite(c) if self.json => json!({"type": "sqlite", "ts_ns": c.enter_ns, "exit_ns": c.exit_ns,
                "pid": c.tgid, "tid": c.tid, "op": format!("{:?}", c.op), "handle": c.handle, "arg": c.arg,
                "ret": c.ret, "text": self.preview(c.text), "truncated": c.truncated,
                "data": base64::engine::general_purpose::STANDARD.encode(c.text)})
            .to_string(),
            Record::Sqlite(c) => format!(
                "{} pid={}/{} sqlite {:?} handle={:#x} arg={:#x} ret={} {}us {}",
                self.wall(c.enter_ns),
                c.tgid,
                c.tid,
                c.op,
                c.handle,
                c.arg,
                c.ret,
                c.exit_ns.saturating_sub(c.enter_ns) / 1000,
                self.preview(c.text)
            ),
        };
        self.emit(&line);
    }
}
