//! `observer run`'s sink: records of server connections go through the HTTP/1 parser and
//! become django_http_* samples; client connections that start (or go on) as PostgreSQL
//! go through its parser and become django_db_* and django_model_* samples, Redis and
//! memcached ones become django_cache_get_* samples, all of the target (the Django app)
//! the process belongs to.
//!
//! A target is a root process (a gunicorn/uwsgi master, a runserver, a uvicorn) and all
//! its descendants: every worker feeds one series set, so counters stay monotonic while
//! workers come and go. Its routes, databases and models are discovered in the
//! background; exchanges and database events wait in a bounded backlog meanwhile so that
//! their labels are right from the first one (and cache lookups are told from other
//! users of the same server). Its migrations are counted by its own
//! interpreter after discovery and on an interval.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use prometheus::Registry;

use crate::{
    app::{
        discover::{self, Database},
        migrations::{self, AliasMigrations},
    },
    conns::{ConnInfo, ConnTable},
    django::{
        TargetLabels,
        aliases::{AliasTable, ConfigAlias},
        cache::{CacheMetrics, CacheTable, ConfigCache},
        db::{DbMetrics, DbObservation, MigrationMetrics, ModelMap, ModelMetrics, POSTGRESQL},
        http::{Body, HttpMetrics, HttpObservation, UNNAMED_VIEW},
    },
    events::{Data, Direction, Record, Role, SockAddr},
    fault,
    loss::LossReport,
    parsers::{ConnState, Parsers, PgConn, Proto},
    profile::{Attribution, CacheWork, Profile, ViewProfileMetrics, Work, metrics::ViewObservation},
    protocol::{
        self, CacheParser, Chunk, KeyGet, Wire, detect,
        http1::{self, Event, Exchange, Http1Parser, Mode},
        memcached::MemcachedParser,
        postgres::{self, Failure, PgParser, sqlstate},
        redis::{self, RedisParser},
    },
    pump::{Live, Sink},
    selfmetrics::SelfStats,
    server::Exposition,
    stream::{Gap, Segment, Streams},
    targets::{self, procfs},
    top::{Sample as TopSample, Top},
    views::{AppSettings, RouteTable, View, ViewResolver},
};

/// Settings of the pipeline (from flags or the config file).
#[derive(Debug, Clone)]
pub struct Settings {
    pub job: String,
    pub namespace: String,
    pub pod: String,
    pub container: String,
    /// Fixed `instance` label; by default `<host>:<port>` of the app's listener.
    pub instance: Option<String>,
    /// This node's pods (`--kubernetes`): an app in a pod gets its namespace, pod,
    /// container and job.
    pub kubernetes: Option<crate::k8s::PodStore>,
    /// Routes to use when discovery fails (or is off).
    pub routes_file: Option<Arc<str>>,
    pub discover_routes: bool,
    pub discovery_timeout: Duration,
    pub max_views: usize,
    pub http: http1::Limits,
    /// Connections with parser state at once.
    pub max_parsers: usize,
    pub postgres: postgres::Limits,
    /// Model labels counted (all models when unset); they are created at 0.
    pub models: Option<Vec<String>>,
    /// Distinct model labels per app.
    pub max_models: usize,
    /// Redis/memcached commands sent and not yet answered, per connection.
    pub cache_commands: usize,
    /// DATABASES aliases from the config file (for apps whose settings cannot be read).
    pub db_aliases: Vec<ConfigAlias>,
    /// Caches from the config file.
    pub caches: Vec<ConfigCache>,
    /// Count each app's migrations with its own interpreter.
    pub migrations: bool,
    pub migrations_interval: Duration,
    /// An app that serves nothing is discovered anyway this long after it appeared.
    pub discovery_delay: Duration,
    /// A request in which one statement shape ran this many times is an N+1 suspect
    /// (0: never).
    pub n_plus_one_threshold: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            job: "django".into(),
            namespace: String::new(),
            pod: String::new(),
            container: String::new(),
            instance: None,
            kubernetes: None,
            routes_file: None,
            discover_routes: true,
            discovery_timeout: Duration::from_secs(30),
            max_views: 500,
            http: http1::Limits::default(),
            max_parsers: 65_536,
            postgres: postgres::Limits::default(),
            models: None,
            max_models: 1000,
            cache_commands: redis::Limits::default().max_pending,
            db_aliases: Vec::new(),
            caches: Vec::new(),
            migrations: true,
            migrations_interval: Duration::from_secs(300),
            discovery_delay: Duration::from_secs(10),
            n_plus_one_threshold: 10,
        }
    }
}

/// Exchanges and database events kept per target while it is being discovered.
const BACKLOG: usize = 10_000;

/// A discovery's result, with the route, alias and cache tables built off the pump (the
/// routes' regexes compiled, host names resolved: both can take long).
type Discovered = Result<(discover::Discovery, RouteTable, AliasTable, CacheTable), String>;

enum Routes {
    /// Discovery starts with the app's first exchange (by then it has loaded its
    /// settings and changed to its working directory; a fresh exec has not), or a while
    /// after the app appeared.
    NotStarted,
    Pending(mpsc::Receiver<Discovered>),
    Ready,
}

enum MigrationsCheck {
    Off,
    /// Next run at.
    Idle(Instant),
    Running(mpsc::Receiver<Result<BTreeMap<String, AliasMigrations>, String>>),
}

/// What a database connection did, for its app's families.
#[derive(Debug, Clone)]
enum DbWhat {
    Attempt,
    AttemptFailed,
    /// A connect that failed before any byte (refused, no such socket).
    Refused,
    Statement(postgres::Statement),
}

#[derive(Debug, Clone)]
struct DbEvent {
    /// Count it only if `peer` is one of the app's databases (a connection met in the
    /// middle, recognised by its messages alone).
    confirm: bool,
    peer: Option<SockAddr>,
    user: Option<Box<str>>,
    database: Option<Box<str>>,
    what: DbWhat,
}

/// A lookup on a Redis or memcached connection.
#[derive(Debug, Clone)]
struct CacheLookup {
    wire: Wire,
    peer: Option<SockAddr>,
    get: KeyGet,
}

