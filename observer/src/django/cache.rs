//! The django_cache_get_* families, and which of an app's caches a Redis or memcached
//! lookup belongs to (the `backend` label).
//!
//! django-prometheus labels these series with the backend's type, not the CACHES alias:
//! `redis` (django-redis), `native_redis` (Django's own Redis backend), `memcached`
//! (PyMemcacheCache, PyLibMCCache). A lookup counts when its connection goes to one of
//! the app's cache servers and its key has the shape the cache's key function gives
//! (`KEY_PREFIX:VERSION:key` by default), so that other users of the same server (Celery,
//! a raw redis-py client) are left out.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs as _};

use prometheus::{IntCounterVec, Registry};
use regex::bytes::Regex;
use serde::Deserialize;

use crate::{
    app::discover::Cache,
    events::SockAddr,
    protocol::{Outcome, Wire},
};

pub const REDIS: &str = "redis";
pub const NATIVE_REDIS: &str = "native_redis";
pub const MEMCACHED: &str = "memcached";

const REDIS_PORT: u16 = 6379;
const MEMCACHED_PORT: u16 = 11211;

/// The wire protocol of a `backend` label (None: not observed over a socket).
pub fn wire_of(backend: &str) -> Option<Wire> {
    match backend {
        REDIS | NATIVE_REDIS => Some(Wire::Redis),
        MEMCACHED => Some(Wire::Memcached),
        _ => None,
    }
}

/// A cache given in the config file (`[[caches]]`), for apps whose settings cannot be
/// read or whose key function is custom.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigCache {
    /// For logs only.
    #[serde(default)]
    pub alias: Option<String>,
    /// The `backend` label: redis, native_redis or memcached.
    pub backend: String,
    /// As in LOCATION: `redis://host:port/db`, `unix:///path`, `host:port`, `unix:/path`.
    pub servers: Vec<String>,
    /// Keys counted (a regular expression over the key's bytes); every key when unset.
    #[serde(default)]
    pub key_regex: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Endpoint {
    Inet(SocketAddr),
    Unix(Vec<u8>),
}

impl Endpoint {
    fn matches(&self, peer: &SockAddr) -> bool {
        match (self, peer) {
            (Self::Inet(a), SockAddr::Inet(b)) => {
                a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
            }
            (Self::Unix(p), SockAddr::UnixPath(q)) => p == q,
            _ => false,
        }
    }
}

/// `host[:port]` (IPv6 in brackets) to addresses; names only when `resolve`.
fn inet(hostport: &str, default_port: u16, resolve: bool) -> Vec<Endpoint> {
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        let (h, after) = rest.split_once(']').unwrap_or((rest, ""));
        (h, after.strip_prefix(':').and_then(|p| p.parse().ok()).unwrap_or(default_port))
    } else {
        match hostport.split_once(':') {
            Some((h, p)) if !p.contains(':') => (h, p.parse().unwrap_or(default_port)),
            // No port, or a bare IPv6 address.
            _ => (hostport, default_port),
        }
    };
    if let Ok(ip) = host.parse::<IpAddr>() {
        return vec![Endpoint::Inet(SocketAddr::new(ip, port))];
    }
    if resolve
        && !host.is_empty()
        && let Ok(addrs) = (host, port).to_socket_addrs()
    {
        return addrs.map(Endpoint::Inet).collect();
    }
    Vec::new()
}

fn unix(path: &str) -> Vec<Endpoint> {
    if path.is_empty() { Vec::new() } else { vec![Endpoint::Unix(path.as_bytes().to_vec())] }
}

