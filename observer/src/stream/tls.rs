//! Which of a connection's records the parsers get once TLS is in the picture.
//!
//! A TLS connection carries two streams: the socket's records (TLS records: ciphertext)
//! and, when the app's TLS library is probed, the plaintext that library read and wrote
//! (records of `SSL_read`/`SSL_write`, tied to the socket by the kernel). Parsers get the
//! plaintext only. A connection is known to be TLS from a socket syscall made inside an
//! `SSL_*` call (flagged by the kernel), from a parser (PostgreSQL's `SSLRequest`
//! answered `S`), from detection (a ClientHello), or from its first plaintext record.
//! Every socket record of such a connection is counted as ciphertext and never parsed,
//! so garbage never reaches a parser as if it were the protocol.

use crate::{
    IdMap,
    events::{Data, Role, SockAddr},
    libs::LibState,
};

/// What to do with one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// Socket bytes of a connection not known to be TLS: parse them.
    Plain,
    /// The connection's first plaintext: a parser that saw its socket bytes saw
    /// ciphertext (HTTP on a ClientHello), so the protocol is decided again from here.
    FirstPlaintext,
    Plaintext,
    /// TLS records: counted, not parsed. `flagged`: the kernel saw them inside an `SSL_*`
    /// call (the plaintext is coming); otherwise nobody decrypts them (yet).
    Ciphertext {
        flagged: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Ciphertext seen, no plaintext yet.
    Opaque(Box<Opaque>),
    /// Plaintext seen.
    Decrypted,
}

/// Whose a TLS connection is: the app it is counted under when it closes opaque.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The app (its root process).
    pub target: u32,
    pub tgid: u32,
    pub role: Role,
    pub peer: Option<SockAddr>,
}

/// A TLS connection whose plaintext has not been seen (yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opaque {
    pub origin: Origin,
    /// A socket syscall of it was made inside a probed `SSL_*` call.
    flagged: bool,
    /// What its process mapped when it was first seen.
    lib: LibState,
}

/// Why a TLS connection closed without its plaintext seen (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opacity {
    /// Its process maps no TLS library the agent probes: Go's crypto/tls, rustls, or a
    /// static OpenSSL under another name without its symbols.
    NoProbedLibrary,
    /// Its process maps one that cannot be probed: stripped of the functions, or the
    /// kernel refused the probes.
    LibraryUnprobeable,
    /// Its process's OpenSSL is probed, but no call of it was seen on this socket:
    /// another TLS implementation in the same process, or a memory BIO whose reads the
    /// agent could not tie to the socket.
    NotTied,
    /// Probed calls were seen on it, but no byte of plaintext: a handshake that failed
    /// or a connection closed right after it.
    NoPlaintext,
}

impl Opacity {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoProbedLibrary => "no_probed_library",
            Self::LibraryUnprobeable => "library_unprobeable",
            Self::NotTied => "not_tied",
            Self::NoPlaintext => "no_plaintext",
        }
    }

    /// Why: from what the kernel saw of the connection and what its process maps (the
    /// most it was known to map, then or at its close).
    fn of(flagged: bool, lib: LibState) -> Self {
        match (flagged, lib) {
            (true, _) => Self::NoPlaintext,
            (false, LibState::Probed) => Self::NotTied,
            (false, LibState::Unusable) => Self::LibraryUnprobeable,
            (false, LibState::None) => Self::NoProbedLibrary,
        }
    }
}

/// An opaque TLS connection that closed, and why it stayed opaque.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosedOpaque {
    pub origin: Origin,
    pub reason: Opacity,
}

/// Counters of TLS connections (exported as `observer_tls_*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TlsStats {
    /// Bytes of TLS records on the sockets (their true lengths).
    pub ciphertext_bytes: u64,
    /// TLS connections closed, whose plaintext was seen, or not.
    pub decrypted: u64,
    pub opaque: u64,
}

/// The TLS connections, by connection id.
#[derive(Debug, Default)]
pub struct Tls {
    conns: IdMap<u64, State>,
    /// What each traced process maps of the probed libraries (from the pump).
    libs: IdMap<u32, LibState>,
    pub stats: TlsStats,
}

