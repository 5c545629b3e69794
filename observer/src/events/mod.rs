//! Ring-buffer records to typed values.
//!
//! [`decode`] is a pure function over the bytes of one ring-buffer item: it checks the
//! length against the kind, checks `cap_len <= total_len` and that the captured bytes are
//! all there, and never panics (fuzzed in `observer/fuzz`). The kernel ABI lives in
//! `observer_ebpf`; this module is the only place that reads it.

mod sockaddr;

use std::mem::size_of;

use observer_ebpf::{
    ConnFd, ConnOpen, DIR_RECV, DIR_SEND, DataHeader, FLAG_CIPHERTEXT, FLAG_FAULT, FLAG_NO_CAPTURE,
    FLAG_NO_SEQ, FLAG_TRUNCATED, FdEpoch, ProcEvent, ROLE_CLIENT, ROLE_SERVER, RecordKind, SOCKADDR_BYTES,
    Syscall,
};
pub use sockaddr::SockAddr;

/// A decoded record. Borrowed from the ring-buffer item it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    Data(Data<'a>),
    ConnOpen(Open),
    /// A `connect` that failed at once; the socket is not traced.
    ConnFailed(Failed),
    ConnClose(FdEvent),
    ConnDup(FdEvent),
    FdEpoch(Epoch),
    ProcFork {
        pid: u32,
        parent: u32,
        ts_ns: u64,
    },
    ProcExec {
        pid: u32,
        tracked: bool,
        epoch: u32,
        ts_ns: u64,
    },
    ProcExit {
        pid: u32,
        ts_ns: u64,
    },
    /// The process mapped a file executable (a library it may have just loaded).
    ProcMap {
        pid: u32,
        ts_ns: u64,
    },
    /// A call into the process's SQLite library.
    Sqlite(SqliteCall<'a>),
}

/// Which SQLite call (see `observer_ebpf::sqlite_op`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqliteOp {
    Open,
    Prepare,
    Bind,
    Readonly,
    Changes,
    LastRowid,
    Errcode,
    Finalize,
    Close,
}

impl SqliteOp {
    fn from_u8(v: u8) -> Option<Self> {
        use observer_ebpf::sqlite_op as o;
        Some(match v {
            o::OPEN => Self::Open,
            o::PREPARE => Self::Prepare,
            o::BIND => Self::Bind,
            o::READONLY => Self::Readonly,
            o::CHANGES => Self::Changes,
            o::LAST_ROWID => Self::LastRowid,
            o::ERRCODE => Self::Errcode,
            o::FINALIZE => Self::Finalize,
            o::CLOSE => Self::Close,
            _ => return None,
        })
    }
}

/// One SQLite call of a tracked process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteCall<'a> {
    pub enter_ns: u64,
    pub exit_ns: u64,
    pub tgid: u32,
    pub tid: u32,
    pub op: SqliteOp,
    /// The `sqlite3*` or `sqlite3_stmt*` the call is about.
    pub handle: u64,
    /// The connection of a prepared statement.
    pub arg: u64,
    /// The result code of `open`/`prepare`, the error code `extended_errcode` returned.
    pub ret: i64,
    /// The file name (`open`) or the SQL text (`prepare`), as captured.
    pub text: &'a [u8],
    /// `text` is only a prefix.
    pub truncated: bool,
}

/// Direction of bytes, from the traced process's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Recv,
    Send,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Recv => "recv",
            Self::Send => "send",
        }
    }
}

/// Who opened the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// The traced process accepted it.
    Server,
    /// The traced process connected it.
    Client,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Server => "server",
            Self::Client => "client",
        }
    }
}

/// One successful data syscall.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Data<'a> {
    pub enter_ns: u64,
    pub exit_ns: u64,
    pub tgid: u32,
    pub tid: u32,
    pub fd: u32,
    pub conn_id: u64,
    pub syscall: Syscall,
    pub dir: Direction,
    /// What the syscall moved (its return value).
    pub total_len: u64,
    /// The captured prefix; shorter than `total_len` when truncated or not captured.
    pub bytes: &'a [u8],
    /// Reading the user buffer faulted.
    pub fault: bool,
    /// A counted-only syscall (sendfile, sendmmsg, recvmmsg).
    pub no_capture: bool,
    /// A socket syscall inside an `SSL_*` call: TLS records, not captured (the
    /// plaintext comes as [`Syscall::SslRead`]/[`Syscall::SslWrite`] records).
    pub ciphertext: bool,
    /// Position of this record in its (tgid, fd)'s sequence of data records, lost ones
    /// included; `None` when the fd was closed before the syscall returned.
    pub seq: Option<u32>,
}

