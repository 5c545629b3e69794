//! What Django's cursor did on SQLite, rebuilt from the library calls Python's `sqlite3`
//! module makes (the uprobes of `observer-ebpf/src/sqlite.rs`). Pure: a state machine
//! over decoded calls, no I/O, bounded tables.
//!
//! CPython's `_pysqlite_query_execute` (3.8 to 3.13) makes, for `cursor.execute(sql, p)`:
//! a `sqlite3_prepare_v2` only when the statement is not in the connection's cache, then
//! `sqlite3_bind_parameter_count` (binding `p`), the first `sqlite3_step` (not probed: it
//! runs per row), `sqlite3_changes` for a DML statement and `sqlite3_last_insert_rowid`
//! last, on success. For `executemany(sql, ps)`: `sqlite3_stmt_readonly` first, then per
//! parameter set a bind, a step and `sqlite3_changes`, and no `last_insert_rowid`. A
//! failed prepare or step raises through `_pysqlite_seterror`, which asks
//! `sqlite3_extended_errcode` (only then). So, per thread (a connection is used by one
//! thread at a time):
//!
//! - an execute starts at its prepare (cache miss) or its bind, and ends at
//!   `last_insert_rowid` (success) or `extended_errcode` (the error class from the code);
//! - an `executemany` starts at `stmt_readonly` (or its prepare), counts one execute per
//!   bind, and ends at its last `changes` (or an error); it is closed by the thread's next
//!   call that is not part of it, by a socket record of the thread ([`Sqlite::quiesce`]:
//!   a batch does no socket I/O, so the response write of the request comes after it), or
//!   after [`BATCH_IDLE_NS`] without a call.
//!
//! What is measured: from the entry of the first probed call of the execute to the entry
//! of its last. django-prometheus times `cursor.execute()` in Python around the same
//! work; the difference is its wrapper's and Django's `convert_query` Python code before
//! the first call and the result-building after the last (a few microseconds), plus on a
//! cached statement the cache lookup before the bind.

pub mod codes;

use std::sync::Arc;

use super::postgres::{
    shape,
    sql::{self, Kind, TableWrite},
};
use crate::{
    IdMap,
    events::{SqliteCall, SqliteOp},
};

/// A batch with no call for this long is over (its thread went quiet).
pub const BATCH_IDLE_NS: u64 = 5_000_000_000;

/// Statements Django runs on a new connection's raw `sqlite3.Connection` (not through the
/// cursor django-prometheus wraps, so never counted by it): `get_new_connection`'s
/// PRAGMAs and the compile-option probe of `register_functions` (Django 4.2 to 5.2, as
/// they are written there; recorded with `observer trace`).
const DJANGO_CONNECT_STATEMENTS: &[&[u8]] = &[
    b"PRAGMA foreign_keys = ON",
    b"PRAGMA legacy_alter_table = OFF",
    b"select sqlite_compileoption_used('ENABLE_MATH_FUNCTIONS')",
];

/// The tables' bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections (database handles) remembered, over all processes.
    pub max_connections: usize,
    /// Prepared statements remembered (their shape and table), over all processes.
    pub max_statements: usize,
    /// Keep each statement's normalised text (its shape) for `observer top`.
    pub keep_shapes: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_connections: 16384, max_statements: 65536, keep_shapes: false }
    }
}

/// One `cursor.execute()` or `executemany()`.
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    /// The database file it ran on, when its connection was opened while traced (or
    /// [`learned`](Sqlite::learn) since).
    pub file: Option<Arc<str>>,
    /// Its connection's handle, when seen.
    pub db: Option<u64>,
    pub executes: u32,
    pub many: bool,
    /// The exception class Python raised.
    pub error: Option<&'static str>,
    pub start_ns: u64,
    pub end_ns: u64,
    /// Its shape's fingerprint (and text when kept), when its prepare was seen.
    pub shape: Option<u64>,
    pub shape_text: Option<Box<str>>,
    /// The table an INSERT/UPDATE/DELETE wrote, with how many times it ran.
    pub writes: Vec<(TableWrite, u32)>,
}

