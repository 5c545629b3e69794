//! One path into the metrics model. Whatever produced it (today the HTTP/1, PostgreSQL,
//! Redis and memcached parsers over socket syscalls; tomorrow TLS plaintext, SQLite calls
//! and MySQL), what an app did is one of four [`Observed`] things: an HTTP exchange, a
//! database event, a cache lookup, or a connect refused before any byte. The pipeline
//! routes each through [`classify`] (is it the app's, and under which labels) and
//! [`count`], where each Django family is filled in one function.

use std::sync::Arc;

use crate::{
    app::{lifecycle::App, tls::Connection},
    django::{
        db::{DbObservation, POSTGRESQL, SQLITE},
        http::{Body, HttpObservation, UNNAMED_VIEW},
    },
    events::{Role, SockAddr},
    profile::{Profile, metrics::ViewObservation},
    protocol::{
        KeyGet, Outcome, Wire,
        http1::Exchange,
        postgres::{self, Failure, sql::TableWrite, sqlstate},
    },
    selfmetrics::SelfStats,
    stream::tls::Opacity,
    views::View,
};

/// What an app did, as its source saw it.
#[derive(Debug, Clone)]
pub enum Observed {
    Http(Box<HttpExchange>),
    Db(DbEvent),
    Cache(CacheLookup),
    /// A connect that failed before any byte: to a database, a cache, or neither.
    Refused(SockAddr),
    /// A TLS connection that closed without its plaintext seen.
    TlsOpaque(TlsOpaque),
}

impl Observed {
    /// The `protocol` label of a fault while counting it.
    pub fn protocol(&self) -> &'static str {
        match self {
            Self::Http(_) => "http",
            Self::Db(ev) => ev.vendor,
            Self::Cache(c) => c.wire.name(),
            Self::Refused(_) => "connect",
            Self::TlsOpaque(_) => "tls",
        }
    }
}

/// One request and its response, with where it was served and what the request did.
#[derive(Debug, Clone)]
pub struct HttpExchange {
    pub exchange: Exchange,
    /// The listener it was served on (the `instance` label names it).
    pub local: Option<SockAddr>,
    /// Served over TLS (its plaintext read from the app's OpenSSL).
    pub tls: bool,
    pub profile: Profile,
}

/// What a database connection did.
#[derive(Debug, Clone)]
pub struct DbEvent {
    /// Count it only if `peer` is one of the app's databases (a connection met in the
    /// middle, recognised by its messages alone).
    pub confirm: bool,
    pub peer: Option<SockAddr>,
    pub user: Option<Box<str>>,
    pub database: Option<Box<str>>,
    /// The database file (SQLite), as the app opened it.
    pub file: Option<Arc<str>>,
    /// django-prometheus's `vendor` label.
    pub vendor: &'static str,
    pub what: DbWhat,
}

#[derive(Debug, Clone)]
pub enum DbWhat {
    Attempt,
    AttemptFailed,
    /// A connect that failed before any byte (refused, no such socket).
    Refused,
    Statement(DbStatement),
}

/// One `cursor.execute()` or `executemany()`, in the driver's terms.
#[derive(Debug, Clone, PartialEq)]
pub struct DbStatement {
    pub executes: u64,
    pub many: bool,
    /// The exception class the driver raised, when it failed.
    pub error_type: Option<&'static str>,
    pub seconds: f64,
    /// INSERT/UPDATE/DELETE statements by table, with how many times each ran.
    pub writes: Vec<(TableWrite, u32)>,
}

impl DbStatement {
    /// A PostgreSQL statement as psycopg reports it to Django.
    pub fn from_postgres(st: &postgres::Statement) -> Self {
        let error_type = st.failure.map(|x| match x {
            Failure::Server(code) => code.class_name(),
            // psycopg: OperationalError when the connection broke, the base class for an
            // error without a SQLSTATE.
            Failure::ConnectionLost => sqlstate::NO_SQLSTATE,
            Failure::Unknown | Failure::Desync => "DatabaseError",
        });
        Self {
            executes: u64::from(st.executes),
            many: st.many,
            error_type,
            seconds: st.seconds(),
            writes: st.writes.clone(),
        }
    }
}

/// A TLS connection nobody decrypted, and why (see `stream::tls`).
#[derive(Debug, Clone)]
pub struct TlsOpaque {
    pub role: Role,
    pub peer: Option<SockAddr>,
    pub reason: Opacity,
}

/// A lookup on a Redis or memcached connection.
#[derive(Debug, Clone)]
pub struct CacheLookup {
    pub wire: Wire,
    pub peer: Option<SockAddr>,
    pub get: KeyGet,
}