impl Data<'_> {
    /// The capture holds only a prefix of what was moved (counted-only syscalls capture
    /// nothing by design and are not "truncated").
    pub fn truncated(&self) -> bool {
        !self.no_capture && (self.bytes.len() as u64) < self.total_len
    }
}

/// A new traced connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    pub ts_ns: u64,
    pub tgid: u32,
    pub tid: u32,
    pub fd: u32,
    pub conn_id: u64,
    pub role: Role,
    /// `connect` returned EINPROGRESS.
    pub in_progress: bool,
    /// The peer's address, from the socket (or the syscall's arguments).
    pub peer: Option<SockAddr>,
    /// The local address, from the socket.
    pub local: Option<SockAddr>,
    /// For an accepted connection, the listening socket's fd.
    pub listen_fd: Option<u32>,
}

/// A `connect` that failed at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed {
    pub ts_ns: u64,
    pub tgid: u32,
    pub tid: u32,
    pub fd: u32,
    /// The errno (ECONNREFUSED, ENOENT, ...).
    pub errno: u16,
    /// Where it tried to connect, as the syscall's argument had it.
    pub peer: Option<SockAddr>,
}

/// An fd of a connection closed (ConnClose) or added (ConnDup).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdEvent {
    pub ts_ns: u64,
    pub tgid: u32,
    pub tid: u32,
    pub fd: u32,
    pub conn_id: u64,
}

/// close_range closed `[lo, hi]` and moved the process to fd-table `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epoch {
    pub ts_ns: u64,
    pub tgid: u32,
    pub lo: u32,
    pub hi: u32,
    pub epoch: u32,
}

/// Why a ring-buffer item could not be decoded (counted, never fatal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {len} bytes is too short for its kind")]
    Short { len: usize },
    #[error("unknown record kind {0}")]
    UnknownKind(u32),
    #[error("unknown syscall tag {0}")]
    UnknownSyscall(u8),
    #[error("invalid field value")]
    Invalid,
}

/// Reads a `#[repr(C)]` plain-data struct from the start of `buf`.
fn read<T: Copy>(buf: &[u8]) -> Result<T, DecodeError> {
    if buf.len() < size_of::<T>() {
        return Err(DecodeError::Short { len: buf.len() });
    }
    // SAFETY: the length is checked above; T is one of the ABI structs, made only of
    // integers and byte arrays, for which every bit pattern is valid.
    Ok(unsafe { std::ptr::read_unaligned(buf.as_ptr().cast::<T>()) })
}

