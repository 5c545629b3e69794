//! The app lifecycle driven by a fake host (process tree, liveness, listeners, and the
//! background helpers, whose results the tests send when they choose) and a fake clock
//! (instants the tests make up).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use super::{
    background::{Discovered, MigrationCounts, tables},
    discover::Discovery,
    lifecycle::{Apps, BACKLOG, Host},
    migrations::AliasMigrations,
};
use crate::{
    events::SockAddr, exchange::Observed, selfmetrics::SelfStats, server::Exposition, settings::Settings,
};

#[derive(Default)]
struct World {
    parents: HashMap<u32, u32>,
    dead: HashSet<u32>,
    listening: HashMap<u32, String>,
    discoveries: Vec<(u32, mpsc::Sender<Discovered>)>,
    migrations: Vec<(u32, mpsc::Sender<MigrationCounts>)>,
}

#[derive(Clone, Default)]
struct FakeHost(Arc<Mutex<World>>);

impl FakeHost {
    fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.0.lock().unwrap()
    }

    fn child(&self, pid: u32, parent: u32) {
        self.world().parents.insert(pid, parent);
    }
}

impl Host for FakeHost {
    fn hostname(&self) -> String {
        "node1".into()
    }

    fn parent_of(&self, pid: u32) -> Option<u32> {
        self.world().parents.get(&pid).copied()
    }

    fn alive(&self, pid: u32) -> bool {
        !self.world().dead.contains(&pid)
    }

    fn listen_addr(&self, pid: u32) -> Option<String> {
        self.world().listening.get(&pid).cloned()
    }

    fn discover(&self, root: u32, _settings: &Settings) -> Option<mpsc::Receiver<Discovered>> {
        let (tx, rx) = mpsc::channel();
        self.world().discoveries.push((root, tx));
        Some(rx)
    }

    fn count_migrations(&self, root: u32, _timeout: Duration) -> Option<mpsc::Receiver<MigrationCounts>> {
        let (tx, rx) = mpsc::channel();
        self.world().migrations.push((root, tx));
        Some(rx)
    }
}

fn settings() -> Settings {
    Settings { migrations: false, ..Settings::default() }
}

fn apps(settings: Settings) -> (Apps, FakeHost, Arc<Mutex<Exposition>>) {
    let host = FakeHost::default();
    let shared = Arc::new(Mutex::new(Exposition::default()));
    (Apps::new(settings, shared.clone(), Box::new(host.clone())), host, shared)
}

fn peer(port: u16) -> Observed {
    Observed::Refused(SockAddr::Inet(SocketAddr::from(([127, 0, 0, 1], port))))
}

fn port_of(o: &Observed) -> u16 {
    match o {
        Observed::Refused(SockAddr::Inet(s)) => s.port(),
        _ => panic!("not a test event"),
    }
}

fn discovery() -> Discovery {
    serde_json::from_str(
        r#"{"django":"5.2","settings":{"APPEND_SLASH":true,"DEFAULT_CHARSET":"utf-8",
            "SECURE_PROXY_SSL_HEADER":["HTTP_X_APP_TLS","https"]},
            "routes":[{"view":"index","segments":[{"kind":"route","regex":"^\\Z","endpoint":true}]}]}"#,
    )
    .unwrap()
}

#[test]
fn workers_and_their_children_join_the_masters_app() {
    let (mut a, host, _) = apps(settings());
    let now = Instant::now();
    host.child(101, 100);
    host.child(102, 101);
    let mut dropped = Vec::new();
    a.tracked(100, now, &mut dropped);
    a.tracked(101, now, &mut dropped);
    a.forked(103, 101);
    a.tracked(102, now, &mut dropped);
    assert_eq!(a.len(), 1);
    for pid in [100, 101, 102, 103] {
        assert_eq!(a.root_of(pid), Some(100), "pid {pid}");
    }
    assert!(dropped.is_empty());
    // A fork of an untraced process is nobody's.
    a.forked(201, 200);
    assert_eq!(a.root_of(201), None);
}

#[test]
fn an_app_traced_above_apps_already_traced_takes_them_in_whole() {
    let (mut a, host, shared) = apps(settings());
    let now = Instant::now();
    host.child(201, 200);
    host.child(202, 201);
    let mut dropped = Vec::new();
    a.tracked(201, now, &mut dropped);
    a.tracked(202, now, &mut dropped);
    let mut stats = SelfStats::default();
    assert!(a.materialized(201, None, &mut stats).is_some());
    assert!(shared.lock().unwrap().registries.contains_key(&201));
    a.tracked(200, now, &mut dropped);
    assert_eq!(dropped, [201]);
    assert_eq!(a.len(), 1);
    // The absorbed app's root goes on as a member, not as nobody's process.
    for pid in [200, 201, 202] {
        assert_eq!(a.root_of(pid), Some(200), "pid {pid}");
    }
    assert!(!shared.lock().unwrap().registries.contains_key(&201));
}

