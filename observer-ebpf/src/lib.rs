//! The record ABI shared by the kernel programs (`src/main.rs`, built for bpf) and the
//! userspace agent (which decodes the ring buffer with these types).
//!
//! Every record in the ring buffer starts with a `u32` [`RecordKind`] tag, so userspace can
//! read the tag first and then the struct it names. All structs are `#[repr(C)]`, made of
//! fixed-width integers with explicit padding, so that both sides agree byte for byte and
//! any bit pattern is a valid value (userspace reads them with `read_unaligned`).
#![cfg_attr(target_arch = "bpf", no_std)]

/// Largest capture per syscall the programs are compiled for. The load-time setting
/// (`--capture-bytes`) is clamped to it. A power of two: offsets and lengths into the
/// scratch buffer are masked with `MAX_CAPTURE - 1`, which is how the verifier learns
/// their bounds for the iovec gather.
pub const MAX_CAPTURE: usize = 8192;

/// How many iovecs of one readv/writev/recvmsg/sendmsg are gathered. Later iovecs are
/// not captured (the record says so with [`FLAG_TRUNCATED`]); the total length stays exact.
pub const MAX_IOVECS: usize = 8;

/// How many `mmsghdr` entries of one sendmmsg/recvmmsg are summed into the total length.
pub const MAX_MMSG: usize = 8;

/// Bytes of a socket address kept in a [`ConnOpen`] record: a full `sockaddr_un`
/// (2 bytes family + 108 bytes path) rounded up to a multiple of 8.
pub const SOCKADDR_BYTES: usize = 112;

/// Bit set in connection ids assigned by userspace (connections found in /proc at start),
/// so they can never collide with ids assigned by the kernel programs.
pub const CONN_ID_USERSPACE_BIT: u64 = 1 << 63;

/// The tag at offset 0 of every ring-buffer record.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// [`DataHeader`] followed by `cap_len` captured bytes.
    Data = 1,
    /// [`ConnOpen`]: a socket of a tracked process became a traced connection.
    ConnOpen = 2,
    /// [`ConnFd`]: an fd of a traced connection was closed (or replaced by dup2/dup3).
    ConnClose = 3,
    /// [`ConnFd`]: a traced connection got another fd (dup, dup2, dup3, fcntl F_DUPFD*).
    ConnDup = 4,
    /// [`FdEpoch`]: close_range(2) invalidated the process's fd table (epoch bump).
    FdEpoch = 5,
    /// [`ProcEvent`] for a fork of a tracked process.
    ProcFork = 6,
    /// [`ProcEvent`] for any exec on the host (userspace selectors decide what to track).
    ProcExec = 7,
    /// [`ProcEvent`] for the exit of a tracked process (its last thread).
    ProcExit = 8,
    /// [`ConnOpen`] layout: a `connect` of a tracked process failed at once (refused,
    /// unreachable, no such socket file); `error` is the errno. The socket is not traced.
    ConnFailed = 9,
    /// [`ProcEvent`]: a tracked process mapped a file executable (`mmap` with
    /// `PROT_EXEC`): a library it loaded may be one the uprobes serve (OpenSSL).
    ProcMap = 10,
    /// [`SqliteCall`] followed by `cap_len` bytes: a call of a tracked process into its
    /// SQLite library (a uprobe).
    Sqlite = 11,
}

impl RecordKind {
    /// All kinds, in tag order.
    pub const ALL: [RecordKind; 11] = [
        Self::Data,
        Self::ConnOpen,
        Self::ConnClose,
        Self::ConnDup,
        Self::FdEpoch,
        Self::ProcFork,
        Self::ProcExec,
        Self::ProcExit,
        Self::ConnFailed,
        Self::ProcMap,
        Self::Sqlite,
    ];

    /// Decodes a tag read from the ring buffer.
    pub fn from_u32(v: u32) -> Option<Self> {
        Self::ALL.get((v as usize).wrapping_sub(1)).copied()
    }
}

