//! Faults, on purpose: the agent killed mid-traffic, its database and cache restarted
//! under load, its ring buffer overflowed. The app must not notice, nothing may stay
//! attached, losses must be counted exactly, and counts must be exact again afterwards.

mod harness;

use std::{
    collections::BTreeSet,
    io::{BufReader, Read, Write as _},
    net::TcpStream,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use harness::{
    caches::Redis,
    django::{Gunicorn, Metrics, ObserverRun, delta, family, http_get, http_status},
    ebpf_available,
    postgres::Postgres,
};
use serde_json::json;

/// A reader that counts the bytes it reads.
struct Counted<R> {
    inner: R,
    n: Arc<std::sync::atomic::AtomicU64>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n.fetch_add(k as u64, Ordering::Relaxed);
        Ok(k)
    }
}

/// A keep-alive HTTP/1.1 client connection that counts every byte it sends and receives.
struct Conn {
    w: TcpStream,
    r: BufReader<Counted<TcpStream>>,
    bytes: Arc<std::sync::atomic::AtomicU64>,
}

impl Conn {
    fn open(port: u16, bytes: &Arc<std::sync::atomic::AtomicU64>) -> Self {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(harness::patience(20))).unwrap();
        let r = BufReader::new(Counted { inner: s.try_clone().unwrap(), n: bytes.clone() });
        Self { w: s, r, bytes: bytes.clone() }
    }

    /// One GET; returns the status. `close` asks the server to close after it.
    fn get(&mut self, path: &str, close: bool) -> u16 {
        let conn = if close { "Connection: close\r\n" } else { "" };
        let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\n{conn}\r\n");
        self.w.write_all(req.as_bytes()).expect("send");
        self.bytes.fetch_add(req.len() as u64, Ordering::Relaxed);
        let resp = harness::django::read_response(&mut self.r, false);
        if close {
            // The server closes: read to the end so every byte it sent is counted.
            let mut rest = Vec::new();
            let _ = self.r.read_to_end(&mut rest);
        }
        resp.status
    }
}

/// IDs of the BPF objects (`prog_id` or `map_id`) a process holds, from its fdinfo.
fn bpf_ids(pid: u32, key: &str) -> BTreeSet<u32> {
    let mut ids = BTreeSet::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap().flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        for l in text.lines() {
            if let Some(v) = l.strip_prefix(key).and_then(|r| r.strip_prefix(':')) {
                ids.insert(v.trim().parse().unwrap());
            }
        }
    }
    ids
}

/// Whether the kernel still has the BPF object `kind` (`prog` or `map`) with this id.
fn bpf_exists(kind: &str, id: u32) -> bool {
    Command::new("bpftool")
        .args([kind, "show", "id", &id.to_string()])
        .output()
        .expect("run bpftool (cargo xtask setup installs it)")
        .status
        .success()
}

#[test]
fn a_killed_agent_leaves_nothing_attached_and_a_new_one_picks_up_open_connections() {
    if !ebpf_available() {
        return;
    }
    let app = Gunicorn::start("gthread", 2, false);
    let pid = app.pid().to_string();
    let mut obs = ObserverRun::start(&["--pid", &pid]);
    let programs = bpf_ids(obs.pid(), "prog_id");
    let maps = bpf_ids(obs.pid(), "map_id");
    assert!(programs.len() >= 20 && !maps.is_empty(), "programs {programs:?} maps {maps:?}");

    // Traffic across the kill, on one keep-alive connection and on new ones.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, port) = (stop.clone(), app.port);
        thread::spawn(move || {
            let bytes = Arc::default();
            let mut c = Conn::open(port, &bytes);
            let (mut sent, mut bad) = (0, Vec::new());
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && sent < 20_000 && Instant::now() < deadline {
                let status =
                    if sent % 2 == 0 { c.get("/", false) } else { Conn::open(port, &bytes).get("/", true) };
                if status != 200 {
                    bad.push(status);
                }
                sent += 1;
            }
            (sent, bad)
        })
    };
    thread::sleep(Duration::from_millis(500));
    obs.kill();
    // Its file descriptors closed with it: the tracepoints detach and the programs and
    // maps are freed (after an RCU grace period).
    let deadline = Instant::now() + harness::patience(20);
    loop {
        let left: Vec<u32> = programs.iter().copied().filter(|&id| bpf_exists("prog", id)).collect();
        let maps_left: Vec<u32> = maps.iter().copied().filter(|&id| bpf_exists("map", id)).collect();
        if left.is_empty() && maps_left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still loaded after the kill: programs {left:?}, maps {maps_left:?}"
        );
        thread::sleep(Duration::from_millis(200));
    }
    thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (sent, bad) = load.join().unwrap();
    assert!(bad.is_empty(), "the app answered {bad:?} while the agent died");
    assert!(sent >= 20, "only {sent} requests across the kill");

    // Connections opened before the new agent, idle between requests (keep-alive).
    let bytes = Arc::default();
    let mut old: Vec<Conn> = (0..4).map(|_| Conn::open(app.port, &bytes)).collect();
    for c in &mut old {
        assert_eq!(c.get("/", false), 200);
    }
    let obs = ObserverRun::start(&["--pid", &pid]);
    for c in &mut old {
        for _ in 0..5 {
            assert_eq!(c.get("/shop/items/3/", false), 200);
        }
    }
    for _ in 0..10 {
        assert_eq!(http_status(app.port, "/"), Some(200));
    }
    let by_view = |m: &Metrics, view: &str| {
        m.sum("django_http_responses_total_by_status_view_method_total", &[("view", view)])
    };
    let m = obs.wait_until("the 30 requests since the restart", |m| {
        by_view(m, "shop:item") >= 20.0
            && by_view(m, "index") >= 10.0
            && m.sum("observer_http_exchanges_total", &[]) >= 30.0
    });
    assert_eq!(by_view(&m, "shop:item"), 20.0, "on the connections older than the agent");
    assert_eq!(by_view(&m, "index"), 10.0, "on new connections");
    assert_eq!(m.sum("django_http_responses_before_middlewares_total", &[]), 30.0);
    assert_eq!(m.sum("observer_records_lost_total", &[]), 0.0);
    assert_eq!(m.sum("observer_parse_errors_total", &[]), 0.0);
}

