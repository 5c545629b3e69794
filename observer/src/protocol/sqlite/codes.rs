//! SQLite result codes as the exception class Python's `sqlite3` module raises for them
//! (CPython `Modules/_sqlite/util.c`, `get_exception_class`): the class is chosen from
//! the primary code (`sqlite3_errcode`, the low byte of the extended code), and is what
//! django-prometheus's `ExceptionCounterByType` labels `django_db_errors_total` with.

const SQLITE_ERROR: i64 = 1;
const SQLITE_INTERNAL: i64 = 2;
const SQLITE_PERM: i64 = 3;
const SQLITE_ABORT: i64 = 4;
const SQLITE_BUSY: i64 = 5;
const SQLITE_LOCKED: i64 = 6;
const SQLITE_NOMEM: i64 = 7;
const SQLITE_READONLY: i64 = 8;
const SQLITE_INTERRUPT: i64 = 9;
const SQLITE_IOERR: i64 = 10;
const SQLITE_CORRUPT: i64 = 11;
const SQLITE_NOTFOUND: i64 = 12;
const SQLITE_FULL: i64 = 13;
const SQLITE_CANTOPEN: i64 = 14;
const SQLITE_PROTOCOL: i64 = 15;
const SQLITE_EMPTY: i64 = 16;
const SQLITE_SCHEMA: i64 = 17;
const SQLITE_TOOBIG: i64 = 18;
const SQLITE_CONSTRAINT: i64 = 19;
const SQLITE_MISMATCH: i64 = 20;
const SQLITE_MISUSE: i64 = 21;
const SQLITE_RANGE: i64 = 25;

/// The class Python raises for an (extended) result code; None for success codes
/// (no exception: `SQLITE_OK`, `SQLITE_ROW`, `SQLITE_DONE`).
pub fn exception_class(code: i64) -> Option<&'static str> {
    let primary = code & 0xff;
    Some(match primary {
        0 | 100 | 101 => return None,
        SQLITE_INTERNAL | SQLITE_NOTFOUND => "InternalError",
        SQLITE_NOMEM => "MemoryError",
        SQLITE_ERROR | SQLITE_PERM | SQLITE_ABORT | SQLITE_BUSY | SQLITE_LOCKED | SQLITE_READONLY
        | SQLITE_INTERRUPT | SQLITE_IOERR | SQLITE_FULL | SQLITE_CANTOPEN | SQLITE_PROTOCOL
        | SQLITE_EMPTY | SQLITE_SCHEMA => "OperationalError",
        SQLITE_CORRUPT => "DatabaseError",
        SQLITE_TOOBIG => "DataError",
        SQLITE_CONSTRAINT | SQLITE_MISMATCH => "IntegrityError",
        SQLITE_MISUSE | SQLITE_RANGE => "InterfaceError",
        _ => "DatabaseError",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extended_codes_map_by_their_primary_code() {
        // SQLITE_CONSTRAINT_UNIQUE, _NOTNULL, _FOREIGNKEY, _PRIMARYKEY.
        for c in [2067, 1299, 787, 1555] {
            assert_eq!(exception_class(c), Some("IntegrityError"), "{c}");
        }
        // A syntax error or a missing table at prepare; SQLITE_BUSY_SNAPSHOT; IOERR_READ.
        for c in [1, 517, 266, 5, 14] {
            assert_eq!(exception_class(c), Some("OperationalError"), "{c}");
        }
        assert_eq!(exception_class(11), Some("DatabaseError"));
        assert_eq!(exception_class(18), Some("DataError"));
        assert_eq!(exception_class(25), Some("InterfaceError"));
        assert_eq!(exception_class(7), Some("MemoryError"));
        assert_eq!(exception_class(2), Some("InternalError"));
        assert_eq!(exception_class(26), Some("DatabaseError"), "SQLITE_NOTADB: the default");
        assert_eq!((exception_class(0), exception_class(100), exception_class(101)), (None, None, None));
    }
}