/// Which syscall produced a data record.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Syscall {
    Read = 1,
    Write = 2,
    Readv = 3,
    Writev = 4,
    Recvfrom = 5,
    Sendto = 6,
    Recvmsg = 7,
    Sendmsg = 8,
    Recvmmsg = 9,
    Sendmmsg = 10,
    Sendfile = 11,
    /// Plaintext an `SSL*` returned from `SSL_read`/`SSL_read_ex` (a uprobe, not a
    /// syscall): the connection's bytes before encryption.
    SslRead = 12,
    /// Plaintext given to `SSL_write`/`SSL_write_ex`.
    SslWrite = 13,
}

impl Syscall {
    /// All data syscalls, in tag order.
    pub const ALL: [Syscall; 13] = [
        Self::Read,
        Self::Write,
        Self::Readv,
        Self::Writev,
        Self::Recvfrom,
        Self::Sendto,
        Self::Recvmsg,
        Self::Sendmsg,
        Self::Recvmmsg,
        Self::Sendmmsg,
        Self::Sendfile,
        Self::SslRead,
        Self::SslWrite,
    ];

    /// Decodes a tag from a data record.
    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.get(usize::from(v).wrapping_sub(1)).copied()
    }

    /// The syscall's name as in `man 2`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Readv => "readv",
            Self::Writev => "writev",
            Self::Recvfrom => "recvfrom",
            Self::Sendto => "sendto",
            Self::Recvmsg => "recvmsg",
            Self::Sendmsg => "sendmsg",
            Self::Recvmmsg => "recvmmsg",
            Self::Sendmmsg => "sendmmsg",
            Self::Sendfile => "sendfile",
            Self::SslRead => "SSL_read",
            Self::SslWrite => "SSL_write",
        }
    }

    /// Whether the process received (`true`) or sent (`false`) these bytes.
    pub fn is_recv(self) -> bool {
        matches!(
            self,
            Self::Read | Self::Readv | Self::Recvfrom | Self::Recvmsg | Self::Recvmmsg | Self::SslRead
        )
    }

    /// TLS plaintext from the app's TLS library, not bytes of a socket syscall.
    pub fn is_tls(self) -> bool {
        matches!(self, Self::SslRead | Self::SslWrite)
    }
}

/// Data direction, from the traced process's point of view.
pub const DIR_RECV: u8 = 1;
/// Data direction, from the traced process's point of view.
pub const DIR_SEND: u8 = 2;

/// `cap_len < total_len`: the capture holds only a prefix of what the syscall moved.
pub const FLAG_TRUNCATED: u8 = 1;
/// Reading the user buffer faulted; `cap_len` is 0 (or what was gathered before the fault).
pub const FLAG_FAULT: u8 = 2;
/// A counted-only syscall (sendfile, sendmmsg, recvmmsg): no bytes are captured.
pub const FLAG_NO_CAPTURE: u8 = 4;
/// The fd's socket entry was gone at syscall exit (closed meanwhile): `seq` is meaningless.
pub const FLAG_NO_SEQ: u8 = 8;
/// A socket syscall made inside an `SSL_*` call of the same thread: TLS records, not
/// the app's bytes. Nothing is captured (with [`FLAG_NO_CAPTURE`]); the length counts.
pub const FLAG_CIPHERTEXT: u8 = 16;

/// Header of a [`RecordKind::Data`] record; `cap_len` captured bytes follow it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DataHeader {
    pub kind: u32,
    pub cap_len: u32,
    /// Syscall entry, `bpf_ktime_get_ns` (CLOCK_MONOTONIC).
    pub enter_ns: u64,
    /// Syscall exit, same clock.
    pub exit_ns: u64,
    pub conn_id: u64,
    /// The syscall's return value: bytes moved (for the mmsg calls, summed over the
    /// first [`MAX_MMSG`] messages).
    pub total_len: u64,
    pub tgid: u32,
    pub tid: u32,
    pub fd: u32,
    pub syscall: u8,
    pub dir: u8,
    pub flags: u8,
    pub _pad: u8,
    /// Data records attempted on this (tgid, fd) before this one, lost ones included: a
    /// jump tells userspace exactly where a stream has a hole (see [`FLAG_NO_SEQ`]).
    pub seq: u32,
    pub _pad2: u32,
}

