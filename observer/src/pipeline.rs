//! `observer run`'s sink, the router of the metrics path. Every record of a traced
//! process's connection becomes a segment of its stream (`stream`, gaps marked); a
//! connection's protocol is decided from its first bytes (`protocol::detect`) and its
//! segments go through that parser (`parsers`, `protocol::*`); what the parsers make of
//! them becomes [`Observed`] exchanges, statements and lookups of the app the process
//! belongs to (`app::lifecycle`), routed by [`Pipeline::route`] into the app's Django
//! families (`exchange`).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::{
    app::lifecycle::{App, Apps, Host, ProcHost},
    conns::{ConnInfo, ConnTable},
    django::db::{POSTGRESQL, SQLITE},
    events::{Data, Direction, Record, Role, SockAddr},
    exchange::{self, CacheLookup, DbEvent, DbStatement, DbWhat, HttpExchange, Observed, TlsOpaque},
    fault,
    libs::LibState,
    loss::LossReport,
    parsers::{ConnState, Parsers, PgConn, Proto},
    profile::{Attribution, CacheWork, Work},
    protocol::{
        self, CacheParser, Chunk, Wire, detect,
        http1::{Event, Http1Parser, Mode},
        memcached::MemcachedParser,
        postgres::{
            self, PgParser,
            fallback::{Fallback, Key},
        },
        redis::RedisParser,
        sqlite::{self, Sqlite},
    },
    pump::{Live, Sink},
    selfmetrics::SelfStats,
    server::Exposition,
    stream::{
        Gap, Segment, Streams,
        tls::{ClosedOpaque, Feed, Origin, Tls},
    },
    targets,
    top::{Sample as TopSample, Top},
};

pub use crate::settings::Settings;

/// At most one warning about parser faults per this long (each is counted).
const FAULT_WARNING_EVERY: Duration = Duration::from_secs(60);

