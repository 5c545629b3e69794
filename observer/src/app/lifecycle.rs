//! The apps being traced, from their first process to their last. An app (a target) is
//! a root process (a gunicorn/uwsgi master, a runserver, a uvicorn) and all its
//! descendants: every worker feeds one series set, so counters stay monotonic while
//! workers come and go. Here: registering an app and the processes that join it, its
//! labels and families, the backlog its events wait in while it is discovered (see
//! `background` for discovery and migrations), and its end: the processes that outlive
//! their root are adopted, apps whose exit was lost are swept.
//!
//! What this reads of the host and what it runs in the background goes through
//! [`Host`], and every method that needs the time takes `now`, so tests drive it with a
//! fake host and their own clock.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use prometheus::Registry;

use super::background::{Discovered, MigrationCounts, MigrationsCheck, Routes};
use crate::{
    IdMap,
    django::{
        TargetLabels,
        aliases::AliasTable,
        cache::{CacheMetrics, CacheTable},
        db::{DbMetrics, MigrationMetrics, ModelMap, ModelMetrics},
        http::HttpMetrics,
    },
    events::SockAddr,
    exchange::Observed,
    fault,
    profile::ViewProfileMetrics,
    protocol::http1,
    selfmetrics::SelfStats,
    server::Exposition,
    settings::Settings,
    targets,
    views::{AppSettings, RouteTable, ViewResolver},
};

/// Events kept per app while it is being discovered.
pub const BACKLOG: usize = 10_000;

/// What the lifecycle reads of the host and starts in the background.
pub trait Host: Send {
    fn hostname(&self) -> String;
    /// A process's parent, unless it is init or gone.
    fn parent_of(&self, pid: u32) -> Option<u32>;
    fn alive(&self, pid: u32) -> bool;
    /// Where a process listens (a TCP port or a Unix socket's path).
    fn listen_addr(&self, pid: u32) -> Option<String>;
    /// Starts discovering an app's routes, databases, caches and models; the result
    /// arrives on the receiver (None: it could not start).
    fn discover(&self, root: u32, settings: &Settings) -> Option<mpsc::Receiver<Discovered>>;
    /// Starts counting an app's migrations.
    fn count_migrations(&self, root: u32, timeout: Duration) -> Option<mpsc::Receiver<MigrationCounts>>;
}

/// The real host: `/proc` through `targets`, helpers run with the app's interpreter on
/// threads of their own (they can take long: regexes compiled, host names resolved).
pub struct ProcHost;

impl Host for ProcHost {
    fn hostname(&self) -> String {
        targets::hostname()
    }

    fn parent_of(&self, pid: u32) -> Option<u32> {
        targets::parent_of(pid)
    }

    fn alive(&self, pid: u32) -> bool {
        targets::alive(pid)
    }

    fn listen_addr(&self, pid: u32) -> Option<String> {
        targets::listen_addr(pid)
    }

    fn discover(&self, root: u32, settings: &Settings) -> Option<mpsc::Receiver<Discovered>> {
        let (tx, rx) = mpsc::channel();
        let timeout = settings.discovery_timeout;
        let (aliases, caches) = (settings.db_aliases.clone(), settings.caches.clone());
        std::thread::Builder::new()
            .name(format!("discover-{root}"))
            .spawn(move || {
                let result = super::discover::discover(root, timeout)
                    .map(|d| super::background::tables(d, &aliases, &caches));
                let _ = tx.send(result);
            })
            .ok()?;
        Some(rx)
    }

    fn count_migrations(&self, root: u32, timeout: Duration) -> Option<mpsc::Receiver<MigrationCounts>> {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("migrations-{root}"))
            .spawn(move || {
                let _ = tx.send(super::migrations::count(root, timeout));
            })
            .ok()?;
        Some(rx)
    }
}

/// The families of one app, created together when the first of them is needed.
pub struct Families {
    pub http: HttpMetrics,
    pub db: DbMetrics,
    pub models: ModelMetrics,
    pub migrations: MigrationMetrics,
    pub cache: CacheMetrics,
    pub profile: ViewProfileMetrics,
    pub tls: super::tls::TlsMetrics,
}

/// One app: what it serves and uses, and its families.
pub struct App {
    /// Created with the first event counted, when the app listens and its `instance`
    /// label (its listening port) is known.
    pub families: Option<Families>,
    pub views: ViewResolver,
    pub settings: AppSettings,
    /// What its HTTP connections' parsers need to know of it.
    pub parser_config: http1::Config,
    pub aliases: AliasTable,
    pub caches: CacheTable,
    pub models: ModelMap,
    pub(super) routes: Routes,
    pub(super) backlog: VecDeque<Observed>,
    pub(super) migrations: MigrationsCheck,
    pub(super) appeared: Instant,
    /// Its families could not be registered (counted once): its events are dropped.
    unregistrable: bool,
}

impl App {
    /// Whether its routes, databases and caches are known (discovered, or discovery is
    /// over): what decides a new connection's protocol from its peer.
    pub fn known(&self) -> bool {
        matches!(self.routes, Routes::Ready)
    }
}

