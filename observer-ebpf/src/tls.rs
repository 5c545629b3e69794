//! The uprobes on the app's OpenSSL: plaintext records from `SSL_read`/`SSL_write` (and
//! their `_ex` forms), tied to the socket the `SSL*` talks over.
//!
//! Userspace attaches these once per library file (inode), for every process; each
//! program returns at once unless the caller is a tracked process. An `SSL_*` call's
//! arguments are stashed under the thread at entry (`SSL_CALLS`) and read back at return
//! (a uretprobe), when the buffer holds what was read or the function has said how much
//! it wrote. Which socket the `SSL*` uses is not in its arguments: a socket syscall made
//! on the same thread *during* the call is its socket (the syscall exit program calls
//! [`nested`], which also marks that syscall's record as ciphertext). The tie is kept in
//! `SSL_CONNS`, so a read served from OpenSSL's buffer, without a syscall, still finds
//! its connection. libpq calls `SSL_connect`/`SSL_read`/`SSL_write`, Python's `ssl`
//! module `SSL_do_handshake`/`SSL_read_ex`/`SSL_write_ex`; both are attached.

use core::ptr::addr_of_mut;

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::{map, uprobe, uretprobe},
    maps::{HashMap, LruHashMap},
    programs::{ProbeContext, RetProbeContext},
};
use observer_ebpf::{DIR_RECV, DIR_SEND, FLAG_FAULT, FLAG_TRUNCATED, SslConn, SslKey, Syscall, counter};

use crate::programs::{
    SCRATCH, capture_limit, count, insert_failed, last_recv, now, output_data, read_into, tracked,
};

/// How recent the thread's last socket read must be to be what a memory BIO decrypts.
const MEMORY_BIO_WINDOW_NS: u64 = 100_000_000;

/// What a thread is in the middle of: one `SSL_*` call at a time (calls do not nest,
/// except the handshake ones: `SSL_connect` calls `SSL_do_handshake`).
#[repr(C)]
#[derive(Clone, Copy)]
struct SslCall {
    enter_ns: u64,
    ssl: u64,
    buf: u64,
    /// The `_ex` forms' `size_t *` out-argument (bytes done); 0 for the others.
    out: u64,
    /// The socket a nested syscall showed (0: none yet).
    conn_id: u64,
    fd: u32,
    op: u8,
    _pad: [u8; 3],
}

const CALL_NONE: u8 = 0;
const CALL_READ: u8 = 1;
const CALL_WRITE: u8 = 2;
/// Handshake and shutdown: their syscalls are TLS records too, and tie the `SSL*`.
const CALL_CTRL: u8 = 3;

/// `SSL_*` calls in flight by pid_tgid; the slot is reused and removed at thread exit.
#[map]
static SSL_CALLS: HashMap<u64, SslCall> = HashMap::with_max_entries(16384, 0);

/// The socket of each `SSL*` seen on one; LRU so that a lost `SSL_free` cannot fill it.
#[map]
static SSL_CONNS: LruHashMap<SslKey, SslConn> = LruHashMap::with_max_entries(65536, 0);

#[inline(always)]
fn enter(ssl: u64, buf: u64, out: u64, op: u8) {
    let pid_tgid = bpf_get_current_pid_tgid();
    if tracked((pid_tgid >> 32) as u32).is_none() {
        return;
    }
    let v = SslCall { enter_ns: now(), ssl, buf, out, conn_id: 0, fd: 0, op, _pad: [0; 3] };
    if let Some(p) = SSL_CALLS.get_ptr_mut(pid_tgid) {
        // SAFETY: the thread's own slot.
        unsafe {
            // A handshake function called inside a read or write belongs to it.
            if op == CALL_CTRL && ((*p).op == CALL_READ || (*p).op == CALL_WRITE) {
                return;
            }
            *p = v;
        }
        return;
    }
    if let Err(e) = SSL_CALLS.insert(pid_tgid, v, 0) {
        insert_failed(e, counter::INFLIGHT_TABLE_FULL, counter::INFLIGHT_TABLE_ERROR);
    }
}