/// Which SQLite call a [`SqliteCall`] record is (see `observer::protocol::sqlite`).
pub mod sqlite_op {
    /// `sqlite3_open_v2` returned: `handle` the `sqlite3*`, `ret` its result code, the
    /// bytes the file name.
    pub const OPEN: u8 = 1;
    /// `sqlite3_prepare_v2`/`_v3` returned: `handle` the statement, `arg` the
    /// `sqlite3*`, `ret` the result code, the bytes the SQL text (`total_len` its length
    /// as the caller gave it; 0: NUL-terminated, unknown).
    pub const PREPARE: u8 = 2;
    /// `sqlite3_bind_parameter_count(stmt)`: an execute starts (once per parameter set).
    pub const BIND: u8 = 3;
    /// `sqlite3_stmt_readonly(stmt)`: an `executemany` starts.
    pub const READONLY: u8 = 4;
    /// `sqlite3_changes(db)`: a DML step is done.
    pub const CHANGES: u8 = 5;
    /// `sqlite3_last_insert_rowid(db)`: an execute is done, successfully.
    pub const LAST_ROWID: u8 = 6;
    /// `sqlite3_extended_errcode(db)` returned `ret`: the call before it failed.
    pub const ERRCODE: u8 = 7;
    /// `sqlite3_finalize(stmt)`.
    pub const FINALIZE: u8 = 8;
    /// `sqlite3_close_v2(db)` / `sqlite3_close(db)`.
    pub const CLOSE: u8 = 9;
}

/// Header of a [`RecordKind::Sqlite`] record; `cap_len` bytes follow it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SqliteCall {
    pub kind: u32,
    pub cap_len: u32,
    /// The call's entry (`bpf_ktime_get_ns`).
    pub enter_ns: u64,
    /// Its return, for calls probed at both ends; else the entry again.
    pub exit_ns: u64,
    /// The `sqlite3*` or `sqlite3_stmt*` the call is about.
    pub handle: u64,
    /// A second handle (the connection of a prepared statement).
    pub arg: u64,
    pub tgid: u32,
    pub tid: u32,
    /// The text's true length when the caller said it (prepare's `nByte`); else 0.
    pub total_len: u32,
    /// A [`sqlite_op`] value.
    pub op: u8,
    pub flags: u8,
    pub _pad: u16,
    /// The call's result code (return-probed calls), else 0.
    pub ret: i64,
}

/// Role of a traced connection.
pub const ROLE_UNCONNECTED: u8 = 0;
/// We accepted it: the process is the server.
pub const ROLE_SERVER: u8 = 1;
/// We connected it: the process is the client.
pub const ROLE_CLIENT: u8 = 2;

/// A [`RecordKind::ConnOpen`] record.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnOpen {
    pub kind: u32,
    pub tgid: u32,
    pub ts_ns: u64,
    pub conn_id: u64,
    pub tid: u32,
    pub fd: u32,
    pub role: u8,
    /// Non-zero when `connect` returned EINPROGRESS (non-blocking; completes later).
    pub in_progress: u8,
    /// The errno of a failed `connect` ([`RecordKind::ConnFailed`]); 0 otherwise.
    pub error: u16,
    /// Valid bytes of `peer`; 0 when unknown.
    pub peer_len: u32,
    /// Valid bytes of `local`; 0 when unknown.
    pub local_len: u32,
    /// The listening socket's fd for an accepted connection; `u32::MAX` for a connected one.
    pub listen_fd: u32,
    /// The peer's `struct sockaddr` (raw, family first): read from the socket when the
    /// kernel offsets are known, else as the syscall's arguments had it.
    pub peer: [u8; SOCKADDR_BYTES],
    /// The local `struct sockaddr`, read from the socket (needs the kernel offsets).
    pub local: [u8; SOCKADDR_BYTES],
}

/// Slots of the syscall handler tables (tail calls indexed by syscall number): every
/// x86_64 syscall the programs handle is below it.
pub const SYSCALL_SLOTS: u32 = 512;

