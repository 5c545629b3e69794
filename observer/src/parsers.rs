//! Per-connection parser state: which parser a connection has (see
//! `protocol::detect`) and what it carries besides, indexed by connection and by the
//! process that owns it, so that a process's exit finds its connections without a walk
//! of every other connection.

use crate::{
    IdMap, IdSet,
    events::SockAddr,
    protocol::{CacheParser, Wire, http1::Http1Parser, postgres::PgParser},
};

pub(crate) struct PgConn {
    pub(crate) parser: PgParser,
    /// Met in the middle: its events count only if it goes to a database of the app.
    pub(crate) mid_stream: bool,
    pub(crate) user: Option<Box<str>>,
    pub(crate) database: Option<Box<str>>,
    /// libpq's retry of a failed attempt with the other encryption (not a new attempt).
    pub(crate) retry: bool,
}

pub(crate) enum Proto {
    Http(Box<Http1Parser>),
    Postgres(Box<PgConn>),
    /// Redis or memcached.
    Cache(Wire, Box<dyn CacheParser>),
    /// A client connection that is no database or cache protocol we parse.
    Other,
    /// Its parsing panicked (a bug, contained): its records are dropped and counted
    /// until it closes.
    Faulted,
}

impl Proto {
    /// The `protocol` label of the connection's parse errors.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Http(_) => "http",
            Self::Postgres(_) => "postgresql",
            Self::Cache(wire, _) => wire.name(),
            Self::Other => "other",
            Self::Faulted => "faulted",
        }
    }
}

pub(crate) struct ConnState {
    pub(crate) target: u32,
    pub(crate) owner: u32,
    /// The connection's local address: the listener the app serves on.
    pub(crate) local: Option<SockAddr>,
    pub(crate) peer: Option<SockAddr>,
    pub(crate) proto: Proto,
    pub(crate) counted_other: bool,
}

/// Every connection with parser state, by id and by owning process.
#[derive(Default)]
pub(crate) struct Parsers {
    by_conn: IdMap<u64, ConnState>,
    by_owner: IdMap<u32, IdSet<u64>>,
}

impl Parsers {
    pub(crate) fn len(&self) -> usize {
        self.by_conn.len()
    }

    pub(crate) fn contains(&self, id: u64) -> bool {
        self.by_conn.contains_key(&id)
    }

    pub(crate) fn get(&self, id: u64) -> Option<&ConnState> {
        self.by_conn.get(&id)
    }

    pub(crate) fn get_mut(&mut self, id: u64) -> Option<&mut ConnState> {
        self.by_conn.get_mut(&id)
    }

    pub(crate) fn insert(&mut self, id: u64, state: ConnState) {
        let owner = state.owner;
        if let Some(old) = self.by_conn.insert(id, state)
            && old.owner != owner
        {
            self.unindex(id, old.owner);
        }
        self.by_owner.entry(owner).or_default().insert(id);
    }

    pub(crate) fn remove(&mut self, id: u64) -> Option<ConnState> {
        let c = self.by_conn.remove(&id)?;
        self.unindex(id, c.owner);
        Some(c)
    }

    fn unindex(&mut self, id: u64, owner: u32) {
        if let Some(ids) = self.by_owner.get_mut(&owner) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_owner.remove(&owner);
            }
        }
    }

    /// The connections a process owns.
    pub(crate) fn owned_by(&self, pid: u32) -> Vec<u64> {
        self.by_owner.get(&pid).map(|ids| ids.iter().copied().collect()).unwrap_or_default()
    }

    /// The connections of an app (a walk: apps come and go far less often than
    /// processes).
    pub(crate) fn of_target_mut(&mut self, root: u32) -> impl Iterator<Item = &mut ConnState> {
        self.by_conn.values_mut().filter(move |c| c.target == root)
    }

    /// Forgets every connection of an app.
    pub(crate) fn remove_target(&mut self, root: u32) {
        let ids: Vec<u64> =
            self.by_conn.iter().filter(|(_, c)| c.target == root).map(|(id, _)| *id).collect();
        for id in ids {
            self.remove(id);
        }
    }

    pub(crate) fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.by_conn.keys().copied()
    }

    /// Gives back memory after a burst of connections.
    pub(crate) fn shrink_idle(&mut self) {
        crate::conns::shrink_idle(&mut self.by_conn);
        crate::conns::shrink_idle(&mut self.by_owner);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(target: u32, owner: u32) -> ConnState {
        ConnState { target, owner, local: None, peer: None, proto: Proto::Other, counted_other: false }
    }

    fn sorted(mut v: Vec<u64>) -> Vec<u64> {
        v.sort_unstable();
        v
    }

    #[test]
    fn a_process_finds_its_connections_and_only_its_own() {
        let mut p = Parsers::default();
        p.insert(1, state(10, 11));
        p.insert(2, state(10, 11));
        p.insert(3, state(10, 12));
        assert_eq!(sorted(p.owned_by(11)), [1, 2]);
        assert_eq!(p.owned_by(12), [3]);
        assert!(p.owned_by(13).is_empty());
        assert!(p.remove(1).is_some());
        assert_eq!(p.owned_by(11), [2]);
        assert!(p.remove(1).is_none(), "removed once");
        p.remove(2);
        assert!(!p.by_owner.contains_key(&11), "an owner without connections takes no room");
    }

    #[test]
    fn a_replaced_state_moves_to_its_new_owner() {
        let mut p = Parsers::default();
        p.insert(1, state(10, 11));
        p.insert(1, state(10, 12));
        assert!(p.owned_by(11).is_empty());
        assert_eq!(p.owned_by(12), [1]);
        assert_eq!(p.len(), 1);
        // The same owner again: still indexed.
        p.insert(1, state(10, 12));
        assert_eq!(p.owned_by(12), [1]);
    }

    #[test]
    fn an_apps_connections_go_with_it() {
        let mut p = Parsers::default();
        p.insert(1, state(10, 11));
        p.insert(2, state(20, 21));
        p.insert(3, state(10, 12));
        assert_eq!(p.of_target_mut(10).count(), 2);
        p.remove_target(10);
        assert_eq!(sorted(p.ids().collect()), [2]);
        assert!(p.owned_by(11).is_empty() && p.owned_by(12).is_empty());
        assert_eq!(p.owned_by(21), [2]);
    }
}
