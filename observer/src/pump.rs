//! The event pump: reads the ring buffer, keeps the process and connection tables in step
//! with the kernel, and hands every record to a [`Sink`] (`observer trace` prints them;
//! the metrics pipeline parses them).
//!
//! It also does the userspace half of the kernel's bookkeeping: selecting processes,
//! entering connections that already exist (from /proc), copying a parent's connections to
//! a forked child, re-entering the connections that survive exec and close_range under
//! the process's new fd-table epoch, and dropping the sockets of processes that exited.

use std::{
    collections::{BTreeSet, HashMap},
    future::Future,
    io,
    time::Duration,
};

use aya::{
    maps::{MapData, RingBuf},
    programs::uprobe::UProbeLinkId,
};
use observer_ebpf::{ROLE_CLIENT, ROLE_SERVER, ROLE_UNCONNECTED, SockKey, SockVal};
use tokio::io::{Interest, unix::AsyncFd};

use crate::{
    conns::{ConnInfo, ConnTable},
    ebpf::Probe,
    events::{self, Record, Role, SockAddr},
    libs::{self, Libraries},
    loss::{LossReport, UserCounters},
    targets::{self, NetTables, Selector, SocketState},
};

/// Receives every decoded record, with what is known of its connection.
pub trait Sink {
    fn record(&mut self, rec: &Record<'_>, conn: Option<&ConnInfo>);
    /// A process was selected and is traced from now on (its children follow).
    fn tracked(&mut self, _pid: u32, _why: &str) {}
    /// The ring buffer is drained for now: a good moment to flush buffered output and
    /// to drop state of connections that are gone (`conns` holds the live ones).
    fn flush(&mut self, _conns: &ConnTable) {}
    /// Once a second: the loss counters and how much is being traced.
    fn report(&mut self, _loss: &LossReport, _live: Live) {}
    /// What a traced process maps of the probed libraries changed (why its TLS is, or
    /// is not, decrypted).
    fn libraries(&mut self, _pid: u32, _state: libs::LibState) {}
}

/// What the pump is tracking right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Live {
    pub connections: usize,
    pub processes: usize,
}

/// How often the ring buffer is read when no wake-up came.
const POLL_EVERY: Duration = Duration::from_millis(10);
/// How often selectors are matched again (new `--comm` processes, new `--port` listeners).
const RESCAN_EVERY: Duration = Duration::from_secs(1);
/// How often the sink gets the loss counters.
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// How often kernel entries of processes that vanished unseen are swept.
const GC_EVERY: Duration = Duration::from_secs(5);
/// Records handled per wake-up before other work (signals, rescans) gets a turn.
const BATCH: usize = 4096;
/// Records handled at most when the pump must empty the ring (at stop, before a sweep).
const FINAL_DRAIN: usize = 1 << 22;
/// The drain at stop ends after this long even if the traced processes keep filling the
/// ring: the agent must exit promptly whatever they do (what is left is not counted).
const STOP_DRAIN_TIME: Duration = Duration::from_millis(300);
/// Listener addresses cached (a cache: cleared when full).
const MAX_LISTENERS: usize = 4096;

pub struct Pump {
    probe: Probe,
    pub conns: ConnTable,
    selector: Selector,
    own_pid: u32,
    pub user: UserCounters,
    /// Look up local addresses of new connections in /proc (for `trace`).
    resolve_addresses: bool,
    /// Listening sockets' addresses by (tgid, fd).
    listeners: HashMap<(u32, u32), Option<SockAddr>>,
    /// The libraries the uprobes are on (OpenSSL), and who maps them.
    libs: Libraries<UProbeLinkId>,
    /// Processes that mapped a file executable since the last look at their mappings.
    remap: Vec<u32>,
}

fn role_code(r: Role) -> u8 {
    match r {
        Role::Server => ROLE_SERVER,
        Role::Client => ROLE_CLIENT,
    }
}

impl Pump {
    pub fn new(
        probe: Probe,
        selector: Selector,
        opts: &crate::ebpf::Options,
        resolve_addresses: bool,
    ) -> Self {
        Self {
            probe,
            conns: ConnTable::new(opts.max_connections as usize),
            selector,
            own_pid: std::process::id(),
            user: UserCounters::default(),
            resolve_addresses,
            listeners: HashMap::new(),
            libs: Libraries::new(&libs::KINDS, opts.libraries),
            remap: Vec::new(),
        }
    }

    /// Selects and tracks the matching processes, entering their existing connections.
    /// Returns the tracked processes.
    pub fn start<S: Sink>(&mut self, sink: &mut S) -> BTreeSet<u32> {
        self.rescan(sink);
        self.probe.tracked().into_iter().collect()
    }