impl Tls {
    /// What to do with `d` (of `origin`'s connection), and what it tells of its
    /// connection.
    pub fn feed(&mut self, d: &Data<'_>, origin: impl FnOnce() -> Origin) -> Feed {
        if d.syscall.is_tls() {
            return match self.conns.insert(d.conn_id, State::Decrypted) {
                Some(State::Decrypted) => Feed::Plaintext,
                _ => Feed::FirstPlaintext,
            };
        }
        if d.ciphertext {
            self.stats.ciphertext_bytes += d.total_len;
            match self.conns.get_mut(&d.conn_id) {
                Some(State::Opaque(o)) => o.flagged = true,
                Some(State::Decrypted) => {}
                None => {
                    let mut o = self.opaque(origin());
                    o.flagged = true;
                    self.conns.insert(d.conn_id, State::Opaque(o));
                }
            }
            return Feed::Ciphertext { flagged: true };
        }
        if self.conns.contains_key(&d.conn_id) {
            self.stats.ciphertext_bytes += d.total_len;
            return Feed::Ciphertext { flagged: false };
        }
        Feed::Plain
    }

    fn opaque(&self, origin: Origin) -> Box<Opaque> {
        let lib = self.libs.get(&origin.tgid).copied().unwrap_or_default();
        Box::new(Opaque { origin, flagged: false, lib })
    }

    /// The connection switched to TLS (a parser or detection says so).
    pub fn encrypted(&mut self, conn_id: u64, origin: Origin) {
        if !self.conns.contains_key(&conn_id) {
            let o = self.opaque(origin);
            self.conns.insert(conn_id, State::Opaque(o));
        }
    }

    /// What `pid` maps of the probed libraries now.
    pub fn libraries(&mut self, pid: u32, state: LibState) {
        self.libs.insert(pid, state);
    }

    /// `pid` exited (its connections closing later keep what it mapped).
    pub fn process_gone(&mut self, pid: u32) {
        self.libs.remove(&pid);
    }

    /// Forgets processes `alive` says are gone (their exit was lost).
    pub fn retain_processes(&mut self, alive: impl Fn(u32) -> bool) {
        self.libs.retain(|pid, _| alive(*pid));
    }

    /// Whether the connection is known to be TLS.
    pub fn knows(&self, conn_id: u64) -> bool {
        self.conns.contains_key(&conn_id)
    }

    /// The connection closed: if it stayed opaque, whose it was and why.
    pub fn closed(&mut self, conn_id: u64) -> Option<ClosedOpaque> {
        let state = self.conns.remove(&conn_id)?;
        self.ended(state)
    }

    fn ended(&mut self, state: State) -> Option<ClosedOpaque> {
        match state {
            State::Decrypted => {
                self.stats.decrypted += 1;
                None
            }
            State::Opaque(o) => {
                self.stats.opaque += 1;
                let now = self.libs.get(&o.origin.tgid).copied().unwrap_or_default();
                let reason = Opacity::of(o.flagged, o.lib.max(now));
                Some(ClosedOpaque { origin: o.origin, reason })
            }
        }
    }

    /// Ends the connections `keep` says are gone (their close was lost); the opaque
    /// ones among them go to `closed`.
    pub fn retain(&mut self, keep: impl Fn(u64) -> bool, closed: &mut Vec<ClosedOpaque>) {
        let gone: Vec<State> = self.conns.extract_if(|id, _| !keep(*id)).map(|(_, s)| s).collect();
        closed.extend(gone.into_iter().filter_map(|s| self.ended(s)));
    }