/// Every traced app, and which app each traced process belongs to.
pub struct Apps {
    pub(super) settings: Settings,
    pub(super) host: Box<dyn Host>,
    shared: Arc<Mutex<Exposition>>,
    hostname: String,
    pub(super) apps: IdMap<u32, App>,
    /// Traced process -> its app's root.
    roots: IdMap<u32, u32>,
    /// Per (app, label): the overflow count already added to the agent's counters.
    overflow_seen: HashMap<(u32, &'static str), u64>,
}

impl Apps {
    pub fn new(settings: Settings, shared: Arc<Mutex<Exposition>>, host: Box<dyn Host>) -> Self {
        let hostname = host.hostname();
        Self {
            settings,
            host,
            shared,
            hostname,
            apps: IdMap::default(),
            roots: IdMap::default(),
            overflow_seen: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.apps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.apps.is_empty()
    }

    /// The root of the app a traced process belongs to.
    pub fn root_of(&self, pid: u32) -> Option<u32> {
        self.roots.get(&pid).copied()
    }

    pub fn get(&self, root: u32) -> Option<&App> {
        self.apps.get(&root)
    }

    /// A process is traced: it joins the app of its nearest traced ancestor, or starts
    /// one (which takes in the apps already traced that run under it). Roots of apps
    /// that ended are added to `dropped`.
    pub fn tracked(&mut self, pid: u32, now: Instant, dropped: &mut Vec<u32>) {
        if self.roots.contains_key(&pid) {
            return;
        }
        let mut p = pid;
        for _ in 0..64 {
            let Some(parent) = self.host.parent_of(p) else { break };
            if let Some(&root) = self.roots.get(&parent) {
                self.roots.insert(pid, root);
                return;
            }
            p = parent;
        }
        self.register(pid, now);
        let under: Vec<u32> = self
            .apps
            .keys()
            .copied()
            .filter(|&r| {
                r != pid
                    && std::iter::successors(self.host.parent_of(r), |&x| self.host.parent_of(x))
                        .take(64)
                        .any(|a| a == pid)
            })
            .collect();
        for r in under {
            self.drop_app(r, now, dropped);
        }
    }

    /// A traced process forked: the child is in its parent's app.
    pub fn forked(&mut self, pid: u32, parent: u32) {
        if let Some(&root) = self.roots.get(&parent) {
            self.roots.insert(pid, root);
        }
    }

    /// A traced process exited; when it was an app's root, the app ends.
    pub fn exited(&mut self, pid: u32, now: Instant, dropped: &mut Vec<u32>) {
        self.roots.remove(&pid);
        self.drop_app(pid, now, dropped);
    }

    /// Ends the apps whose root vanished without an exit record (lost).
    pub fn sweep(&mut self, now: Instant, dropped: &mut Vec<u32>) {
        let dead: Vec<u32> = self.apps.keys().copied().filter(|&r| !self.host.alive(r)).collect();
        for r in dead {
            self.drop_app(r, now, dropped);
        }
    }

    fn register(&mut self, root: u32, now: Instant) {
        tracing::info!(root, "new app");
        let s = &self.settings;
        let routes_file = s.routes_file.as_deref().and_then(|t| RouteTable::from_routes_file(t).ok());
        let app = App {
            families: None,
            views: ViewResolver::new(routes_file, s.max_views),
            settings: AppSettings::default(),
            parser_config: http1::Config::default(),
            routes: Routes::NotStarted,
            backlog: VecDeque::new(),
            // Until discovery: the config file's aliases (addresses only, no DNS here).
            aliases: AliasTable::build(&[], &s.db_aliases, false),
            caches: CacheTable::build(&[], &s.caches, false),
            models: ModelMap::by_rule(s.models.as_deref()),
            migrations: if s.migrations { MigrationsCheck::Idle(now) } else { MigrationsCheck::Off },
            appeared: now,
            unregistrable: false,
        };
        self.apps.insert(root, app);
        self.roots.insert(root, root);
    }

    fn drop_app(&mut self, root: u32, now: Instant, dropped: &mut Vec<u32>) {
        if self.apps.remove(&root).is_none() {
            return;
        }
        tracing::info!(root, "app gone; its series are dropped");
        dropped.push(root);
        let members: Vec<u32> = self.roots.iter().filter(|(_, r)| **r == root).map(|(p, _)| *p).collect();
        self.roots.retain(|_, r| *r != root);
        fault::lock(&self.shared).registries.remove(&root);
        let orphans = members.into_iter().filter(|&p| self.host.alive(p)).collect();
        self.adopt(orphans, now, dropped);
    }

    /// Processes of an app whose root went away but which live on (a gunicorn master
    /// re-exec'd with USR2 outlives the old one): the topmost become new apps (a counter
    /// reset Prometheus sees, as for any restarted exporter) and the others join them.
    fn adopt(&mut self, orphans: Vec<u32>, now: Instant, dropped: &mut Vec<u32>) {
        let set: HashSet<u32> = orphans.iter().copied().collect();
        let (tops, rest): (Vec<u32>, Vec<u32>) =
            orphans.into_iter().partition(|&p| self.host.parent_of(p).is_none_or(|pp| !set.contains(&pp)));
        for p in tops.into_iter().chain(rest) {
            self.tracked(p, now, dropped);
        }
    }

    /// An event of an app, unless it must wait for the app's discovery (which this
    /// starts if it has not yet): then it is kept in the app's bounded backlog and
    /// replayed when discovery is over.
    pub fn admit(&mut self, root: u32, obs: Observed, stats: &mut SelfStats) -> Option<Observed> {
        // One lookup for the common case, an app discovered long ago.
        let app = self.apps.get_mut(&root)?;
        if matches!(app.routes, Routes::Ready) {
            return Some(obs);
        }
        if matches!(app.routes, Routes::NotStarted) {
            self.start_discovery(root);
        }
        let app = self.apps.get_mut(&root)?;
        if !matches!(app.routes, Routes::Pending(_)) {
            return Some(obs);
        }
        if app.backlog.len() >= BACKLOG {
            app.backlog.pop_front();
            stats.backlog_dropped += 1;
        }
        app.backlog.push_back(obs);
        None
    }

    /// The app with its families, created (registry, target labels, precreated series)
    /// if this is its first counted event. `local` is where its first exchange was
    /// served: the `instance` label names it. None when the families could not be made
    /// (a registration error, counted and logged once): its events are dropped and
    /// counted.
    pub fn materialized(
        &mut self,
        root: u32,
        local: Option<&SockAddr>,
        stats: &mut SelfStats,
    ) -> Option<&mut App> {
        let app = self.apps.get(&root)?;
        if app.families.is_some() {
            return self.apps.get_mut(&root);
        }
        if app.unregistrable {
            stats.unregistered_events += 1;
            return None;
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
                tls: super::tls::TlsMetrics::new(&registry)?,
            };
            Ok((registry, families))
        });
        let app = self.apps.get_mut(&root)?;
        let (registry, mut families) = match made {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(root, error = %e, "cannot register the app's metric families: its events are dropped");
                app.unregistrable = true;
                stats.registration_errors += 1;
                stats.unregistered_events += 1;
                return None;
            }
        };
        // django-prometheus's model mixin creates its model's series at 0.
        for label in app.models.precreate() {
            families.models.precreate(label);
        }
        app.families = Some(families);
        tracing::info!(root, instance = %labels.instance, "exporting the app's series");
        fault::lock(&self.shared).registries.insert(root, registry);
        self.apps.get_mut(&root)
    }

    /// The app's target labels: its pod's when it runs in one, else the configured
    /// ones; `instance` is `<host>:<where it serves>`.
    pub fn labels(&self, root: u32, local: Option<&SockAddr>) -> TargetLabels {
        let served_on = local.and_then(|a| match a {
            SockAddr::Inet(s) => Some(s.port().to_string()),
            SockAddr::UnixPath(p) => Some(String::from_utf8_lossy(p).into_owned()),
            SockAddr::UnixAbstract(p) => Some(format!("@{}", String::from_utf8_lossy(p))),
            SockAddr::UnixUnnamed => None,
        });
        let s = &self.settings;
        let pod = s.kubernetes.as_ref().and_then(|k| k.labels_for_pid(root));
        if s.kubernetes.is_some() && pod.is_none() {
            tracing::info!(root, "the app runs in no pod of this node that the API listed: no pod labels");
        }
        // In a pod, the instance is named after it, as a scrape of the pod would be.
        let host = pod.as_ref().map_or(self.hostname.as_str(), |p| p.pod.as_str());
        let instance =
            s.instance.clone().unwrap_or_else(|| match served_on.or_else(|| self.host.listen_addr(root)) {
                Some(addr) => format!("{host}:{addr}"),
                None => format!("{host}:pid{root}"),
            });
        match pod {
            Some(p) => TargetLabels {
                job: p.job.unwrap_or_else(|| s.job.clone()),
                namespace: p.namespace,
                pod: p.pod,
                container: p.container,
                instance,
            },
            None => TargetLabels {
                job: s.job.clone(),
                namespace: s.namespace.clone(),
                pod: s.pod.clone(),
                container: s.container.clone(),
                instance,
            },
        }
    }

    /// Adds to the agent's overflow counters what each app's labels overflowed since the
    /// last report (the counts live in each app: the totals survive apps that end).
    pub fn report(&mut self, stats: &mut SelfStats) {
        stats.targets = self.apps.len();
        for (root, t) in &self.apps {
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
                *stats.label_overflow.entry(label).or_default() += now.saturating_sub(*seen);
                *seen = now;
            }
        }
        let apps = &self.apps;
        self.overflow_seen.retain(|(root, _), _| apps.contains_key(root));
    }

    /// Returns the memory of a burst of processes that is over.
    pub fn shrink_idle(&mut self) {
        crate::conns::shrink_idle(&mut self.roots);
    }
}
