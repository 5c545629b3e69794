//! Which request a database statement or cache lookup belongs to.
//!
//! Sync and gthread workers serve one request per thread at a time, on the thread that
//! read it: work done on that thread while the request is in flight is the request's. A
//! thread reading several requests at once (an event loop) is ambiguous: its work is
//! unattributed. A thread that never read a request (an ASGI worker's executor running the
//! ORM, a background thread) has its work given to the process's request in flight only
//! when there is exactly one. Everything else is counted as unattributed, by reason.

use std::collections::BTreeMap;

use crate::{
    IdMap,
    events::SockAddr,
    protocol::{KeyGet, Wire},
};

/// Distinct statement shapes kept per request (more are not counted for N+1).
pub const MAX_SHAPES: usize = 64;
/// Cache lookups kept per request until its exchange resolves them.
pub const MAX_CACHE_WORK: usize = 1024;

/// A cache lookup, resolved against the app's caches when its request is counted.
#[derive(Debug, Clone)]
pub struct CacheWork {
    pub wire: Wire,
    pub peer: Option<SockAddr>,
    pub get: KeyGet,
}

/// Work done on behalf of a request.
#[derive(Debug, Clone)]
pub enum Work {
    /// `text`: the shape's normalised text, only when kept (`observer top`).
    Db {
        executes: u32,
        seconds: f64,
        shape: Option<u64>,
        text: Option<Box<str>>,
    },
    Cache(CacheWork),
}

impl Work {
    fn kind(&self) -> &'static str {
        match self {
            Self::Db { .. } => "db",
            Self::Cache(_) => "cache",
        }
    }
}

/// What one request did, so far.
#[derive(Debug, Clone, Default)]
pub struct Profile {
    /// Statements executed (a Sync batch of N executes counts N).
    pub statements: u32,
    /// Time between sending each unit of statements and reading its answer.
    pub db_seconds: f64,
    /// Statement shapes with the units run with each, and their text when kept (bounded
    /// by MAX_SHAPES).
    pub shapes: Vec<(u64, u32, Option<Box<str>>)>,
    pub cache: Vec<CacheWork>,
    /// Statements and lookups attributed (for the agent's own counters).
    pub works: u64,
}

impl Profile {
    /// The most a single shape ran.
    pub fn max_repeats(&self) -> u32 {
        self.shapes.iter().map(|(_, n, _)| *n).max().unwrap_or(0)
    }

    fn add(&mut self, w: Work) -> bool {
        match w {
            Work::Db { executes, seconds, shape, text } => {
                // Counts from the wire (an executemany's parameter sets): saturating, a
                // request cannot make them wrap.
                self.statements = self.statements.saturating_add(executes);
                self.db_seconds += seconds;
                if let Some(h) = shape {
                    if let Some(e) = self.shapes.iter_mut().find(|(x, _, _)| *x == h) {
                        e.1 = e.1.saturating_add(1);
                    } else if self.shapes.len() < MAX_SHAPES {
                        self.shapes.push((h, 1, text));
                    }
                }
            }
            Work::Cache(c) => {
                if self.cache.len() >= MAX_CACHE_WORK {
                    return false;
                }
                self.cache.push(c);
            }
        }
        self.works = self.works.saturating_add(1);
        true
    }
}

#[derive(Debug, Default)]
struct ThreadState {
    /// Connections whose request in flight this thread read.
    conns: Vec<u64>,
    /// It has read a request at some point.
    served: bool,
}

/// Why work was not attributed (each an `observer_profile_unattributed_total` reason).
pub const REASONS: [&str; 4] = ["no_request", "concurrent", "unfinished", "overflow"];
/// The kinds of work.
pub const KINDS: [&str; 2] = ["db", "cache"];

/// The bookkeeping of one agent: threads, requests in flight, and the work gathered for
/// each.
#[derive(Debug)]
pub struct Attribution {
    threads: IdMap<(u32, u32), ThreadState>,
    /// Process -> connections with a request in flight.
    inflight: IdMap<u32, Vec<u64>>,
    /// Connection -> (process, thread that read its request in flight).
    reader: IdMap<u64, (u32, u32)>,
    work: IdMap<u64, Profile>,
    /// (kind, reason) -> statements or lookups not attributed.
    pub unattributed: BTreeMap<(&'static str, &'static str), u64>,
    /// kind -> statements or lookups attributed to a counted request.
    pub attributed: BTreeMap<&'static str, u64>,
}