impl Statement {
    pub fn seconds(&self) -> f64 {
        self.end_ns.saturating_sub(self.start_ns) as f64 / 1e9
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// `sqlite3_open_v2` on `file`; `failed` when it returned an error (Python raises).
    Attempt {
        file: Arc<str>,
        failed: bool,
    },
    Statement(Statement),
    /// One of Django's connect-time statements failed on connection `db`: Python raised
    /// in `get_new_connection`, which django-prometheus counts as a failed connection
    /// (e.g. a file that is not a database: its open succeeds, its first statement not).
    ConnectFailed {
        file: Option<Arc<str>>,
        db: u64,
    },
}

/// An event and the thread it happened on (for the per-request profile).
#[derive(Debug, Clone, PartialEq)]
pub struct Emitted {
    pub tgid: u32,
    pub tid: u32,
    pub event: Event,
}

/// Counters of what could not be followed (exported as `observer_sqlite_*`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SqliteStats {
    pub calls: u64,
    /// Executes of statements prepared before tracing began (counted; no shape).
    pub unknown_statements: u64,
    /// Executes of Django's own connect-time statements (not counted, as by django-prometheus).
    pub connect_statements: u64,
    /// An execute's end without its start (its start record lost): not counted.
    pub unmatched_ends: u64,
    /// An execute that started and never ended nor failed in SQLite (Python raised before
    /// its step, e.g. a wrong number of parameters): counted as a ProgrammingError.
    pub abandoned: u64,
    pub connections_full: u64,
    pub statements_full: u64,
}

#[derive(Debug, Clone)]
struct Prepared {
    db: u64,
    kind: Kind,
    shape: Option<(u64, Option<Box<str>>)>,
    connect: bool,
}

/// An execute or a batch in flight on a thread.
#[derive(Debug, Clone)]
struct Op {
    start_ns: u64,
    /// Last call that belongs to it (a batch ends at its last `changes`).
    last_ns: u64,
    stmt: u64,
    db: Option<u64>,
    many: bool,
    /// Binds seen (executes so far); a batch's last bind time, its `changes` before it.
    binds: u32,
    last_bind_ns: u64,
    end_before_last_bind: u64,
}

#[derive(Debug, Default)]
struct Thread {
    op: Option<Op>,
    /// The statement this thread last prepared and when (an execute on it starts there).
    prepared: Option<(u64, u64)>,
    /// A prepare that failed: (db, entry, one of Django's connect statements) until its
    /// `extended_errcode`.
    failed_prepare: Option<(u64, u64, bool)>,
    last_ns: u64,
}

/// The SQLite activity of every tracked process.
#[derive(Default)]
pub struct Sqlite {
    limits: Limits,
    /// (tgid, db handle) -> its file.
    conns: IdMap<(u32, u64), Arc<str>>,
    /// (tgid, statement handle) -> what it is.
    stmts: IdMap<(u32, u64), Prepared>,
    threads: IdMap<(u32, u32), Thread>,
    scratch: Vec<u8>,
    pub stats: SqliteStats,
}

impl Sqlite {
    pub fn new(limits: Limits) -> Self {
        Self { limits, ..Self::default() }
    }

