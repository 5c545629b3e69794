//! Replays a recording made with `observer trace --json` into a [`Sink`] (the metrics
//! pipeline) without the kernel: the record streams of the userspace benchmarks
//! (`benches/replay.rs`), and a way to run a captured stream through the parsers offline.
//!
//! Process IDs are renumbered into a range no real process uses, under one fake root, so
//! that nothing about the machine the replay runs on (its /proc) leaks into it.

use std::{collections::HashMap, net::SocketAddr};

use base64::Engine as _;
use observer_ebpf::Syscall;

use crate::{
    conns::ConnInfo,
    django::{aliases::ConfigAlias, cache::ConfigCache},
    events::{Data, Direction, FdEvent, Open, Record, Role, SockAddr},
    pipeline::Settings,
    pump::Sink,
};

/// The fake root process every replayed process is forked from.
pub const ROOT_PID: u32 = 0x3fff_0000;

/// `benches/data/django-gunicorn.jsonl`: the test app under gunicorn (2 sync workers)
/// serving pages, database views (PostgreSQL) and cache views (django-redis), recorded
/// with `observer trace --json`. The replay benchmark and its test read it.
pub fn django_gunicorn() -> Recording {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/data/django-gunicorn.jsonl");
    Recording::parse(&std::fs::read_to_string(path).expect("the recording is in the repository"))
        .expect("the recording parses")
}

/// Pipeline settings for [`django_gunicorn`]: no discovery (no app to ask), and its
/// database and cache servers where they listened while it was recorded.
pub fn django_gunicorn_settings() -> Settings {
    Settings {
        discover_routes: false,
        migrations: false,
        db_aliases: vec![ConfigAlias {
            alias: "default".into(),
            host: Some("127.0.0.1".into()),
            port: Some(46015),
            name: None,
            user: None,
        }],
        caches: vec![ConfigCache {
            alias: Some("default".into()),
            backend: "redis".into(),
            servers: vec!["redis://127.0.0.1:43653/0".into()],
            key_regex: None,
        }],
        ..Settings::default()
    }
}

/// One recorded record, owned.
#[derive(Debug, Clone)]
pub enum Item {
    Open { pid: u32, fd: u32, conn: ConnInfo },
    Data { pid: u32, tid: u32, fd: u32, d: OwnedData, conn: ConnInfo },
    Close { pid: u32, fd: u32, conn_id: u64 },
}

#[derive(Debug, Clone)]
pub struct OwnedData {
    pub enter_ns: u64,
    pub exit_ns: u64,
    pub dir: Direction,
    pub total_len: u64,
    pub seq: Option<u32>,
    pub bytes: Vec<u8>,
}

/// A whole recording.
#[derive(Debug, Clone, Default)]
pub struct Recording {
    pub items: Vec<Item>,
    /// The renumbered processes, in order of appearance.
    pub pids: Vec<u32>,
}

fn addr(v: &serde_json::Value) -> Option<SockAddr> {
    let s = v.as_str()?;
    if let Some(p) = s.strip_prefix("unix:@") {
        return Some(SockAddr::UnixAbstract(p.as_bytes().to_vec()));
    }
    if s == "unix:(unnamed)" {
        return Some(SockAddr::UnixUnnamed);
    }
    if let Some(p) = s.strip_prefix("unix:") {
        return Some(SockAddr::UnixPath(p.as_bytes().to_vec()));
    }
    s.parse::<SocketAddr>().ok().map(SockAddr::Inet)
}

