//! Which DATABASES alias a database connection belongs to (the `alias` label).
//!
//! Entries come from the app's own settings (discovery) and from the config file. A
//! connection is matched by what it showed: the address it connected to, and the user and
//! database of its startup message. A known user or database that differs rules an alias
//! out; each thing that agrees scores; the best wins, `default` on a tie, and `default`
//! when nothing is known.

use std::{
    net::{IpAddr, SocketAddr, ToSocketAddrs as _},
    path::Path,
};

use serde::Deserialize;

use crate::{app::discover::Database, events::SockAddr};

/// The alias django-prometheus reports when there is one database.
pub const DEFAULT: &str = "default";
/// libpq's port when none is set.
const PG_PORT: u16 = 5432;

/// An alias given in the config file (`[[databases]]`), for apps whose settings cannot
/// be read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigAlias {
    pub alias: String,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub name: Option<String>,
    pub user: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Endpoint {
    Inet(SocketAddr),
    /// A Unix socket file.
    Unix(Vec<u8>),
    /// libpq's default socket directory (compiled into libpq): any `.s.PGSQL.<port>`.
    AnyUnix(u16),
}

#[derive(Debug, Clone)]
struct Entry {
    alias: String,
    name: Option<String>,
    user: Option<String>,
    endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, Default)]
pub struct AliasTable {
    entries: Vec<Entry>,
    /// SQLite aliases and their NAME (a path, possibly relative, or `:memory:`).
    files: Vec<(String, String)>,
}

fn unix_socket(dir: &str, port: u16) -> Endpoint {
    Endpoint::Unix(Path::new(dir).join(format!(".s.PGSQL.{port}")).as_os_str().as_encoded_bytes().to_vec())
}

/// libpq's endpoints for a HOST/PORT pair (comma-separated lists are libpq multi-host).
fn endpoints(host: Option<&str>, port: &str, resolve: bool) -> Vec<Endpoint> {
    let ports: Vec<u16> = port.split(',').map(|p| p.trim().parse().unwrap_or(PG_PORT)).collect();
    let host = host.unwrap_or("");
    let hosts: Vec<&str> = host.split(',').map(str::trim).collect();
    let mut out = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(PG_PORT);
        if h.is_empty() {
            out.push(Endpoint::AnyUnix(port));
        } else if h.starts_with('/') || h.starts_with('@') {
            out.push(unix_socket(h, port));
        } else if let Ok(ip) = h.trim_matches(['[', ']']).parse::<IpAddr>() {
            out.push(Endpoint::Inet(SocketAddr::new(ip, port)));
        } else if resolve && let Ok(addrs) = (*h, port).to_socket_addrs() {
            out.extend(addrs.map(Endpoint::Inet));
        }
    }
    out
}

fn same_ip(a: &SocketAddr, b: &SocketAddr) -> bool {
    a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
}

impl Endpoint {
    fn matches(&self, peer: &SockAddr) -> bool {
        match (self, peer) {
            (Self::Inet(a), SockAddr::Inet(b)) => same_ip(a, b),
            (Self::Unix(p), SockAddr::UnixPath(q)) => p == q,
            (Self::AnyUnix(port), SockAddr::UnixPath(q)) => {
                q.ends_with(format!("/.s.PGSQL.{port}").as_bytes())
            }
            _ => false,
        }
    }
}

fn non_empty(s: &Option<String>) -> Option<String> {
    s.clone().filter(|s| !s.is_empty())
}

impl AliasTable {
    /// The PostgreSQL aliases of `databases` (discovery) and `config`. Host names are
    /// resolved (a DNS lookup) only when `resolve` is set.
    pub fn build(databases: &[Database], config: &[ConfigAlias], resolve: bool) -> Self {
        let mut entries: Vec<Entry> = config
            .iter()
            .map(|c| Entry {
                alias: c.alias.clone(),
                name: non_empty(&c.name),
                user: non_empty(&c.user),
                endpoints: match (&c.host, c.port) {
                    (None, None) => Vec::new(),
                    (h, p) => endpoints(h.as_deref(), &p.map(|p| p.to_string()).unwrap_or_default(), resolve),
                },
            })
            .collect();
        let mut files = Vec::new();
        for d in databases {
            let sqlite = match &d.vendor {
                Some(v) => v == super::db::SQLITE,
                None => d.engine.as_deref().is_some_and(|e| e.contains("sqlite")),
            };
            if sqlite {
                files.push((d.alias.clone(), d.name.clone().unwrap_or_default()));
                continue;
            }
            let postgres = match &d.vendor {
                Some(v) => v == super::db::POSTGRESQL,
                None => d.engine.as_deref().is_some_and(|e| e.contains("postgres") || e.contains("postgis")),
            };
            if !postgres || entries.iter().any(|e| e.alias == d.alias) {
                continue;
            }
            entries.push(Entry {
                alias: d.alias.clone(),
                // Django connects to "postgres" when NAME is empty.
                name: non_empty(&d.name).or_else(|| Some("postgres".into())),
                user: non_empty(&d.user),
                endpoints: endpoints(d.host.as_deref(), &d.port, resolve),
            });
        }
        Self { entries, files }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.files.is_empty()
    }