enum Backlogged {
    Http(Exchange, Option<SockAddr>, Box<Profile>),
    Db(DbEvent),
    Cache(CacheLookup),
    /// A connect that failed before any byte: to a database, a cache, or neither.
    Refused(SockAddr),
}

impl Backlogged {
    fn protocol(&self) -> &'static str {
        match self {
            Self::Http(..) => "http",
            Self::Db(_) => "postgresql",
            Self::Cache(c) => c.wire.name(),
            Self::Refused(_) => "connect",
        }
    }
}

/// The families of one app, created together when the first of them is needed.
struct Families {
    http: HttpMetrics,
    db: DbMetrics,
    models: ModelMetrics,
    migrations: MigrationMetrics,
    cache: CacheMetrics,
    profile: ViewProfileMetrics,
}

struct Target {
    /// Created with the first exchange or database event, when the app listens and its
    /// `instance` label (its listening port) is known.
    families: Option<Families>,
    views: ViewResolver,
    settings: AppSettings,
    parser_config: http1::Config,
    routes: Routes,
    backlog: VecDeque<Backlogged>,
    aliases: AliasTable,
    caches: CacheTable,
    models: ModelMap,
    migrations: MigrationsCheck,
    appeared: Instant,
    /// Its families could not be registered (counted once): its events are dropped.
    unregistrable: bool,
}

/// At most one warning about parser faults per this long (each is counted).
const FAULT_WARNING_EVERY: Duration = Duration::from_secs(60);