/// Offsets into kernel structs, resolved by userspace from the kernel's BTF and set at
/// load time (Rust eBPF has no CO-RE relocations). The task, signal and register
/// offsets are required (the load fails without them); with `ok == 0` the socket
/// offsets are unknown, the programs do not read sockets and connection addresses come
/// from syscall arguments only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `task_struct.tgid`: a forked child is a new process when its tgid is not the
    /// parent's (sched_process_fork's raw arguments are the two tasks).
    pub task_tgid: u32,
    /// `task_struct.signal`, then `signal_struct.live` (an `atomic_t`): do_exit decrements
    /// `live` before sched_process_exit fires, so 0 there means the last thread is exiting.
    pub task_signal: u32,
    pub signal_live: u32,
    /// `pt_regs` slots of the six syscall arguments (x86_64: di, si, dx, r10, r8, r9) and
    /// of the syscall number at exit (`orig_ax`): the raw_syscalls tracepoints pass the
    /// user registers, not the arguments.
    pub regs_arg: [u32; 6],
    pub regs_orig_ax: u32,
    pub ok: u32,
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdt_max_fds: u32,
    pub fdt_fd: u32,
    pub file_private_data: u32,
    pub socket_sk: u32,
    pub skc_family: u32,
    pub skc_num: u32,
    pub skc_dport: u32,
    pub skc_rcv_saddr: u32,
    pub skc_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    pub skc_v6_daddr: u32,
    pub unix_addr: u32,
    pub unix_peer: u32,
    pub unix_address_len: u32,
    pub unix_address_name: u32,
}

/// A [`RecordKind::ConnClose`] or [`RecordKind::ConnDup`] record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnFd {
    pub kind: u32,
    pub tgid: u32,
    pub ts_ns: u64,
    pub conn_id: u64,
    pub tid: u32,
    pub fd: u32,
}

/// A [`RecordKind::FdEpoch`] record: close_range(2) closed fds `[lo, hi]` and moved the
/// process's fd table to `epoch`. Userspace re-enters the connections outside the range.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FdEpoch {
    pub kind: u32,
    pub tgid: u32,
    pub ts_ns: u64,
    pub lo: u32,
    pub hi: u32,
    pub epoch: u32,
    pub _pad: u32,
}

/// A [`RecordKind::ProcFork`], [`RecordKind::ProcExec`] or [`RecordKind::ProcExit`] record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcEvent {
    pub kind: u32,
    /// The process (fork: the new child's pid; exec/exit: the process).
    pub pid: u32,
    pub ts_ns: u64,
    /// fork: the parent's tgid; exec: 1 if the process is tracked; exit: 0.
    pub arg: u32,
    /// exec of a tracked process: its new fd-table epoch (CLOEXEC fds are gone).
    pub epoch: u32,
}

/// Key of the socket table: an fd of a process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub tgid: u32,
    pub fd: u32,
}

/// Value of the socket table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SockVal {
    /// 0 while the socket is not connected yet (`socket()` seen, `connect` not yet).
    pub conn_id: u64,
    /// The process's fd-table epoch when this entry was made; a stale entry is ignored.
    pub epoch: u32,
    pub role: u8,
    pub _pad: [u8; 3],
    /// Data records attempted on this fd so far (copied into each record as `seq`).
    pub seq: u32,
    pub _pad2: u32,
}

impl SockVal {
    /// A fresh entry (record sequence at 0).
    pub const fn new(conn_id: u64, epoch: u32, role: u8) -> Self {
        Self { conn_id, epoch, role, _pad: [0; 3], seq: 0, _pad2: 0 }
    }
}

/// Value of the tracked-process table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcVal {
    /// Bumped on exec and close_range; socket entries from an older epoch are stale.
    pub epoch: u32,
    pub _pad: u32,
}

/// Key of the TLS table: an `SSL*` of a process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SslKey {
    pub tgid: u32,
    pub _pad: u32,
    pub ssl: u64,
}

/// Value of the TLS table: the socket an `SSL*` was seen on, and its own record
/// sequence (plaintext records are numbered apart from the socket's syscalls).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SslConn {
    pub conn_id: u64,
    pub fd: u32,
    pub seq: u32,
}