impl Default for Attribution {
    /// Every counter present from the start, at 0 (rates work from the first scrape).
    fn default() -> Self {
        Self {
            threads: IdMap::default(),
            inflight: IdMap::default(),
            reader: IdMap::default(),
            work: IdMap::default(),
            unattributed: KINDS.iter().flat_map(|k| REASONS.iter().map(move |r| ((*k, *r), 0))).collect(),
            attributed: KINDS.iter().map(|k| (*k, 0)).collect(),
        }
    }
}

impl Attribution {
    /// An HTTP server connection's parser took a chunk moved by thread `tid`; it now has
    /// `pending` requests read and not yet answered.
    pub fn http(&mut self, tgid: u32, tid: u32, conn: u64, pending: usize, read: bool) {
        let busy = self.reader.contains_key(&conn);
        if pending > 0 && !busy && read {
            self.reader.insert(conn, (tgid, tid));
            let t = self.threads.entry((tgid, tid)).or_default();
            t.conns.push(conn);
            t.served = true;
            self.inflight.entry(tgid).or_default().push(conn);
        } else if pending == 0 && busy {
            self.release(conn);
        }
    }

    /// The request of `conn` was counted: its work, for its view's families.
    pub fn take(&mut self, conn: u64) -> Profile {
        self.work.remove(&conn).unwrap_or_default()
    }

    /// Counts what `p` carried as attributed (once its exchange was counted).
    pub fn counted(&mut self, p: &Profile) {
        let cache = p.cache.len() as u64;
        *self.attributed.entry("cache").or_default() += cache;
        // Every cache lookup kept is one of `works`; saturating all the same.
        *self.attributed.entry("db").or_default() += p.works.saturating_sub(cache);
    }

    /// A statement or lookup finished on thread `tid` of process `tgid`.
    pub fn work(&mut self, tgid: u32, tid: u32, w: Work) {
        let kind = w.kind();
        let conn = match self.threads.get(&(tgid, tid)) {
            Some(t) if t.conns.len() == 1 => Ok(t.conns[0]),
            Some(t) if t.conns.len() > 1 => Err("concurrent"),
            Some(t) if t.served => Err("no_request"),
            _ => match self.inflight.get(&tgid).map(Vec::as_slice) {
                Some([one]) => Ok(*one),
                Some([_, _, ..]) => Err("concurrent"),
                _ => Err("no_request"),
            },
        };
        match conn {
            Ok(c) => {
                if !self.work.entry(c).or_default().add(w) {
                    *self.unattributed.entry((kind, "overflow")).or_default() += 1;
                }
            }
            Err(reason) => *self.unattributed.entry((kind, reason)).or_default() += 1,
        }
    }

    /// The connection closed: a request still in flight never finished; its work is
    /// unattributed.
    pub fn closed(&mut self, conn: u64) {
        self.release(conn);
        if let Some(p) = self.work.remove(&conn) {
            let cache = p.cache.len() as u64;
            *self.unattributed.entry(("cache", "unfinished")).or_default() += cache;
            *self.unattributed.entry(("db", "unfinished")).or_default() += p.works.saturating_sub(cache);
        }
    }

    /// The process exited: its threads go, and its requests in flight never finish (their
    /// connections may be dropped with their app, without a close of their own).
    pub fn process_gone(&mut self, tgid: u32) {
        let conns: Vec<u64> = self.reader.iter().filter(|(_, (t, _))| *t == tgid).map(|(c, _)| *c).collect();
        for conn in conns {
            self.closed(conn);
        }
        self.threads.retain(|(t, _), _| *t != tgid);
        self.inflight.remove(&tgid);
    }

    /// Forgets threads serving no request that `alive` says have exited (threads come and
    /// go inside long-lived processes: an executor's, a gthread pool's after a restart).
    pub fn retain_threads(&mut self, alive: impl Fn(u32, u32) -> bool) {
        self.threads.retain(|&(tgid, tid), t| !t.conns.is_empty() || alive(tgid, tid));
    }