pub struct Pipeline {
    settings: Settings,
    shared: Arc<Mutex<Exposition>>,
    apps: Apps,
    conns: Parsers,
    /// Each connection's records in order, gaps marked.
    streams: Streams,
    /// Which connections are TLS, and so which of their records are parsed.
    tls: Tls,
    /// Failed PostgreSQL attempts that libpq may retry with the other encryption.
    fallback: Fallback<SockAddr, (u32, DbEvent)>,
    /// The latest record's time (the kernel's monotonic clock).
    now_ns: u64,
    stats: SelfStats,
    events: Vec<Event>,
    pg_events: Vec<postgres::Event>,
    cache_events: Vec<protocol::CacheEvent>,
    /// What the apps' SQLite calls add up to.
    sqlite: Sqlite,
    sqlite_events: Vec<sqlite::Emitted>,
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
        Self::with_host(settings, shared, Box::new(ProcHost))
    }

    /// With what the apps' lifecycle reads of the host and runs in the background.
    pub fn with_host(settings: Settings, shared: Arc<Mutex<Exposition>>, host: Box<dyn Host>) -> Self {
        let fallback = Fallback::new(settings.max_held_connect_failures);
        let sqlite =
            Sqlite::new(sqlite::Limits { keep_shapes: settings.postgres.keep_shapes, ..settings.sqlite });
        Self {
            apps: Apps::new(settings.clone(), shared.clone(), host),
            settings,
            shared,
            conns: Parsers::default(),
            streams: Streams::default(),
            tls: Tls::default(),
            fallback,
            now_ns: 0,
            stats: SelfStats::default(),
            events: Vec::new(),
            pg_events: Vec::new(),
            cache_events: Vec::new(),
            sqlite,
            sqlite_events: Vec::new(),
            attribution: Attribution::default(),
            top: None,
            last_gc: Instant::now(),
            fault_warned: None,
            faults_unwarned: 0,
            #[cfg(test)]
            inject_fault: None,
        }
    }

    /// What an app did, whatever produced it, into its families: it waits while the
    /// app is being discovered, is counted only if it is the app's (see
    /// [`exchange::classify`]), and creates the app's families if it is their first.
    fn route(&mut self, root: u32, obs: Observed) {
        let Some(obs) = self.apps.admit(root, obs, &mut self.stats) else { return };
        let Some(app) = self.apps.get(root) else { return };
        let Some(count) = exchange::classify(app, obs, &mut self.stats) else { return };
        let Some(app) = self.apps.materialized(root, count.local(), &mut self.stats) else { return };
        let counted = exchange::count(app, &count, self.settings.n_plus_one_threshold, &mut self.stats);
        if let exchange::Count::Http(h) = &count {
            if let (Some(c), Some(top)) = (&counted, self.top.as_mut()) {
                top.observe(&TopSample {
                    root,
                    view: &c.view,
                    latency_s: h.exchange.latency_s(),
                    profile: &h.profile,
                    cache_gets: c.cache_gets,
                    cache_hits: c.cache_hits,
                });
            }
            self.attribution.counted(&h.profile);
        }
    }

    /// Apps whose discovery is over: their HTTP parsers learn the app's settings, and
    /// what waited is routed, in order.
    fn poll_discoveries(&mut self) {
        for over in self.apps.poll_discoveries(&mut self.stats) {
            for c in self.conns.of_target_mut(over.root) {
                if let Proto::Http(p) = &mut c.proto {
                    p.set_config(over.config.clone());
                }
            }
            for obs in over.backlog {
                let protocol = obs.protocol();
                if let Err(f) = fault::contain(|| self.route(over.root, obs)) {
                    self.fault_seen(protocol, over.root, &f);
                }
            }
        }
    }

    /// Apps that ended: their connections' parser state and their `top` rows go.
    fn forget_apps(&mut self, dropped: Vec<u32>) {
        for root in dropped {
            self.conns.remove_target(root);
            if let Some(top) = self.top.as_mut() {
                top.forget(root);
            }
        }
    }

    /// What an HTTP connection's parser reported.
    fn handle_events(&mut self, target: u32, conn_id: u64, local: Option<&SockAddr>) {
        let mut events = std::mem::take(&mut self.events);
        for ev in events.drain(..) {
            match ev {
                Event::Exchange(exchange) => {
                    let profile = self.attribution.take(conn_id);
                    let local = local.cloned();
                    let tls = self.tls.knows(conn_id);
                    self.route(
                        target,
                        Observed::Http(Box::new(HttpExchange { exchange, local, tls, profile })),
                    );
                }
                Event::Error(e) => *self.stats.parse_errors.entry(("http", e.as_str())).or_default() += 1,
            }
        }
        // Keep the buffer's allocation for the next chunk.
        self.events = events;
    }

    /// What a PostgreSQL connection's parser reported.
    fn handle_pg_events(&mut self, target: u32, conn_id: u64, thread: (u32, u32)) {
        let events = std::mem::take(&mut self.pg_events);
        let now = self.now_ns;
        for ev in &events {
            let (confirm, peer, user, database, tls, retry) = match self.conns.get_mut(conn_id) {
                Some(ConnState { proto: Proto::Postgres(pg), peer, .. }) => {
                    if let postgres::Event::Attempt { user, database } = ev {
                        pg.user.clone_from(user);
                        pg.database.clone_from(database);
                    }
                    let tls = pg.parser.awaits_tls();
                    (pg.mid_stream, peer.clone(), pg.user.clone(), pg.database.clone(), tls, &mut pg.retry)
                }
                _ => (false, None, None, None, false, &mut false),
            };
            let key = || Key { thread: thread.1, peer: peer.clone(), user: user.clone() };
            // A failure libpq may retry with the other encryption is held a moment.
            let hold = matches!(ev, postgres::Event::AttemptFailed { sqlstate: Some(_) }) && !*retry;
            let what = match ev {
                postgres::Event::Attempt { .. } => {
                    if self.fallback.retry(&key(), tls, now) {
                        // libpq's retry with the other encryption: the same attempt.
                        *retry = true;
                        continue;
                    }
                    DbWhat::Attempt
                }
                postgres::Event::AttemptFailed { .. } => DbWhat::AttemptFailed,
                postgres::Event::Statement(st) => {
                    let work = Work::Db {
                        executes: st.executes,
                        seconds: st.seconds(),
                        shape: st.shape,
                        text: st.shape_text.clone(),
                    };
                    self.attribution.work(thread.0, thread.1, work);
                    DbWhat::Statement(DbStatement::from_postgres(st))
                }
                postgres::Event::Encrypted => {
                    self.stats.db_encrypted += 1;
                    let origin = Origin { target, tgid: thread.0, role: Role::Client, peer: peer.clone() };
                    self.tls.encrypted(conn_id, origin);
                    continue;
                }
                postgres::Event::Cancel => continue,
                postgres::Event::Error(e) => {
                    *self.stats.parse_errors.entry(("postgresql", e.as_str())).or_default() += 1;
                    continue;
                }
            };
            let held_key = hold.then(key);
            let db = DbEvent { confirm, peer, user, database, file: None, vendor: POSTGRESQL, what };
            match held_key {
                Some(k) => {
                    if let Some((t, released)) = self.fallback.hold(k, tls, now, (target, db)) {
                        self.route(t, Observed::Db(released));
                    }
                }
                None => self.route(target, Observed::Db(db)),
            }
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
                    self.route(target, Observed::Cache(CacheLookup { wire, peer: peer.cloned(), get }))
                }
                protocol::CacheEvent::Error(e) => {
                    *self.stats.parse_errors.entry((protocol, e.as_str())).or_default() += 1
                }
            }
        }
        // Keep the buffer's allocation for the next chunk.
        self.cache_events = events;
    }

    /// What the apps' SQLite calls added up to, into their families and their requests'
    /// profiles.
    fn handle_sqlite_events(&mut self) {
        let mut events = std::mem::take(&mut self.sqlite_events);
        for e in events.drain(..) {
            let Some(target) = self.apps.root_of(e.tgid) else {
                self.stats.unattributed_records += 1;
                continue;
            };
            let db = |file, what| DbEvent {
                confirm: false,
                peer: None,
                user: None,
                database: None,
                file,
                vendor: SQLITE,
                what,
            };
            match e.event {
                sqlite::Event::Attempt { file, failed } => {
                    self.route(target, Observed::Db(db(Some(file.clone()), DbWhat::Attempt)));
                    if failed {
                        self.route(target, Observed::Db(db(Some(file), DbWhat::AttemptFailed)));
                    }
                }
                sqlite::Event::ConnectFailed { file, db: handle } => {
                    let file = file.or_else(|| self.sqlite_file(e.tgid, handle));
                    self.route(target, Observed::Db(db(file, DbWhat::AttemptFailed)));
                }
                sqlite::Event::Statement(mut st) => {
                    if st.file.is_none()
                        && let Some(handle) = st.db
                    {
                        st.file = self.sqlite_file(e.tgid, handle);
                    }
                    let work = Work::Db {
                        executes: st.executes,
                        seconds: st.seconds(),
                        shape: st.shape,
                        text: st.shape_text.clone(),
                    };
                    self.attribution.work(e.tgid, e.tid, work);
                    let what = DbWhat::Statement(DbStatement {
                        executes: u64::from(st.executes),
                        many: st.many,
                        error_type: st.error,
                        seconds: st.seconds(),
                        writes: st.writes.clone(),
                    });
                    self.route(target, Observed::Db(db(st.file.clone(), what)));
                }
            }
        }
        self.sqlite_events = events;
    }

    /// The file of a connection whose open was not seen (opened before tracing): the one
    /// SQLite database its process has open, if it has one; looked up once per handle.
    fn sqlite_file(&mut self, tgid: u32, handle: u64) -> Option<Arc<str>> {
        if self.sqlite.knows(tgid, handle) {
            return None;
        }
        let file: Arc<str> = match targets::open_sqlite_files(tgid).as_slice() {
            [one] => one.as_str().into(),
            _ => "".into(),
        };
        self.sqlite.learn(tgid, handle, file.clone());
        Some(file).filter(|f| !f.is_empty())
    }

    /// The connection is gone: its parser's last events, then its state goes.
    fn close_conn(&mut self, conn_id: u64) {
        let Some(target) = self.conns.get(conn_id).map(|c| c.target) else {
            self.tls_closed(conn_id);
            return;
        };
        if let Err(f) = fault::contain(|| self.close_parser(conn_id)) {
            self.parser_fault(conn_id, target, &f);
        }
        self.conns.remove(conn_id);
        self.attribution.closed(conn_id);
        // Last: what the close completed was served over TLS.
        self.tls_closed(conn_id);
    }

    /// A connection's TLS state ends; one that stayed opaque is counted under its app.
    fn tls_closed(&mut self, conn_id: u64) {
        if let Some(c) = self.tls.closed(conn_id) {
            self.opaque_closed(c);
        }
    }

    fn opaque_closed(&mut self, c: ClosedOpaque) {
        let ClosedOpaque { origin, reason } = c;
        self.route(
            origin.target,
            Observed::TlsOpaque(TlsOpaque { role: origin.role, peer: origin.peer, reason }),
        );
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

    /// A connection's first TLS plaintext: a PostgreSQL parser waiting for it goes on
    /// (or resumes, if it had given the connection up as opaque); any other parser saw
    /// only ciphertext and goes, so the protocol is decided from the plaintext.
    fn plaintext_begins(&mut self, conn_id: u64) {
        match self.conns.get_mut(conn_id).map(|c| &mut c.proto) {
            Some(Proto::Postgres(pg)) => pg.parser.decrypted(),
            Some(Proto::Faulted) | None => {}
            Some(_) => {
                let _ = self.conns.remove(conn_id);
            }
        }
    }

    /// Socket bytes of a TLS connection that the kernel did not see inside an `SSL_*`
    /// call: nobody decrypts it (no probed library, or its handshake ran before the
    /// probes were set). A PostgreSQL connection in that state was an attempt all the same.
    fn ciphertext_unread(&mut self, target: u32, d: &Data<'_>) {
        if let Some(ConnState { proto: Proto::Postgres(pg), .. }) = self.conns.get_mut(d.conn_id)
            && pg.parser.awaits_tls()
        {
            pg.parser.opaque(&mut self.pg_events);
            self.handle_pg_events(target, d.conn_id, (d.tgid, d.tid));
        }
    }

    /// The parser for a connection, from one of its records (None: not decided yet).
    fn new_proto(&self, app: &App, role: Role, chunk: &Chunk<'_>, peer: Option<&SockAddr>) -> Option<Proto> {
        let known = app.known();
        let hint = detect::Peer {
            known,
            is_cache: known && peer.is_some_and(|p| app.caches.by_address(p).is_some()),
        };
        let limits = self.settings.postgres;
        let cache = protocol::CacheLimits { max_pending: self.settings.cache_commands };
        Some(match detect::detect(role, chunk, hint)? {
            detect::Protocol::Http => {
                Proto::Http(Box::new(Http1Parser::new(self.settings.http, app.parser_config.clone())))
            }
            detect::Protocol::Postgres { mid_stream } => {
                let parser = if mid_stream { PgParser::mid_stream(limits) } else { PgParser::new(limits) };
                Proto::Postgres(Box::new(PgConn {
                    parser,
                    mid_stream,
                    user: None,
                    database: None,
                    retry: false,
                }))
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

impl Sink for Pipeline {
    fn tracked(&mut self, pid: u32, _why: &str) {
        let mut dropped = Vec::new();
        self.apps.tracked(pid, Instant::now(), &mut dropped);
        self.forget_apps(dropped);
    }

    fn record(&mut self, rec: &Record<'_>, conn: Option<&ConnInfo>) {
        match rec {
            Record::Data(d) => {
                self.now_ns = self.now_ns.max(d.exit_ns);
                let Some(conn) = conn else { return };
                let Some(target) = self.apps.root_of(d.tgid) else {
                    self.stats.unattributed_records += 1;
                    return;
                };
                // A thread's socket I/O ends the SQLite batch it had in flight.
                self.sqlite.quiesce(d.tgid, d.tid, &mut self.sqlite_events);
                if !self.sqlite_events.is_empty() {
                    self.handle_sqlite_events();
                }
                // Every record of a traced process's connection, decided or not, so that
                // a gap is seen wherever it falls.
                let seg = self.streams.segment(d);
                let origin = || Origin { target, tgid: d.tgid, role: conn.role, peer: conn.peer.clone() };
                match self.tls.feed(d, origin) {
                    Feed::Plain | Feed::Plaintext => {}
                    Feed::FirstPlaintext => self.plaintext_begins(d.conn_id),
                    Feed::Ciphertext { flagged } => {
                        if !flagged {
                            self.ciphertext_unread(target, d);
                        }
                        return;
                    }
                }
                let Some(app) = self.apps.get(target) else { return };
                if !self.conns.contains(d.conn_id) {
                    if !d.syscall.is_tls() && detect::is_tls_record(seg.chunk.bytes) {
                        // A handshake nobody decrypts (yet): its plaintext, if it comes,
                        // decides the protocol.
                        self.tls.encrypted(d.conn_id, origin());
                        return;
                    }
                    let Some(proto) = self.new_proto(app, conn.role, &seg.chunk, conn.peer.as_ref()) else {
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
                        && !self.tls.knows(c.conn_id)
                        && let Some(target) = self.apps.root_of(c.tgid)
                        && let Some(peer) = info.peer.clone()
                    {
                        self.route(target, Observed::Refused(peer));
                    }
                    self.close_conn(c.conn_id);
                }
            }
            Record::ConnFailed(f) => {
                if let Some(target) = self.apps.root_of(f.tgid)
                    && let Some(peer) = f.peer.clone()
                {
                    self.route(target, Observed::Refused(peer));
                }
            }
            Record::ProcFork { pid, parent, .. } => self.apps.forked(*pid, *parent),
            Record::ProcMap { .. } => {}
            Record::ProcExit { pid, .. } => {
                self.streams.process_gone(*pid);
                let owned = self.conns.owned_by(*pid);
                for id in owned {
                    self.close_conn(id);
                }
                self.tls.process_gone(*pid);
                self.sqlite.process_gone(*pid, &mut self.sqlite_events);
                self.handle_sqlite_events();
                self.attribution.process_gone(*pid);
                let mut dropped = Vec::new();
                self.apps.exited(*pid, Instant::now(), &mut dropped);
                self.forget_apps(dropped);
            }
            Record::Sqlite(c) => {
                self.now_ns = self.now_ns.max(c.exit_ns);
                self.sqlite.call(c, &mut self.sqlite_events);
                self.handle_sqlite_events();
            }
            Record::ConnDup(_) | Record::FdEpoch(_) | Record::ProcExec { .. } => {}
        }
    }

    fn flush(&mut self, conns: &ConnTable) {
        if !self.fallback.is_empty() {
            let mut released = Vec::new();
            self.fallback.expired(crate::monotonic_ns(), &mut released);
            for (target, ev) in released {
                self.route(target, Observed::Db(ev));
            }
        }
        self.sqlite.expire(self.now_ns, &mut self.sqlite_events);
        self.handle_sqlite_events();
        let now = Instant::now();
        self.apps.discover_quiet(now);
        self.poll_discoveries();
        self.apps.poll_migrations(now, &mut self.stats);
        if self.last_gc.elapsed() >= Duration::from_secs(5) {
            self.last_gc = Instant::now();
            // Parser state of connections the pump no longer knows (their close was lost).
            let gone: Vec<u64> = self.conns.ids().filter(|id| conns.get(*id).is_none()).collect();
            for id in gone {
                self.close_conn(id);
            }
            let mut closed = Vec::new();
            self.tls.retain(|id| conns.get(id).is_some(), &mut closed);
            for c in closed {
                self.opaque_closed(c);
            }
            self.tls.retain_processes(targets::alive);
            let mut dropped = Vec::new();
            self.apps.sweep(now, &mut dropped);
            self.forget_apps(dropped);
            self.attribution.retain_threads(targets::thread_alive);
            self.sqlite.retain_threads(targets::thread_alive);
            self.conns.shrink_idle();
            self.streams.shrink_idle();
            self.tls.shrink_idle();
            self.apps.shrink_idle();
        }
    }

    fn libraries(&mut self, pid: u32, state: LibState) {
        self.tls.libraries(pid, state);
    }

    fn report(&mut self, loss: &LossReport, live: Live) {
        self.stats.loss = loss.clone();
        self.stats.connections = live.connections;
        self.stats.processes = live.processes;
        self.stats.kubernetes_pods = self.settings.kubernetes.as_ref().map_or(0, |k| k.len());
        self.stats.parser_states = self.conns.len();
        self.stats.stream_gaps = self.streams.gaps.iter().map(|(g, n)| (g.as_str(), *n)).collect();
        self.stats.tls = self.tls.stats;
        self.stats.held_failures_released = self.fallback.released_early;
        self.stats.sqlite = self.sqlite.stats.clone();
        self.stats.profile_attributed.clone_from(&self.attribution.attributed);
        self.stats.profile_unattributed.clone_from(&self.attribution.unattributed);
        if let Some(top) = self.top.as_mut() {
            top.tick();
        }
        self.apps.report(&mut self.stats);
        let stats = self.stats.clone();
        let mut e = fault::lock(&self.shared);
        e.stats = stats;
        e.last_report = Some(Instant::now());
    }
}
