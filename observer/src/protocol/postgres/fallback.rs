//! libpq's encryption fallback: one `connect()` of the app, two sessions on the wire.
//!
//! With `sslmode=prefer` (libpq's default), a session that fails during authentication
//! over TLS is retried at once in plaintext by the same call (`fe-connect.c`: "if sslmode
//! is prefer and we're in an SSL connection, then do a non-SSL retry"); with
//! `sslmode=allow`, a plaintext failure is retried over TLS. Django, and so
//! django-prometheus, sees one connection and at most one error. So a failed attempt is
//! held for a moment: if the same thread opens a session to the same server for the same
//! user with the other encryption right after, that session is the retry (the held
//! failure is dropped, the retry's own outcome counts, its attempt is not counted
//! again); otherwise the failure is released as it was.

/// Who retries: the thread, the server and the user (the retry names the same one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key<P> {
    pub thread: u32,
    pub peer: Option<P>,
    pub user: Option<Box<str>>,
}

struct Held<P, T> {
    key: Key<P>,
    tls: bool,
    at_ns: u64,
    what: T,
}

/// libpq retries within the same call, before returning: well under this.
pub const WINDOW_NS: u64 = 500_000_000;
/// Failures held at once by default (`--max-held-connect-failures`); past it the
/// oldest is released at once.
pub const MAX_HELD: usize = 256;

/// Failed attempts that a retry may still replace.
pub struct Fallback<P, T> {
    held: Vec<Held<P, T>>,
    max: usize,
    /// Failures released before their window ended to make room: if libpq retried
    /// one of them, that connect counts as two attempts.
    pub released_early: u64,
}

impl<P, T> Default for Fallback<P, T> {
    fn default() -> Self {
        Self::new(MAX_HELD)
    }
}

impl<P, T> Fallback<P, T> {
    /// Holding at most `max` failures (at least one).
    pub fn new(max: usize) -> Self {
        Self { held: Vec::new(), max: max.max(1), released_early: 0 }
    }
}

impl<P: PartialEq, T> Fallback<P, T> {
    /// Holds the failure `what` of an attempt made with `tls` at `at_ns`. Returns a
    /// failure that had to be released to make room.
    pub fn hold(&mut self, key: Key<P>, tls: bool, at_ns: u64, what: T) -> Option<T> {
        let out = (self.held.len() >= self.max).then(|| self.held.remove(0).what);
        self.released_early += u64::from(out.is_some());
        self.held.push(Held { key, tls, at_ns, what });
        out
    }

    /// A new attempt (made with `tls`, its startup at `at_ns`): true when it is the retry
    /// of a held failure, which is then dropped.
    pub fn retry(&mut self, key: &Key<P>, tls: bool, at_ns: u64) -> bool {
        let found = self
            .held
            .iter()
            .position(|h| h.key == *key && h.tls != tls && at_ns >= h.at_ns && at_ns - h.at_ns < WINDOW_NS);
        found.map(|i| self.held.remove(i)).is_some()
    }

    /// The failures no retry followed by `now_ns`.
    pub fn expired(&mut self, now_ns: u64, out: &mut Vec<T>) {
        let mut i = 0;
        while i < self.held.len() {
            if now_ns.saturating_sub(self.held[i].at_ns) >= WINDOW_NS {
                out.push(self.held.remove(i).what);
            } else {
                i += 1;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(thread: u32, user: &str) -> Key<u16> {
        Key { thread, peer: Some(5432), user: Some(user.into()) }
    }

    const MS: u64 = 1_000_000;

    #[test]
    fn a_plaintext_retry_right_after_a_tls_failure_replaces_it() {
        let mut f = Fallback::default();
        assert!(f.hold(key(1, "app"), true, 100 * MS, "failed over TLS").is_none());
        assert!(f.retry(&key(1, "app"), false, 103 * MS));
        let mut out = Vec::new();
        f.expired(10_000 * MS, &mut out);
        assert!(out.is_empty(), "dropped, not released");
    }

    #[test]
    fn anything_else_is_not_a_retry_and_the_failure_is_released() {
        let mut f = Fallback::default();
        f.hold(key(1, "app"), true, 100 * MS, "a");
        // Same encryption, another thread, another user, another server, too late.
        assert!(!f.retry(&key(1, "app"), true, 101 * MS));
        assert!(!f.retry(&key(2, "app"), false, 101 * MS));
        assert!(!f.retry(&key(1, "other"), false, 101 * MS));
        assert!(!f.retry(&Key { peer: Some(5433), ..key(1, "app") }, false, 101 * MS));
        assert!(!f.retry(&key(1, "app"), false, 100 * MS + WINDOW_NS));
        let mut out = Vec::new();
        f.expired(100 * MS + WINDOW_NS - 1, &mut out);
        assert!(out.is_empty());
        f.expired(100 * MS + WINDOW_NS, &mut out);
        assert_eq!(out, ["a"]);
        assert!(f.is_empty());
    }

    #[test]
    fn sslmode_allow_retries_the_other_way() {
        let mut f = Fallback::default();
        f.hold(key(1, "app"), false, 0, "plaintext refused");
        assert!(f.retry(&key(1, "app"), true, MS));
    }

    #[test]
    fn held_failures_are_bounded() {
        let mut f = Fallback::default();
        for i in 0..MAX_HELD as u32 {
            assert!(f.hold(key(i, "app"), true, 0, i).is_none());
        }
        assert_eq!(f.hold(key(9999, "app"), true, 0, 9999), Some(0), "the oldest goes out");
        assert_eq!((f.len(), f.released_early), (MAX_HELD, 1));
    }
}
