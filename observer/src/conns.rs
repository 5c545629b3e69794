//! Userspace mirror of the traced connections: id, role, addresses, and which
//! (process, fd) pairs name each one.
//!
//! The kernel's socket table decides what is captured; this table tells userspace what a
//! conn_id is, and knows which kernel entries to add when a process forks (children
//! inherit fds) and which to drop when it exits (exit closes fds without close(2)).
//! Bounded by `--max-connections`; when full, new connections are still captured by the
//! kernel but their records carry no addresses, and `observer_table_full_total
//! {table="connections"}` counts it.

use std::collections::{HashMap, hash_map::Entry};

use observer_ebpf::CONN_ID_USERSPACE_BIT;

use crate::events::{Open, Role, SockAddr};

/// What is known about one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    pub conn_id: u64,
    pub role: Role,
    pub local: Option<SockAddr>,
    pub peer: Option<SockAddr>,
    /// The socket's inode, when /proc told us.
    pub inode: Option<u64>,
    /// The (tgid, fd) pairs that name this socket.
    pub owners: Vec<(u32, u32)>,
    /// Found in /proc at start (or at tracking time) rather than seen being opened.
    pub preexisting: bool,
}

/// The connection table.
#[derive(Debug)]
pub struct ConnTable {
    conns: HashMap<u64, ConnInfo>,
    by_fd: HashMap<(u32, u32), u64>,
    max: usize,
    next_user_id: u64,
    /// Connections not entered because the table was full.
    pub full: u64,
}

/// Gives back the memory of a map that grew for a burst (a flood of connections) and is
/// mostly empty again: a HashMap keeps its capacity after removals.
pub fn shrink_idle<K: Eq + std::hash::Hash, V, S: std::hash::BuildHasher>(m: &mut HashMap<K, V, S>) {
    if m.capacity() > 1024 && m.capacity() > 4 * m.len() {
        m.shrink_to(2 * m.len());
    }
}

impl ConnTable {
    /// Returns the memory of a burst that is over (see [`shrink_idle`]).
    pub fn shrink_idle(&mut self) {
        shrink_idle(&mut self.conns);
        shrink_idle(&mut self.by_fd);
    }