    /// Matches the selectors against /proc and tracks new matches. Which processes are
    /// traced is the kernel's table alone (it adds a traced process's children at their
    /// fork and removes a process at its exit): one that is in it already, selected or
    /// followed from its fork, is not entered again from /proc, which runs ahead of the
    /// ring and would release connections whose last records are still queued.
    fn rescan<S: Sink>(&mut self, sink: &mut S) {
        let procs = targets::list_processes();
        for (pid, why) in self.selector.select(&procs, self.own_pid) {
            if self.probe.epoch(pid).is_none() {
                self.track(pid, &why, sink);
            }
        }
    }

    fn track<S: Sink>(&mut self, pid: u32, why: &str, sink: &mut S) {
        if pid == self.own_pid {
            return;
        }
        match self.probe.track(pid) {
            Ok(epoch) => {
                tracing::info!(pid, why, "tracing process");
                sink.tracked(pid, why);
                self.enter_sockets(pid, epoch, None);
                self.scan_libraries(pid, sink);
            }
            Err(e) => {
                if e.is_full() {
                    self.user.process_table_full += 1;
                } else {
                    self.user.process_table_errors += 1;
                }
                tracing::warn!(pid, error = %e, "cannot track process");
            }
        }
    }

    /// Brings the kernel's socket entries of `tgid` in line with /proc under `epoch`:
    /// connections found there (new ones get a userspace id, known ones keep theirs) and
    /// unconnected stream sockets (so that their `connect` is traced). fds in `closed`
    /// are being closed and are skipped; known fds that /proc no longer shows are released.
    fn enter_sockets(&mut self, tgid: u32, epoch: u32, closed: Option<(u32, u32)>) {
        let in_closed = |fd: u32| closed.is_some_and(|(lo, hi)| (lo..=hi).contains(&fd));
        let fds = targets::socket_fds(tgid);
        tracing::debug!(tgid, epoch, ?fds, "entering sockets");
        for (fd, _, _) in self.conns.fds_of(tgid) {
            if in_closed(fd) || !fds.iter().any(|&(f, _)| f == fd) {
                self.conns.release(tgid, fd);
            }
        }
        if fds.is_empty() {
            return;
        }
        let Some(net) = NetTables::read(tgid) else { return };
        for (fd, inode) in fds {
            if in_closed(fd) {
                continue;
            }
            let (conn_id, role) = match net.classify(inode) {
                Some(SocketState::Connected(ep)) => {
                    let known = self
                        .conns
                        .by_fd(tgid, fd)
                        .filter(|c| c.inode.is_none_or(|i| i == inode))
                        .map(|c| (c.conn_id, c.role));
                    match known {
                        Some(k) => k,
                        None => match self.conns.seed(tgid, fd, inode, ep.role, ep.local, ep.peer) {
                            Some(id) => {
                                tracing::debug!(tgid, fd, id, "seeded connection");
                                (id, ep.role)
                            }
                            None => continue,
                        },
                    }
                }
                Some(SocketState::Unconnected) => (0, Role::Client),
                _ => continue,
            };
            let role = if conn_id == 0 { ROLE_UNCONNECTED } else { role_code(role) };
            self.write_socket(SockKey { tgid, fd }, SockVal::new(conn_id, epoch, role));
        }
    }

    /// Writes a kernel socket entry unless the kernel made one under this epoch already
    /// (its own entry, from a connect or accept since, is newer than what /proc showed).
    fn write_socket(&mut self, key: SockKey, val: SockVal) {
        if self.probe.socket(key).is_some_and(|cur| cur.epoch == val.epoch) {
            return;
        }
        match self.probe.insert_socket(key, val, false) {
            Ok(_) => {}
            Err(e) if e.is_full() => self.user.socket_table_full += 1,
            Err(e) => {
                self.user.socket_table_errors += 1;
                tracing::debug!(error = %e, "cannot enter a socket");
            }
        }
    }