/// Where one LOCATION entry connects.
fn endpoints(wire: Wire, server: &str, resolve: bool) -> Vec<Endpoint> {
    let server = server.trim();
    match wire {
        Wire::Redis => {
            // `unix:///path` (Python's urlunsplit writes it `unix:/path`).
            if let Some(rest) = server.strip_prefix("unix://").or_else(|| server.strip_prefix("unix:")) {
                return unix(rest.split('?').next().unwrap_or_default());
            }
            let rest = server
                .strip_prefix("redis://")
                .or_else(|| server.strip_prefix("rediss://"))
                .unwrap_or(server);
            // Credentials were dropped by discovery; a config file may still have them.
            let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
            let hostport = rest.split(['/', '?']).next().unwrap_or_default();
            inet(if hostport.is_empty() { "localhost" } else { hostport }, REDIS_PORT, resolve)
        }
        Wire::Memcached => {
            if let Some(path) = server.strip_prefix("unix:") {
                unix(path)
            } else if server.starts_with('/') {
                unix(server)
            } else {
                inet(server, MEMCACHED_PORT, resolve)
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    alias: String,
    backend: &'static str,
    wire: Wire,
    endpoints: Vec<Endpoint>,
    /// Keys of this cache; every key when unset.
    key: Option<Regex>,
}

/// The app's caches that live behind a socket.
#[derive(Debug, Clone, Default)]
pub struct CacheTable {
    entries: Vec<Entry>,
}

fn label(kind: &str) -> Option<&'static str> {
    [REDIS, NATIVE_REDIS, MEMCACHED].into_iter().find(|l| *l == kind)
}

/// Django's default key shape: `<head><version><tail><key>`.
fn key_regex(head: &str, tail: &str) -> Option<Regex> {
    Regex::new(&format!("^{}-?[0-9]+{}", regex::escape(head), regex::escape(tail))).ok()
}

impl CacheTable {
    /// The Redis and memcached caches of `caches` (discovery) and `config`. Host names
    /// are resolved (a DNS lookup) only when `resolve` is set.
    pub fn build(caches: &[Cache], config: &[ConfigCache], resolve: bool) -> Self {
        let mut entries = Vec::new();
        for c in config {
            let Some(backend) = label(&c.backend) else {
                tracing::warn!(backend = %c.backend, "config cache: backend must be redis, native_redis or memcached");
                continue;
            };
            let key = match c.key_regex.as_deref().map(|r| Regex::new(&format!("^(?:{r})"))) {
                Some(Ok(r)) => Some(r),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "config cache: bad key_regex; the cache is left out");
                    continue;
                }
                None => None,
            };
            let wire = wire_of(backend).unwrap_or(Wire::Redis);
            entries.push(Entry {
                alias: c.alias.clone().unwrap_or_default(),
                backend,
                wire,
                endpoints: c.servers.iter().flat_map(|s| endpoints(wire, s, resolve)).collect(),
                key,
            });
        }
        for c in caches {
            let Some(backend) = c.kind.as_deref().and_then(label) else { continue };
            let wire = wire_of(backend).unwrap_or(Wire::Redis);
            let key = match (&c.key_head, &c.key_tail) {
                (Some(h), Some(t)) => key_regex(h, t),
                _ => {
                    tracing::info!(
                        alias = %c.alias,
                        "the cache's key function is custom: every lookup on its servers is counted"
                    );
                    None
                }
            };
            entries.push(Entry {
                alias: c.alias.clone(),
                backend,
                wire,
                endpoints: c.servers.iter().flat_map(|s| endpoints(wire, s, resolve)).collect(),
                key,
            });
        }
        Self { entries }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Aliases of the caches (for logs).
    pub fn aliases(&self) -> Vec<&str> {
        self.entries.iter().map(|e| e.alias.as_str()).collect()
    }

    /// The `backend` label of a lookup of `key` on a `wire` connection to `peer`; None
    /// when it is not a lookup of one of the app's caches.
    pub fn lookup(&self, wire: Wire, peer: &SockAddr, key: &[u8]) -> Option<&'static str> {
        self.entries
            .iter()
            .filter(|e| e.wire == wire && e.endpoints.iter().any(|x| x.matches(peer)))
            .find(|e| e.key.as_ref().is_none_or(|r| r.is_match(key)))
            .map(|e| e.backend)
    }

    /// The `backend` label of the cache a connection to `peer` is for (the first, when
    /// several share the server).
    pub fn by_address(&self, peer: &SockAddr) -> Option<&'static str> {
        self.entries.iter().find(|e| e.endpoints.iter().any(|x| x.matches(peer))).map(|e| e.backend)
    }
}