#[test]
fn the_processes_that_outlive_their_root_become_a_new_app() {
    // A gunicorn master re-exec'd with USR2: the new master (301, a child of the old
    // one) and its worker (302) live on when the old master (300) exits.
    let (mut a, host, _) = apps(settings());
    let now = Instant::now();
    host.child(301, 300);
    host.child(302, 301);
    host.child(303, 300);
    let mut dropped = Vec::new();
    for pid in [300, 301, 302, 303] {
        a.tracked(pid, now, &mut dropped);
    }
    host.world().dead.extend([300, 303]);
    host.world().parents.remove(&301);
    a.exited(303, now, &mut dropped);
    assert!(dropped.is_empty(), "a worker's exit ends nothing");
    assert_eq!(a.root_of(303), None);
    a.exited(300, now, &mut dropped);
    assert_eq!(dropped, [300]);
    assert_eq!(a.len(), 1);
    assert_eq!(a.root_of(301), Some(301));
    assert_eq!(a.root_of(302), Some(301));
    assert_eq!(a.root_of(300), None);
}

#[test]
fn apps_whose_exit_was_lost_are_swept() {
    let (mut a, host, shared) = apps(settings());
    let now = Instant::now();
    let mut dropped = Vec::new();
    a.tracked(400, now, &mut dropped);
    a.tracked(500, now, &mut dropped);
    a.materialized(400, None, &mut SelfStats::default());
    a.sweep(now, &mut dropped);
    assert!(dropped.is_empty());
    host.world().dead.insert(400);
    a.sweep(now, &mut dropped);
    assert_eq!(dropped, [400]);
    assert_eq!(a.len(), 1);
    assert!(shared.lock().unwrap().registries.is_empty());
}