    /// Handles one ring-buffer item.
    pub fn handle<S: Sink>(&mut self, raw: &[u8], sink: &mut S) {
        let rec = match events::decode(raw) {
            Ok(r) => r,
            Err(e) => {
                self.user.decode_errors += 1;
                tracing::debug!(error = %e, "undecodable record");
                return;
            }
        };
        match &rec {
            Record::Data(d) => {
                self.user.data_bytes += d.total_len;
                let conn = self.conns.get(d.conn_id);
                if conn.is_none() {
                    self.user.unknown_connection_records += 1;
                    tracing::debug!(
                        tgid = d.tgid,
                        fd = d.fd,
                        conn_id = d.conn_id,
                        "record of an unknown connection"
                    );
                }
                sink.record(&rec, conn);
            }
            Record::ConnOpen(o) => {
                self.user.connections_opened += 1;
                // Without kernel offsets the local address is not in the record: look in
                // /proc (best effort: the connection may be closed again already), then
                // fall back to the listener's address.
                let fallback = self.resolve_addresses && o.local.is_none();
                let listener = match (fallback, o.listen_fd) {
                    (true, Some(lfd)) => self.listener_addr(o.tgid, lfd),
                    _ => None,
                };
                if let Some(c) = self.conns.open(o)
                    && fallback
                {
                    resolve_endpoints(c, o.tgid, o.fd);
                    if c.local.is_none() {
                        c.local = listener;
                    }
                }
                sink.record(&rec, self.conns.get(o.conn_id));
            }
            Record::ConnClose(c) => {
                sink.record(&rec, self.conns.get(c.conn_id));
                self.conns.release(c.tgid, c.fd);
            }
            Record::ConnDup(c) => {
                self.conns.alias(c.conn_id, c.tgid, c.fd);
                sink.record(&rec, self.conns.get(c.conn_id));
            }
            Record::FdEpoch(e) => {
                sink.record(&rec, None);
                self.enter_sockets(e.tgid, e.epoch, Some((e.lo, e.hi)));
            }
            Record::ProcFork { pid, parent, .. } => {
                sink.record(&rec, None);
                // The child inherited the parent's fds: same sockets, same connection ids.
                for (fd, conn_id, role) in self.conns.fds_of(*parent) {
                    self.conns.alias(conn_id, *pid, fd);
                    let val = SockVal::new(conn_id, 0, role_code(role));
                    self.write_socket(SockKey { tgid: *pid, fd }, val);
                }
                self.enter_sockets(*pid, 0, None);
                self.libs.forked(*parent, *pid);
                sink.libraries(*pid, self.libs.state(*pid, libs::TLS));
            }
            Record::ProcExec { pid, tracked: true, epoch, .. } => {
                sink.record(&rec, None);
                self.enter_sockets(*pid, *epoch, None);
                // A new image: other libraries.
                self.libs.gone(*pid, std::time::Instant::now());
                self.scan_libraries(*pid, sink);
            }
            Record::ProcExec { pid, tracked: false, .. } => {
                if let Some(why) = self.selector.matches_new(*pid) {
                    self.track(*pid, &format!("started and {why}"), sink);
                }
            }
            Record::ProcExit { pid, .. } => {
                sink.record(&rec, None);
                self.forget_process(*pid);
            }
            Record::ConnFailed(_) | Record::Sqlite(_) => sink.record(&rec, None),
            Record::ProcMap { pid, .. } => {
                if !self.remap.contains(pid) {
                    self.remap.push(*pid);
                }
            }
        }
    }

    /// Reads what `pid` maps, probes the libraries among them, and says what it has.
    fn scan_libraries<S: Sink>(&mut self, pid: u32, sink: &mut S) {
        self.libs.scan(pid, &mut self.probe);
        sink.libraries(pid, self.libs.state(pid, libs::TLS));
    }

    /// The bound address of a listening socket, cached: listeners live long, so /proc
    /// still shows them when their short-lived connections are gone already.
    fn listener_addr(&mut self, tgid: u32, fd: u32) -> Option<SockAddr> {
        if let Some(a) = self.listeners.get(&(tgid, fd)) {
            return a.clone();
        }
        let inode = targets::fd_inode(tgid, fd)?;
        let addr = NetTables::read(tgid).and_then(|n| n.listener_addr(inode));
        if self.listeners.len() >= MAX_LISTENERS {
            self.listeners.clear();
        }
        self.listeners.insert((tgid, fd), addr.clone());
        addr
    }

    fn forget_process(&mut self, pid: u32) {
        self.libs.gone(pid, std::time::Instant::now());
        self.listeners.retain(|&(t, _), _| t != pid);
        self.conns.drop_process(pid);
        for key in self.probe.socket_keys() {
            if key.tgid == pid {
                self.probe.remove_socket(key);
            }
        }
    }