    /// One call, in record order.
    pub fn call(&mut self, c: &SqliteCall<'_>, out: &mut Vec<Emitted>) {
        self.stats.calls += 1;
        let key = (c.tgid, c.tid);
        match c.op {
            SqliteOp::Open => {
                let file: Arc<str> = String::from_utf8_lossy(trim_nul(c.text)).into();
                if c.ret == 0 && c.handle != 0 {
                    self.remember(c.tgid, c.handle, file.clone());
                }
                out.push(Emitted {
                    tgid: c.tgid,
                    tid: c.tid,
                    event: Event::Attempt { file, failed: c.ret != 0 },
                });
                self.settle(key, out);
            }
            SqliteOp::Prepare => {
                // executemany() of a statement in use by another cursor prepares a fresh
                // one after its `stmt_readonly`: part of the batch.
                let own = self
                    .threads
                    .get(&key)
                    .and_then(|t| t.op.as_ref())
                    .is_some_and(|o| o.many && o.binds == 0);
                if !own {
                    self.settle(key, out);
                }
                let t = self.threads.entry(key).or_default();
                t.last_ns = c.exit_ns;
                let text = trim_nul(c.text);
                let connect = DJANGO_CONNECT_STATEMENTS.contains(&text);
                if c.ret != 0 || c.handle == 0 {
                    // A batch whose statement did not compile ends at its error.
                    if !own {
                        t.failed_prepare = Some((c.arg, c.enter_ns, connect));
                    }
                    t.prepared = None;
                    return;
                }
                t.failed_prepare = None;
                t.prepared = Some((c.handle, c.enter_ns));
                // The table is full: the statement is counted without its shape, which
                // is then not worth computing.
                if self.stmts.len() >= self.limits.max_statements
                    && !self.stmts.contains_key(&(c.tgid, c.handle))
                {
                    self.stats.statements_full += 1;
                    return;
                }
                let kind = sql::classify(text);
                let shape = (!text.is_empty()).then(|| {
                    let h = shape::fingerprint_of(text, &mut self.scratch);
                    (h, self.limits.keep_shapes.then(|| String::from_utf8_lossy(&self.scratch).into()))
                });
                self.stmts.insert((c.tgid, c.handle), Prepared { db: c.arg, kind, shape, connect });
            }
            SqliteOp::Bind => {
                let t = self.threads.entry(key).or_default();
                t.last_ns = c.enter_ns;
                if let Some(op) = t.op.as_mut().filter(|o| o.many) {
                    op.binds += 1;
                    op.end_before_last_bind = op.last_ns;
                    op.last_bind_ns = c.enter_ns;
                    op.last_ns = c.enter_ns;
                    return;
                }
                self.settle(key, out);
                self.start(key, c, false);
            }
            SqliteOp::Readonly => {
                self.settle(key, out);
                self.start(key, c, true);
            }
            SqliteOp::Changes => {
                if let Some(op) = self.threads.get_mut(&key).and_then(|t| t.op.as_mut()) {
                    op.db = Some(c.handle);
                    op.last_ns = c.enter_ns;
                }
            }
            SqliteOp::LastRowid => {
                let Some(t) = self.threads.get_mut(&key) else {
                    self.stats.unmatched_ends += 1;
                    return;
                };
                t.last_ns = c.enter_ns;
                let Some(mut op) = t.op.take() else {
                    self.stats.unmatched_ends += 1;
                    return;
                };
                op.db = op.db.or(Some(c.handle));
                if op.many {
                    if op.binds == 0 {
                        // Not a batch's: nothing started it.
                        self.stats.unmatched_ends += 1;
                        self.finish(key, op, None, out);
                        return;
                    }
                    // executemany never asks for the row id: its last bind was an
                    // execute of the same statement after the batch.
                    let single = Op {
                        start_ns: op.last_bind_ns,
                        last_ns: c.enter_ns,
                        many: false,
                        binds: 1,
                        ..op.clone()
                    };
                    op.binds -= 1;
                    op.last_ns = op.end_before_last_bind;
                    self.finish(key, op, None, out);
                    self.finish(key, single, None, out);
                } else {
                    op.last_ns = c.enter_ns;
                    self.finish(key, op, None, out);
                }
            }
            SqliteOp::Errcode => {
                let error = codes::exception_class(c.ret);
                let t = self.threads.entry(key).or_default();
                t.last_ns = c.exit_ns;
                if let Some(mut op) = t.op.take() {
                    op.last_ns = c.enter_ns;
                    op.db = op.db.or(Some(c.handle));
                    self.finish(key, op, error.or(Some("DatabaseError")), out);
                } else if let Some((db, _, true)) = t.failed_prepare.filter(|f| f.0 == c.handle) {
                    t.failed_prepare = None;
                    self.stats.connect_statements += 1;
                    self.connect_failed(c.tgid, c.tid, db, out);
                } else if let Some((db, at, _)) = t.failed_prepare.take().filter(|f| f.0 == c.handle) {
                    // cursor.execute() whose statement did not compile (a syntax error,
                    // a missing table): django-prometheus counted the execute.
                    let op = Op {
                        start_ns: at,
                        last_ns: c.enter_ns,
                        stmt: 0,
                        db: Some(db),
                        many: false,
                        binds: 1,
                        last_bind_ns: at,
                        end_before_last_bind: at,
                    };
                    self.finish(key, op, error.or(Some("DatabaseError")), out);
                }
                // Else an error of open, commit or close: not an execute.
            }
            SqliteOp::Finalize => {
                self.stmts.remove(&(c.tgid, c.handle));
            }
            SqliteOp::Close => {
                self.settle(key, out);
                self.conns.remove(&(c.tgid, c.handle));
            }
        }
    }

    /// An execute (`many`: a batch) starts at `c`, a bind or `stmt_readonly`; at the
    /// thread's prepare of the same statement if that came just before (a cache miss).
    fn start(&mut self, key: (u32, u32), c: &SqliteCall<'_>, many: bool) {
        let t = self.threads.entry(key).or_default();
        t.last_ns = c.enter_ns;
        let start = match t.prepared.take() {
            Some((stmt, at)) if stmt == c.handle => at,
            _ => c.enter_ns,
        };
        t.failed_prepare = None;
        t.op = Some(Op {
            start_ns: start,
            last_ns: c.enter_ns,
            stmt: c.handle,
            db: None,
            many,
            binds: u32::from(!many),
            last_bind_ns: c.enter_ns,
            end_before_last_bind: c.enter_ns,
        });
    }

    /// A thread's call that is not part of its batch: the batch is over; an execute that
    /// never ended in SQLite was abandoned by Python.
    fn settle(&mut self, key: (u32, u32), out: &mut Vec<Emitted>) {
        let Some(op) = self.threads.get_mut(&key).and_then(|t| t.op.take()) else { return };
        if op.many {
            self.finish(key, op, None, out);
        } else {
            self.stats.abandoned += 1;
            self.finish(key, op, Some("ProgrammingError"), out);
        }
    }

