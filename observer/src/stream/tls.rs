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

use crate::{IdMap, events::Data};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Ciphertext seen, no plaintext yet.
    Opaque,
    /// Plaintext seen.
    Decrypted,
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
    pub stats: TlsStats,
}

impl Tls {
    /// What to do with `d`, and what it tells of its connection.
    pub fn feed(&mut self, d: &Data<'_>) -> Feed {
        if d.syscall.is_tls() {
            return match self.conns.insert(d.conn_id, State::Decrypted) {
                Some(State::Decrypted) => Feed::Plaintext,
                _ => Feed::FirstPlaintext,
            };
        }
        if d.ciphertext {
            self.stats.ciphertext_bytes += d.total_len;
            self.conns.entry(d.conn_id).or_insert(State::Opaque);
            return Feed::Ciphertext { flagged: true };
        }
        if self.conns.contains_key(&d.conn_id) {
            self.stats.ciphertext_bytes += d.total_len;
            return Feed::Ciphertext { flagged: false };
        }
        Feed::Plain
    }

    /// The connection switched to TLS (a parser or detection says so).
    pub fn encrypted(&mut self, conn_id: u64) {
        self.conns.entry(conn_id).or_insert(State::Opaque);
    }

    /// Whether the connection is known to be TLS.
    pub fn knows(&self, conn_id: u64) -> bool {
        self.conns.contains_key(&conn_id)
    }

    /// The connection closed.
    pub fn closed(&mut self, conn_id: u64) {
        match self.conns.remove(&conn_id) {
            Some(State::Decrypted) => self.stats.decrypted += 1,
            Some(State::Opaque) => self.stats.opaque += 1,
            None => {}
        }
    }

    /// Forgets connections `keep` says are gone (their close was lost).
    pub fn retain(&mut self, keep: impl Fn(u64) -> bool) {
        self.conns.retain(|id, _| keep(*id));
    }

    /// Gives back memory after a burst of connections.
    pub fn shrink_idle(&mut self) {
        crate::conns::shrink_idle(&mut self.conns);
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

    #[test]
    fn a_probed_connection_feeds_its_plaintext_only() {
        let mut t = Tls::default();
        assert_eq!(t.feed(&rec(1, Syscall::Write, true)), Feed::Ciphertext { flagged: true });
        assert_eq!(t.feed(&rec(1, Syscall::SslWrite, false)), Feed::FirstPlaintext);
        assert_eq!(t.feed(&rec(1, Syscall::Read, true)), Feed::Ciphertext { flagged: true });
        assert_eq!(t.feed(&rec(1, Syscall::SslRead, false)), Feed::Plaintext);
        // A socket record the kernel did not see inside an SSL call (a close_notify
        // written by SSL_shutdown before its probe was set) is ciphertext all the same.
        assert_eq!(t.feed(&rec(1, Syscall::Write, false)), Feed::Ciphertext { flagged: false });
        assert_eq!(t.stats.ciphertext_bytes, 300);
        t.closed(1);
        assert_eq!((t.stats.decrypted, t.stats.opaque), (1, 0));
        // The id is not TLS any more (ids are not reused, but the table must not grow).
        assert!(!t.knows(1));
    }

    #[test]
    fn plain_connections_are_untouched_and_an_announced_switch_is_opaque() {
        let mut t = Tls::default();
        assert_eq!(t.feed(&rec(2, Syscall::Sendto, false)), Feed::Plain);
        t.encrypted(2);
        assert_eq!(t.feed(&rec(2, Syscall::Sendto, false)), Feed::Ciphertext { flagged: false });
        t.closed(2);
        t.closed(3);
        assert_eq!((t.stats.decrypted, t.stats.opaque), (0, 1));
    }
}