/// Called by the syscall exit program for every successful data syscall on a traced
/// socket: inside an `SSL_*` call of this thread, the socket is that `SSL*`'s and the
/// bytes are TLS records (true: do not capture them).
#[inline(always)]
pub fn nested(pid_tgid: u64, conn_id: u64, fd: u32) -> bool {
    let Some(p) = SSL_CALLS.get_ptr_mut(pid_tgid) else { return false };
    // SAFETY: the thread's own slot.
    unsafe {
        if (*p).op == CALL_NONE {
            return false;
        }
        (*p).conn_id = conn_id;
        (*p).fd = fd;
    }
    true
}

/// The thread exits: its slot goes.
#[inline(always)]
pub fn thread_exit(pid_tgid: u64) {
    let _ = SSL_CALLS.remove(pid_tgid);
}

/// The socket of the call's `SSL*` and the plaintext record's sequence number (None:
/// never seen on a socket). A nested syscall (re)ties it; a new socket starts at 0.
#[inline(always)]
fn tie(key: &SslKey, c: &SslCall, data: bool) -> Option<(u64, u32, u32)> {
    let step = u32::from(data);
    if let Some(e) = SSL_CONNS.get_ptr_mut(key) {
        // SAFETY: a map value; concurrent users of one SSL* only make the sequence skip.
        unsafe {
            if c.conn_id == 0 || (*e).conn_id == c.conn_id {
                let seq = (*e).seq;
                (*e).seq = seq.wrapping_add(step);
                return Some(((*e).conn_id, (*e).fd, seq));
            }
        }
    }
    if c.conn_id == 0 {
        return None;
    }
    let v = SslConn { conn_id: c.conn_id, fd: c.fd, seq: step };
    if SSL_CONNS.insert(key, v, 0).is_err() {
        count(counter::TLS_TABLE_ERROR, 1);
    }
    Some((c.conn_id, c.fd, 0))
}

/// An `SSL*` never seen on a socket, on a memory BIO: plaintext read from it came from
/// the socket the thread read just before the call (the event loop reads, then feeds
/// the BIO and calls `SSL_read`). Its writes are tied once a read was: the app answers
/// what it read. A tie seen by a nested syscall later replaces this one.
#[inline(always)]
fn memory_bio(key: &SslKey, pid_tgid: u64, op: u8, enter_ns: u64) -> Option<(u64, u32, u32)> {
    if op != CALL_READ {
        return None;
    }
    let (conn_id, fd, at) = last_recv(pid_tgid)?;
    if at > enter_ns || enter_ns - at > MEMORY_BIO_WINDOW_NS {
        return None;
    }
    if SSL_CONNS.insert(key, SslConn { conn_id, fd, seq: 1 }, 0).is_err() {
        count(counter::TLS_TABLE_ERROR, 1);
    }
    Some((conn_id, fd, 0))
}

