//! A statement's shape: its SQL with every literal, parameter and value list replaced, so
//! that the 30 queries of an N+1 loop (`... WHERE "id" = 1`, `= 2`, ...) are one shape.
//! Shapes are counted per request to find N+1 loops; their text is shown only by
//! `observer top`, on the node, never exported or logged.

/// Longest normalised text kept.
pub const MAX_SHAPE: usize = 512;

/// The normalised text of `sql` (which may be cut short): string and numeric literals,
/// `$n` parameters and `%s`-style placeholders become `?`, a parenthesised list of only
/// those becomes `(...)`, runs of such lists (`VALUES (...), (...)`) become one, comments
/// go and whitespace runs become one space.
pub fn normalise(sql: &[u8]) -> String {
    let mut out = Vec::with_capacity(sql.len().min(MAX_SHAPE));
    normalise_into(sql, &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The fingerprint of `sql`'s shape, normalised in `scratch` (reused from call to call:
/// no allocation once it has grown). Equal to `fingerprint(normalise(sql).as_bytes())`
/// for UTF-8 text.
pub fn fingerprint_of(sql: &[u8], scratch: &mut Vec<u8>) -> u64 {
    normalise_into(sql, scratch);
    fingerprint(scratch)
}

/// `normalise` into `out` (cleared first), at most MAX_SHAPE bytes.
pub fn normalise_into(sql: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let mut i = 0;
    let push_space = |out: &mut Vec<u8>| {
        if out.last().is_some_and(|&c| c != b' ' && c != b'(') {
            out.push(b' ');
        }
    };
    while i < sql.len() && out.len() < MAX_SHAPE {
        let c = sql[i];
        match c {
            b'\'' => {
                i = skip_string(sql, i + 1);
                out.push(b'?');
            }
            b'E' | b'e' if sql.get(i + 1) == Some(&b'\'') && !ident_before(out) => {
                i = skip_string(sql, i + 2);
                out.push(b'?');
            }
            b'"' => {
                // A quoted identifier: kept as written.
                let end = sql[i + 1..].iter().position(|&q| q == b'"').map_or(sql.len(), |p| i + 2 + p);
                out.extend_from_slice(&sql[i..end.min(sql.len())]);
                i = end;
            }
            b'$' if sql.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                i += 1;
                while sql.get(i).is_some_and(u8::is_ascii_digit) {
                    i += 1;
                }
                out.push(b'?');
            }
            b'%' if sql.get(i + 1) == Some(&b's') => {
                i += 2;
                out.push(b'?');
            }
            b'0'..=b'9' if !ident_before(out) => {
                while sql.get(i).is_some_and(|d| d.is_ascii_alphanumeric() || *d == b'.') {
                    i += 1;
                }
                out.push(b'?');
            }
            b'-' if sql.get(i + 1) == Some(&b'-') => {
                i = sql[i..].iter().position(|&n| n == b'\n').map_or(sql.len(), |p| i + p + 1);
                push_space(out);
            }
            b'/' if sql.get(i + 1) == Some(&b'*') => {
                i = sql[i + 2..].windows(2).position(|w| w == b"*/").map_or(sql.len(), |p| i + 2 + p + 2);
                push_space(out);
            }
            c if c.is_ascii_whitespace() => {
                i += 1;
                push_space(out);
            }
            b')' => {
                if out.last() == Some(&b' ') {
                    out.pop();
                }
                out.push(b')');
                i += 1;
                collapse_list(out);
            }
            b',' => {
                if out.last() == Some(&b' ') {
                    out.pop();
                }
                out.extend_from_slice(b", ");
                i += 1;
                while sql.get(i).is_some_and(u8::is_ascii_whitespace) {
                    i += 1;
                }
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    out.truncate(MAX_SHAPE);
    while out.last() == Some(&b' ') {
        out.pop();
    }
}

/// The shape's identity: a hash of the normalised text (FNV-1a, stable across runs).
pub fn fingerprint(normalised: &[u8]) -> u64 {
    normalised
        .iter()
        .copied()
        .fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// After a string's opening quote: the index past its closing one (`''` is a quote).
fn skip_string(sql: &[u8], mut i: usize) -> usize {
    while i < sql.len() {
        if sql[i] == b'\'' {
            if sql.get(i + 1) == Some(&b'\'') {
                i += 2;
                continue;
            }
            return i + 1;
        }
        i += 1;
    }
    sql.len()
}

/// Whether the output ends inside an identifier (so a digit or `E'` belongs to it).
fn ident_before(out: &[u8]) -> bool {
    out.last().is_some_and(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'$')
}

/// `(?, ?, ?)` just closed: becomes `(...)`; and `(...), (...)` becomes `(...)`.
fn collapse_list(out: &mut Vec<u8>) {
    let Some(open) = out.iter().rposition(|&c| c == b'(') else { return };
    let inner = &out[open + 1..out.len() - 1];
    let only_values = !inner.is_empty() && inner.iter().all(|&c| matches!(c, b'?' | b',' | b' ' | b'.'));
    if only_values || inner == b"..." {
        out.truncate(open);
        out.extend_from_slice(b"(...)");
        if out.ends_with(b"(...), (...)") {
            out.truncate(out.len() - b", (...)".len());
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn literals_and_parameters_become_placeholders() {
        let a = normalise(br#"SELECT "shop_item"."id", "shop_item"."name" FROM "shop_item" WHERE "shop_item"."id" = 3 LIMIT 21"#);
        let b = normalise(br#"SELECT "shop_item"."id", "shop_item"."name" FROM "shop_item" WHERE "shop_item"."id" = 117 LIMIT 21"#);
        assert_eq!(a, b);
        assert_eq!(
            a,
            r#"SELECT "shop_item"."id", "shop_item"."name" FROM "shop_item" WHERE "shop_item"."id" = ? LIMIT ?"#
        );
        assert_eq!(
            normalise(b"SELECT * FROM t WHERE name = 'it''s' AND x = $1"),
            "SELECT * FROM t WHERE name = ? AND x = ?"
        );
        assert_eq!(normalise(b"select e'\\n', col1, t2.c3 from t2"), "select ?, col1, t2.c3 from t2");
        assert_eq!(normalise(b"SELECT 1.5e3, -2"), "SELECT ?, -?");
    }

    #[test]
    fn in_lists_and_value_rows_collapse() {
        let one = normalise(b"SELECT * FROM t WHERE id IN (1)");
        let many = normalise(b"SELECT * FROM t WHERE id IN (1, 2, 3,4)");
        assert_eq!(one, "SELECT * FROM t WHERE id IN (...)");
        assert_eq!(one, many);
        assert_eq!(
            normalise(b"INSERT INTO \"t\" (\"a\", \"b\") VALUES ('x', 1), ('y', 2), ('z', 3) RETURNING \"t\".\"id\""),
            "INSERT INTO \"t\" (\"a\", \"b\") VALUES (...) RETURNING \"t\".\"id\""
        );
        // Column lists stay.
        assert_eq!(normalise(b"SELECT count(*) FROM t"), "SELECT count(*) FROM t");
    }

    #[test]
    fn comments_and_whitespace_go() {
        assert_eq!(
            normalise(b"SELECT  a\n\t FROM t -- note 42\nWHERE b = 7 /* c 9 */"),
            "SELECT a FROM t WHERE b = ?"
        );
    }

    #[test]
    fn fingerprints_tell_shapes_apart() {
        let f = |s: &[u8]| fingerprint(normalise(s).as_bytes());
        assert_eq!(f(b"SELECT a FROM t WHERE id = 1"), f(b"SELECT a FROM t WHERE id = 2"));
        assert_ne!(f(b"SELECT a FROM t WHERE id = 1"), f(b"SELECT a FROM u WHERE id = 1"));
    }

    proptest! {
        /// Any bytes: bounded output, and literals never survive.
        #[test]
        fn bounded_and_literal_free(sql in proptest::collection::vec(any::<u8>(), 0..2048), n in 0u32..1_000_000) {
            let s = normalise(&sql);
            // Lossy UTF-8 may widen invalid bytes: bounded by three per byte kept.
            prop_assert!(s.len() <= 3 * MAX_SHAPE);
            let mut scratch = Vec::new();
            prop_assert_eq!(fingerprint_of(&sql, &mut scratch), fingerprint(&scratch));
            let q = normalise(format!("SELECT a FROM t WHERE x = {n} AND y = 'v{n}'").as_bytes());
            prop_assert_eq!(q, "SELECT a FROM t WHERE x = ? AND y = ?");
        }
    }
}
