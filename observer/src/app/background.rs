//! What is learnt of an app in the background, off the event pump: its discovery
//! (routes, settings, databases, caches, models), started with its first event or a while
//! after it appeared, and the count of its migrations, after discovery and on an
//! interval. Results are picked up by polling, so the pump never waits for a helper.

use std::{collections::BTreeMap, sync::mpsc, time::Instant};

use super::{
    discover::{self, Database},
    lifecycle::Apps,
    migrations::AliasMigrations,
};
use crate::{
    django::{
        aliases::{AliasTable, ConfigAlias},
        cache::{CacheTable, ConfigCache},
        db::ModelMap,
    },
    exchange::Observed,
    protocol::http1,
    selfmetrics::SelfStats,
    views::RouteTable,
};

/// A discovery's result, with the route, alias and cache tables built off the pump (the
/// routes' regexes compiled, host names resolved: both can take long).
pub type Discovered = Result<(discover::Discovery, RouteTable, AliasTable, CacheTable), String>;

/// A migrations count's result, per database alias.
pub type MigrationCounts = Result<BTreeMap<String, AliasMigrations>, String>;

/// Builds a discovery's tables (on the discovery's thread).
pub fn tables(
    d: discover::Discovery,
    config: &[ConfigAlias],
    config_caches: &[ConfigCache],
) -> (discover::Discovery, RouteTable, AliasTable, CacheTable) {
    let routes = RouteTable::new(&d.routes);
    let aliases = AliasTable::build(&d.databases, config, true);
    let caches = CacheTable::build(&d.caches, config_caches, true);
    (d, routes, aliases, caches)
}

pub(super) enum Routes {
    /// Discovery starts with the app's first event (by then it has loaded its settings
    /// and changed to its working directory; a fresh exec has not), or a while after the
    /// app appeared.
    NotStarted,
    Pending(mpsc::Receiver<Discovered>),
    /// Discovered, failed, or off.
    Ready,
}

pub(super) enum MigrationsCheck {
    Off,
    /// Next run at.
    Idle(Instant),
    Running(mpsc::Receiver<MigrationCounts>),
}

/// An app whose discovery is over: its HTTP parsers get `config`, and what waited is
/// replayed in order.
pub struct DiscoveryOver {
    pub root: u32,
    pub config: http1::Config,
    pub backlog: Vec<Observed>,
}

impl Apps {
    /// Starts the app's discovery in the background (or skips it when off).
    pub(super) fn start_discovery(&mut self, root: u32) {
        let Some(app) = self.apps.get_mut(&root) else { return };
        app.routes = Routes::Ready;
        if !self.settings.discover_routes {
            return;
        }
        if let Some(rx) = self.host.discover(root, &self.settings) {
            app.routes = Routes::Pending(rx);
        }
    }

    /// Starts the discovery of apps that served nothing for a while.
    pub fn discover_quiet(&mut self, now: Instant) {
        let delay = self.settings.discovery_delay;
        let quiet: Vec<u32> = self
            .apps
            .iter()
            .filter(|(_, a)| {
                matches!(a.routes, Routes::NotStarted) && now.saturating_duration_since(a.appeared) >= delay
            })
            .map(|(r, _)| *r)
            .collect();
        for root in quiet {
            self.start_discovery(root);
        }
    }

    /// Applies finished discoveries; returns those apps, with what waited for them.
    pub fn poll_discoveries(&mut self, stats: &mut SelfStats) -> Vec<DiscoveryOver> {
        let mut done = Vec::new();
        for (root, app) in &mut self.apps {
            if let Routes::Pending(rx) = &app.routes {
                match rx.try_recv() {
                    Ok(result) => done.push((*root, result)),
                    Err(mpsc::TryRecvError::Empty) => {}
                    Err(mpsc::TryRecvError::Disconnected) => {
                        done.push((*root, Err("discovery thread ended".into())))
                    }
                }
            }
        }
        let mut ready = Vec::with_capacity(done.len());
        for (root, result) in done {
            let Some(app) = self.apps.get_mut(&root) else { continue };
            app.routes = Routes::Ready;
            match result {
                Ok((d, table, aliases, caches)) => {
                    stats.route_discovery_ok += 1;
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
                    app.views.set_table(Some(table));
                    app.parser_config = http1::Config {
                        extra_header: d
                            .settings
                            .secure_header()
                            .map(|(name, _)| name)
                            .filter(|n| !http1::PROXY_HEADERS.contains(&n.as_str())),
                    };
                    app.settings = d.settings;
                    app.aliases = aliases;
                    app.caches = caches;
                    for c in
                        d.caches.iter().filter(|c| matches!(c.kind.as_deref(), Some("locmem" | "filebased")))
                    {
                        tracing::info!(
                            root,
                            alias = %c.alias,
                            "the cache lives in the process or on disk: its lookups cross no socket and are not counted"
                        );
                    }
                    app.models = ModelMap::new(
                        d.models.iter().map(|m| (m.table.as_str(), m.model.as_str(), m.mixin.as_deref())),
                        self.settings.models.as_deref(),
                    );
                    if d.databases
                        .iter()
                        .all(|db: &Database| db.engine.as_deref() == Some("django.db.backends.dummy"))
                        && !d.databases.is_empty()
                    {
                        app.migrations = MigrationsCheck::Off;
                    }
                }
                Err(e) => {
                    stats.route_discovery_failed += 1;
                    let fallback = if app.views.has_routes() { "the routes file" } else { "templated paths" };
                    tracing::warn!(root, error = %e, "route discovery failed; using {fallback}");
                }
            }
            ready.push(DiscoveryOver {
                root,
                config: app.parser_config.clone(),
                backlog: std::mem::take(&mut app.backlog).into(),
            });
        }
        ready
    }

    /// Starts due migration counts (after discovery) and applies finished ones.
    pub fn poll_migrations(&mut self, now: Instant, stats: &mut SelfStats) {
        let timeout = self.settings.discovery_timeout;
        let interval = self.settings.migrations_interval;
        let mut results = Vec::new();
        for (root, app) in &mut self.apps {
            if !matches!(app.routes, Routes::Ready) {
                continue;
            }
            match &app.migrations {
                MigrationsCheck::Idle(at) if now >= *at => {
                    app.migrations = match self.host.count_migrations(*root, timeout) {
                        Some(rx) => MigrationsCheck::Running(rx),
                        None => MigrationsCheck::Idle(now + interval),
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
            if let Some(app) = self.apps.get_mut(&root) {
                app.migrations = MigrationsCheck::Idle(now + interval);
            }
            let aliases = match result {
                Ok(a) if a.is_empty() => continue,
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(root, error = %e, "cannot count the app's migrations");
                    stats.migrations_failed += 1;
                    continue;
                }
            };
            let Some(f) = self.materialized(root, None, stats).and_then(|a| a.families.as_mut()) else {
                continue;
            };
            for (alias, m) in aliases {
                match m {
                    AliasMigrations::Counts { applied, unapplied } => {
                        f.migrations.set(&alias, applied, unapplied);
                        stats.migrations_ok += 1;
                    }
                    AliasMigrations::Failed { error } => {
                        tracing::warn!(root, alias, error, "cannot count the migrations of a database");
                        stats.migrations_failed += 1;
                    }
                }
            }
        }
    }
}