#[inline(always)]
fn exit(ctx: &RetProbeContext, op: u8) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(p) = SSL_CALLS.get_ptr_mut(pid_tgid) else { return };
    // SAFETY: the thread's own slot, copied out before it is marked empty.
    let c = unsafe {
        let c = *p;
        if c.op != op {
            return;
        }
        (*p).op = CALL_NONE;
        c
    };
    let tgid = (pid_tgid >> 32) as u32;
    let key = SslKey { tgid, _pad: 0, ssl: c.ssl };
    let ret: i32 = ctx.ret();
    if op == CALL_CTRL {
        let _ = tie(&key, &c, false);
        return;
    }
    let total: u64 = if c.out != 0 {
        if ret != 1 {
            return;
        }
        // SAFETY: the helper checks the user pointer.
        match unsafe { bpf_probe_read_user(c.out as *const u64) } {
            Ok(n) => n,
            Err(_) => {
                count(counter::READ_FAULT, 1);
                return;
            }
        }
    } else if ret > 0 {
        ret as u64
    } else {
        return;
    };
    if total == 0 {
        return;
    }
    let Some((conn_id, fd, seq)) = tie(&key, &c, true).or_else(|| memory_bio(&key, pid_tgid, op, c.enter_ns))
    else {
        count(counter::TLS_UNTIED, 1);
        return;
    };
    let Some(rec) = SCRATCH.get_ptr_mut(0) else { return };
    // SAFETY: rec points to this CPU's scratch value.
    let data: *mut u8 = unsafe { addr_of_mut!((*rec).data).cast() };
    let want = {
        let cap = capture_limit();
        if total < cap { total } else { cap }
    };
    let mut flags = 0u8;
    let mut got = 0u64;
    if read_into(data, 0, want, c.buf) {
        got = want;
    } else {
        flags |= FLAG_FAULT;
        count(counter::READ_FAULT, 1);
    }
    if got < total {
        flags |= FLAG_TRUNCATED;
        count(counter::CAPTURE_TRUNCATED, 1);
    }
    let (sys, dir) =
        if op == CALL_READ { (Syscall::SslRead, DIR_RECV) } else { (Syscall::SslWrite, DIR_SEND) };
    if output_data(rec, sys, dir, c.enter_ns, conn_id, total, got, pid_tgid, fd, flags, seq) {
        count(counter::TLS_RECORDS, 1);
    }
}

/// `int SSL_read(SSL *ssl, void *buf, int num)`
#[uprobe]
pub fn ssl_read(ctx: ProbeContext) -> u32 {
    enter(ctx.arg(0).unwrap_or(0), ctx.arg(1).unwrap_or(0), 0, CALL_READ);
    0
}

/// `int SSL_read_ex(SSL *ssl, void *buf, size_t num, size_t *readbytes)`
#[uprobe]
pub fn ssl_read_ex(ctx: ProbeContext) -> u32 {
    let out: u64 = ctx.arg(3).unwrap_or(0);
    if out != 0 {
        enter(ctx.arg(0).unwrap_or(0), ctx.arg(1).unwrap_or(0), out, CALL_READ);
    }
    0
}

#[uretprobe]
pub fn ssl_read_ret(ctx: RetProbeContext) -> u32 {
    exit(&ctx, CALL_READ);
    0
}

/// `int SSL_write(SSL *ssl, const void *buf, int num)`
#[uprobe]
pub fn ssl_write(ctx: ProbeContext) -> u32 {
    enter(ctx.arg(0).unwrap_or(0), ctx.arg(1).unwrap_or(0), 0, CALL_WRITE);
    0
}

/// `int SSL_write_ex(SSL *s, const void *buf, size_t num, size_t *written)`
#[uprobe]
pub fn ssl_write_ex(ctx: ProbeContext) -> u32 {
    let out: u64 = ctx.arg(3).unwrap_or(0);
    if out != 0 {
        enter(ctx.arg(0).unwrap_or(0), ctx.arg(1).unwrap_or(0), out, CALL_WRITE);
    }
    0
}

#[uretprobe]
pub fn ssl_write_ret(ctx: RetProbeContext) -> u32 {
    exit(&ctx, CALL_WRITE);
    0
}

/// `SSL_do_handshake`, `SSL_connect`, `SSL_accept`, `SSL_shutdown`: `(SSL *s)`.
#[uprobe]
pub fn ssl_ctrl(ctx: ProbeContext) -> u32 {
    enter(ctx.arg(0).unwrap_or(0), 0, 0, CALL_CTRL);
    0
}

#[uretprobe]
pub fn ssl_ctrl_ret(ctx: RetProbeContext) -> u32 {
    exit(&ctx, CALL_CTRL);
    0
}

/// `void SSL_free(SSL *ssl)`: the pointer may be reused for another connection.
#[uprobe]
pub fn ssl_free(ctx: ProbeContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if tracked(tgid).is_none() {
        return 0;
    }
    let key = SslKey { tgid, _pad: 0, ssl: ctx.arg(0).unwrap_or(0) };
    let _ = SSL_CONNS.remove(key);
    0
}