impl Recording {
    /// Parses `observer trace --json` lines; lines of other kinds are skipped.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut rec = Self::default();
        let mut pids: HashMap<u64, u32> = HashMap::new();
        let mut conns: HashMap<u64, ConnInfo> = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| format!("line {}: {e}", n + 1))?;
            let num = |k: &str| v[k].as_u64().ok_or_else(|| format!("line {}: no {k}", n + 1));
            let kind = v["type"].as_str().unwrap_or_default();
            if !matches!(kind, "open" | "data" | "close") {
                continue;
            }
            let next = ROOT_PID + 1 + pids.len() as u32;
            let pid = *pids.entry(num("pid")?).or_insert_with(|| {
                rec.pids.push(next);
                next
            });
            let fd = num("fd")? as u32;
            let conn_id = num("conn_id")?;
            let info = |c: &serde_json::Value| ConnInfo {
                conn_id,
                role: if c["role"] == "server" { Role::Server } else { Role::Client },
                local: addr(&c["local"]),
                peer: addr(&c["peer"]),
                inode: None,
                owners: vec![(pid, fd)],
                preexisting: c["preexisting"].as_bool().unwrap_or(false),
            };
            match kind {
                "open" => {
                    let conn = info(&v["conn"]);
                    conns.insert(conn_id, conn.clone());
                    rec.items.push(Item::Open { pid, fd, conn });
                }
                "close" => rec.items.push(Item::Close { pid, fd, conn_id }),
                _ => {
                    // A connection seen only by its data (opened before the recording).
                    let conn = conns.entry(conn_id).or_insert_with(|| info(&v["conn"])).clone();
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(v["data"].as_str().unwrap_or_default())
                        .map_err(|e| format!("line {}: {e}", n + 1))?;
                    let d = OwnedData {
                        enter_ns: num("enter_ns")?,
                        exit_ns: num("exit_ns")?,
                        dir: if v["dir"] == "send" { Direction::Send } else { Direction::Recv },
                        total_len: num("total_len")?,
                        seq: v["seq"].as_u64().map(|s| s as u32),
                        bytes,
                    };
                    rec.items.push(Item::Data { pid, tid: num("tid")? as u32, fd, d, conn });
                }
            }
        }
        Ok(rec)
    }

    /// Data records in the recording.
    pub fn data_records(&self) -> usize {
        self.items.iter().filter(|i| matches!(i, Item::Data { .. })).count()
    }

    /// Bytes the data records carry (captured).
    pub fn captured_bytes(&self) -> usize {
        self.items.iter().map(|i| if let Item::Data { d, .. } = i { d.bytes.len() } else { 0 }).sum()
    }

    /// Feeds the recording to `sink` as the pump would: the root process tracked, every
    /// recorded process forked from it, then each record with its connection.
    pub fn replay(&self, sink: &mut impl Sink) {
        sink.tracked(ROOT_PID, "replay");
        for &pid in &self.pids {
            sink.record(&Record::ProcFork { pid, parent: ROOT_PID, ts_ns: 0 }, None);
        }
        for item in &self.items {
            match item {
                Item::Open { pid, fd, conn } => {
                    let o = Open {
                        ts_ns: 0,
                        tgid: *pid,
                        tid: *pid,
                        fd: *fd,
                        conn_id: conn.conn_id,
                        role: conn.role,
                        in_progress: false,
                        peer: conn.peer.clone(),
                        local: conn.local.clone(),
                        listen_fd: None,
                    };
                    sink.record(&Record::ConnOpen(o), Some(conn));
                }
                Item::Data { pid, tid, fd, d, conn } => {
                    let data = Data {
                        enter_ns: d.enter_ns,
                        exit_ns: d.exit_ns,
                        tgid: *pid,
                        tid: *tid,
                        fd: *fd,
                        conn_id: conn.conn_id,
                        syscall: if d.dir == Direction::Send { Syscall::Sendto } else { Syscall::Recvfrom },
                        dir: d.dir,
                        total_len: d.total_len,
                        bytes: &d.bytes,
                        fault: false,
                        no_capture: false,
                        ciphertext: false,
                        seq: d.seq,
                    };
                    sink.record(&Record::Data(data), Some(conn));
                }
                Item::Close { pid, fd, conn_id } => {
                    let c = FdEvent { ts_ns: 0, tgid: *pid, tid: *pid, fd: *fd, conn_id: *conn_id };
                    sink.record(&Record::ConnClose(c), None);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sums of each family's samples in what the pipeline exports.
    fn totals(shared: &std::sync::Mutex<crate::server::Exposition>) -> impl Fn(&str) -> f64 {
        let e = crate::fault::lock(shared);
        let families: Vec<_> = e.registries.values().flat_map(|r| r.gather()).collect();
        let samples = crate::django::expo::parse_text(&crate::django::expo::encode_text(&families));
        move |name: &str| {
            samples.iter().filter(|s| s.series().split('{').next() == Some(name)).map(|s| s.value).sum()
        }
    }

    #[derive(Default)]
    struct Count {
        tracked: Vec<u32>,
        forks: usize,
        data: usize,
        bytes: usize,
        opens: usize,
        closes: usize,
    }

    impl Sink for Count {
        fn tracked(&mut self, pid: u32, _why: &str) {
            self.tracked.push(pid);
        }
        fn record(&mut self, rec: &Record<'_>, conn: Option<&ConnInfo>) {
            match rec {
                Record::ProcFork { parent, .. } => {
                    assert_eq!(*parent, ROOT_PID);
                    self.forks += 1;
                }
                Record::Data(d) => {
                    assert!(conn.is_some());
                    self.data += 1;
                    self.bytes += d.bytes.len();
                }
                Record::ConnOpen(_) => self.opens += 1,
                Record::ConnClose(_) => self.closes += 1,
                _ => {}
            }
        }
    }

    #[test]
    fn a_trace_json_recording_replays_record_for_record() {
        let text = r#"{"type":"ready","pids":[7],"capture_bytes":4096}
{"type":"open","ts_ns":1,"pid":7,"tid":7,"fd":5,"conn_id":9,"role":"server","in_progress":false,"conn":{"role":"server","local":"127.0.0.1:8000","peer":"127.0.0.1:5000","family":"ipv4","preexisting":false}}
{"type":"data","time_unix_ns":1,"enter_ns":2,"exit_ns":3,"pid":7,"tid":8,"fd":5,"conn_id":9,"dir":"recv","syscall":"recvfrom","total_len":5,"cap_len":5,"truncated":false,"fault":false,"no_capture":false,"seq":0,"data":"aGVsbG8=","conn":{"role":"server","local":"127.0.0.1:8000","peer":"127.0.0.1:5000","family":"ipv4","preexisting":false}}
{"type":"data","time_unix_ns":1,"enter_ns":4,"exit_ns":5,"pid":11,"tid":11,"fd":3,"conn_id":12,"dir":"send","syscall":"write","total_len":2,"cap_len":2,"truncated":false,"fault":false,"no_capture":false,"seq":4,"data":"aGk=","conn":{"role":"client","local":null,"peer":"unix:/run/x.sock","family":"unix","preexisting":true}}
{"type":"close","ts_ns":6,"pid":7,"tid":7,"fd":5,"conn_id":9}
{"type":"counters","counters":{}}"#;
        let r = Recording::parse(text).unwrap();
        assert_eq!(r.data_records(), 2);
        assert_eq!(r.captured_bytes(), 7);
        assert_eq!(r.pids, vec![ROOT_PID + 1, ROOT_PID + 2]);
        match &r.items[2] {
            Item::Data { conn, d, .. } => {
                assert_eq!(conn.peer, Some(SockAddr::UnixPath(b"/run/x.sock".to_vec())));
                assert!(conn.preexisting);
                assert_eq!(d.seq, Some(4));
            }
            other => panic!("{other:?}"),
        }
        let mut c = Count::default();
        r.replay(&mut c);
        assert_eq!(c.tracked, vec![ROOT_PID]);
        assert_eq!((c.forks, c.data, c.bytes, c.opens, c.closes), (2, 2, 7, 1, 1));
        assert!(Recording::parse("{not json").is_err());
    }

    /// The benchmark's recording, through the whole pipeline, gives the counts of what
    /// was sent while it was recorded: 60 rounds of /, /db/list, /cache/hit and
    /// /shop/items/N/, then 10 of /big, /db/create and /cache/miss (curl, one
    /// connection each, gunicorn with 2 sync workers).
    #[test]
    fn the_bench_recording_gives_the_counts_that_were_sent() {
        use std::sync::{Arc, Mutex};

        use crate::{pipeline::Pipeline, server::Exposition};
        let rec = django_gunicorn();
        let settings = django_gunicorn_settings();
        let shared = Arc::new(Mutex::new(Exposition::default()));
        let mut p = Pipeline::new(settings, shared.clone());
        rec.replay(&mut p);
        let total = totals(&shared);
        assert_eq!(total("django_http_responses_before_middlewares_total"), 270.0);
        assert_eq!(total("django_cache_get_total"), 70.0);
        assert_eq!(total("django_cache_get_hits_total"), 60.0);
        assert_eq!(total("django_cache_get_misses_total"), 10.0);
        assert_eq!(total("django_db_execute_total"), 70.0);
        assert_eq!(total("django_model_inserts_total"), 10.0);
    }

    /// A parser that panics (a test hook makes the HTTP parser fail on one request)
    /// costs that connection only: its records from then on are dropped and counted as
    /// lost to a parser fault, and every other connection is counted exactly.
    #[test]
    fn a_panicking_parser_costs_its_connection_only() {
        use std::sync::{Arc, Mutex};

        use crate::{pipeline::Pipeline, server::Exposition};
        const FAULTY: &[u8] = b"GET /shop/items/7/ ";
        crate::fault::install_hook();
        let rec = django_gunicorn();
        let faulty_conn = rec
            .items
            .iter()
            .find_map(|i| match i {
                Item::Data { d, conn, .. } if d.bytes.starts_with(FAULTY) => Some(conn.conn_id),
                _ => None,
            })
            .expect("the recording has that request");
        // The faulty record and every later one of its connection.
        let mut seen = false;
        let lost = rec
            .items
            .iter()
            .filter(|i| match i {
                Item::Data { d, conn, .. } if conn.conn_id == faulty_conn => {
                    seen |= d.bytes.starts_with(FAULTY);
                    seen
                }
                _ => false,
            })
            .count();
        assert!(lost >= 2, "the request and at least its response");
        let shared = Arc::new(Mutex::new(Exposition::default()));
        let mut p = Pipeline::new(django_gunicorn_settings(), shared.clone());
        p.inject_fault = Some(|c| c.bytes.starts_with(FAULTY));
        rec.replay(&mut p);
        let stats = p.stats();
        assert_eq!(stats.parser_faults.get("http"), Some(&1));
        assert_eq!(stats.records_lost_parser_fault, lost as u64);
        let total = totals(&shared);
        assert_eq!(total("django_http_requests_before_middlewares_total"), 269.0);
        assert_eq!(total("django_http_responses_before_middlewares_total"), 269.0);
        assert_eq!(total("django_cache_get_total"), 70.0);
        assert_eq!(total("django_db_execute_total"), 70.0);
        assert_eq!(total("django_model_inserts_total"), 10.0);
    }
}