    fn release(&mut self, conn: u64) {
        let Some((tgid, tid)) = self.reader.remove(&conn) else { return };
        if let Some(t) = self.threads.get_mut(&(tgid, tid)) {
            t.conns.retain(|c| *c != conn);
        }
        if let Some(v) = self.inflight.get_mut(&tgid) {
            v.retain(|c| *c != conn);
            if v.is_empty() {
                self.inflight.remove(&tgid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(shape: u64) -> Work {
        Work::Db { executes: 1, seconds: 0.001, shape: Some(shape), text: None }
    }

    #[test]
    fn sync_and_gthread_work_goes_to_the_request_on_the_same_thread() {
        let mut a = Attribution::default();
        // Two threads of one process each read a request (gthread).
        a.http(10, 11, 1, 1, true);
        a.http(10, 12, 2, 1, true);
        for _ in 0..3 {
            a.work(10, 11, db(7));
        }
        a.work(10, 12, db(8));
        let p1 = a.take(1);
        let p2 = a.take(2);
        assert_eq!((p1.statements, p1.max_repeats()), (3, 3));
        assert_eq!((p2.statements, p2.max_repeats()), (1, 1));
        a.http(10, 11, 1, 0, false);
        // Between requests, a serving thread's work has no request.
        a.work(10, 11, db(7));
        assert_eq!(a.unattributed[&("db", "no_request")], 1);
    }

    #[test]
    fn executor_threads_get_the_only_request_in_flight_else_nothing() {
        let mut a = Attribution::default();
        // The event loop (tid 20) read one request; the ORM runs on tid 21.
        a.http(20, 20, 5, 1, true);
        a.work(20, 21, db(1));
        assert_eq!(a.take(5).statements, 1);
        // Two requests in flight on the loop: ambiguous, on the loop thread and off it.
        a.http(20, 20, 6, 1, true);
        a.work(20, 21, db(1));
        a.work(20, 20, db(1));
        assert_eq!(a.unattributed[&("db", "concurrent")], 2);
        // Nothing in flight.
        a.http(20, 20, 5, 0, false);
        a.http(20, 20, 6, 0, false);
        a.work(20, 21, db(1));
        assert_eq!(a.unattributed[&("db", "no_request")], 1);
    }

    #[test]
    fn a_request_that_never_finishes_leaves_its_work_unattributed() {
        let mut a = Attribution::default();
        a.http(1, 1, 9, 1, true);
        a.work(1, 1, db(3));
        a.work(1, 1, db(3));
        a.closed(9);
        assert_eq!(a.unattributed[&("db", "unfinished")], 2);
        assert!(a.take(9).shapes.is_empty());
    }

    #[test]
    fn a_process_that_goes_takes_its_threads_and_requests_with_it() {
        let mut a = Attribution::default();
        a.http(1, 2, 9, 1, true);
        a.work(1, 2, db(3));
        a.http(1, 3, 8, 1, true);
        a.http(1, 3, 8, 0, false);
        a.process_gone(1);
        assert!(a.threads.is_empty() && a.inflight.is_empty() && a.reader.is_empty() && a.work.is_empty());
        assert_eq!(a.unattributed[&("db", "unfinished")], 1);
    }

    #[test]
    fn exited_idle_threads_are_forgotten_busy_ones_kept() {
        let mut a = Attribution::default();
        a.http(1, 2, 9, 1, true); // busy
        a.http(1, 3, 8, 1, true);
        a.http(1, 3, 8, 0, false); // idle
        a.http(1, 4, 7, 1, true);
        a.http(1, 4, 7, 0, false); // idle, still alive
        a.retain_threads(|_, tid| tid == 4);
        let mut left: Vec<_> = a.threads.keys().copied().collect();
        left.sort_unstable();
        assert_eq!(left, vec![(1, 2), (1, 4)]);
    }

    #[test]
    fn shapes_per_request_are_bounded() {
        let mut p = Profile::default();
        for i in 0..(MAX_SHAPES as u64 + 10) {
            p.add(db(i));
        }
        assert_eq!(p.shapes.len(), MAX_SHAPES);
        assert_eq!(p.statements as usize, MAX_SHAPES + 10);
    }
}