/// Indexes of the per-CPU counter array `COUNTERS`. Loss counters first.
pub mod counter {
    /// Data records dropped because the ring buffer was full.
    pub const RING_FULL_DATA: u32 = 0;
    /// Connection and process records dropped because the ring buffer was full.
    pub const RING_FULL_CONTROL: u32 = 1;
    /// Data records whose capture is shorter than the syscall's length.
    pub const CAPTURE_TRUNCATED: u32 = 2;
    /// Reads of user memory that faulted (buffer, iovec, msghdr or sockaddr).
    pub const READ_FAULT: u32 = 3;
    /// Sockets not traced because the socket table was full.
    pub const SOCK_TABLE_FULL: u32 = 4;
    /// Syscalls not traced because the in-flight syscall table was full.
    pub const INFLIGHT_TABLE_FULL: u32 = 5;
    /// Child processes not tracked because the process table was full.
    pub const PROC_TABLE_FULL: u32 = 6;
    /// Bytes of data records dropped because the ring buffer was full (their total lengths).
    pub const RING_FULL_DATA_BYTES: u32 = 7;
    /// Data records written to the ring buffer.
    pub const DATA_RECORDS: u32 = 8;
    /// Bytes captured into data records.
    pub const CAPTURED_BYTES: u32 = 9;
    /// recv/recvfrom/recvmsg calls with MSG_PEEK, not recorded (the data is read again).
    pub const PEEK_SKIPPED: u32 = 10;
    /// Socket table updates that failed for another reason than a full table.
    pub const SOCK_TABLE_ERROR: u32 = 11;
    /// In-flight syscall table updates that failed for another reason than a full table.
    pub const INFLIGHT_TABLE_ERROR: u32 = 12;
    /// Process table updates that failed for another reason than a full table.
    pub const PROC_TABLE_ERROR: u32 = 13;
    /// TLS plaintext records dropped: the `SSL*` was never seen on a socket (no nested
    /// socket syscall yet, e.g. a memory BIO).
    pub const TLS_UNTIED: u32 = 14;
    /// TLS plaintext records written to the ring buffer.
    pub const TLS_RECORDS: u32 = 15;
    /// `SSL*` to socket ties not kept because the table update failed.
    pub const TLS_TABLE_ERROR: u32 = 16;
    /// SQLite call records written to the ring buffer (records lost to a full ring count
    /// under [`RING_FULL_CONTROL`]).
    pub const SQLITE_RECORDS: u32 = 17;
    /// Number of counters.
    pub const COUNT: u32 = 18;
}

#[cfg(feature = "user")]
mod user {
    //! Map keys and values userspace reads and writes through aya.
    use super::*;

    // SAFETY: #[repr(C)] structs of integers with explicit padding: no uninitialised bytes,
    // every bit pattern valid.
    unsafe impl aya::Pod for SockKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockVal {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ProcVal {}
    // SAFETY: as above.
    unsafe impl aya::Pod for KernelOffsets {}
}

#[cfg(not(target_arch = "bpf"))]
mod host {
    //! Compile-time checks of the layout both sides rely on.
    use super::*;
    use core::mem::size_of;

    const _: () = assert!(size_of::<DataHeader>() == 64);
    const _: () = assert!(size_of::<ConnOpen>() == 48 + 2 * SOCKADDR_BYTES);
    const _: () = assert!(size_of::<KernelOffsets>() == 112);
    const _: () = assert!(size_of::<ConnFd>() == 32);
    const _: () = assert!(size_of::<FdEpoch>() == 32);
    const _: () = assert!(size_of::<ProcEvent>() == 24);
    const _: () = assert!(size_of::<SockKey>() == 8);
    const _: () = assert!(size_of::<SockVal>() == 24);
    const _: () = assert!(size_of::<SslKey>() == 16);
    const _: () = assert!(size_of::<SslConn>() == 16);
    // It is written over a data record's header in the scratch buffer.
    const _: () = assert!(size_of::<SqliteCall>() == size_of::<DataHeader>());
    const _: () = assert!(MAX_CAPTURE.is_power_of_two());

    #[test]
    fn tags_round_trip() {
        for k in RecordKind::ALL {
            assert_eq!(RecordKind::from_u32(k as u32), Some(k));
        }
        for s in Syscall::ALL {
            assert_eq!(Syscall::from_u8(s as u8), Some(s));
        }
        assert_eq!(RecordKind::from_u32(0), None);
        assert_eq!(Syscall::from_u8(0), None);
        assert_eq!(Syscall::from_u8(14), None);
    }
}
