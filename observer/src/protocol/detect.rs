//! Which protocol a connection speaks, decided once, from its role and its first bytes:
//! the server side of an app's connection is HTTP/1 (the parser itself notices a
//! connection that is not, and stops); a client connection is PostgreSQL when its first
//! write opens a session (or, met in the middle, is whole frontend messages), Redis or
//! memcached when it is their commands, and anything else is left alone.
//!
//! Pure: what the app is known to talk to comes in as [`Peer`], so the decision can be
//! tested and fuzzed without an app.

use super::{Chunk, Wire, memcached, postgres, redis};
use crate::events::{Direction, Role};

/// A parser to give the connection, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    /// `mid_stream`: met in the middle (open before tracing started); its events count
    /// only once its peer proves to be one of the app's databases.
    Postgres {
        mid_stream: bool,
    },
    Cache(Wire),
    /// A client connection that is no database or cache protocol we parse.
    Other,
}

/// What the app is known to talk to, about this connection's peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Peer {
    /// The app's databases and caches are known (its discovery finished): a
    /// connection that is none of them now never will be.
    pub known: bool,
    /// The peer is one of the app's caches (meaningful once `known`).
    pub is_cache: bool,
}

/// The bytes start a TLS record (a handshake: ClientHello from a client, or the
/// ServerHello a server reads back): content type 22, protocol major version 3.
pub fn is_tls_record(b: &[u8]) -> bool {
    matches!(b, [0x16, 0x03, minor, ..] if *minor <= 0x04)
}

