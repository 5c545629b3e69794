//! Bounded text from untrusted bytes. Every value the agent keeps from the wire or from
//! another process is cut at a limit, and a cut must fall on a character boundary:
//! slicing a `&str` inside a multi-byte character panics.

/// The longest prefix of `s` that is at most `max` bytes and ends on a character boundary.
pub fn cut(s: &str, max: usize) -> &str {
    // floor_char_boundary never returns more than s.len(), and always a boundary.
    &s[..s.floor_char_boundary(max)]
}

/// At most `max` bytes of `b` as text: invalid UTF-8 becomes U+FFFD, and the result is
/// cut on a character boundary to at most `max` bytes.
pub fn lossy(b: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(&b[..b.len().min(max)]);
    cut(&text, max).to_owned()
}

/// Text another process wrote (an exception message of the app's own code) made fit for
/// a log line: at most `max` bytes of it, with control characters escaped so that it can
/// neither forge log lines nor drive the operator's terminal.
pub fn printable(s: &str, max: usize) -> String {
    let mut out = String::new();
    for c in s.chars() {
        let start = out.len();
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
        if out.len() > max {
            out.truncate(start);
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn cuts_fall_on_character_boundaries() {
        assert_eq!(cut("aé", 2), "a");
        assert_eq!(cut("aé", 3), "aé");
        assert_eq!(cut("aé", 99), "aé");
        assert_eq!(cut("€", 0), "");
        assert_eq!(lossy(b"a\xc3\xa9", 2), "a");
        assert_eq!(lossy(b"a\xc3\xa9", 3), "aé");
        assert_eq!(lossy(b"\xff\xfe", 10), "\u{fffd}\u{fffd}");
        assert_eq!(lossy(b"\xff\xfe", 4), "\u{fffd}");
    }

    #[test]
    fn printable_escapes_controls_and_stays_bounded() {
        assert_eq!(printable("a\nb\x1b[2Jé", 99), "a\\nb\\u{1b}[2Jé");
        assert_eq!(printable("abcé", 4), "abc");
        assert_eq!(printable("ab\n", 3), "ab");
        assert!(printable(&"\u{7}".repeat(1000), 512).len() <= 512);
    }

    proptest! {
        #[test]
        fn any_bytes_and_any_limit(b in proptest::collection::vec(any::<u8>(), 0..64), max in 0usize..80) {
            let l = lossy(&b, max);
            prop_assert!(l.len() <= max);
            let s = String::from_utf8_lossy(&b);
            let c = cut(&s, max);
            prop_assert!(c.len() <= max && s.starts_with(c));
            prop_assert!(c.len() + 4 > max.min(s.len()), "at most one character short");
        }
    }
}