/// What an observation counts as in its app's families, its labels decided.
#[derive(Debug)]
pub enum Count {
    Http(Box<HttpExchange>),
    Db { alias: String, vendor: &'static str, what: DbWhat },
    CacheGet { backend: &'static str, outcome: Outcome },
    TlsOpaque { connection: Connection, reason: Opacity },
}

impl Count {
    /// Where it was served, for the app's `instance` label if its families start now.
    pub fn local(&self) -> Option<&SockAddr> {
        match self {
            Self::Http(h) => h.local.as_ref(),
            _ => None,
        }
    }
}

/// Whether an observation is the app's, and as what: a statement on a connection met in
/// the middle counts only if it goes to one of the app's databases, a refused connect
/// only if it was to one of its databases or caches, a lookup only on one of its caches
/// (another user of the same server is not the app).
pub fn classify(app: &App, obs: Observed, stats: &mut SelfStats) -> Option<Count> {
    match obs {
        Observed::Http(h) => Some(Count::Http(h)),
        Observed::Db(ev) if ev.vendor == SQLITE => {
            // Only the files of the app's DATABASES: another user of SQLite in the
            // process (a library's own cache) is not the app's database.
            let Some(alias) = app.aliases.by_file(ev.file.as_deref()) else {
                stats.sqlite_other_files += 1;
                return None;
            };
            Some(Count::Db { alias: alias.to_string(), vendor: ev.vendor, what: ev.what })
        }
        Observed::Db(ev) => {
            if ev.confirm && ev.peer.as_ref().is_none_or(|p| app.aliases.by_address(p).is_none()) {
                return None;
            }
            let alias = app.aliases.resolve(ev.peer.as_ref(), ev.user.as_deref(), ev.database.as_deref());
            Some(Count::Db { alias: alias.to_string(), vendor: ev.vendor, what: ev.what })
        }
        Observed::Refused(peer) => {
            if let Some(alias) = app.aliases.by_address(&peer) {
                Some(Count::Db { alias: alias.to_string(), vendor: POSTGRESQL, what: DbWhat::Refused })
            } else {
                // The command never left: whatever it was, the cache call failed. Counted
                // as a failed get (see the README on what this over-counts).
                let backend = app.caches.by_address(&peer)?;
                Some(Count::CacheGet { backend, outcome: Outcome::Fail })
            }
        }
        Observed::Cache(c) => {
            let backend = c.peer.as_ref().and_then(|p| app.caches.lookup(c.wire, p, &c.get.key));
            let Some(backend) = backend else {
                stats.cache_gets_ignored += 1;
                return None;
            };
            Some(Count::CacheGet { backend, outcome: c.get.outcome })
        }
        Observed::TlsOpaque(t) => {
            let connection = match (t.role, &t.peer) {
                (Role::Server, _) => Connection::Served,
                (Role::Client, Some(p)) if app.aliases.by_address(p).is_some() => Connection::Database,
                (Role::Client, Some(p)) if app.caches.by_address(p).is_some() => Connection::Cache,
                (Role::Client, _) => Connection::Other,
            };
            Some(Count::TlsOpaque { connection, reason: t.reason })
        }
    }
}

/// What an HTTP exchange was counted as, for `observer top`.
pub struct HttpCounted {
    pub view: Arc<str>,
    pub cache_gets: u64,
    pub cache_hits: u64,
}

/// A classified observation into the app's families (which exist by now).
pub fn count(
    app: &mut App,
    c: &Count,
    n_plus_one_threshold: u32,
    stats: &mut SelfStats,
) -> Option<HttpCounted> {
    match c {
        Count::Http(h) => {
            stats.http_exchanges += 1;
            let view = http(app, &h.exchange, h.tls)?;
            let (cache_gets, cache_hits) = view_profile(app, &view, h, n_plus_one_threshold);
            Some(HttpCounted { view, cache_gets, cache_hits })
        }
        Count::Db { alias, vendor, what } => {
            db(app, alias, vendor, what, stats);
            None
        }
        Count::CacheGet { backend, outcome } => {
            if let Some(f) = app.families.as_ref() {
                f.cache.observe(backend, *outcome);
                stats.cache_gets += 1;
            }
            None
        }
        Count::TlsOpaque { connection, reason } => {
            if let Some(f) = app.families.as_ref() {
                f.tls.opaque(*connection, *reason);
            }
            None
        }
    }
}

/// The exchange into the app's django_http_* families; returns its view label.
fn http(app: &mut App, ex: &Exchange, tls: bool) -> Option<Arc<str>> {
    let http = app.families.as_mut().map(|f| &mut f.http)?;
    let (req, resp) = (&ex.request, &ex.response);
    let view = app.views.resolve(&req.path);
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
        && app.settings.append_slash
        && !req.path.ends_with('/')
        && app.views.table().is_some_and(|tb| tb.resolve(&format!("{}/", req.path)).is_some())
    {
        status = 404;
        response_body = Body::Unknown;
    }
    let charset = resp.charset.clone().unwrap_or_else(|| app.settings.default_charset.clone());
    let secure = crate::django::http::is_secure(&req.proxy_headers, app.settings.secure_header(), tls);
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
        latency_s: ex.latency_s(),
    });
    Some(label)
}