    /// Sweeps kernel entries of processes that are gone without an exit record (lost).
    /// The records such a process made before it died are handled first: they are all in
    /// the ring already (a dead process makes no more), so the order is check, drain, forget.
    fn gc<S: Sink>(&mut self, ring: &mut RingBuf<MapData>, sink: &mut S) {
        self.libs.sweep(std::time::Instant::now(), &mut self.probe);
        let mut dead: BTreeSet<u32> =
            self.probe.socket_keys().into_iter().map(|k| k.tgid).filter(|&t| !targets::alive(t)).collect();
        let gone: Vec<u32> = self.probe.tracked().into_iter().filter(|&t| !targets::alive(t)).collect();
        if dead.is_empty() && gone.is_empty() {
            return;
        }
        self.drain(ring, sink, FINAL_DRAIN);
        for pid in gone {
            self.probe.untrack(pid);
            dead.insert(pid);
        }
        for pid in dead {
            self.forget_process(pid);
        }
    }

    /// Handles up to `max` records; returns how many there were.
    fn drain<S: Sink>(&mut self, ring: &mut RingBuf<MapData>, sink: &mut S, max: usize) -> usize {
        self.drain_until(ring, sink, max, None)
    }

    /// [`drain`](Self::drain), stopping at `deadline` too (checked every [`BATCH`]).
    fn drain_until<S: Sink>(
        &mut self,
        ring: &mut RingBuf<MapData>,
        sink: &mut S,
        max: usize,
        deadline: Option<std::time::Instant>,
    ) -> usize {
        let mut n = 0;
        while n < max {
            if n % BATCH == BATCH - 1 && deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                break;
            }
            let Some(item) = ring.next() else { break };
            self.handle(&item, sink);
            n += 1;
        }
        // Libraries loaded meanwhile get their probes before more records are read: the
        // sooner they are set, the fewer of the first TLS calls are missed.
        for pid in std::mem::take(&mut self.remap) {
            if self.probe.epoch(pid).is_some() {
                self.scan_libraries(pid, sink);
            }
        }
        sink.flush(&self.conns);
        n
    }

    /// Runs until `stop` completes, then handles what is left in the ring buffer.
    pub async fn run<S: Sink>(&mut self, sink: &mut S, stop: impl Future<Output = ()>) -> io::Result<()> {
        let ring = self.probe.take_ring().ok_or_else(|| io::Error::other("ring buffer already taken"))?;
        // SAFETY: the ring buffer's fd stays open and unchanged while the AsyncFd owns it.
        let mut afd =
            unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }.map_err(io::Error::from)?;
        // Data records wake us only when the ring fills up (see the kernel's wakeup_flag):
        // otherwise they are picked up here.
        let mut poll = tokio::time::interval(POLL_EVERY);
        let mut rescan = tokio::time::interval(RESCAN_EVERY);
        let mut gc = tokio::time::interval_at(tokio::time::Instant::now() + GC_EVERY, GC_EVERY);
        let mut report = tokio::time::interval(REPORT_EVERY);
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        gc.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                biased;
                () = &mut stop => break,
                guard = afd.readable_mut() => {
                    let mut guard = guard?;
                    if self.drain(guard.get_inner_mut(), sink, BATCH) < BATCH {
                        guard.clear_ready();
                    }
                }
                _ = poll.tick() => {
                    self.drain(afd.get_mut(), sink, BATCH);
                }
                _ = rescan.tick() => self.rescan(sink),
                _ = gc.tick() => self.gc(afd.get_mut(), sink),
                _ = report.tick() => {
                    self.conns.shrink_idle();
                    let live = Live { connections: self.conns.len(), processes: self.probe.tracked().len() };
                    sink.report(&self.loss(), live);
                }
            }
        }
        // Everything the traced processes did before the stop is in the ring (or counted
        // as lost): hand it over. Bounded, in case they keep going.
        let deadline = std::time::Instant::now() + STOP_DRAIN_TIME;
        self.drain_until(afd.get_mut(), sink, FINAL_DRAIN, Some(deadline));
        Ok(())
    }

    /// Loss and activity counters, kernel and userspace.
    pub fn loss(&self) -> LossReport {
        let mut user = self.user.clone();
        user.connection_table_full = self.conns.full;
        user.libs = self.libs.stats.clone();
        LossReport::collect(&self.probe, user)
    }

    pub fn probe(&self) -> &Probe {
        &self.probe
    }
}

/// Fills in local (and missing peer) address and inode from /proc. Best effort: a
/// connection that is already closed again keeps what the syscall told us.
fn resolve_endpoints(c: &mut ConnInfo, tgid: u32, fd: u32) {
    let Some(inode) = targets::fd_inode(tgid, fd) else { return };
    let Some(ep) = NetTables::read(tgid).and_then(|n| n.endpoints(inode)) else { return };
    c.inode = Some(inode);
    c.local = ep.local;
    if c.peer.is_none() {
        c.peer = ep.peer;
    }
}