    /// The thread did socket I/O: a batch it had in flight is over.
    pub fn quiesce(&mut self, tgid: u32, tid: u32, out: &mut Vec<Emitted>) {
        // Called for every socket record: nothing to hash when no thread uses SQLite.
        if self.threads.is_empty() {
            return;
        }
        let key = (tgid, tid);
        if self.threads.get(&key).is_some_and(|t| t.op.as_ref().is_some_and(|o| o.many)) {
            self.settle(key, out);
        }
    }

    /// Batches without a call for [`BATCH_IDLE_NS`] by `now_ns` are over.
    pub fn expire(&mut self, now_ns: u64, out: &mut Vec<Emitted>) {
        let idle: Vec<(u32, u32)> = self
            .threads
            .iter()
            .filter(|(_, t)| {
                t.op.as_ref().is_some_and(|o| o.many) && now_ns.saturating_sub(t.last_ns) >= BATCH_IDLE_NS
            })
            .map(|(k, _)| *k)
            .collect();
        for key in idle {
            self.settle(key, out);
        }
    }

    /// A process is gone: its handles and threads go (a batch in flight is counted).
    pub fn process_gone(&mut self, tgid: u32, out: &mut Vec<Emitted>) {
        let threads: Vec<(u32, u32)> = self.threads.keys().filter(|k| k.0 == tgid).copied().collect();
        for key in threads {
            if self.threads.get(&key).is_some_and(|t| t.op.as_ref().is_some_and(|o| o.many)) {
                self.settle(key, out);
            }
            self.threads.remove(&key);
        }
        self.conns.retain(|k, _| k.0 != tgid);
        self.stmts.retain(|k, _| k.0 != tgid);
    }

    /// Threads that exited (their state goes).
    pub fn retain_threads(&mut self, alive: impl Fn(u32, u32) -> bool) {
        self.threads.retain(|k, t| t.op.is_some() || alive(k.0, k.1));
    }

    /// The file of a connection opened before tracing began, found otherwise (the one
    /// SQLite database the process has open); an empty name marks it as not findable.
    pub fn learn(&mut self, tgid: u32, db: u64, file: Arc<str>) {
        self.remember(tgid, db, file);
    }

    /// A connection's file, within `max_connections`.
    fn remember(&mut self, tgid: u32, db: u64, file: Arc<str>) {
        if self.conns.len() >= self.limits.max_connections && !self.conns.contains_key(&(tgid, db)) {
            self.stats.connections_full += 1;
            return;
        }
        self.conns.insert((tgid, db), file);
    }

    /// Whether the file of a connection is known, or known not to be findable.
    pub fn knows(&self, tgid: u32, db: u64) -> bool {
        self.conns.contains_key(&(tgid, db))
    }

    /// Entries held now: connections, statements, threads.
    pub fn sizes(&self) -> (usize, usize, usize) {
        (self.conns.len(), self.stmts.len(), self.threads.len())
    }

    fn connect_failed(&self, tgid: u32, tid: u32, db: u64, out: &mut Vec<Emitted>) {
        let file = self.conns.get(&(tgid, db)).cloned().filter(|f| !f.is_empty());
        out.push(Emitted { tgid, tid, event: Event::ConnectFailed { file, db } });
    }

    fn finish(&mut self, key: (u32, u32), op: Op, error: Option<&'static str>, out: &mut Vec<Emitted>) {
        let prepared = self.stmts.get(&(key.0, op.stmt));
        if let Some(p) = prepared.filter(|p| p.connect) {
            self.stats.connect_statements += 1;
            if error.is_some() {
                let db = op.db.unwrap_or(p.db);
                self.connect_failed(key.0, key.1, db, out);
            }
            return;
        }
        if prepared.is_none() && op.stmt != 0 {
            self.stats.unknown_statements += 1;
        }
        let db = op.db.or(prepared.map(|p| p.db));
        let file = db.and_then(|d| self.conns.get(&(key.0, d)).cloned()).filter(|f| !f.is_empty());
        let (shape, shape_text) = match prepared.and_then(|p| p.shape.clone()) {
            Some((h, t)) => (Some(h), t),
            None => (None, None),
        };
        let writes = match prepared.map(|p| &p.kind) {
            Some(Kind::Write(w)) if op.binds > 0 => vec![(w.clone(), op.binds)],
            _ => Vec::new(),
        };
        let end = op.last_ns.max(op.start_ns);
        out.push(Emitted {
            tgid: key.0,
            tid: key.1,
            event: Event::Statement(Statement {
                file,
                db,
                executes: op.binds,
                many: op.many,
                error,
                start_ns: op.start_ns,
                end_ns: end,
                shape,
                shape_text,
                writes,
            }),
        });
    }
}

/// The text up to its first NUL (prepare's length counts the terminator).
fn trim_nul(b: &[u8]) -> &[u8] {
    b.iter().position(|&c| c == 0).map_or(b, |i| &b[..i])
}

#[cfg(test)]
mod tests;
