//! What the agent was told to do with what it sees (from flags or the config file):
//! the labels it gives apps, the parsers' limits, discovery and migrations.

use std::{sync::Arc, time::Duration};

use crate::{
    django::{aliases::ConfigAlias, cache::ConfigCache},
    protocol::{http1, postgres, redis},
};

/// Settings of the pipeline and of the apps it follows.
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
    /// The SQLite tables' bounds (`--max-sqlite-statements`).
    pub sqlite: crate::protocol::sqlite::Limits,
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
    /// Failed PostgreSQL connects held for libpq's encryption retry at once.
    pub max_held_connect_failures: usize,
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
            sqlite: crate::protocol::sqlite::Limits::default(),
            models: None,
            max_models: 1000,
            cache_commands: redis::Limits::default().max_pending,
            db_aliases: Vec::new(),
            caches: Vec::new(),
            migrations: true,
            migrations_interval: Duration::from_secs(300),
            discovery_delay: Duration::from_secs(10),
            n_plus_one_threshold: 10,
            max_held_connect_failures: crate::protocol::postgres::fallback::MAX_HELD,
        }
    }
}