const DB: [&str; 4] = [
    "django_db_new_connections_total",
    "django_db_new_connection_errors_total",
    "django_db_execute_total",
    "django_db_query_duration_seconds_count",
];
const CACHE: [&str; 4] = [
    "django_cache_get_total",
    "django_cache_get_hits_total",
    "django_cache_get_misses_total",
    "django_cache_get_fail_total",
];

#[test]
fn postgresql_and_redis_restarted_under_load_count_errors_and_then_exactly_again() {
    if !ebpf_available() {
        return;
    }
    let mut pg = Postgres::start();
    let settings = pg.settings(json!({"failing_aliases": false}));
    pg.migrate(&settings, &[]);
    let mut redis = Redis::start();
    let cache = json!({
        "kind": "django_redis", "location": redis.url(),
        "down": format!("redis://127.0.0.1:{}/0", harness::django::free_port()),
    });
    // django-prometheus inside the app is the reference for what was counted.
    let app = Gunicorn::start_with(
        "sync",
        1,
        true,
        &[("OBSERVER_TEST_PG", &settings), ("OBSERVER_TEST_CACHE", &cache.to_string())],
    );
    let obs = ObserverRun::start(&["--pid", &app.pid().to_string()]);
    let theirs = || Metrics::parse(&http_get(app.port, "/metrics"));
    let start_theirs = theirs();
    let start_ours = obs.metrics();

    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, port) = (stop.clone(), app.port);
        thread::spawn(move || {
            let mut statuses = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && statuses.len() < 20_000 && Instant::now() < deadline {
                // (a miss is a bare get: with the server gone, the get itself fails)
                for path in ["/db/list", "/cache/miss"] {
                    statuses.push(http_status(port, path).unwrap_or(0));
                }
            }
            statuses
        })
    };
    thread::sleep(Duration::from_millis(1500));
    pg.restart(Duration::from_millis(1000));
    thread::sleep(Duration::from_millis(1000));
    redis.restart(Duration::from_millis(1000));
    thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let statuses = load.join().unwrap();
    let failed = statuses.iter().filter(|&&s| s != 200).count();
    eprintln!("{} requests under load, {failed} failed while the servers restarted", statuses.len());
    assert!(failed > 0, "the restarts were felt by the app");
    assert!(statuses.len() - failed > 20);

    // The outage, as both saw it: refused connections are connection errors.
    let mid_theirs = theirs();
    let requests = mid_theirs.sum("django_http_responses_before_middlewares_total", &[]);
    let mid_ours = obs.wait_until("every request under load", |m| {
        m.sum("django_http_responses_before_middlewares_total", &[]) >= requests - 1.0
    });
    let errors = "django_db_new_connection_errors_total";
    let theirs_errors = delta(&mid_theirs, &start_theirs, errors);
    assert!(!theirs_errors.is_empty(), "django-prometheus saw connection errors");
    assert_eq!(delta(&mid_ours, &start_ours, errors), theirs_errors, "{errors} during the restarts");
    let fails = "django_cache_get_fail_total";
    assert!(!delta(&mid_theirs, &start_theirs, fails).is_empty(), "cache gets failed during the restart");

    // Afterwards: no parser stuck, every family exact again.
    for _ in 0..10 {
        assert_eq!(http_status(app.port, "/db/list"), Some(200));
        assert_eq!(http_status(app.port, "/cache/hit"), Some(200));
        assert_eq!(http_status(app.port, "/cache/miss"), Some(200));
    }
    let end_theirs = theirs();
    // Database families over the quiet pass; cache families over the whole run: a get in
    // flight when Redis was killed is counted (failed) when the client drops that socket,
    // which can fall after the split.
    let checks: Vec<(&str, &Metrics, _)> = DB
        .iter()
        .map(|f| (*f, &mid_ours, delta(&end_theirs, &mid_theirs, f)))
        .chain(CACHE.iter().map(|f| (*f, &start_ours, delta(&end_theirs, &start_theirs, f))))
        .collect();
    let mut ours = obs.metrics();
    let deadline = Instant::now() + harness::patience(20);
    while checks.iter().any(|(f, base, w)| &delta(&ours, base, f) != w) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(200));
        ours = obs.metrics();
    }
    for (f, base, w) in &checks {
        assert_eq!(&delta(&ours, base, f), w, "{f} after the restarts");
    }
    assert!(family(&ours, "django_db_execute_total").values().sum::<f64>() > 0.0);
    assert_eq!(ours.sum("observer_records_lost_total", &[]), 0.0);
}