    /// Gives back memory after a burst of connections.
    pub fn shrink_idle(&mut self) {
        crate::conns::shrink_idle(&mut self.conns);
        crate::conns::shrink_idle(&mut self.libs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Direction;
    use observer_ebpf::Syscall;

    fn rec(conn_id: u64, syscall: Syscall, ciphertext: bool) -> Data<'static> {
        Data {
            enter_ns: 1,
            exit_ns: 2,
            tgid: 1,
            tid: 1,
            fd: 3,
            conn_id,
            syscall,
            dir: if syscall.is_recv() { Direction::Recv } else { Direction::Send },
            total_len: 100,
            bytes: b"",
            fault: false,
            no_capture: ciphertext,
            ciphertext,
            seq: Some(0),
        }
    }

    fn origin() -> Origin {
        Origin { target: 7, tgid: 1, role: Role::Client, peer: None }
    }

    fn feed(t: &mut Tls, d: &Data<'_>) -> Feed {
        t.feed(d, origin)
    }

    #[test]
    fn a_probed_connection_feeds_its_plaintext_only() {
        let mut t = Tls::default();
        assert_eq!(feed(&mut t, &rec(1, Syscall::Write, true)), Feed::Ciphertext { flagged: true });
        assert_eq!(feed(&mut t, &rec(1, Syscall::SslWrite, false)), Feed::FirstPlaintext);
        assert_eq!(feed(&mut t, &rec(1, Syscall::Read, true)), Feed::Ciphertext { flagged: true });
        assert_eq!(feed(&mut t, &rec(1, Syscall::SslRead, false)), Feed::Plaintext);
        // A socket record the kernel did not see inside an SSL call (a close_notify
        // written by SSL_shutdown before its probe was set) is ciphertext all the same.
        assert_eq!(feed(&mut t, &rec(1, Syscall::Write, false)), Feed::Ciphertext { flagged: false });
        assert_eq!(t.stats.ciphertext_bytes, 300);
        assert_eq!(t.closed(1), None, "decrypted");
        assert_eq!((t.stats.decrypted, t.stats.opaque), (1, 0));
        // The id is not TLS any more (ids are not reused, but the table must not grow).
        assert!(!t.knows(1));
    }

    #[test]
    fn plain_connections_are_untouched_and_an_announced_switch_is_opaque() {
        let mut t = Tls::default();
        assert_eq!(feed(&mut t, &rec(2, Syscall::Sendto, false)), Feed::Plain);
        t.encrypted(2, origin());
        assert_eq!(feed(&mut t, &rec(2, Syscall::Sendto, false)), Feed::Ciphertext { flagged: false });
        let closed = t.closed(2).unwrap();
        assert_eq!((closed.origin, closed.reason), (origin(), Opacity::NoProbedLibrary));
        assert_eq!(t.closed(3), None);
        assert_eq!((t.stats.decrypted, t.stats.opaque), (0, 1));
    }

    #[test]
    fn an_opaque_connection_says_why() {
        let mut t = Tls::default();
        let reason = |t: &mut Tls, id| t.closed(id).map(|c| c.reason);
        // Nothing probed in the process (a Go binary, rustls).
        t.encrypted(1, origin());
        assert_eq!(reason(&mut t, 1), Some(Opacity::NoProbedLibrary));
        // A stripped libssl.
        t.libraries(1, LibState::Unusable);
        t.encrypted(2, origin());
        assert_eq!(reason(&mut t, 2), Some(Opacity::LibraryUnprobeable));
        // Probed, but this socket was never seen inside an SSL call.
        t.libraries(1, LibState::Probed);
        t.encrypted(3, origin());
        assert_eq!(reason(&mut t, 3), Some(Opacity::NotTied));
        // Seen inside SSL calls (the handshake), never any plaintext.
        assert_eq!(feed(&mut t, &rec(4, Syscall::Write, true)), Feed::Ciphertext { flagged: true });
        assert_eq!(reason(&mut t, 4), Some(Opacity::NoPlaintext));
        // Announced first (SSLRequest), then seen inside an SSL call.
        t.encrypted(5, origin());
        feed(&mut t, &rec(5, Syscall::Read, true));
        assert_eq!(reason(&mut t, 5), Some(Opacity::NoPlaintext));
        // The library probed only after the connection began: known at its close.
        t.libraries(1, LibState::None);
        t.encrypted(6, origin());
        t.libraries(1, LibState::Probed);
        assert_eq!(reason(&mut t, 6), Some(Opacity::NotTied));
        // A close lost with its process: what it mapped when the connection was seen.
        t.libraries(1, LibState::Unusable);
        t.encrypted(7, origin());
        t.process_gone(1);
        let mut closed = Vec::new();
        t.retain(|_| false, &mut closed);
        assert_eq!(closed.iter().map(|c| c.reason).collect::<Vec<_>>(), [Opacity::LibraryUnprobeable]);
        assert_eq!(t.stats.opaque, 7);
        t.retain_processes(|_| false);
        assert!(t.libs.is_empty() && t.conns.is_empty());
    }
}
