//! SQLSTATE to the psycopg 3 exception class name, the `type` label django-prometheus
//! gives `django_db_errors_total` on PostgreSQL (it counts the driver's exception class).
//!
//! The table is built from PostgreSQL's own `errcodes.txt` (PostgreSQL 15, verbatim) plus
//! the codes later releases added, with psycopg's naming rule (`tools/update_errors.py`:
//! the spec name title-cased without underscores, a few renamed). A code psycopg does not
//! know falls back to the class-level exception exactly as psycopg's
//! `get_base_exception` does: by the first two characters, then the first one, else
//! `DatabaseError`.

use std::{collections::HashMap, sync::LazyLock};

/// PostgreSQL 15's `src/backend/utils/errcodes.txt`.
const ERRCODES: &str = include_str!("errcodes.txt");

/// Codes added after PostgreSQL 15, in errcodes.txt's format.
const LATER: &str = "
Section: Class 10 - XQuery Error
10608    E    ERRCODE_INVALID_ARGUMENT_FOR_XQUERY                            invalid_argument_for_xquery
Section: Class 25 - Invalid Transaction State
25P04    E    ERRCODE_TRANSACTION_TIMEOUT                                    transaction_timeout
Section: Class 58 - System Error (errors external to PostgreSQL itself)
58P03    E    ERRCODE_FILE_NAME_TOO_LONG                                     file_name_too_long
";

/// psycopg's renames (names that would clash with DB-API classes or each other).
const SPECIFIC: [(&str, &str); 5] = [
    ("38002", "ModifyingSqlDataNotPermittedExt"),
    ("38003", "ProhibitedSqlStatementAttemptedExt"),
    ("38004", "ReadingSqlDataNotPermittedExt"),
    ("39004", "NullValueNotAllowedExt"),
    ("XX000", "InternalError_"),
];

/// psycopg's `_base_exc_map`: class code (two characters, or one) to DB-API class.
const BASE: [(&str, &str); 33] = [
    ("08", "OperationalError"),
    ("0A", "NotSupportedError"),
    ("10", "ProgrammingError"),
    ("20", "ProgrammingError"),
    ("21", "ProgrammingError"),
    ("22", "DataError"),
    ("23", "IntegrityError"),
    ("24", "InternalError"),
    ("25", "InternalError"),
    ("26", "ProgrammingError"),
    ("27", "OperationalError"),
    ("28", "OperationalError"),
    ("2B", "InternalError"),
    ("2D", "InternalError"),
    ("2F", "OperationalError"),
    ("34", "ProgrammingError"),
    ("38", "OperationalError"),
    ("39", "OperationalError"),
    ("3B", "OperationalError"),
    ("3D", "ProgrammingError"),
    ("3F", "ProgrammingError"),
    ("40", "OperationalError"),
    ("42", "ProgrammingError"),
    ("44", "ProgrammingError"),
    ("53", "OperationalError"),
    ("54", "OperationalError"),
    ("55", "OperationalError"),
    ("57", "OperationalError"),
    ("58", "OperationalError"),
    ("F", "OperationalError"),
    ("H", "OperationalError"),
    ("P", "ProgrammingError"),
    ("X", "InternalError"),
];

/// The class psycopg raises when there is no SQLSTATE (the connection broke).
pub const NO_SQLSTATE: &str = "OperationalError";

/// A five-character SQLSTATE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SqlState(pub [u8; 5]);

impl SqlState {
    pub fn parse(b: &[u8]) -> Option<Self> {
        let a: [u8; 5] = b.try_into().ok()?;
        a.iter().all(u8::is_ascii_alphanumeric).then_some(Self(a))
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("?????")
    }

    /// The psycopg 3 exception class name for this code.
    pub fn class_name(&self) -> &'static str {
        let code = self.as_str().to_ascii_uppercase();
        if let Some(name) = TABLE.get(code.as_str()) {
            return name;
        }
        base_exception(&code)
    }
}

/// psycopg's `get_base_exception`.
fn base_exception(code: &str) -> &'static str {
    let lookup = |k: &str| BASE.iter().find(|(c, _)| *c == k).map(|(_, n)| *n);
    code.get(..2).and_then(lookup).or_else(|| code.get(..1).and_then(lookup)).unwrap_or("DatabaseError")
}

/// Python's `str.title()` on ASCII: a letter is upper-cased after a non-letter and
/// lower-cased after a letter.
fn title(s: &str) -> String {
    let mut prev_cased = false;
    s.chars()
        .map(|c| {
            let out = if prev_cased { c.to_ascii_lowercase() } else { c.to_ascii_uppercase() };
            prev_cased = c.is_ascii_alphabetic();
            out
        })
        .collect()
}