/// Decodes one ring-buffer item.
pub fn decode(buf: &[u8]) -> Result<Record<'_>, DecodeError> {
    let kind: u32 = read(buf)?;
    match RecordKind::from_u32(kind).ok_or(DecodeError::UnknownKind(kind))? {
        RecordKind::Data => {
            let h: DataHeader = read(buf)?;
            let syscall = Syscall::from_u8(h.syscall).ok_or(DecodeError::UnknownSyscall(h.syscall))?;
            let dir = match h.dir {
                DIR_RECV => Direction::Recv,
                DIR_SEND => Direction::Send,
                _ => return Err(DecodeError::Invalid),
            };
            if dir != if syscall.is_recv() { Direction::Recv } else { Direction::Send } {
                return Err(DecodeError::Invalid);
            }
            let cap = h.cap_len as usize;
            // Plaintext comes from a library, never through a counted-only or TLS syscall.
            if syscall.is_tls() && h.flags & (FLAG_NO_CAPTURE | FLAG_CIPHERTEXT) != 0 {
                return Err(DecodeError::Invalid);
            }
            if cap as u64 > h.total_len && h.flags & FLAG_NO_CAPTURE == 0 {
                return Err(DecodeError::Invalid);
            }
            let bytes = buf
                .get(size_of::<DataHeader>()..size_of::<DataHeader>() + cap)
                .ok_or(DecodeError::Short { len: buf.len() })?;
            let truncated = (cap as u64) < h.total_len;
            if truncated != (h.flags & FLAG_TRUNCATED != 0) && h.flags & FLAG_NO_CAPTURE == 0 {
                return Err(DecodeError::Invalid);
            }
            Ok(Record::Data(Data {
                enter_ns: h.enter_ns,
                exit_ns: h.exit_ns,
                tgid: h.tgid,
                tid: h.tid,
                fd: h.fd,
                conn_id: h.conn_id,
                syscall,
                dir,
                total_len: h.total_len,
                bytes,
                fault: h.flags & FLAG_FAULT != 0,
                no_capture: h.flags & FLAG_NO_CAPTURE != 0,
                ciphertext: h.flags & FLAG_CIPHERTEXT != 0,
                seq: (h.flags & FLAG_NO_SEQ == 0).then_some(h.seq),
            }))
        }
        RecordKind::ConnOpen => {
            let o: ConnOpen = read(buf)?;
            let role = match o.role {
                ROLE_SERVER => Role::Server,
                ROLE_CLIENT => Role::Client,
                _ => return Err(DecodeError::Invalid),
            };
            let addr = |raw: &[u8; SOCKADDR_BYTES], len: u32| {
                SockAddr::from_raw(&raw[..(len as usize).min(SOCKADDR_BYTES)])
            };
            Ok(Record::ConnOpen(Open {
                ts_ns: o.ts_ns,
                tgid: o.tgid,
                tid: o.tid,
                fd: o.fd,
                conn_id: o.conn_id,
                role,
                in_progress: o.in_progress != 0,
                peer: addr(&o.peer, o.peer_len),
                local: addr(&o.local, o.local_len),
                listen_fd: (o.listen_fd != u32::MAX).then_some(o.listen_fd),
            }))
        }
        RecordKind::ConnFailed => {
            let o: ConnOpen = read(buf)?;
            Ok(Record::ConnFailed(Failed {
                ts_ns: o.ts_ns,
                tgid: o.tgid,
                tid: o.tid,
                fd: o.fd,
                errno: o.error,
                peer: SockAddr::from_raw(&o.peer[..(o.peer_len as usize).min(SOCKADDR_BYTES)]),
            }))
        }
        k @ (RecordKind::ConnClose | RecordKind::ConnDup) => {
            let c: ConnFd = read(buf)?;
            let ev = FdEvent { ts_ns: c.ts_ns, tgid: c.tgid, tid: c.tid, fd: c.fd, conn_id: c.conn_id };
            Ok(if k == RecordKind::ConnClose { Record::ConnClose(ev) } else { Record::ConnDup(ev) })
        }
        RecordKind::FdEpoch => {
            let e: FdEpoch = read(buf)?;
            Ok(Record::FdEpoch(Epoch { ts_ns: e.ts_ns, tgid: e.tgid, lo: e.lo, hi: e.hi, epoch: e.epoch }))
        }
        k @ (RecordKind::ProcFork | RecordKind::ProcExec | RecordKind::ProcExit | RecordKind::ProcMap) => {
            let p: ProcEvent = read(buf)?;
            Ok(match k {
                RecordKind::ProcFork => Record::ProcFork { pid: p.pid, parent: p.arg, ts_ns: p.ts_ns },
                RecordKind::ProcExec => {
                    Record::ProcExec { pid: p.pid, tracked: p.arg != 0, epoch: p.epoch, ts_ns: p.ts_ns }
                }
                RecordKind::ProcMap => Record::ProcMap { pid: p.pid, ts_ns: p.ts_ns },
                _ => Record::ProcExit { pid: p.pid, ts_ns: p.ts_ns },
            })
        }
        RecordKind::Sqlite => {
            let h: observer_ebpf::SqliteCall = read(buf)?;
            let op = SqliteOp::from_u8(h.op).ok_or(DecodeError::Invalid)?;
            let start = size_of::<observer_ebpf::SqliteCall>();
            let text =
                buf.get(start..start + h.cap_len as usize).ok_or(DecodeError::Short { len: buf.len() })?;
            if h.exit_ns < h.enter_ns {
                return Err(DecodeError::Invalid);
            }
            Ok(Record::Sqlite(SqliteCall {
                enter_ns: h.enter_ns,
                exit_ns: h.exit_ns,
                tgid: h.tgid,
                tid: h.tid,
                op,
                handle: h.handle,
                arg: h.arg,
                ret: h.ret,
                text,
                truncated: h.flags & (FLAG_TRUNCATED | FLAG_FAULT) != 0,
            }))
        }
    }
}

/// Test helpers that build raw records the way the kernel programs do.
#[cfg(test)]
pub mod raw {
    use super::*;

    fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
        // SAFETY: T is a #[repr(C)] ABI struct of integers with explicit padding fields.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    /// A data record as `exit_data` emits it.
    pub fn data(syscall: Syscall, conn_id: u64, total_len: u64, captured: &[u8], flags: u8) -> Vec<u8> {
        let h = DataHeader {
            kind: RecordKind::Data as u32,
            cap_len: captured.len() as u32,
            enter_ns: 1_000,
            exit_ns: 2_000,
            conn_id,
            total_len,
            tgid: 42,
            tid: 43,
            fd: 7,
            syscall: syscall as u8,
            dir: if syscall.is_recv() { DIR_RECV } else { DIR_SEND },
            flags,
            _pad: 0,
            seq: 3,
            _pad2: 0,
        };
        let mut v = bytes_of(&h);
        v.extend_from_slice(captured);
        v
    }