/// The protocol of a connection from one of its records, or None when this record does
/// not decide it yet (a client's read, or bytes that may still turn out to be a
/// database's before the app's databases are known).
pub fn detect(role: Role, c: &Chunk<'_>, peer: Peer) -> Option<Protocol> {
    if role == Role::Server {
        return Some(Protocol::Http);
    }
    // A client speaks first in every protocol parsed here.
    if c.dir != Direction::Send {
        return None;
    }
    if postgres::is_startup(c.bytes) {
        return Some(Protocol::Postgres { mid_stream: false });
    }
    if postgres::looks_like_frontend(c.bytes, c.total_len) {
        return Some(Protocol::Postgres { mid_stream: true });
    }
    let wire = if redis::is_command(c.bytes) {
        Some(Wire::Redis)
    } else if memcached::is_command(c.bytes) {
        Some(Wire::Memcached)
    } else {
        None
    };
    match wire {
        // Once the app's caches are known, only those of its servers are followed (a
        // Celery broker on Redis is not parsed).
        Some(_) if peer.known && !peer.is_cache => Some(Protocol::Other),
        Some(w) => Some(Protocol::Cache(w)),
        None if peer.known => Some(Protocol::Other),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::fixtures;

    const UNKNOWN: Peer = Peer { known: false, is_cache: false };
    const A_CACHE: Peer = Peer { known: true, is_cache: true };
    const NOT_A_CACHE: Peer = Peer { known: true, is_cache: false };

    fn send(bytes: &[u8]) -> Chunk<'_> {
        Chunk { dir: Direction::Send, enter_ns: 1, exit_ns: 2, bytes, total_len: bytes.len() as u64 }
    }

    /// Each recorded connection's first write, as the kernel captured it.
    fn first_writes(name: &str) -> Vec<Vec<u8>> {
        let mut seen = std::collections::BTreeSet::new();
        fixtures::load(name)
            .into_iter()
            .filter_map(|r| {
                let s = r.step?;
                (s.dir == Direction::Send && seen.insert(r.conn)).then_some(s.data)
            })
            .collect()
    }

    #[test]
    fn the_server_side_is_http_whatever_it_carries() {
        for bytes in [&b"GET / HTTP/1.1\r\n"[..], b"\x16\x03\x01", b"", b"*1\r\n$4\r\nPING\r\n"] {
            for dir in [Direction::Send, Direction::Recv] {
                let c = Chunk { dir, ..send(bytes) };
                assert_eq!(detect(Role::Server, &c, UNKNOWN), Some(Protocol::Http));
            }
        }
    }

    #[test]
    fn recorded_first_writes_are_told_apart() {
        let cases = [
            ("postgres-django-views.jsonl", Protocol::Postgres { mid_stream: false }),
            ("redis-django-redis.jsonl", Protocol::Cache(Wire::Redis)),
            ("redis-native-resp3.jsonl", Protocol::Cache(Wire::Redis)),
            ("memcached-pymemcache.jsonl", Protocol::Cache(Wire::Memcached)),
        ];
        for (name, want) in cases {
            let firsts = first_writes(name);
            assert!(!firsts.is_empty(), "{name}");
            for (i, bytes) in firsts.iter().enumerate() {
                for peer in [UNKNOWN, A_CACHE] {
                    assert_eq!(detect(Role::Client, &send(bytes), peer), Some(want), "{name} #{i}");
                }
                // Cut to what a small capture keeps: the verdict holds on a prefix.
                let c = Chunk { total_len: bytes.len() as u64, ..send(&bytes[..bytes.len().min(16)]) };
                assert_eq!(detect(Role::Client, &c, UNKNOWN), Some(want), "{name} #{i}, 16 bytes");
            }
        }
    }

    #[test]
    fn a_postgres_connection_met_in_the_middle_is_recognised_by_its_messages() {
        let recs = fixtures::load("postgres-django-views.jsonl");
        let mut firsts = std::collections::BTreeSet::new();
        let mut mid = 0;
        for r in &recs {
            let Some(s) = &r.step else { continue };
            if s.dir != Direction::Send || firsts.insert(r.conn) {
                continue;
            }
            // A later write is whole frontend messages (or the StartupMessage after an
            // SSLRequest was refused), never a cache's commands.
            match detect(Role::Client, &send(&s.data), UNKNOWN) {
                Some(Protocol::Postgres { mid_stream: true }) => mid += 1,
                Some(Protocol::Postgres { mid_stream: false }) | None => {}
                other => panic!("a later PostgreSQL write read as {other:?}"),
            }
        }
        assert!(mid > 10, "only {mid} later writes recognised");
    }

    #[test]
    fn a_clients_read_decides_nothing() {
        let c = Chunk { dir: Direction::Recv, ..send(b"*1\r\n$4\r\nPING\r\n") };
        assert_eq!(detect(Role::Client, &c, UNKNOWN), None);
        assert_eq!(detect(Role::Client, &c, NOT_A_CACHE), None);
    }

    #[test]
    fn cache_commands_to_a_server_the_app_does_not_use_as_a_cache_are_left_alone() {
        let get = b"*2\r\n$3\r\nGET\r\n$5\r\n:1:k1\r\n";
        assert_eq!(detect(Role::Client, &send(get), UNKNOWN), Some(Protocol::Cache(Wire::Redis)));
        assert_eq!(detect(Role::Client, &send(get), A_CACHE), Some(Protocol::Cache(Wire::Redis)));
        assert_eq!(detect(Role::Client, &send(get), NOT_A_CACHE), Some(Protocol::Other));
        let mc = b"get :1:k1\r\n";
        assert_eq!(detect(Role::Client, &send(mc), UNKNOWN), Some(Protocol::Cache(Wire::Memcached)));
        assert_eq!(detect(Role::Client, &send(mc), NOT_A_CACHE), Some(Protocol::Other));
    }

    #[test]
    fn other_bytes_wait_for_the_apps_databases_then_are_left_alone() {
        for bytes in [&b"GET /api HTTP/1.1\r\nHost: x\r\n\r\n"[..], b"\x16\x03\x01\x02\x00", b"\0\0\0"] {
            assert_eq!(detect(Role::Client, &send(bytes), UNKNOWN), None);
            assert_eq!(detect(Role::Client, &send(bytes), NOT_A_CACHE), Some(Protocol::Other));
            assert_eq!(detect(Role::Client, &send(bytes), A_CACHE), Some(Protocol::Other));
        }
    }
}