/// Parses errcodes.txt lines into (sqlstate, class name), psycopg's way: success and
/// warning classes and codes without a spec name are left out; a later line wins.
fn parse(text: &str, out: &mut HashMap<&'static str, &'static str>) {
    let mut class: Option<String> = None;
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("Section: Class ") {
            class = rest.get(..2).map(str::to_string);
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let [code, _, macro_, spec] = f[..] else { continue };
        if !macro_.starts_with("ERRCODE_") || code.len() != 5 {
            continue;
        }
        if matches!(class.as_deref(), Some("00" | "01")) {
            continue;
        }
        let name = SPECIFIC
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, n)| (*n).to_string())
            .unwrap_or_else(|| title(&spec.to_ascii_uppercase()).replace('_', ""));
        out.insert(leak(code), leak(&name));
    }
}

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_string().into_boxed_str())
}

static TABLE: LazyLock<HashMap<&'static str, &'static str>> = LazyLock::new(|| {
    let mut m = HashMap::new();
    parse(ERRCODES, &mut m);
    parse(LATER, &mut m);
    m
});

/// Every (SQLSTATE, class name) known, for cross-checks against the installed psycopg.
pub fn table() -> Vec<(&'static str, &'static str)> {
    let mut v: Vec<_> = TABLE.iter().map(|(k, v)| (*k, *v)).collect();
    v.sort_unstable();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(code: &str) -> &'static str {
        SqlState::parse(code.as_bytes()).unwrap().class_name()
    }

    #[test]
    fn the_classes_django_apps_meet() {
        assert_eq!(name("23505"), "UniqueViolation");
        assert_eq!(name("42P01"), "UndefinedTable");
        assert_eq!(name("57014"), "QueryCanceled");
        assert_eq!(name("23503"), "ForeignKeyViolation");
        assert_eq!(name("40001"), "SerializationFailure");
        assert_eq!(name("40P01"), "DeadlockDetected");
        assert_eq!(name("28P01"), "InvalidPassword");
        assert_eq!(name("42601"), "SyntaxError");
        assert_eq!(name("22P02"), "InvalidTextRepresentation");
        assert_eq!(name("25P02"), "InFailedSqlTransaction");
        assert_eq!(name("57P01"), "AdminShutdown");
        assert_eq!(name("25P04"), "TransactionTimeout");
    }

    #[test]
    fn psycopg_renames_and_title_case_rules() {
        assert_eq!(name("XX000"), "InternalError_");
        assert_eq!(name("39004"), "NullValueNotAllowedExt");
        assert_eq!(name("22004"), "NullValueNotAllowed");
        // 2202E has two lines; the one with a spec name wins.
        assert_eq!(name("2202E"), "ArraySubscriptError");
        assert_eq!(name("08001"), "SqlclientUnableToEstablishSqlconnection");
        assert_eq!(name("2201E"), "InvalidArgumentForLogarithm");
        assert_eq!(name("0Z002"), "StackedDiagnosticsAccessedWithoutActiveHandler");
    }

    #[test]
    fn unknown_codes_fall_back_like_psycopg() {
        assert_eq!(name("23999"), "IntegrityError");
        assert_eq!(name("42ZZZ"), "ProgrammingError");
        assert_eq!(name("F0999"), "OperationalError");
        assert_eq!(name("P0999"), "ProgrammingError");
        assert_eq!(name("XX999"), "InternalError");
        assert_eq!(name("99999"), "DatabaseError");
        assert_eq!(name("0A999"), "NotSupportedError");
    }

    #[test]
    fn warnings_and_success_are_not_errors() {
        assert!(!TABLE.contains_key("00000"));
        assert!(!TABLE.contains_key("01000"));
        // 02 (no data) is a warning class per the standard, but psycopg keeps it.
        assert_eq!(name("02000"), "NoData");
    }

    #[test]
    fn table_size_matches_psycopg_3_3() {
        // psycopg 3.3.9 knows 254 SQLSTATEs (checked end to end against the installed
        // package by the tests/ crate).
        assert_eq!(TABLE.len(), 254);
    }

    #[test]
    fn parse_rejects_non_codes() {
        assert!(SqlState::parse(b"2350").is_none());
        assert!(SqlState::parse(b"23-05").is_none());
        assert_eq!(SqlState::parse(b"23505").unwrap().as_str(), "23505");
    }
}