pub struct Pipeline {
    settings: Settings,
    shared: Arc<Mutex<Exposition>>,
    hostname: String,
    targets: HashMap<u32, Target>,
    /// Traced process -> its target's root.
    pid_target: HashMap<u32, u32>,
    conns: Parsers,
    /// Each connection's records in order, gaps marked.
    streams: Streams,
    stats: SelfStats,
    /// Per (target, label): the overflow count already added to `stats`.
    overflow_seen: HashMap<(u32, &'static str), u64>,
    events: Vec<Event>,
    pg_events: Vec<postgres::Event>,
    cache_events: Vec<protocol::CacheEvent>,
    /// Which request each statement and cache lookup belongs to.
    attribution: Attribution,
    /// `observer top`'s screen, when this pipeline feeds one.
    top: Option<Top>,
    last_gc: Instant,
    /// When the last parser-fault warning was logged, and faults since then unlogged.
    fault_warned: Option<Instant>,
    faults_unwarned: u64,
    /// Tests: a parse step on which this returns true panics (see `fault`).
    #[cfg(test)]
    pub(crate) inject_fault: Option<fn(&Chunk<'_>) -> bool>,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

/// Where a process listens, for the `instance` label: its lowest TCP port, else the
/// path of its listening Unix socket.
fn listen_addr(pid: u32) -> Option<String> {
    let net = targets::NetTables::read(pid)?;
    let fds = targets::socket_fds(pid);
    let owned = |inode: u64| fds.iter().any(|(_, i)| *i == inode);
    let port = net
        .tcp
        .iter()
        .filter(|r| r.state == procfs::TCP_LISTEN && owned(r.inode))
        .map(|r| r.local.port())
        .min();
    if let Some(p) = port {
        return Some(p.to_string());
    }
    net.unix
        .iter()
        .filter(|r| r.listening && owned(r.inode))
        .find_map(|r| r.path.as_deref().map(|p| String::from_utf8_lossy(p).into_owned()))
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn parent_of(pid: u32) -> Option<u32> {
    targets::read_process(pid).map(|p| p.ppid).filter(|&p| p > 1)
}

impl Pipeline {
    /// The agent's own counters as the pipeline has them now (tests read them without
    /// a pump report).
    pub fn stats(&self) -> &SelfStats {
        &self.stats
    }

    /// Feeds `observer top`'s screen as well (it renders once a second, on the report).
    pub fn with_top(mut self, top: Top) -> Self {
        self.top = Some(top);
        self
    }

    pub fn new(settings: Settings, shared: Arc<Mutex<Exposition>>) -> Self {
        Self {
            settings,
            shared,
            hostname: hostname(),
            targets: HashMap::new(),
            pid_target: HashMap::new(),
            conns: Parsers::default(),
            streams: Streams::default(),
            stats: SelfStats::default(),
            overflow_seen: HashMap::new(),
            events: Vec::new(),
            pg_events: Vec::new(),
            cache_events: Vec::new(),
            attribution: Attribution::default(),
            top: None,
            last_gc: Instant::now(),
            fault_warned: None,
            faults_unwarned: 0,
            #[cfg(test)]
            inject_fault: None,
        }
    }

    fn labels(&self, root: u32, local: Option<&SockAddr>) -> TargetLabels {
        let served_on = local.and_then(|a| match a {
            SockAddr::Inet(s) => Some(s.port().to_string()),
            SockAddr::UnixPath(p) => Some(String::from_utf8_lossy(p).into_owned()),
            SockAddr::UnixAbstract(p) => Some(format!("@{}", String::from_utf8_lossy(p))),
            SockAddr::UnixUnnamed => None,
        });
        let pod = self.settings.kubernetes.as_ref().and_then(|k| k.labels_for_pid(root));
        if self.settings.kubernetes.is_some() && pod.is_none() {
            tracing::info!(root, "the app runs in no pod of this node that the API listed: no pod labels");
        }
        // In a pod, the instance is named after it, as a scrape of the pod would be.
        let host = pod.as_ref().map_or(self.hostname.as_str(), |p| p.pod.as_str());
        let instance =
            self.settings.instance.clone().unwrap_or_else(|| match served_on.or_else(|| listen_addr(root)) {
                Some(addr) => format!("{host}:{addr}"),
                None => format!("{host}:pid{root}"),
            });
        match pod {
            Some(p) => TargetLabels {
                job: p.job.unwrap_or_else(|| self.settings.job.clone()),
                namespace: p.namespace,
                pod: p.pod,
                container: p.container,
                instance,
            },
            None => TargetLabels {
                job: self.settings.job.clone(),
                namespace: self.settings.namespace.clone(),
                pod: self.settings.pod.clone(),
                container: self.settings.container.clone(),
                instance,
            },
        }
    }

    fn new_target(&mut self, root: u32) {
        tracing::info!(root, "new app");
        let migrations = if self.settings.migrations {
            MigrationsCheck::Idle(Instant::now())
        } else {
            MigrationsCheck::Off
        };
        let target = Target {
            families: None,
            views: ViewResolver::new(self.routes_file_table(), self.settings.max_views),
            settings: AppSettings::default(),
            parser_config: http1::Config::default(),
            routes: Routes::NotStarted,
            backlog: VecDeque::new(),
            // Until discovery: the config file's aliases (addresses only, no DNS here).
            aliases: AliasTable::build(&[], &self.settings.db_aliases, false),
            caches: CacheTable::build(&[], &self.settings.caches, false),
            models: ModelMap::by_rule(self.settings.models.as_deref()),
            migrations,
            appeared: Instant::now(),
            unregistrable: false,
        };
        self.targets.insert(root, target);
        self.pid_target.insert(root, root);
    }

    /// Starts the app's discovery in the background (or skips it when off).
    fn start_discovery(&mut self, root: u32) {
        let Some(t) = self.targets.get_mut(&root) else { return };
        t.routes = Routes::Ready;
        if !self.settings.discover_routes {
            return;
        }
        let (tx, rx) = mpsc::channel();
        let timeout = self.settings.discovery_timeout;
        let config = self.settings.db_aliases.clone();
        let config_caches = self.settings.caches.clone();
        let spawned = std::thread::Builder::new().name(format!("discover-{root}")).spawn(move || {
            let result = discover::discover(root, timeout).map(|d| {
                let routes = RouteTable::new(&d.routes);
                let aliases = AliasTable::build(&d.databases, &config, true);
                let caches = CacheTable::build(&d.caches, &config_caches, true);
                (d, routes, aliases, caches)
            });
            let _ = tx.send(result);
        });
        if spawned.is_ok() {
            t.routes = Routes::Pending(rx);
        }
    }

    /// Creates the app's registry and families, with its target labels, once. `local` is
    /// where its first exchange was served: the `instance` label names it.
    /// Returns whether the app has them: when they could not be made (a registration
    /// error, counted and logged once), its events are dropped and counted.
    fn materialize(&mut self, root: u32, local: Option<&SockAddr>) -> bool {
        match self.targets.get(&root) {
            None => return false,
            Some(t) if t.families.is_some() => return true,
            Some(t) if t.unregistrable => {
                self.stats.unregistered_events += 1;
                return false;
            }
            Some(_) => {}
        }
        let labels = self.labels(root, local);
        let made = Registry::new_custom(None, Some(labels.as_map())).and_then(|registry| {
            let families = Families {
                http: HttpMetrics::new(&registry)?,
                db: DbMetrics::new(&registry)?,
                models: ModelMetrics::new(&registry, self.settings.max_models)?,
                migrations: MigrationMetrics::new(&registry)?,
                cache: CacheMetrics::new(&registry)?,
                profile: ViewProfileMetrics::new(&registry)?,
            };
            Ok((registry, families))
        });
        let Some(t) = self.targets.get_mut(&root) else { return false };
        let (registry, mut families) = match made {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(root, error = %e, "cannot register the app's metric families: its events are dropped");
                t.unregistrable = true;
                self.stats.registration_errors += 1;
                self.stats.unregistered_events += 1;
                return false;
            }
        };
        // django-prometheus's model mixin creates its model's series at 0.
        for label in t.models.precreate() {
            families.models.precreate(label);
        }
        t.families = Some(families);
        tracing::info!(root, instance = %labels.instance, "exporting the app's series");
        self.publish(|e| {
            e.registries.insert(root, registry);
        });
        true
    }

    /// Whether events of the app wait for its discovery (and start it if needed).
    fn waits_for_discovery(&mut self, root: u32) -> bool {
        if matches!(self.targets.get(&root).map(|t| &t.routes), Some(Routes::NotStarted)) {
            self.start_discovery(root);
        }
        matches!(self.targets.get(&root).map(|t| &t.routes), Some(Routes::Pending(_)))
    }

    fn backlog(&mut self, root: u32, item: Backlogged) {
        let Some(t) = self.targets.get_mut(&root) else { return };
        if t.backlog.len() >= BACKLOG {
            t.backlog.pop_front();
            self.stats.backlog_dropped += 1;
        }
        t.backlog.push_back(item);
    }

    /// One exchange of an app (served on `local`): wait for its routes, or count it.
    fn exchange(&mut self, root: u32, ex: &Exchange, local: Option<&SockAddr>, profile: Profile) {
        if self.waits_for_discovery(root) {
            self.backlog(root, Backlogged::Http(ex.clone(), local.cloned(), Box::new(profile)));
            return;
        }
        if !self.materialize(root, local) {
            return;
        }
        if let Some(t) = self.targets.get_mut(&root) {
            if let Some(view) = observe(t, ex) {
                let (cache_gets, cache_hits) =
                    observe_profile(t, &view, ex, &profile, self.settings.n_plus_one_threshold);
                if let Some(top) = self.top.as_mut() {
                    top.observe(&TopSample {
                        root,
                        view: &view,
                        latency_s: ex.latency_s(),
                        profile: &profile,
                        cache_gets,
                        cache_hits,
                    });
                }
            }
            self.stats.http_exchanges += 1;
            self.attribution.counted(&profile);
        }
    }

    /// One database event of an app: wait for its aliases and models, or count it.
    fn db_event(&mut self, root: u32, ev: DbEvent) {
        if self.waits_for_discovery(root) {
            self.backlog(root, Backlogged::Db(ev));
            return;
        }
        let Some(t) = self.targets.get(&root) else { return };
        if ev.confirm && ev.peer.as_ref().is_none_or(|p| t.aliases.by_address(p).is_none()) {
            return;
        }
        // A connect that failed before any byte is a database's only if it was to one.
        let alias = match (&ev.what, &ev.peer) {
            (DbWhat::Refused, Some(peer)) => match t.aliases.by_address(peer) {
                Some(a) => a.to_string(),
                None => return,
            },
            (DbWhat::Refused, None) => return,
            _ => t.aliases.resolve(ev.peer.as_ref(), ev.user.as_deref(), ev.database.as_deref()).to_string(),
        };
        if !self.materialize(root, None) {
            return;
        }
        let Some(t) = self.targets.get_mut(&root) else { return };
        let Some(f) = t.families.as_mut() else { return };
        match ev.what {
            DbWhat::Attempt => f.db.attempt(&alias, POSTGRESQL),
            DbWhat::AttemptFailed => f.db.attempt_failed(&alias, POSTGRESQL),
            DbWhat::Refused => {
                f.db.attempt(&alias, POSTGRESQL);
                f.db.attempt_failed(&alias, POSTGRESQL);
            }
            DbWhat::Statement(st) => {
                let error_type = st.failure.map(|x| match x {
                    Failure::Server(code) => code.class_name(),
                    // psycopg: OperationalError when the connection broke, the base class
                    // for an error without a SQLSTATE.
                    Failure::ConnectionLost => sqlstate::NO_SQLSTATE,
                    Failure::Unknown | Failure::Desync => "DatabaseError",
                });
                f.db.observe(&DbObservation {
                    alias: &alias,
                    vendor: POSTGRESQL,
                    executes: u64::from(st.executes),
                    many: st.many,
                    error_type,
                    seconds: st.seconds(),
                });
                for (w, n) in &st.writes {
                    if let Some(label) = t.models.label(&w.table) {
                        f.models.count(w.op, &label, u64::from(*n));
                    }
                }
                self.stats.db_statements += 1;
            }
        }
    }

    /// A connect that failed before any byte: a database's or a cache's only if it was to
    /// one of the app's.
    fn refused(&mut self, root: u32, peer: SockAddr) {
        if self.waits_for_discovery(root) {
            self.backlog(root, Backlogged::Refused(peer));
            return;
        }
        let Some(t) = self.targets.get(&root) else { return };
        if t.aliases.by_address(&peer).is_some() {
            let ev = DbEvent {
                confirm: false,
                peer: Some(peer),
                user: None,
                database: None,
                what: DbWhat::Refused,
            };
            self.db_event(root, ev);
        } else if let Some(backend) = t.caches.by_address(&peer) {
            // The command never left: whatever it was, the cache call failed. Counted as
            // a failed get (see the README on what this over-counts).
            self.count_cache_get(root, backend, protocol::Outcome::Fail);
        }
    }

    /// One `cache.get()` of an app, into its django_cache_get_* families.
    fn count_cache_get(&mut self, root: u32, backend: &str, outcome: protocol::Outcome) {
        if !self.materialize(root, None) {
            return;
        }
        if let Some(f) = self.targets.get(&root).and_then(|t| t.families.as_ref()) {
            f.cache.observe(backend, outcome);
            self.stats.cache_gets += 1;
        }
    }

    /// One lookup on a cache connection: wait for the app's caches, or count it.
    fn cache_event(&mut self, root: u32, ev: CacheLookup) {
        if self.waits_for_discovery(root) {
            self.backlog(root, Backlogged::Cache(ev));
            return;
        }
        let Some(t) = self.targets.get(&root) else { return };
        let backend = ev.peer.as_ref().and_then(|p| t.caches.lookup(ev.wire, p, &ev.get.key));
        let Some(backend) = backend else {
            self.stats.cache_gets_ignored += 1;
            return;
        };
        self.count_cache_get(root, backend, ev.get.outcome);
    }

    fn routes_file_table(&self) -> Option<RouteTable> {
        let text = self.settings.routes_file.as_ref()?;
        RouteTable::from_routes_file(text).ok()
    }

    fn publish(&self, f: impl FnOnce(&mut Exposition)) {
        f(&mut fault::lock(&self.shared));
    }

    fn drop_target(&mut self, root: u32) {
        if let Some(top) = self.top.as_mut() {
            top.forget(root);
        }
        if self.targets.remove(&root).is_some() {
            tracing::info!(root, "app gone; its series are dropped");
            let members: Vec<u32> =
                self.pid_target.iter().filter(|(_, r)| **r == root).map(|(p, _)| *p).collect();
            self.pid_target.retain(|_, r| *r != root);
            self.conns.remove_target(root);
            self.publish(|e| {
                e.registries.remove(&root);
            });
            self.adopt(members.into_iter().filter(|&p| p != root && alive(p)).collect());
        }
    }

    /// Processes of an app whose root went away but which live on (a gunicorn master
    /// re-exec'd with USR2 outlives the old one): the topmost become new apps (a counter
    /// reset Prometheus sees, as for any restarted exporter) and the others join them.
    fn adopt(&mut self, orphans: Vec<u32>) {
        let set: std::collections::HashSet<u32> = orphans.iter().copied().collect();
        let (tops, rest): (Vec<u32>, Vec<u32>) =
            orphans.into_iter().partition(|&p| parent_of(p).is_none_or(|pp| !set.contains(&pp)));
        for p in tops.into_iter().chain(rest) {
            self.tracked(p, "outlived its app's root");
        }
    }

    /// Apps whose root vanished without an exit record (lost).
    fn sweep_targets(&mut self) {
        let dead: Vec<u32> = self.targets.keys().copied().filter(|&r| !alive(r)).collect();
        for r in dead {
            self.drop_target(r);
        }
    }

    /// Starts the discovery of apps that served nothing for a while.
    fn discover_quiet_apps(&mut self) {
        let delay = self.settings.discovery_delay;
        let quiet: Vec<u32> = self
            .targets
            .iter()
            .filter(|(_, t)| matches!(t.routes, Routes::NotStarted) && t.appeared.elapsed() >= delay)
            .map(|(r, _)| *r)
            .collect();
        for root in quiet {
            self.start_discovery(root);
        }
    }

    /// Picks up finished discoveries and replays what waited.
    fn poll_discoveries(&mut self) {
        let mut done = Vec::new();
        for (root, t) in &mut self.targets {
            if let Routes::Pending(rx) = &t.routes {
                match rx.try_recv() {
                    Ok(result) => done.push((*root, result)),
                    Err(mpsc::TryRecvError::Empty) => {}
                    Err(mpsc::TryRecvError::Disconnected) => {
                        done.push((*root, Err("discovery thread ended".into())))
                    }
                }
            }
        }
        for (root, result) in done {
            let Some(t) = self.targets.get_mut(&root) else { continue };
            t.routes = Routes::Ready;
            match result {
                Ok((d, table, aliases, caches)) => {
                    self.stats.route_discovery_ok += 1;
                    tracing::info!(
                        root,
                        django = %d.django,
                        routes = table.len(),
                        unsupported = table.unsupported,
                        dropped = table.dropped,
                        databases = d.databases.len(),
                        caches = caches.aliases().len(),
                        models = d.models.len(),
                        "routes discovered from the running app"
                    );
                    t.views.set_table(Some(table));
                    t.parser_config = http1::Config {
                        extra_header: d
                            .settings
                            .secure_header()
                            .map(|(name, _)| name)
                            .filter(|n| !http1::PROXY_HEADERS.contains(&n.as_str())),
                    };
                    t.settings = d.settings;
                    t.aliases = aliases;
                    t.caches = caches;
                    for c in
                        d.caches.iter().filter(|c| matches!(c.kind.as_deref(), Some("locmem" | "filebased")))
                    {
                        tracing::info!(
                            root,
                            alias = %c.alias,
                            "the cache lives in the process or on disk: its lookups cross no socket and are not counted"
                        );
                    }
                    t.models = ModelMap::new(
                        d.models.iter().map(|m| (m.table.as_str(), m.model.as_str(), m.mixin.as_deref())),
                        self.settings.models.as_deref(),
                    );
                    if d.databases
                        .iter()
                        .all(|db: &Database| db.engine.as_deref() == Some("django.db.backends.dummy"))
                        && !d.databases.is_empty()
                    {
                        t.migrations = MigrationsCheck::Off;
                    }
                }
                Err(e) => {
                    self.stats.route_discovery_failed += 1;
                    let fallback = if t.views.has_routes() { "the routes file" } else { "templated paths" };
                    tracing::warn!(root, error = %e, "route discovery failed; using {fallback}");
                }
            }
            let config = t.parser_config.clone();
            let backlog = std::mem::take(&mut t.backlog);
            for c in self.conns.of_target_mut(root) {
                if let Proto::Http(p) = &mut c.proto {
                    p.set_config(config.clone());
                }
            }
            for item in backlog {
                let protocol = item.protocol();
                let counted = fault::contain(|| match item {
                    Backlogged::Http(ex, local, profile) => {
                        self.exchange(root, &ex, local.as_ref(), *profile)
                    }
                    Backlogged::Db(ev) => self.db_event(root, ev),
                    Backlogged::Cache(ev) => self.cache_event(root, ev),
                    Backlogged::Refused(peer) => self.refused(root, peer),
                });
                if let Err(f) = counted {
                    self.fault_seen(protocol, root, &f);
                }
            }
        }
    }

    /// Starts due migration counts (after discovery) and applies finished ones.
    fn poll_migrations(&mut self) {
        let timeout = self.settings.discovery_timeout;
        let interval = self.settings.migrations_interval;
        let mut results = Vec::new();
        for (root, t) in &mut self.targets {
            if !matches!(t.routes, Routes::Ready) {
                continue;
            }
            match &t.migrations {
                MigrationsCheck::Idle(at) if Instant::now() >= *at => {
                    let (tx, rx) = mpsc::channel();
                    let pid = *root;
                    let spawned =
                        std::thread::Builder::new().name(format!("migrations-{root}")).spawn(move || {
                            let _ = tx.send(migrations::count(pid, timeout));
                        });
                    t.migrations = match spawned {
                        Ok(_) => MigrationsCheck::Running(rx),
                        Err(_) => MigrationsCheck::Idle(Instant::now() + interval),
                    };
                }
                MigrationsCheck::Running(rx) => match rx.try_recv() {
                    Ok(r) => results.push((*root, r)),
                    Err(mpsc::TryRecvError::Empty) => {}
                    Err(mpsc::TryRecvError::Disconnected) => {
                        results.push((*root, Err("thread ended".into())))
                    }
                },
                _ => {}
            }
        }
        for (root, result) in results {
            if let Some(t) = self.targets.get_mut(&root) {
                t.migrations = MigrationsCheck::Idle(Instant::now() + interval);
            }
            match result {
                Ok(aliases) => {
                    if aliases.is_empty() {
                        continue;
                    }
                    if !self.materialize(root, None) {
                        continue;
                    }
                    let Some(f) = self.targets.get_mut(&root).and_then(|t| t.families.as_mut()) else {
                        continue;
                    };
                    for (alias, m) in aliases {
                        match m {
                            AliasMigrations::Counts { applied, unapplied } => {
                                f.migrations.set(&alias, applied, unapplied);
                                self.stats.migrations_ok += 1;
                            }
                            AliasMigrations::Failed { error } => {
                                tracing::warn!(
                                    root,
                                    alias,
                                    error,
                                    "cannot count the migrations of a database"
                                );
                                self.stats.migrations_failed += 1;
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(root, error = %e, "cannot count the app's migrations");
                    self.stats.migrations_failed += 1;
                }
            }
        }
    }

    fn handle_events(&mut self, target: u32, conn_id: u64, local: Option<&SockAddr>) {
        let events = std::mem::take(&mut self.events);
        for ev in &events {
            match ev {
                Event::Exchange(ex) => {
                    let profile = self.attribution.take(conn_id);
                    self.exchange(target, ex, local, profile);
                }
                Event::Error(e) => *self.stats.parse_errors.entry(("http", e.as_str())).or_default() += 1,
            }
        }
        self.events = events;
        self.events.clear();
    }

    /// What a PostgreSQL connection's parser reported.
    fn handle_pg_events(&mut self, target: u32, conn_id: u64, thread: (u32, u32)) {
        let events = std::mem::take(&mut self.pg_events);
        for ev in &events {
            let (confirm, peer, user, database) = match self.conns.get_mut(conn_id) {
                Some(ConnState { proto: Proto::Postgres(pg), peer, .. }) => {
                    if let postgres::Event::Attempt { user, database } = ev {
                        pg.user.clone_from(user);
                        pg.database.clone_from(database);
                    }
                    (pg.mid_stream, peer.clone(), pg.user.clone(), pg.database.clone())
                }
                _ => (false, None, None, None),
            };
            let what = match ev {
                postgres::Event::Attempt { .. } => DbWhat::Attempt,
                postgres::Event::AttemptFailed { .. } => DbWhat::AttemptFailed,
                postgres::Event::Statement(st) => {
                    let work = Work::Db {
                        executes: st.executes,
                        seconds: st.seconds(),
                        shape: st.shape,
                        text: st.shape_text.clone(),
                    };
                    self.attribution.work(thread.0, thread.1, work);
                    DbWhat::Statement(st.clone())
                }
                postgres::Event::Encrypted => {
                    self.stats.db_encrypted += 1;
                    continue;
                }
                postgres::Event::Cancel => continue,
                postgres::Event::Error(e) => {
                    *self.stats.parse_errors.entry(("postgresql", e.as_str())).or_default() += 1;
                    continue;
                }
            };
            self.db_event(target, DbEvent { confirm, peer, user, database, what });
        }
        self.pg_events = events;
        self.pg_events.clear();
    }

    /// What a Redis or memcached connection's parser reported.
    fn handle_cache_events(&mut self, target: u32, wire: Wire, peer: Option<&SockAddr>, thread: (u32, u32)) {
        let protocol = wire.name();
        let mut events = std::mem::take(&mut self.cache_events);
        for ev in events.drain(..) {
            match ev {
                protocol::CacheEvent::Get(get) => {
                    let work = CacheWork { wire, peer: peer.cloned(), get: get.clone() };
                    self.attribution.work(thread.0, thread.1, Work::Cache(work));
                    self.cache_event(target, CacheLookup { wire, peer: peer.cloned(), get })
                }
                protocol::CacheEvent::Error(e) => {
                    *self.stats.parse_errors.entry((protocol, e.as_str())).or_default() += 1
                }
            }
        }
        // Keep the buffer's allocation for the next chunk.
        self.cache_events = events;
    }

    /// The connection is gone: its parser's last events, then its state goes.
    fn close_conn(&mut self, conn_id: u64) {
        let Some(target) = self.conns.get(conn_id).map(|c| c.target) else { return };
        if let Err(f) = fault::contain(|| self.close_parser(conn_id)) {
            self.parser_fault(conn_id, target, &f);
        }
        self.conns.remove(conn_id);
        self.attribution.closed(conn_id);
    }

    fn close_parser(&mut self, conn_id: u64) {
        let Some(c) = self.conns.get_mut(conn_id) else { return };
        let target = c.target;
        // What a close completes happened on no thread in particular: the owner's main one.
        let thread = (c.owner, c.owner);
        match &mut c.proto {
            Proto::Http(p) => {
                p.close(&mut self.events);
                let local = c.local.clone();
                self.conns.remove(conn_id);
                self.handle_events(target, conn_id, local.as_ref());
            }
            Proto::Postgres(pg) => {
                pg.parser.close(&mut self.pg_events);
                self.handle_pg_events(target, conn_id, thread);
                self.conns.remove(conn_id);
            }
            Proto::Cache(wire, p) => {
                let wire = *wire;
                p.close(&mut self.cache_events);
                let peer = c.peer.clone();
                self.conns.remove(conn_id);
                self.handle_cache_events(target, wire, peer.as_ref(), thread);
            }
            Proto::Other | Proto::Faulted => {
                self.conns.remove(conn_id);
            }
        }
    }

    /// One segment of a connection through its parser (told of a gap before it first),
    /// and what the parser made of it into the app's families: the step
    /// [`fault::contain`] runs.
    fn parse(&mut self, target: u32, d: &Data<'_>, seg: &Segment<'_>) {
        let Some(state) = self.conns.get_mut(d.conn_id) else { return };
        let chunk = &seg.chunk;
        #[cfg(test)]
        if self.inject_fault.is_some_and(|f| f(chunk)) {
            panic!("injected parser fault");
        }
        if seg.gap.is_some() {
            let followed = match &mut state.proto {
                Proto::Http(p) => p.lost(),
                Proto::Postgres(pg) => pg.parser.lost(),
                Proto::Cache(_, p) => p.lost(),
                Proto::Other | Proto::Faulted => false,
            };
            if followed && seg.gap == Some(Gap::Lost) {
                *self.stats.parse_errors.entry((state.proto.name(), Gap::Lost.as_str())).or_default() += 1;
            }
        }
        match &mut state.proto {
            Proto::Http(parser) => {
                parser.feed(chunk, &mut self.events);
                if parser.mode() == Mode::Other && !state.counted_other {
                    state.counted_other = true;
                    self.stats.not_http_connections += 1;
                }
                let pending = parser.pending();
                let local = state.local.clone();
                self.handle_events(target, d.conn_id, local.as_ref());
                self.attribution.http(d.tgid, d.tid, d.conn_id, pending, d.dir == Direction::Recv);
            }
            Proto::Postgres(pg) => {
                pg.parser.feed(chunk, &mut self.pg_events);
                self.handle_pg_events(target, d.conn_id, (d.tgid, d.tid));
            }
            Proto::Cache(wire, p) => {
                let wire = *wire;
                p.feed(chunk, &mut self.cache_events);
                let peer = state.peer.clone();
                self.handle_cache_events(target, wire, peer.as_ref(), (d.tgid, d.tid));
            }
            Proto::Other | Proto::Faulted => {}
        }
    }

    /// A parse step of `conn_id` panicked: its parser and the events it was making go,
    /// the rest of its records are dropped (counted as lost to a parser fault), and the
    /// agent goes on. The warning names the protocol and the app, never the bytes.
    fn parser_fault(&mut self, conn_id: u64, target: u32, f: &fault::Fault) {
        self.events.clear();
        self.pg_events.clear();
        self.cache_events.clear();
        let protocol = match self.conns.get_mut(conn_id) {
            Some(c) => std::mem::replace(&mut c.proto, Proto::Faulted).name(),
            None => "unknown",
        };
        self.fault_seen(protocol, target, f);
    }

    /// Counts a contained fault and warns about it, at most once per
    /// [`FAULT_WARNING_EVERY`].
    fn fault_seen(&mut self, protocol: &'static str, target: u32, f: &fault::Fault) {
        *self.stats.parser_faults.entry(protocol).or_default() += 1;
        self.faults_unwarned += 1;
        if self.fault_warned.is_none_or(|t| t.elapsed() >= FAULT_WARNING_EVERY) {
            tracing::warn!(
                protocol,
                app = target,
                at = f.location.as_deref().unwrap_or("unknown"),
                faults = self.faults_unwarned,
                "parsing failed on a bug (contained): that connection's records, or that event, are dropped and counted; everything else is parsed as before"
            );
            self.fault_warned = Some(Instant::now());
            self.faults_unwarned = 0;
        }
    }

    /// The parser for a connection, from one of its records (None: not decided yet).
    fn new_proto(&self, t: &Target, role: Role, chunk: &Chunk<'_>, peer: Option<&SockAddr>) -> Option<Proto> {
        let known = matches!(t.routes, Routes::Ready);
        let hint =
            detect::Peer { known, is_cache: known && peer.is_some_and(|p| t.caches.by_address(p).is_some()) };
        let limits = self.settings.postgres;
        let cache = protocol::CacheLimits { max_pending: self.settings.cache_commands };
        Some(match detect::detect(role, chunk, hint)? {
            detect::Protocol::Http => {
                Proto::Http(Box::new(Http1Parser::new(self.settings.http, t.parser_config.clone())))
            }
            detect::Protocol::Postgres { mid_stream } => {
                let parser = if mid_stream { PgParser::mid_stream(limits) } else { PgParser::new(limits) };
                Proto::Postgres(Box::new(PgConn { parser, mid_stream, user: None, database: None }))
            }
            detect::Protocol::Cache(wire) => {
                let parser: Box<dyn CacheParser> = match wire {
                    Wire::Redis => Box::new(RedisParser::new(cache)),
                    Wire::Memcached => Box::new(MemcachedParser::new(cache)),
                };
                Proto::Cache(wire, parser)
            }
            detect::Protocol::Other => Proto::Other,
        })
    }
}

/// One exchange into its target's families.
/// Counts the exchange into the app's django_http_* families; returns its view label.
fn observe(t: &mut Target, ex: &Exchange) -> Option<Arc<str>> {
    let http = t.families.as_mut().map(|f| &mut f.http)?;
    let (req, resp) = (&ex.request, &ex.response);
    let view = t.views.resolve(&req.path);
    let (label, resolved) = match &view {
        View::Resolved(v) | View::Templated(v) => (v.clone(), true),
        View::Unresolved => (Arc::from(UNNAMED_VIEW), false),
    };
    let streaming = resp.chunked || resp.close_delimited;
    let mut status = resp.status;
    let mut response_body =
        if streaming { Body::Streaming } else { Body::Size(resp.content_length.unwrap_or(resp.body_bytes)) };
    // CommonMiddleware turns a resolver 404 into an APPEND_SLASH redirect after
    // django-prometheus's After middleware recorded the 404 (whose body never reaches
    // the wire).
    if !resolved
        && status == 301
        && t.settings.append_slash
        && !req.path.ends_with('/')
        && t.views.table().is_some_and(|tb| tb.resolve(&format!("{}/", req.path)).is_some())
    {
        status = 404;
        response_body = Body::Unknown;
    }
    let charset = resp.charset.clone().unwrap_or_else(|| t.settings.default_charset.clone());
    let latency_s = ex.latency_s();
    let secure = crate::django::http::is_secure(&req.proxy_headers, t.settings.secure_header());
    http.observe(&HttpObservation {
        method: &req.method,
        view: &label,
        resolved,
        secure,
        ajax: req.ajax,
        status,
        request_body: req.declared_length,
        response_body,
        charset: &charset,
        latency_s,
    });
    Some(label)
}

/// The exchange's profile into the app's per-view families (same view label as
/// django-prometheus's by-view families).
/// Returns the request's gets on the app's caches and its hits.
fn observe_profile(
    t: &Target,
    view: &str,
    ex: &Exchange,
    profile: &Profile,
    n_plus_one_threshold: u32,
) -> (u64, u64) {
    let Some(f) = t.families.as_ref() else { return (0, 0) };
    let (mut gets, mut hits, mut misses) = (0, 0, 0);
    for c in &profile.cache {
        if c.peer.as_ref().and_then(|p| t.caches.lookup(c.wire, p, &c.get.key)).is_some() {
            gets += 1;
            match c.get.outcome {
                protocol::Outcome::Hit => hits += 1,
                protocol::Outcome::Miss => misses += 1,
                protocol::Outcome::Fail | protocol::Outcome::Unknown => {}
            }
        }
    }
    f.profile.observe(&ViewObservation {
        view,
        method: &ex.request.method,
        latency_s: ex.latency_s(),
        profile,
        cache_gets: gets,
        cache_hits: hits,
        cache_misses: misses,
        n_plus_one_threshold,
    });
    (gets, hits)
}

impl Sink for Pipeline {
    fn tracked(&mut self, pid: u32, _why: &str) {
        if self.pid_target.contains_key(&pid) {
            return;
        }
        // A process under a traced app belongs to it (its nearest traced ancestor).
        let mut p = pid;
        for _ in 0..64 {
            let Some(parent) = parent_of(p) else { break };
            if let Some(&root) = self.pid_target.get(&parent) {
                self.pid_target.insert(pid, root);
                return;
            }
            p = parent;
        }
        self.new_target(pid);
        // Apps already traced that run under this one join it.
        let under: Vec<u32> = self
            .targets
            .keys()
            .copied()
            .filter(|&r| {
                r != pid && std::iter::successors(parent_of(r), |&x| parent_of(x)).take(64).any(|a| a == pid)
            })
            .collect();
        for r in under {
            self.drop_target(r);
        }
    }

    fn record(&mut self, rec: &Record<'_>, conn: Option<&ConnInfo>) {
        match rec {
            Record::Data(d) => {
                let Some(conn) = conn else { return };
                let Some(&target) = self.pid_target.get(&d.tgid) else {
                    self.stats.unattributed_records += 1;
                    return;
                };
                // Every record of a traced process's connection, decided or not, so that
                // a gap is seen wherever it falls.
                let seg = self.streams.segment(d);
                let Some(t) = self.targets.get(&target) else { return };
                if !self.conns.contains(d.conn_id) {
                    let Some(proto) = self.new_proto(t, conn.role, &seg.chunk, conn.peer.as_ref()) else {
                        return;
                    };
                    if self.conns.len() >= self.settings.max_parsers {
                        self.stats.parsers_full += 1;
                        return;
                    }
                    if matches!(proto, Proto::Other) {
                        self.stats.not_db_connections += 1;
                    }
                    self.conns.insert(
                        d.conn_id,
                        ConnState {
                            target,
                            owner: d.tgid,
                            local: conn.local.clone(),
                            peer: conn.peer.clone(),
                            proto,
                            counted_other: false,
                        },
                    );
                }
                if matches!(self.conns.get(d.conn_id).map(|c| &c.proto), Some(Proto::Faulted)) {
                    self.stats.records_lost_parser_fault += 1;
                    return;
                }
                if let Err(f) = fault::contain(|| self.parse(target, d, &seg)) {
                    self.parser_fault(d.conn_id, target, &f);
                    self.stats.records_lost_parser_fault += 1;
                }
            }
            Record::ConnOpen(o) => {
                // A connection the kernel saw opening starts its record sequence at 0.
                self.streams.opened(o.tgid, o.fd);
            }
            Record::ConnClose(c) => {
                self.streams.closed(c.tgid, c.fd);
                // The socket closes with its last fd.
                if conn.is_none_or(|i| i.owners.len() <= 1) {
                    // A client connection that never moved a byte: its connect failed
                    // (a non-blocking connect reports that later, through SO_ERROR).
                    if let Some(info) = conn
                        && info.role == Role::Client
                        && !info.preexisting
                        && !self.conns.contains(c.conn_id)
                        && let Some(&target) = self.pid_target.get(&c.tgid)
                        && let Some(peer) = info.peer.clone()
                    {
                        self.refused(target, peer);
                    }
                    self.close_conn(c.conn_id);
                }
            }
            Record::ConnFailed(f) => {
                if let Some(&target) = self.pid_target.get(&f.tgid)
                    && let Some(peer) = f.peer.clone()
                {
                    self.refused(target, peer);
                }
            }
            Record::ProcFork { pid, parent, .. } => {
                if let Some(&root) = self.pid_target.get(parent) {
                    self.pid_target.insert(*pid, root);
                }
            }
            Record::ProcExit { pid, .. } => {
                self.streams.process_gone(*pid);
                let owned = self.conns.owned_by(*pid);
                for id in owned {
                    self.close_conn(id);
                }
                self.pid_target.remove(pid);
                self.attribution.process_gone(*pid);
                self.drop_target(*pid);
            }
            Record::ConnDup(_) | Record::FdEpoch(_) | Record::ProcExec { .. } => {}
        }
    }

    fn flush(&mut self, conns: &ConnTable) {
        self.discover_quiet_apps();
        self.poll_discoveries();
        self.poll_migrations();
        if self.last_gc.elapsed() >= Duration::from_secs(5) {
            self.last_gc = Instant::now();
            // Parser state of connections the pump no longer knows (their close was lost).
            let gone: Vec<u64> = self.conns.ids().filter(|id| conns.get(*id).is_none()).collect();
            for id in gone {
                self.close_conn(id);
            }
            self.sweep_targets();
            self.attribution.retain_threads(|tgid, tid| {
                std::path::Path::new(&format!("/proc/{tgid}/task/{tid}")).exists()
            });
            self.conns.shrink_idle();
            self.streams.shrink_idle();
            crate::conns::shrink_idle(&mut self.pid_target);
        }
    }

    fn report(&mut self, loss: &LossReport, live: Live) {
        self.stats.loss = loss.clone();
        self.stats.connections = live.connections;
        self.stats.processes = live.processes;
        self.stats.targets = self.targets.len();
        self.stats.kubernetes_pods = self.settings.kubernetes.as_ref().map_or(0, |k| k.len());
        self.stats.parser_states = self.conns.len();
        self.stats.stream_gaps = self.streams.gaps.iter().map(|(g, n)| (g.as_str(), *n)).collect();
        self.stats.profile_attributed.clone_from(&self.attribution.attributed);
        self.stats.profile_unattributed.clone_from(&self.attribution.unattributed);
        if let Some(top) = self.top.as_mut() {
            top.tick();
        }
        // Overflow counts live in each target; add what each gained since the last
        // report, so the totals survive targets that go away.
        for (root, t) in &self.targets {
            let o = t.families.as_ref().map(|f| f.http.overflows).unwrap_or_default();
            let models = t.families.as_ref().map_or(0, |f| f.models.overflowed);
            let migrations = t.families.as_ref().map_or(0, |f| f.migrations.overflowed);
            for (label, now) in [
                ("view", t.views.overflowed),
                ("method", o.methods),
                ("charset", o.charsets),
                ("model", models),
                ("connection", migrations),
            ] {
                let seen = self.overflow_seen.entry((*root, label)).or_default();
                *self.stats.label_overflow.entry(label).or_default() += now.saturating_sub(*seen);
                *seen = now;
            }
        }
        self.overflow_seen.retain(|(root, _), _| self.targets.contains_key(root));
        let stats = self.stats.clone();
        self.publish(|e| {
            e.stats = stats;
            e.last_report = Some(Instant::now());
        });
    }
}