/// The exchange's profile into the app's per-view families (same view label as
/// django-prometheus's by-view families). Returns the request's gets on the app's caches
/// and its hits.
fn view_profile(app: &App, view: &str, h: &HttpExchange, n_plus_one_threshold: u32) -> (u64, u64) {
    let Some(f) = app.families.as_ref() else { return (0, 0) };
    let (mut gets, mut hits, mut misses) = (0, 0, 0);
    for c in &h.profile.cache {
        if c.peer.as_ref().and_then(|p| app.caches.lookup(c.wire, p, &c.get.key)).is_some() {
            gets += 1;
            match c.get.outcome {
                Outcome::Hit => hits += 1,
                Outcome::Miss => misses += 1,
                Outcome::Fail | Outcome::Unknown => {}
            }
        }
    }
    f.profile.observe(&ViewObservation {
        view,
        method: &h.exchange.request.method,
        latency_s: h.exchange.latency_s(),
        profile: &h.profile,
        cache_gets: gets,
        cache_hits: hits,
        cache_misses: misses,
        n_plus_one_threshold,
    });
    (gets, hits)
}

/// A database event into the app's django_db_* and django_model_* families.
fn db(app: &mut App, alias: &str, vendor: &'static str, what: &DbWhat, stats: &mut SelfStats) {
    let Some(f) = app.families.as_mut() else { return };
    match what {
        DbWhat::Attempt => f.db.attempt(alias, vendor),
        DbWhat::AttemptFailed => f.db.attempt_failed(alias, vendor),
        DbWhat::Refused => {
            f.db.attempt(alias, vendor);
            f.db.attempt_failed(alias, vendor);
        }
        DbWhat::Statement(st) => {
            f.db.observe(&DbObservation {
                alias,
                vendor,
                executes: st.executes,
                many: st.many,
                error_type: st.error_type,
                seconds: st.seconds,
            });
            for (w, n) in &st.writes {
                if let Some(label) = app.models.label(&w.table) {
                    f.models.count(w.op, &label, u64::from(*n));
                }
            }
            stats.db_statements += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::SocketAddr,
        sync::{Arc, Mutex},
        time::Instant,
    };

    use super::*;
    use crate::{
        app::lifecycle::{Apps, ProcHost},
        django::{aliases::ConfigAlias, cache::ConfigCache},
        server::Exposition,
        settings::Settings,
    };

    /// A pid no process has: the real host reads nothing of it.
    const ROOT: u32 = 4_000_000_000;

    fn addr(port: u16) -> SockAddr {
        SockAddr::Inet(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// An app with a database on port 5432 and a Redis cache on 6379, its families made.
    fn app() -> (Apps, Arc<Mutex<Exposition>>) {
        let settings = Settings {
            discover_routes: false,
            migrations: false,
            db_aliases: vec![ConfigAlias {
                alias: "default".into(),
                host: Some("127.0.0.1".into()),
                port: Some(5432),
                name: None,
                user: None,
            }],
            caches: vec![ConfigCache {
                alias: None,
                backend: "redis".into(),
                servers: vec!["redis://127.0.0.1:6379/0".into()],
                key_regex: None,
            }],
            ..Settings::default()
        };
        let shared = Arc::new(Mutex::new(Exposition::default()));
        let mut apps = Apps::new(settings, shared.clone(), Box::new(ProcHost));
        apps.tracked(ROOT, Instant::now(), &mut Vec::new());
        assert!(apps.materialized(ROOT, None, &mut SelfStats::default()).is_some());
        (apps, shared)
    }

    fn text(shared: &Arc<Mutex<Exposition>>) -> String {
        let e = shared.lock().unwrap();
        prometheus::TextEncoder::new().encode_to_string(&e.registries[&ROOT].gather()).unwrap()
    }

    fn db(peer: u16, confirm: bool, what: DbWhat) -> Observed {
        Observed::Db(DbEvent {
            confirm,
            peer: Some(addr(peer)),
            user: None,
            database: None,
            file: None,
            vendor: POSTGRESQL,
            what,
        })
    }

    fn statement(error_type: Option<&'static str>) -> DbWhat {
        DbWhat::Statement(DbStatement {
            executes: 3,
            many: true,
            error_type,
            seconds: 0.002,
            writes: Vec::new(),
        })
    }

    fn route(apps: &mut Apps, obs: Observed, stats: &mut SelfStats) -> bool {
        let Some(c) = classify(apps.get(ROOT).unwrap(), obs, stats) else { return false };
        count(apps.materialized(ROOT, c.local(), stats).unwrap(), &c, 10, stats);
        true
    }

    #[test]
    fn statements_count_under_their_alias_and_exception_class() {
        let (mut apps, shared) = app();
        let mut stats = SelfStats::default();
        assert!(route(&mut apps, db(5432, false, statement(None)), &mut stats));
        assert!(route(&mut apps, db(5432, false, statement(Some("IntegrityError"))), &mut stats));
        assert!(route(&mut apps, db(5432, false, DbWhat::Attempt), &mut stats));
        assert_eq!(stats.db_statements, 2);
        let t = text(&shared);
        for line in [
            r#"django_db_execute_total{alias="default",vendor="postgresql","#,
            r#"django_db_execute_many_total{alias="default",vendor="postgresql""#,
            r#"django_db_errors_total{alias="default",type="IntegrityError",vendor="postgresql""#,
            r#"django_db_new_connections_total{alias="default",vendor="postgresql""#,
        ] {
            assert!(t.contains(line), "{line} missing in\n{t}");
        }
        let execute = t.lines().find(|l| l.starts_with("django_db_execute_total{")).unwrap();
        assert!(execute.ends_with("} 6"), "3 executes twice: {execute}");
    }

    #[test]
    fn a_connection_met_in_the_middle_counts_only_to_the_apps_databases() {
        let (mut apps, _) = app();
        let mut stats = SelfStats::default();
        assert!(!route(&mut apps, db(5433, true, statement(None)), &mut stats));
        assert!(route(&mut apps, db(5432, true, statement(None)), &mut stats));
        // Not met in the middle: another address is still the app's (its default alias).
        assert!(route(&mut apps, db(5433, false, statement(None)), &mut stats));
        assert_eq!(stats.db_statements, 2);
    }

    #[test]
    fn a_refused_connect_counts_where_it_was_going() {
        let (mut apps, shared) = app();
        let mut stats = SelfStats::default();
        assert!(route(&mut apps, Observed::Refused(addr(5432)), &mut stats));
        assert!(route(&mut apps, Observed::Refused(addr(6379)), &mut stats));
        assert!(!route(&mut apps, Observed::Refused(addr(80)), &mut stats));
        let t = text(&shared);
        assert!(
            t.contains(r#"django_db_new_connection_errors_total{alias="default",vendor="postgresql""#),
            "{t}"
        );
        assert!(t.contains(r#"django_cache_get_fail_total{backend="redis""#), "{t}");
        assert_eq!(stats.cache_gets, 1);
    }

    #[test]
    fn lookups_count_only_on_the_apps_caches() {
        let (mut apps, shared) = app();
        let mut stats = SelfStats::default();
        let lookup = |port, outcome| {
            Observed::Cache(CacheLookup {
                wire: Wire::Redis,
                peer: Some(addr(port)),
                get: KeyGet { key: b":1:k".to_vec().into(), outcome },
            })
        };
        assert!(route(&mut apps, lookup(6379, Outcome::Hit), &mut stats));
        assert!(route(&mut apps, lookup(6379, Outcome::Miss), &mut stats));
        assert!(!route(&mut apps, lookup(6380, Outcome::Hit), &mut stats));
        assert_eq!((stats.cache_gets, stats.cache_gets_ignored), (2, 1));
        let t = text(&shared);
        assert!(t.contains(r#"django_cache_get_hits_total{backend="redis","#), "{t}");
        assert!(t.contains(r#"django_cache_get_misses_total{backend="redis","#), "{t}");
    }

    #[test]
    fn postgres_failures_map_to_psycopgs_exception_classes() {
        let mut st = postgres::Statement {
            start_ns: 1_000,
            end_ns: 3_000,
            executes: 2,
            many: true,
            failure: Some(Failure::ConnectionLost),
            writes: Vec::new(),
            shape: None,
            shape_text: None,
        };
        let d = DbStatement::from_postgres(&st);
        assert_eq!((d.executes, d.many, d.error_type), (2, true, Some(sqlstate::NO_SQLSTATE)));
        assert!((d.seconds - 2e-6).abs() < 1e-12);
        st.failure = Some(Failure::Desync);
        assert_eq!(DbStatement::from_postgres(&st).error_type, Some("DatabaseError"));
        st.failure = None;
        assert_eq!(DbStatement::from_postgres(&st).error_type, None);
    }
}