#[test]
fn an_overflowing_ring_loses_exactly_what_it_counts_and_counts_are_exact_after() {
    if !ebpf_available() {
        return;
    }
    let app = Gunicorn::start("gthread", 2, false);
    // 16 KiB holds three 4 KiB captures: a burst of 200 KB responses overflows it.
    let obs = ObserverRun::start(&["--pid", &app.pid().to_string(), "--ring-buffer-bytes", "16384"]);
    let bytes: Arc<std::sync::atomic::AtomicU64> = Arc::default();
    let mut conns: Vec<Conn> = (0..4).map(|_| Conn::open(app.port, &bytes)).collect();
    for c in &mut conns {
        assert_eq!(c.get("/", false), 200);
    }
    obs.wait_until("the connections", |m| m.sum("observer_http_exchanges_total", &[]) >= 4.0);

    // The burst: four clients pulling 200 KB responses as fast as they can.
    let burst: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            thread::spawn(move || {
                for _ in 0..40 {
                    assert_eq!(c.get("/big", false), 200);
                }
                c
            })
        })
        .collect();
    let mut conns: Vec<Conn> = burst.into_iter().map(|t| t.join().unwrap()).collect();
    let lost = |m: &Metrics| m.sum("observer_records_lost_total", &[("reason", "ring_buffer_full")]);
    let settled = obs.wait_until("the burst drained", |m| {
        lost(m) > 0.0
            && m.sum("observer_data_bytes_total", &[]) + m.sum("observer_bytes_lost_total", &[])
                == bytes.load(Ordering::Relaxed) as f64
    });
    eprintln!(
        "burst: {} records received, {} lost",
        settled.sum("observer_records_total", &[]),
        lost(&settled)
    );

    // Quiet again: on the same connections (their parsers resynchronise) and on new ones.
    for c in &mut conns {
        for _ in 0..5 {
            assert_eq!(c.get("/shop/items/3/", false), 200);
        }
    }
    for _ in 0..10 {
        assert_eq!(Conn::open(app.port, &bytes).get("/plain", true), 200);
    }
    let total = bytes.load(Ordering::Relaxed) as f64;
    let m = obs.wait_until("every byte, received or counted lost", |m| {
        m.sum("observer_data_bytes_total", &[]) + m.sum("observer_bytes_lost_total", &[]) == total
    });
    // Exactly what the clients moved: nothing vanished without being counted.
    assert_eq!(
        m.sum("observer_bytes_lost_total", &[]),
        m.sum("observer_bytes_lost_total", &[("reason", "ring_buffer_full")]),
        "only the ring lost anything"
    );
    let after = delta(&m, &settled, "django_http_responses_total_by_status_view_method_total");
    let views: f64 = after.values().sum();
    assert_eq!(views, 30.0, "the 30 requests after the burst, exactly: {after:?}");
    assert_eq!(
        m.sum("django_http_responses_total_by_status_view_method_total", &[("view", "shop:item")])
            - settled
                .sum("django_http_responses_total_by_status_view_method_total", &[("view", "shop:item")]),
        20.0
    );
}