#[test]
fn events_wait_for_discovery_and_are_replayed_in_order() {
    let (mut a, host, _) = apps(settings());
    let now = Instant::now();
    let mut stats = SelfStats::default();
    a.tracked(600, now, &mut Vec::new());
    assert!(a.get(600).is_some_and(|app| !app.known()));
    // The first event starts the discovery and waits, as do the ones after it.
    for port in [1, 2, 3] {
        assert!(a.admit(600, peer(port), &mut stats).is_none());
    }
    assert_eq!(host.world().discoveries.len(), 1, "one discovery per app");
    assert!(a.poll_discoveries(&mut stats).is_empty(), "nothing to replay while it runs");
    let (root, tx) = host.world().discoveries.pop().unwrap();
    assert_eq!(root, 600);
    tx.send(Ok(tables(discovery(), &[], &[]))).unwrap();
    let over = a.poll_discoveries(&mut stats);
    assert_eq!(over.len(), 1);
    assert_eq!(over[0].root, 600);
    assert_eq!(over[0].backlog.iter().map(port_of).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(over[0].config.extra_header.as_deref(), Some("x-app-tls"));
    assert_eq!(stats.route_discovery_ok, 1);
    let app = a.get(600).unwrap();
    assert!(app.known() && app.views.has_routes() && app.settings.append_slash);
    // Discovered: events pass straight through.
    assert!(a.admit(600, peer(4), &mut stats).is_some());
    assert_eq!(stats.backlog_dropped, 0);
}

#[test]
fn the_backlog_keeps_the_newest_events_up_to_its_bound() {
    let (mut a, host, _) = apps(settings());
    let mut stats = SelfStats::default();
    a.tracked(700, Instant::now(), &mut Vec::new());
    let n = BACKLOG + 5;
    for i in 0..n {
        assert!(a.admit(700, peer((i % 60_000) as u16 + 1), &mut stats).is_none());
    }
    assert_eq!(stats.backlog_dropped, 5);
    // The discovery's thread died without a word: a failure, and what waited goes on.
    host.world().discoveries.clear();
    let over = a.poll_discoveries(&mut stats);
    assert_eq!(stats.route_discovery_failed, 1);
    assert_eq!(over[0].backlog.len(), BACKLOG);
    assert_eq!(port_of(&over[0].backlog[0]), 6, "the oldest were dropped");
    assert!(a.get(700).unwrap().known());
}

#[test]
fn an_app_that_serves_nothing_is_discovered_after_the_delay() {
    let delay = Duration::from_secs(10);
    let (mut a, host, _) = apps(Settings { discovery_delay: delay, ..settings() });
    let t0 = Instant::now();
    a.tracked(800, t0, &mut Vec::new());
    a.discover_quiet(t0 + delay - Duration::from_millis(1));
    assert!(host.world().discoveries.is_empty());
    a.discover_quiet(t0 + delay);
    assert_eq!(host.world().discoveries.len(), 1);
    a.discover_quiet(t0 + 2 * delay);
    assert_eq!(host.world().discoveries.len(), 1, "started once");
}

#[test]
fn discovery_off_leaves_the_app_known_at_once() {
    let (mut a, host, _) = apps(Settings { discover_routes: false, ..settings() });
    let mut stats = SelfStats::default();
    a.tracked(900, Instant::now(), &mut Vec::new());
    assert!(a.admit(900, peer(1), &mut stats).is_some());
    assert!(host.world().discoveries.is_empty());
    assert!(a.get(900).unwrap().known());
}

#[test]
fn migrations_are_counted_after_discovery_and_on_their_interval() {
    let interval = Duration::from_secs(300);
    let s =
        Settings { migrations: true, migrations_interval: interval, discover_routes: false, ..settings() };
    let (mut a, host, shared) = apps(s);
    let mut stats = SelfStats::default();
    let t0 = Instant::now();
    a.tracked(1000, t0, &mut Vec::new());
    a.poll_migrations(t0, &mut stats);
    assert!(host.world().migrations.is_empty(), "not before discovery");
    assert!(a.admit(1000, peer(1), &mut stats).is_some());
    a.poll_migrations(t0, &mut stats);
    assert_eq!(host.world().migrations.len(), 1);
    a.poll_migrations(t0, &mut stats);
    assert_eq!(host.world().migrations.len(), 1, "one count at a time");
    let (_, tx) = host.world().migrations.pop().unwrap();
    let counts = BTreeMap::from([
        ("default".to_string(), AliasMigrations::Counts { applied: 7, unapplied: 2 }),
        ("replica".to_string(), AliasMigrations::Failed { error: "no such table".into() }),
    ]);
    tx.send(Ok(counts)).unwrap();
    let t1 = t0 + Duration::from_secs(1);
    a.poll_migrations(t1, &mut stats);
    assert_eq!((stats.migrations_ok, stats.migrations_failed), (1, 1));
    let text = {
        let e = shared.lock().unwrap();
        let families = e.registries[&1000].gather();
        prometheus::TextEncoder::new().encode_to_string(&families).unwrap()
    };
    let applied =
        text.lines().find(|l| l.starts_with(r#"django_migrations_applied_total{connection="default","#));
    assert!(
        applied.is_some_and(|l| l.contains(r#"instance="node1:pid1000""#) && l.ends_with("} 7")),
        "{text}"
    );
    a.poll_migrations(t1 + interval - Duration::from_millis(1), &mut stats);
    assert!(host.world().migrations.is_empty());
    a.poll_migrations(t1 + interval, &mut stats);
    assert_eq!(host.world().migrations.len(), 1, "again after the interval");
}

#[test]
fn the_instance_label_names_where_the_app_serves() {
    let (mut a, host, _) = apps(settings());
    a.tracked(1100, Instant::now(), &mut Vec::new());
    let local = SockAddr::Inet(SocketAddr::from(([127, 0, 0, 1], 8000)));
    assert_eq!(a.labels(1100, Some(&local)).instance, "node1:8000");
    assert_eq!(
        a.labels(1100, Some(&SockAddr::UnixPath(b"/run/app.sock".to_vec()))).instance,
        "node1:/run/app.sock"
    );
    assert_eq!(a.labels(1100, None).instance, "node1:pid1100");
    host.world().listening.insert(1100, "9000".into());
    assert_eq!(a.labels(1100, None).instance, "node1:9000");
    assert_eq!(a.labels(1100, Some(&SockAddr::UnixUnnamed)).instance, "node1:9000");
    let (b, _, _) = apps(Settings { instance: Some("web-1".into()), job: "shop".into(), ..settings() });
    let l = b.labels(1100, Some(&local));
    assert_eq!((l.instance.as_str(), l.job.as_str()), ("web-1", "shop"));
}

#[test]
fn families_are_made_once_with_the_first_events_labels() {
    let (mut a, _, shared) = apps(settings());
    let mut stats = SelfStats::default();
    a.tracked(1200, Instant::now(), &mut Vec::new());
    let local = SockAddr::Inet(SocketAddr::from(([127, 0, 0, 1], 8001)));
    assert!(a.materialized(1200, Some(&local), &mut stats).is_some_and(|app| app.families.is_some()));
    let other = SockAddr::Inet(SocketAddr::from(([127, 0, 0, 1], 8002)));
    assert!(a.materialized(1200, Some(&other), &mut stats).is_some());
    assert!(a.materialized(1299, None, &mut stats).is_none(), "no such app");
    let e = shared.lock().unwrap();
    assert_eq!(e.registries.len(), 1);
    let text = prometheus::TextEncoder::new().encode_to_string(&e.registries[&1200].gather()).unwrap();
    assert!(!text.contains("8002"));
    assert_eq!((stats.registration_errors, stats.unregistered_events), (0, 0));
}
