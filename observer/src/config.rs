//! `--config FILE`: the same settings as the flags, in TOML. A flag given on the command
//! line wins over the file.
//!
//! ```toml
//! listen = "0.0.0.0:9807"          # or "unix:/run/observer/metrics.sock"
//! tls_cert = "/etc/observer/tls.crt" # with tls_key: /metrics over HTTPS
//! tls_key = "/etc/observer/tls.key"
//! job = "django"
//! namespace = "shop"
//! port = [8000]
//! routes = "/etc/observer/routes.txt"
//! max_views = 500
//! models = ["item", "order"]
//! migrations_interval = 300
//!
//! # DATABASES aliases, for apps whose settings cannot be read (matched by address,
//! # database name and user, like the discovered ones).
//! [[databases]]
//! alias = "replica"
//! host = "10.0.0.12"
//! port = 5432
//! name = "shop"
//!
//! # Redis and memcached caches, for apps whose settings cannot be read or whose
//! # KEY_FUNCTION makes keys of another shape (backend: redis, native_redis, memcached).
//! [[caches]]
//! backend = "redis"
//! servers = ["redis://10.0.0.13:6379/0"]
//! key_regex = "shop:[0-9]+:"
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::django::{aliases::ConfigAlias, cache::ConfigCache};

/// Every key is optional.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    #[serde(default)]
    pub pid: Vec<u32>,
    #[serde(default)]
    pub comm: Vec<String>,
    #[serde(default)]
    pub port: Vec<u16>,
    pub routes: Option<PathBuf>,
    pub route_discovery: Option<bool>,
    pub job: Option<String>,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub container: Option<String>,
    pub instance: Option<String>,
    pub kubernetes: Option<bool>,
    pub node_name: Option<String>,
    pub max_views: Option<usize>,
    pub max_http_head_bytes: Option<usize>,
    pub max_pending_requests: Option<usize>,
    pub max_parsers: Option<usize>,
    pub capture_bytes: Option<u32>,
    pub ring_buffer_bytes: Option<u32>,
    pub max_connections: Option<u32>,
    pub max_processes: Option<u32>,
    pub max_inflight_syscalls: Option<u32>,
    pub max_library_files: Option<usize>,
    pub max_held_connect_failures: Option<usize>,
    pub max_sqlite_statements: Option<usize>,
    pub max_sqlite_connections: Option<usize>,
    pub uprobe_idle_grace: Option<u64>,
    pub models: Option<Vec<String>>,
    pub max_models: Option<usize>,
    pub migrations: Option<bool>,
    pub migrations_interval: Option<u64>,
    pub max_pending_statements: Option<usize>,
    pub max_pending_cache_commands: Option<usize>,
    pub n_plus_one_threshold: Option<u32>,
    #[serde(default)]
    pub databases: Vec<ConfigAlias>,
    #[serde(default)]
    pub caches: Vec<ConfigCache>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| match e.span() {
            // One line with where it is (toml's own rendering quotes the file over several).
            Some(span) => format!("line {}: {}", text[..span.start].matches('\n').count() + 1, e.message()),
            None => e.message().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_key_and_rejects_unknown_ones() {
        let c = FileConfig::parse(
            "listen = \"127.0.0.1:9000\"\njob = \"shop\"\nport = [8000, 8001]\nmax_views = 10\nroute_discovery = false\n",
        )
        .unwrap();
        assert_eq!(c.listen.as_deref(), Some("127.0.0.1:9000"));
        assert_eq!(c.port, vec![8000, 8001]);
        assert_eq!(c.max_views, Some(10));
        assert_eq!(c.route_discovery, Some(false));
        assert!(FileConfig::parse("lisen = \"x\"").unwrap_err().contains("unknown field"));
        let e = FileConfig::parse("job = \"a\"\nmax_views = \"many\"\n").unwrap_err();
        assert!(e.starts_with("line 2: ") && !e.contains('\n'), "{e}");
        let c = FileConfig::parse(
            "models = [\"item\"]\nmigrations = false\n[[databases]]\nalias = \"replica\"\nhost = \"10.0.0.2\"\nport = 5433\n",
        )
        .unwrap();
        assert_eq!(c.models, Some(vec!["item".to_string()]));
        assert_eq!(c.migrations, Some(false));
        assert_eq!(c.databases[0].alias, "replica");
        assert_eq!(c.databases[0].port, Some(5433));
        let c = FileConfig::parse(
            "max_pending_cache_commands = 64\n[[caches]]\nbackend = \"memcached\"\nservers = [\"10.0.0.3:11211\"]\n",
        )
        .unwrap();
        assert_eq!(c.max_pending_cache_commands, Some(64));
        assert_eq!(c.caches[0].backend, "memcached");
    }
}