    pub fn new(max: usize) -> Self {
        Self { conns: HashMap::new(), by_fd: HashMap::new(), max, next_user_id: 1, full: 0 }
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    pub fn get(&self, conn_id: u64) -> Option<&ConnInfo> {
        self.conns.get(&conn_id)
    }

    pub fn get_mut(&mut self, conn_id: u64) -> Option<&mut ConnInfo> {
        self.conns.get_mut(&conn_id)
    }

    /// The connection (tgid, fd) names.
    pub fn by_fd(&self, tgid: u32, fd: u32) -> Option<&ConnInfo> {
        self.conns.get(self.by_fd.get(&(tgid, fd))?)
    }

    /// A connection the kernel saw being opened. Replaces whatever (tgid, fd) named before.
    pub fn open(&mut self, o: &Open) -> Option<&mut ConnInfo> {
        self.release(o.tgid, o.fd);
        let info = ConnInfo {
            conn_id: o.conn_id,
            role: o.role,
            local: o.local.clone(),
            peer: o.peer.clone(),
            inode: None,
            owners: vec![(o.tgid, o.fd)],
            preexisting: false,
        };
        self.insert(info)
    }

    /// A connection found in /proc; returns its new (userspace) id.
    pub fn seed(
        &mut self,
        tgid: u32,
        fd: u32,
        inode: u64,
        role: Role,
        local: Option<SockAddr>,
        peer: Option<SockAddr>,
    ) -> Option<u64> {
        let conn_id = CONN_ID_USERSPACE_BIT | self.next_user_id;
        self.next_user_id += 1;
        self.release(tgid, fd);
        let info = ConnInfo {
            conn_id,
            role,
            local,
            peer,
            inode: Some(inode),
            owners: vec![(tgid, fd)],
            preexisting: true,
        };
        self.insert(info).map(|c| c.conn_id)
    }

    fn insert(&mut self, info: ConnInfo) -> Option<&mut ConnInfo> {
        if self.conns.len() >= self.max && !self.conns.contains_key(&info.conn_id) {
            self.full += 1;
            return None;
        }
        for &k in &info.owners {
            self.by_fd.insert(k, info.conn_id);
        }
        let id = info.conn_id;
        self.conns.insert(id, info);
        self.conns.get_mut(&id)
    }

    /// (tgid, fd) no longer names its connection. Returns the connection if that was its
    /// last name (it is then gone from the table).
    pub fn release(&mut self, tgid: u32, fd: u32) -> Option<ConnInfo> {
        let id = self.by_fd.remove(&(tgid, fd))?;
        let Entry::Occupied(mut e) = self.conns.entry(id) else { return None };
        e.get_mut().owners.retain(|&k| k != (tgid, fd));
        if e.get().owners.is_empty() { Some(e.remove()) } else { None }
    }

    /// (tgid, fd) now also names `conn_id` (dup, or inherited across fork).
    pub fn alias(&mut self, conn_id: u64, tgid: u32, fd: u32) {
        if self.by_fd.get(&(tgid, fd)) == Some(&conn_id) {
            return;
        }
        self.release(tgid, fd);
        if let Some(c) = self.conns.get_mut(&conn_id) {
            c.owners.push((tgid, fd));
            self.by_fd.insert((tgid, fd), conn_id);
        }
    }

    /// The (fd, conn_id, role) of every connection `tgid` holds.
    pub fn fds_of(&self, tgid: u32) -> Vec<(u32, u64, Role)> {
        let mut v: Vec<_> = self
            .by_fd
            .iter()
            .filter(|((t, _), _)| *t == tgid)
            .filter_map(|(&(_, fd), id)| Some((fd, *id, self.conns.get(id)?.role)))
            .collect();
        v.sort_unstable();
        v
    }

    /// Forgets every fd of `tgid` (it exited). Returns the connections that closed.
    pub fn drop_process(&mut self, tgid: u32) -> Vec<ConnInfo> {
        self.fds_of(tgid).into_iter().filter_map(|(fd, _, _)| self.release(tgid, fd)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_that_emptied_after_a_burst_gives_its_memory_back() {
        let mut m: HashMap<u64, [u8; 64]> = (0..100_000).map(|i| (i, [0; 64])).collect();
        shrink_idle(&mut m);
        assert!(m.capacity() >= 100_000, "a full map keeps its room");
        m.retain(|k, _| *k < 10);
        shrink_idle(&mut m);
        assert!(m.capacity() < 1024, "capacity {}", m.capacity());
        assert_eq!(m.len(), 10);
    }

    fn open(conn_id: u64, tgid: u32, fd: u32) -> Open {
        Open {
            ts_ns: 0,
            tgid,
            tid: tgid,
            fd,
            conn_id,
            role: Role::Client,
            in_progress: false,
            peer: None,
            local: None,
            listen_fd: None,
        }
    }

    #[test]
    fn dup_keeps_connection_until_last_fd_closes() {
        let mut t = ConnTable::new(10);
        t.open(&open(1, 100, 5));
        t.alias(1, 100, 9);
        assert!(t.release(100, 5).is_none());
        assert_eq!(t.by_fd(100, 9).unwrap().conn_id, 1);
        assert_eq!(t.release(100, 9).unwrap().conn_id, 1);
        assert!(t.is_empty());
    }

    #[test]
    fn reused_fd_names_the_new_connection_only() {
        let mut t = ConnTable::new(10);
        t.open(&open(1, 100, 5));
        // close was lost; the same fd number is reused by a new connection
        t.open(&open(2, 100, 5));
        assert_eq!(t.by_fd(100, 5).unwrap().conn_id, 2);
        assert!(t.get(1).is_none());
    }

    #[test]
    fn fork_shares_and_exit_drops() {
        let mut t = ConnTable::new(10);
        t.open(&open(1, 100, 5));
        for (fd, id, _) in t.fds_of(100) {
            t.alias(id, 200, fd);
        }
        assert!(t.drop_process(100).is_empty());
        assert_eq!(t.drop_process(200).len(), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn full_table_counts_and_refuses() {
        let mut t = ConnTable::new(1);
        assert!(t.open(&open(1, 100, 5)).is_some());
        assert!(t.open(&open(2, 100, 6)).is_none());
        assert_eq!(t.full, 1);
        let id = t.seed(100, 7, 1, Role::Server, None, None);
        assert!(id.is_none());
        assert_eq!(t.full, 2);
    }

    #[test]
    fn seeded_ids_never_collide_with_kernel_ids() {
        let mut t = ConnTable::new(10);
        let id = t.seed(100, 7, 1234, Role::Server, None, None).unwrap();
        assert_ne!(id & CONN_ID_USERSPACE_BIT, 0);
        assert!(t.get(id).unwrap().preexisting);
    }
}