/// django-prometheus's four cache families.
pub struct CacheMetrics {
    total: IntCounterVec,
    hits: IntCounterVec,
    misses: IntCounterVec,
    fail: IntCounterVec,
}

fn counter_vec(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounterVec> {
    super::counter_vec(r, name, help, &["backend"])
}

impl CacheMetrics {
    pub fn new(r: &Registry) -> prometheus::Result<Self> {
        Ok(Self {
            total: counter_vec(r, "django_cache_get_total", "Total get requests on cache")?,
            hits: counter_vec(r, "django_cache_get_hits_total", "Total hits on cache")?,
            misses: counter_vec(r, "django_cache_get_misses_total", "Total misses on cache")?,
            fail: counter_vec(r, "django_cache_get_fail_total", "Total get request failures by cache")?,
        })
    }

    /// One `cache.get()`: always a get; a hit, a miss or a failure when that is known
    /// (never two of them).
    pub fn observe(&self, backend: &str, outcome: Outcome) {
        self.total.with_label_values(&[backend]).inc();
        match outcome {
            Outcome::Hit => self.hits.with_label_values(&[backend]).inc(),
            Outcome::Miss => self.misses.with_label_values(&[backend]).inc(),
            Outcome::Fail => self.fail.with_label_values(&[backend]).inc(),
            Outcome::Unknown => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(kind: &str, servers: &[&str], head: Option<&str>) -> Cache {
        Cache {
            alias: "default".into(),
            backend: None,
            kind: Some(kind.into()),
            servers: servers.iter().map(|s| s.to_string()).collect(),
            key_head: head.map(Into::into),
            key_tail: head.map(|_| ":".into()),
        }
    }

    fn tcp(s: &str) -> SockAddr {
        SockAddr::Inet(s.parse().unwrap())
    }

    #[test]
    fn redis_urls_and_memcached_servers() {
        let t = CacheTable::build(
            &[
                cache(
                    "redis",
                    &[
                        "redis://10.0.0.1:6380/1",
                        "rediss://10.0.0.2",
                        "unix:///run/redis.sock?db=2",
                        "unix:/run/r2.sock?db=0",
                    ],
                    Some(":"),
                ),
                cache("memcached", &["10.0.0.3:11212", "[::1]", "unix:/run/mc.sock"], Some(":")),
                cache("locmem", &[""], Some(":")),
            ],
            &[],
            false,
        );
        assert_eq!(t.lookup(Wire::Redis, &tcp("10.0.0.1:6380"), b":1:k"), Some(REDIS));
        assert_eq!(t.lookup(Wire::Redis, &tcp("10.0.0.2:6379"), b":1:k"), Some(REDIS));
        assert_eq!(t.lookup(Wire::Redis, &tcp("[::ffff:10.0.0.2]:6379"), b":1:k"), Some(REDIS));
        assert_eq!(
            t.lookup(Wire::Redis, &SockAddr::UnixPath(b"/run/redis.sock".to_vec()), b":1:k"),
            Some(REDIS)
        );
        assert_eq!(t.by_address(&SockAddr::UnixPath(b"/run/r2.sock".to_vec())), Some(REDIS));
        assert_eq!(t.lookup(Wire::Memcached, &tcp("10.0.0.3:11212"), b":1:k"), Some(MEMCACHED));
        assert_eq!(t.lookup(Wire::Memcached, &tcp("[::1]:11211"), b":1:k"), Some(MEMCACHED));
        assert_eq!(
            t.lookup(Wire::Memcached, &SockAddr::UnixPath(b"/run/mc.sock".to_vec()), b":1:k"),
            Some(MEMCACHED)
        );
        // The wrong protocol for the server, another server, another key shape.
        assert_eq!(t.lookup(Wire::Memcached, &tcp("10.0.0.1:6380"), b":1:k"), None);
        assert_eq!(t.lookup(Wire::Redis, &tcp("10.0.0.9:6379"), b":1:k"), None);
        assert_eq!(t.lookup(Wire::Redis, &tcp("10.0.0.1:6380"), b"celery-task-meta-1"), None);
        assert_eq!(t.by_address(&tcp("10.0.0.3:11212")), Some(MEMCACHED));
    }

    #[test]
    fn key_prefix_and_version_shape() {
        let t = CacheTable::build(
            &[cache("native_redis", &["redis://127.0.0.1:6379"], Some("my.app:"))],
            &[],
            false,
        );
        let peer = tcp("127.0.0.1:6379");
        assert_eq!(t.lookup(Wire::Redis, &peer, b"my.app:1:views.decorators.cache"), Some(NATIVE_REDIS));
        assert_eq!(t.lookup(Wire::Redis, &peer, b"my.app:-3:k"), Some(NATIVE_REDIS));
        assert_eq!(t.lookup(Wire::Redis, &peer, b"myXapp:1:k"), None);
        assert_eq!(t.lookup(Wire::Redis, &peer, b":1:k"), None);
        // A custom key function: every key of the server.
        let t = CacheTable::build(&[cache("redis", &["redis://127.0.0.1:6379"], None)], &[], false);
        assert_eq!(t.lookup(Wire::Redis, &peer, b"anything"), Some(REDIS));
    }

    #[test]
    fn two_caches_on_one_server_are_told_apart_by_key() {
        let mut a = cache("redis", &["redis://127.0.0.1:6379/0"], Some("a:"));
        a.alias = "a".into();
        let b = cache("native_redis", &["redis://127.0.0.1:6379/1"], Some("b:"));
        let t = CacheTable::build(&[a, b], &[], false);
        let peer = tcp("127.0.0.1:6379");
        assert_eq!(t.lookup(Wire::Redis, &peer, b"a:1:k"), Some(REDIS));
        assert_eq!(t.lookup(Wire::Redis, &peer, b"b:1:k"), Some(NATIVE_REDIS));
    }

    #[test]
    fn config_caches() {
        let config: Vec<ConfigCache> = toml::from_str::<toml::Table>(
            r#"
            [[caches]]
            backend = "redis"
            servers = ["redis://user:pw@127.0.0.1:7000/0"]
            key_regex = "sess:"
            [[caches]]
            backend = "memcached"
            servers = ["127.0.0.1:11211"]
            [[caches]]
            backend = "locmem"
            servers = []
            "#,
        )
        .unwrap()["caches"]
            .clone()
            .try_into()
            .unwrap();
        let t = CacheTable::build(&[], &config, false);
        assert_eq!(t.aliases().len(), 2);
        assert_eq!(t.lookup(Wire::Redis, &tcp("127.0.0.1:7000"), b"sess:abc"), Some(REDIS));
        assert_eq!(t.lookup(Wire::Redis, &tcp("127.0.0.1:7000"), b"x:sess:abc"), None);
        assert_eq!(t.lookup(Wire::Memcached, &tcp("127.0.0.1:11211"), b"whatever"), Some(MEMCACHED));
    }

    #[test]
    fn names_resolve_only_when_asked() {
        let c = [cache("redis", &["redis://localhost:6379/0"], Some(":"))];
        assert!(CacheTable::build(&c, &[], false).by_address(&tcp("127.0.0.1:6379")).is_none());
        assert_eq!(CacheTable::build(&c, &[], true).by_address(&tcp("127.0.0.1:6379")), Some(REDIS));
    }

    #[test]
    fn outcomes_count_once_each() {
        let r = Registry::new();
        let m = CacheMetrics::new(&r).unwrap();
        for o in [Outcome::Hit, Outcome::Hit, Outcome::Miss, Outcome::Fail, Outcome::Unknown] {
            m.observe(REDIS, o);
        }
        let text = prometheus::TextEncoder::new().encode_to_string(&r.gather()).unwrap();
        assert!(text.contains("# HELP django_cache_get_total Total get requests on cache\n"));
        assert!(text.contains("django_cache_get_total{backend=\"redis\"} 5\n"));
        assert!(text.contains("django_cache_get_hits_total{backend=\"redis\"} 2\n"));
        assert!(text.contains("django_cache_get_misses_total{backend=\"redis\"} 1\n"));
        assert!(text.contains("django_cache_get_fail_total{backend=\"redis\"} 1\n"));
        assert!(text.contains("# HELP django_cache_get_fail_total Total get request failures by cache\n"));
    }
}