    /// The SQLite alias whose NAME is `file` as the app opened it: the same string, or
    /// the same path when one of them is relative (to the app's working directory).
    /// Without a file (a connection opened before tracing) the alias is known only when
    /// the app has one SQLite database. Django's test runner opens an in-memory NAME as
    /// `file:memorydb_<alias>?mode=memory&cache=shared`: that alias.
    pub fn by_file(&self, file: Option<&str>) -> Option<&str> {
        let Some(file) = file else {
            return match self.files.as_slice() {
                [(alias, _)] => Some(alias),
                _ => None,
            };
        };
        if let Some(rest) = file.strip_prefix("file:memorydb_") {
            let alias = rest.split('?').next().unwrap_or(rest);
            return self.files.iter().find(|(a, _)| a == alias).map(|(a, _)| a.as_str());
        }
        let same = |name: &str| {
            name == file || {
                let (abs, rel) = if name.starts_with('/') { (name, file) } else { (file, name) };
                let rel = rel.trim_start_matches("./");
                // `abs` ends with "/" + `rel` (checked without building it: this runs
                // for every statement).
                !rel.starts_with('/')
                    && !rel.is_empty()
                    && abs.strip_suffix(rel).is_some_and(|head| head.ends_with('/'))
            }
        };
        let hits: Vec<&(String, String)> = self.files.iter().filter(|(_, n)| same(n)).collect();
        hits.iter().find(|(a, _)| a == DEFAULT).or(hits.first()).map(|(a, _)| a.as_str())
    }

    /// The alias of a connection to `peer` that started as `user` on `database`.
    pub fn resolve(&self, peer: Option<&SockAddr>, user: Option<&str>, database: Option<&str>) -> &str {
        let mut best: Option<(&Entry, u32)> = None;
        for e in &self.entries {
            let agree = |want: &Option<String>, got: Option<&str>| match (want, got) {
                (Some(w), Some(g)) => Some(w == g),
                _ => None,
            };
            let (db, us) = (agree(&e.name, database), agree(&e.user, user));
            if db == Some(false) || us == Some(false) {
                continue;
            }
            let at = peer.is_some_and(|p| e.endpoints.iter().any(|ep| ep.matches(p)));
            let score = u32::from(db == Some(true)) + u32::from(us == Some(true)) + u32::from(at);
            let better = match best {
                None => true,
                Some((b, s)) => score > s || (score == s && e.alias == DEFAULT && b.alias != DEFAULT),
            };
            if better {
                best = Some((e, score));
            }
        }
        best.map_or(DEFAULT, |(e, _)| e.alias.as_str())
    }

