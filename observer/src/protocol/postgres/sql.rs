//! What a statement is, from the head of its SQL text: enough to tell the statements
//! django-prometheus counts from those it cannot see, and which model table a write
//! touches. Never more than the first keywords and one identifier are looked at; the
//! text itself is never kept or exported.

/// A write on one table (the unqualified table name, as Django quotes it).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableWrite {
    pub op: WriteOp,
    pub table: Box<str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WriteOp {
    Insert,
    Update,
    Delete,
}

impl WriteOp {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Insert => "insert",
            Self::Update => "update",
            Self::Delete => "delete",
        }
    }
}

/// The kinds of statements that matter for counting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// BEGIN/COMMIT/ROLLBACK as psycopg sends them for `connection.commit()` and friends:
    /// not a cursor `execute()`, so django-prometheus never counts them. (Savepoints,
    /// which Django runs through a cursor, are counted.)
    TxControl,
    /// DECLARE/FETCH/MOVE/CLOSE of a Django server-side cursor (`QuerySet.iterator()`):
    /// psycopg runs them on a cursor class django-prometheus does not wrap.
    ServerCursor,
    /// INSERT/UPDATE/DELETE on a table.
    Write(TableWrite),
    /// Anything else the app executes.
    Other,
}

/// Skips whitespace and SQL comments.
fn skip_blank(mut s: &[u8]) -> &[u8] {
    loop {
        let t = s.trim_ascii_start();
        if let Some(rest) = t.strip_prefix(b"--") {
            s = rest.iter().position(|&c| c == b'\n').map_or(&[][..], |i| &rest[i + 1..]);
        } else if let Some(rest) = t.strip_prefix(b"/*") {
            s = rest.windows(2).position(|w| w == b"*/").map_or(&[][..], |i| &rest[i + 2..]);
        } else {
            return t;
        }
    }
}

/// The next keyword (letters and underscores), upper-cased into `buf`, and the rest.
fn keyword<'a>(s: &'a [u8], buf: &mut [u8; 16]) -> Option<(usize, &'a [u8])> {
    let s = skip_blank(s);
    let n = s.iter().take_while(|c| c.is_ascii_alphabetic() || **c == b'_').count();
    if n == 0 || n > buf.len() {
        return None;
    }
    for (d, c) in buf.iter_mut().zip(&s[..n]) {
        *d = c.to_ascii_uppercase();
    }
    Some((n, &s[n..]))
}

/// Consumes `word` (case-insensitive) if it comes next.
fn eat<'a>(s: &'a [u8], word: &[u8]) -> Option<&'a [u8]> {
    let mut buf = [0u8; 16];
    let (n, rest) = keyword(s, &mut buf)?;
    (buf[..n] == *word).then_some(rest)
}

/// One identifier, quoted (`"a""b"`) or not; returns it and the rest.
fn identifier(s: &[u8]) -> Option<(Vec<u8>, &[u8])> {
    let s = skip_blank(s);
    if let Some(mut rest) = s.strip_prefix(b"\"") {
        let mut out = Vec::new();
        loop {
            let i = rest.iter().position(|&c| c == b'"')?;
            out.extend_from_slice(&rest[..i]);
            rest = &rest[i + 1..];
            match rest.strip_prefix(b"\"") {
                Some(r) => {
                    out.push(b'"');
                    rest = r;
                }
                None => return Some((out, rest)),
            }
        }
    }
    let n = s.iter().take_while(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'$')).count();
    if n == 0 || s[0].is_ascii_digit() {
        return None;
    }
    // Unquoted identifiers fold to lower case.
    Some((s[..n].to_ascii_lowercase(), &s[n..]))
}

/// A possibly schema-qualified table name; returns the last part.
fn table_name(s: &[u8]) -> Option<Box<str>> {
    let (mut name, mut rest) = identifier(s)?;
    while let Some(r) = rest.strip_prefix(b".") {
        let (n, r2) = identifier(r)?;
        name = n;
        rest = r2;
    }
    // PostgreSQL truncates identifiers to 63 bytes; a longer one is not a table name.
    if name.is_empty() || name.len() > 63 {
        return None;
    }
    String::from_utf8(name).ok().map(String::into_boxed_str)
}

fn write(op: WriteOp, s: &[u8]) -> Kind {
    let s = eat(s, b"ONLY").unwrap_or(s);
    table_name(s).map_or(Kind::Other, |table| Kind::Write(TableWrite { op, table }))
}

/// Classifies a statement from the head of its text (it may be cut short).
pub fn classify(head: &[u8]) -> Kind {
    let mut buf = [0u8; 16];
    let Some((n, rest)) = keyword(head, &mut buf) else { return Kind::Other };
    match &buf[..n] {
        // psycopg's own transaction commands: exactly these shapes.
        b"BEGIN" => Kind::TxControl,
        b"COMMIT" | b"ROLLBACK" if skip_blank(rest).iter().all(|&c| c == b';' || c.is_ascii_whitespace()) => {
            Kind::TxControl
        }
        b"DECLARE" | b"FETCH" | b"MOVE" | b"CLOSE" if contains(head, b"\"_django_curs_") => {
            Kind::ServerCursor
        }
        b"INSERT" => eat(rest, b"INTO").map_or(Kind::Other, |r| write(WriteOp::Insert, r)),
        b"UPDATE" => write(WriteOp::Update, rest),
        b"DELETE" => eat(rest, b"FROM").map_or(Kind::Other, |r| write(WriteOp::Delete, r)),
        _ => Kind::Other,
    }
}