    /// A ConnOpen record with the given raw sockaddr.
    pub fn open(conn_id: u64, role: u8, addr: &[u8]) -> Vec<u8> {
        let mut o = ConnOpen {
            kind: RecordKind::ConnOpen as u32,
            tgid: 42,
            ts_ns: 5,
            conn_id,
            tid: 43,
            fd: 9,
            role,
            in_progress: 0,
            error: 0,
            peer_len: addr.len() as u32,
            local_len: 0,
            listen_fd: 3,
            peer: [0; SOCKADDR_BYTES],
            local: [0; SOCKADDR_BYTES],
        };
        o.peer[..addr.len()].copy_from_slice(addr);
        bytes_of(&o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn data_record_round_trips() {
        let raw = raw::data(Syscall::Sendto, 77, 5, b"hello", 0);
        let Record::Data(d) = decode(&raw).unwrap() else { panic!("not data") };
        assert_eq!(d.syscall, Syscall::Sendto);
        assert_eq!(d.dir, Direction::Send);
        assert_eq!(d.bytes, b"hello");
        assert_eq!(d.total_len, 5);
        assert_eq!(d.conn_id, 77);
        assert_eq!(d.seq, Some(3));
        assert!(!d.truncated());
    }

    #[test]
    fn truncated_capture_keeps_true_length() {
        let raw = raw::data(Syscall::Read, 1, 10_000, &[b'x'; 256], FLAG_TRUNCATED);
        let Record::Data(d) = decode(&raw).unwrap() else { panic!("not data") };
        assert!(d.truncated());
        assert_eq!(d.total_len, 10_000);
        assert_eq!(d.bytes.len(), 256);
    }

    #[test]
    fn inconsistent_truncation_flag_is_rejected() {
        let raw = raw::data(Syscall::Read, 1, 10_000, &[b'x'; 256], 0);
        assert_eq!(decode(&raw), Err(DecodeError::Invalid));
    }

    #[test]
    fn capture_longer_than_total_is_rejected() {
        let raw = raw::data(Syscall::Write, 1, 3, b"hello", 0);
        assert_eq!(decode(&raw), Err(DecodeError::Invalid));
    }

    #[test]
    fn missing_captured_bytes_are_rejected() {
        let mut raw = raw::data(Syscall::Write, 1, 5, b"hello", 0);
        raw.truncate(raw.len() - 2);
        assert!(matches!(decode(&raw), Err(DecodeError::Short { .. })));
    }

    #[test]
    fn counted_only_syscall_has_no_bytes() {
        let raw = raw::data(Syscall::Sendfile, 1, 1 << 20, &[], FLAG_NO_CAPTURE);
        let Record::Data(d) = decode(&raw).unwrap() else { panic!("not data") };
        assert!(d.no_capture);
        assert_eq!(d.total_len, 1 << 20);
    }

    #[test]
    fn unknown_kind_and_short_buffers_are_errors() {
        assert_eq!(decode(&[99, 0, 0, 0]), Err(DecodeError::UnknownKind(99)));
        assert_eq!(decode(&[1, 0]), Err(DecodeError::Short { len: 2 }));
        assert_eq!(decode(&[]), Err(DecodeError::Short { len: 0 }));
    }

    #[test]
    fn open_record_decodes_ipv4_peer() {
        // sockaddr_in: family 2, port 8080 (big endian), 127.0.0.1
        let addr = [2, 0, 0x1f, 0x90, 127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0];
        let Record::ConnOpen(o) = decode(&raw::open(5, ROLE_SERVER, &addr)).unwrap() else {
            panic!("not open")
        };
        assert_eq!(o.role, Role::Server);
        assert_eq!(o.listen_fd, Some(3));
        assert_eq!(o.peer.unwrap().to_string(), "127.0.0.1:8080");
        assert_eq!(o.local, None);
    }

    proptest! {
        #[test]
        fn decode_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode(&buf);
        }

        #[test]
        fn decode_never_panics_on_data_kind(mut buf in proptest::collection::vec(any::<u8>(), 64..400)) {
            buf[..4].copy_from_slice(&1u32.to_ne_bytes());
            if let Ok(Record::Data(d)) = decode(&buf) {
                prop_assert!(d.bytes.len() as u64 <= d.total_len || d.no_capture);
            }
        }
    }
}