    /// The alias whose address `peer` is, if any (a connect that failed says no more).
    pub fn by_address(&self, peer: &SockAddr) -> Option<&str> {
        let hits: Vec<&Entry> =
            self.entries.iter().filter(|e| e.endpoints.iter().any(|ep| ep.matches(peer))).collect();
        hits.iter().find(|e| e.alias == DEFAULT).or(hits.first()).map(|e| e.alias.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(alias: &str, host: &str, port: &str, name: &str, user: &str) -> Database {
        Database {
            alias: alias.into(),
            vendor: Some("postgresql".into()),
            engine: Some("django.db.backends.postgresql".into()),
            name: Some(name.into()),
            user: Some(user.into()),
            host: Some(host.into()),
            port: port.into(),
            pool: false,
        }
    }

    fn inet(s: &str) -> SockAddr {
        SockAddr::Inet(s.parse().unwrap())
    }

    #[test]
    fn the_test_apps_aliases() {
        let t = AliasTable::build(
            &[
                db("default", "127.0.0.1", "15432", "app", "observer"),
                db("broken", "127.0.0.1", "9", "app", "observer"),
                db("wrongpw", "127.0.0.1", "15432", "app", "observer_wrongpw"),
            ],
            &[],
            false,
        );
        let p = inet("127.0.0.1:15432");
        assert_eq!(t.resolve(Some(&p), Some("observer"), Some("app")), "default");
        assert_eq!(t.resolve(Some(&p), Some("observer_wrongpw"), Some("app")), "wrongpw");
        assert_eq!(t.by_address(&inet("127.0.0.1:9")), Some("broken"));
        assert_eq!(t.by_address(&p), Some("default"));
        assert_eq!(t.by_address(&inet("127.0.0.1:5")), None);
        // IPv4-mapped IPv6 is the same address.
        assert_eq!(t.by_address(&inet("[::ffff:127.0.0.1]:9")), Some("broken"));
    }

    #[test]
    fn replicas_are_told_apart_by_address() {
        let t = AliasTable::build(
            &[db("default", "10.0.0.1", "", "app", "u"), db("replica", "10.0.0.2", "", "app", "u")],
            &[],
            false,
        );
        assert_eq!(t.resolve(Some(&inet("10.0.0.2:5432")), Some("u"), Some("app")), "replica");
        assert_eq!(t.resolve(Some(&inet("10.0.0.1:5432")), Some("u"), Some("app")), "default");
        // Address unknown (a host name resolved elsewhere): default wins the tie.
        assert_eq!(t.resolve(Some(&inet("10.9.9.9:5432")), Some("u"), Some("app")), "default");
    }

    #[test]
    fn unix_sockets_and_defaults() {
        let t = AliasTable::build(
            &[db("default", "", "", "app", "u"), db("other", "/run/pg", "5433", "other", "u")],
            &[],
            false,
        );
        let default_sock = SockAddr::UnixPath(b"/var/run/postgresql/.s.PGSQL.5432".to_vec());
        assert_eq!(t.by_address(&default_sock), Some("default"));
        let other = SockAddr::UnixPath(b"/run/pg/.s.PGSQL.5433".to_vec());
        assert_eq!(t.by_address(&other), Some("other"));
        assert_eq!(t.resolve(Some(&other), Some("u"), Some("other")), "other");
        // Nothing matches: default.
        assert_eq!(t.resolve(None, Some("x"), Some("y")), "default");
        assert_eq!(AliasTable::default().resolve(None, None, None), "default");
    }

    #[test]
    fn config_entries_come_first_and_other_vendors_are_left_out() {
        let mut sqlite = db("lite", "", "", "db.sqlite3", "");
        sqlite.vendor = Some("sqlite".into());
        let t = AliasTable::build(
            &[sqlite, db("default", "db", "", "app", "u")],
            &[ConfigAlias { alias: "reports".into(), name: Some("reports".into()), ..Default::default() }],
            false,
        );
        assert_eq!(t.resolve(None, Some("u"), Some("reports")), "reports");
        assert_eq!(t.resolve(None, Some("u"), Some("app")), "default");
        assert_eq!(t.resolve(None, Some("u"), Some("db.sqlite3")), "default");
        assert!(!t.is_empty());
    }

    #[test]
    fn host_names_resolve_when_asked() {
        let t = AliasTable::build(&[db("default", "localhost", "6000", "app", "u")], &[], true);
        assert_eq!(t.by_address(&inet("127.0.0.1:6000")), Some("default"));
        let t = AliasTable::build(&[db("default", "localhost", "6000", "app", "u")], &[], false);
        assert_eq!(t.by_address(&inet("127.0.0.1:6000")), None);
    }

    #[test]
    fn sqlite_aliases_by_file() {
        let lite = |alias: &str, name: &str| Database {
            alias: alias.into(),
            vendor: Some("sqlite".into()),
            name: Some(name.into()),
            ..Database::default()
        };
        let t = AliasTable::build(
            &[
                lite("default", "/srv/app/db.sqlite3"),
                lite("other", "data/other.db"),
                lite("mem", ":memory:"),
            ],
            &[],
            false,
        );
        assert_eq!(t.by_file(Some(":memory:")), Some("mem"));
        assert_eq!(t.by_file(Some("file:memorydb_mem?mode=memory&cache=shared")), Some("mem"), "test runs");
        assert_eq!(t.by_file(Some("file:memorydb_gone?mode=memory&cache=shared")), None);
        assert_eq!(t.by_file(Some("/srv/app/db.sqlite3")), Some("default"));
        assert_eq!(t.by_file(Some("/srv/app/data/other.db")), Some("other"), "a relative NAME by its suffix");
        assert_eq!(t.by_file(Some("/srv/app/xdata/other.db")), None, "a suffix only at a path boundary");
        assert_eq!(t.by_file(Some("/tmp/cache.db")), None);
        assert_eq!(t.by_file(None), None, "several SQLite aliases: unknown");
        let one = AliasTable::build(&[lite("default", "./db.sqlite3")], &[], false);
        assert_eq!(one.by_file(Some("/srv/db.sqlite3")), Some("default"));
        assert_eq!(one.by_file(None), Some("default"));
    }
}