/// The query a Django server-side cursor's DECLARE runs (`DECLARE "_django_curs_..." ...
/// CURSOR ... FOR <query>`), when the text is one.
pub fn declared_query(text: &[u8]) -> Option<&[u8]> {
    let mut buf = [0u8; 16];
    let (n, _) = keyword(text, &mut buf)?;
    if &buf[..n] != b"DECLARE" || !contains(text, b"\"_django_curs_") {
        return None;
    }
    // The cursor's name is Django's (no " FOR " in it): the first " FOR " after it ends
    // the declaration.
    const NAME: &[u8] = b"\"_django_curs_";
    let name_end = text.windows(NAME.len()).position(|w| w == NAME)? + NAME.len();
    let after = &text[name_end..];
    let at = after.windows(5).position(|w| w.eq_ignore_ascii_case(b" FOR "))?;
    Some(skip_blank(&after[at + 5..]))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn w(op: WriteOp, t: &str) -> Kind {
        Kind::Write(TableWrite { op, table: t.into() })
    }

    #[test]
    fn django_orm_writes() {
        assert_eq!(
            classify(b"INSERT INTO \"shop_item\" (\"name\", \"price\") VALUES ('a', 1) RETURNING \"shop_item\".\"id\""),
            w(WriteOp::Insert, "shop_item")
        );
        assert_eq!(
            classify(b"UPDATE \"shop_item\" SET \"price\" = 4 WHERE \"shop_item\".\"price\" = 3"),
            w(WriteOp::Update, "shop_item")
        );
        assert_eq!(
            classify(b"DELETE FROM \"shop_item\" WHERE \"shop_item\".\"id\" IN (18)"),
            w(WriteOp::Delete, "shop_item")
        );
        assert_eq!(classify(b"insert into shop_item (name) values ('x')"), w(WriteOp::Insert, "shop_item"));
        assert_eq!(classify(b"  /* c */ -- x\n UPDATE ONLY public.\"T\" SET a=1"), w(WriteOp::Update, "T"));
        assert_eq!(classify(b"INSERT INTO \"we\"\"ird\" VALUES (1)"), w(WriteOp::Insert, "we\"ird"));
        assert_eq!(classify(b"DELETE FROM Shop_Item"), w(WriteOp::Delete, "shop_item"));
    }

    #[test]
    fn transaction_control_is_psycopgs_own() {
        assert_eq!(classify(b"BEGIN"), Kind::TxControl);
        assert_eq!(classify(b"BEGIN ISOLATION LEVEL SERIALIZABLE"), Kind::TxControl);
        assert_eq!(classify(b"COMMIT"), Kind::TxControl);
        assert_eq!(classify(b"ROLLBACK"), Kind::TxControl);
        // Savepoints go through a cursor: counted.
        assert_eq!(classify(b"SAVEPOINT \"s1_x1\""), Kind::Other);
        assert_eq!(classify(b"ROLLBACK TO SAVEPOINT \"s1_x1\""), Kind::Other);
        assert_eq!(classify(b"RELEASE SAVEPOINT \"s1_x1\""), Kind::Other);
    }

    #[test]
    fn django_server_side_cursors() {
        assert_eq!(
            classify(b"DECLARE \"_django_curs_140_sync_1\" NO SCROLL CURSOR WITHOUT HOLD FOR SELECT 1"),
            Kind::ServerCursor
        );
        assert_eq!(classify(b"FETCH FORWARD 2000 FROM \"_django_curs_140_sync_1\""), Kind::ServerCursor);
        assert_eq!(classify(b"CLOSE \"_django_curs_140_sync_1\""), Kind::ServerCursor);
        assert_eq!(classify(b"CLOSE \"mine\""), Kind::Other);
        let declare =
            b"DECLARE \"_django_curs_140_sync_1\" NO SCROLL CURSOR WITHOUT HOLD FOR  SELECT \"a\" FROM t";
        assert_eq!(declared_query(declare), Some(&b"SELECT \"a\" FROM t"[..]));
        assert_eq!(
            declared_query(b"declare \"_django_curs_1_sync_2\" cursor for select 1"),
            Some(&b"select 1"[..])
        );
        assert_eq!(declared_query(b"DECLARE \"mine\" CURSOR FOR SELECT 1"), None);
        assert_eq!(declared_query(b"FETCH FORWARD 2000 FROM \"_django_curs_140_sync_1\""), None);
        assert_eq!(declared_query(b"DECLARE \"_django_curs_140_sync_1\" NO SCROLL CURS"), None, "cut short");
    }

    #[test]
    fn others_and_cut_text() {
        assert_eq!(classify(b"SELECT 1"), Kind::Other);
        assert_eq!(classify(b"WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x"), Kind::Other);
        assert_eq!(classify(b"INSERT INTO \"shop_it"), Kind::Other);
        assert_eq!(classify(b"INSERT"), Kind::Other);
        assert_eq!(classify(b""), Kind::Other);
        assert_eq!(classify(b"/* unterminated"), Kind::Other);
        assert_eq!(classify(b"INSERT INTO 123 VALUES (1)"), Kind::Other);
    }

    proptest! {
        #[test]
        fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = classify(&b);
        }

        #[test]
        fn table_names_round_trip(t in "[a-z_][a-z0-9_]{0,40}") {
            let q = format!("INSERT INTO \"{t}\" VALUES (1)");
            prop_assert_eq!(classify(q.as_bytes()), w(WriteOp::Insert, &t));
        }
    }
}
