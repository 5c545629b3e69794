//! The uprobes on the app's SQLite: what Django's cursor did, from the library calls
//! Python's `sqlite3` module makes once per connection, statement or execute.
//!
//! Userspace attaches these once per library file (inode) for every process; each
//! program returns at once unless the caller is a tracked process. Entry-only calls
//! (`bind_parameter_count`, `stmt_readonly`, `changes`, `last_insert_rowid`, `finalize`,
//! `close`) are a fixed-size record each; the calls whose result matters (`open_v2`,
//! `prepare_v2`/`_v3`, `extended_errcode`) stash their arguments under the thread at entry
//! (`SQL_CALLS`) and write one record at return, with the file name or the SQL text.
//! Nothing is probed that runs once per row (`sqlite3_step`, `sqlite3_column_*`); what
//! SQLite calls from inside a step (`sqlite3_exec` of a schema query after a DDL) is
//! skipped by probing `sqlite3_exec` as a depth only.

use core::ptr::addr_of_mut;

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user, bpf_probe_read_user_str_bytes},
    macros::{map, uprobe, uretprobe},
    maps::HashMap,
    programs::{ProbeContext, RetProbeContext},
};
use observer_ebpf::{FLAG_FAULT, FLAG_TRUNCATED, MAX_CAPTURE, RecordKind, SqliteCall, counter, sqlite_op};

use crate::programs::{
    EVENTS, SCRATCH, capture_limit, count, insert_failed, now, read_into, tracked, wakeup_flag,
};

/// A call in flight on a thread, stashed at entry for its return.
#[repr(C)]
#[derive(Clone, Copy)]
struct SqlCall {
    enter_ns: u64,
    /// open: the file name; prepare and errcode: the `sqlite3*`.
    a: u64,
    /// prepare: the SQL text.
    b: u64,
    /// The out-pointer the call writes its handle through (`ppDb`, `ppStmt`).
    out: u64,
    /// prepare's `nByte` (negative: NUL-terminated).
    n: i64,
    op: u8,
    /// Probed calls open on the thread: libsqlite3 calls its own exports through its PLT
    /// (preparing a statement first prepares the schema query), and those inner calls
    /// are not the app's.
    depth: u8,
    _pad: [u8; 6],
}

const NONE: u8 = 0;
/// `sqlite3_exec`, stashed only to open a depth: SQLite runs it from inside a step (a
/// `CREATE TABLE` re-reads the schema with it), and the prepares it makes are not the
/// app's. No record. Outside the record ops ([`sqlite_op`]).
const EXEC: u8 = 0xff;

/// SQLite calls in flight by pid_tgid; the slot is reused and removed at thread exit.
#[map]
static SQL_CALLS: HashMap<u64, SqlCall> = HashMap::with_max_entries(16384, 0);

/// The longest file name kept (PATH_MAX).
const MAX_PATH: usize = 4096;

/// A call open longer than this lost its return (the uretprobe did not fire): a new one
/// starts over.
const STALE_NS: u64 = 10_000_000_000;

#[inline(always)]
fn stash(op: u8, a: u64, b: u64, out: u64, n: i64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    if tracked((pid_tgid >> 32) as u32).is_none() {
        return;
    }
    let t = now();
    let v = SqlCall { enter_ns: t, a, b, out, n, op, depth: 1, _pad: [0; 6] };
    if let Some(p) = SQL_CALLS.get_ptr_mut(pid_tgid) {
        // SAFETY: the thread's own slot.
        unsafe {
            if (*p).op != NONE
                && (*p).depth > 0
                && (*p).depth < 255
                && t.wrapping_sub((*p).enter_ns) < STALE_NS
            {
                // Called from inside the library: the outer call's arguments stay.
                (*p).depth += 1;
                return;
            }
            *p = v;
        }
        return;
    }
    if let Err(e) = SQL_CALLS.insert(pid_tgid, v, 0) {
        insert_failed(e, counter::INFLIGHT_TABLE_FULL, counter::INFLIGHT_TABLE_ERROR);
    }
}

/// The thread's stashed call of kind `op` at the return of the outermost probed call
/// (None: an inner call's return, another call, or none).
#[inline(always)]
fn take(pid_tgid: u64, op: u8) -> Option<SqlCall> {
    let p = SQL_CALLS.get_ptr_mut(pid_tgid)?;
    // SAFETY: the thread's own slot, copied out before it is marked empty.
    unsafe {
        let c = *p;
        if c.op == NONE {
            return None;
        }
        if c.depth > 1 {
            (*p).depth = c.depth - 1;
            return None;
        }
        (*p).op = NONE;
        (*p).depth = 0;
        if c.op != op {
            return None;
        }
        Some(c)
    }
}

/// Whether the thread is inside a probed call (an entry-only call now is the library's
/// own).
#[inline(always)]
fn inside(pid_tgid: u64) -> bool {
    // SAFETY: the value is copied out at once.
    unsafe { SQL_CALLS.get(pid_tgid) }.is_some_and(|c| c.op != NONE && c.depth > 0)
}

/// The thread exits: its slot goes.
#[inline(always)]
pub fn thread_exit(pid_tgid: u64) {
    let _ = SQL_CALLS.remove(pid_tgid);
}

/// A fixed-size record of an entry-only call.
#[inline(always)]
fn emit(op: u8, handle: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tracked(tgid).is_none() || inside(pid_tgid) {
        return;
    }
    let Some(mut e) = EVENTS.reserve::<SqliteCall>(0) else {
        count(counter::RING_FULL_CONTROL, 1);
        return;
    };
    let r = e.as_mut_ptr();
    let t = now();
    // SAFETY: r points to a reserved SqliteCall in the ring buffer; every field is set.
    unsafe {
        (*r).kind = RecordKind::Sqlite as u32;
        (*r).cap_len = 0;
        (*r).enter_ns = t;
        (*r).exit_ns = t;
        (*r).handle = handle;
        (*r).arg = 0;
        (*r).tgid = tgid;
        (*r).tid = pid_tgid as u32;
        (*r).total_len = 0;
        (*r).op = op;
        (*r).flags = 0;
        (*r)._pad = 0;
        (*r).ret = 0;
    }
    e.submit(wakeup_flag());
    count(counter::SQLITE_RECORDS, 1);
}

/// Where the text comes from, for a record written at a call's return.
#[derive(Clone, Copy)]
enum Text {
    None,
    /// A NUL-terminated string of at most this many bytes.
    Str(u64, usize),
    /// `len` bytes (the caller's length, NUL included or not).
    Bytes(u64, u64),
}

/// A record of a return-probed call, with its text, from the per-CPU scratch.
#[inline(always)]
#[allow(clippy::too_many_arguments, reason = "inlined; the record's fields")]
fn emit_text(pid_tgid: u64, op: u8, c: &SqlCall, handle: u64, arg: u64, ret: i64, text: Text) {
    let Some(rec) = SCRATCH.get_ptr_mut(0) else { return };
    // SAFETY: rec points to this CPU's scratch value; its data area follows a header of
    // SqliteCall's size (asserted in the ABI crate).
    let data: *mut u8 = unsafe { addr_of_mut!((*rec).data).cast() };
    let (mut got, mut total, mut flags) = (0u64, 0u64, 0u8);
    match text {
        Text::None => {}
        Text::Str(src, max) => {
            // SAFETY: the data area holds 2 * MAX_CAPTURE bytes, max <= MAX_CAPTURE.
            let dst = unsafe {
                core::slice::from_raw_parts_mut(data, if max < MAX_CAPTURE { max } else { MAX_CAPTURE })
            };
            // SAFETY: the helper checks the user pointer.
            match unsafe { bpf_probe_read_user_str_bytes(src as *const u8, dst) } {
                Ok(s) => {
                    got = s.len() as u64;
                    if got + 1 >= max as u64 {
                        flags |= FLAG_TRUNCATED;
                    }
                }
                Err(_) => {
                    flags |= FLAG_FAULT;
                    count(counter::READ_FAULT, 1);
                }
            }
        }
        Text::Bytes(src, len) => {
            total = len;
            let cap = capture_limit();
            let want = if len < cap { len } else { cap };
            if read_into(data, 0, want, src) {
                got = want;
            } else {
                flags |= FLAG_FAULT;
                count(counter::READ_FAULT, 1);
            }
            if got < total {
                flags |= FLAG_TRUNCATED;
            }
        }
    }
    let got = if got > MAX_CAPTURE as u64 { MAX_CAPTURE as u64 } else { got };
    let h: *mut SqliteCall = rec.cast();
    // SAFETY: the header is written in place at the start of the scratch value.
    unsafe {
        (*h).kind = RecordKind::Sqlite as u32;
        (*h).cap_len = got as u32;
        (*h).enter_ns = c.enter_ns;
        (*h).exit_ns = now();
        (*h).handle = handle;
        (*h).arg = arg;
        (*h).tgid = (pid_tgid >> 32) as u32;
        (*h).tid = pid_tgid as u32;
        (*h).total_len = if total > u64::from(u32::MAX) { u32::MAX } else { total as u32 };
        (*h).op = op;
        (*h).flags = flags;
        (*h)._pad = 0;
        (*h).ret = ret;
    }
    let len = core::mem::size_of::<SqliteCall>() + got as usize;
    // SAFETY: len <= header + MAX_CAPTURE, inside the scratch value.
    let bytes = unsafe { core::slice::from_raw_parts(rec as *const u8, len) };
    if EVENTS.output::<[u8]>(bytes, wakeup_flag()).is_ok() {
        count(counter::SQLITE_RECORDS, 1);
    } else {
        count(counter::RING_FULL_CONTROL, 1);
    }
}

/// The handle a call wrote through its out-pointer (0 when it could not be read).
#[inline(always)]
fn handle_out(out: u64) -> u64 {
    if out == 0 {
        return 0;
    }
    // SAFETY: the helper checks the user pointer.
    unsafe { bpf_probe_read_user(out as *const u64) }.unwrap_or(0)
}

/// `int sqlite3_open_v2(const char *filename, sqlite3 **ppDb, int flags, const char *zVfs)`
#[uprobe]
pub fn sqlite_open(ctx: ProbeContext) -> u32 {
    stash(sqlite_op::OPEN, ctx.arg(0).unwrap_or(0), 0, ctx.arg(1).unwrap_or(0), 0);
    0
}

#[uretprobe]
pub fn sqlite_open_ret(ctx: RetProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(c) = take(pid_tgid, sqlite_op::OPEN) else { return 0 };
    let rc: i32 = ctx.ret();
    let db = handle_out(c.out);
    emit_text(pid_tgid, sqlite_op::OPEN, &c, db, 0, i64::from(rc), Text::Str(c.a, MAX_PATH));
    0
}

/// `int sqlite3_prepare_v2(sqlite3 *db, const char *zSql, int nByte, sqlite3_stmt **ppStmt,
/// const char **pzTail)`
#[uprobe]
pub fn sqlite_prepare(ctx: ProbeContext) -> u32 {
    let n: i32 = ctx.arg(2).unwrap_or(-1);
    stash(
        sqlite_op::PREPARE,
        ctx.arg(0).unwrap_or(0),
        ctx.arg(1).unwrap_or(0),
        ctx.arg(3).unwrap_or(0),
        i64::from(n),
    );
    0
}

/// `int sqlite3_prepare_v3(sqlite3 *db, const char *zSql, int nByte, unsigned int prepFlags,
/// sqlite3_stmt **ppStmt, const char **pzTail)`
#[uprobe]
pub fn sqlite_prepare_v3(ctx: ProbeContext) -> u32 {
    let n: i32 = ctx.arg(2).unwrap_or(-1);
    stash(
        sqlite_op::PREPARE,
        ctx.arg(0).unwrap_or(0),
        ctx.arg(1).unwrap_or(0),
        ctx.arg(4).unwrap_or(0),
        i64::from(n),
    );
    0
}

#[uretprobe]
pub fn sqlite_prepare_ret(ctx: RetProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(c) = take(pid_tgid, sqlite_op::PREPARE) else { return 0 };
    let rc: i32 = ctx.ret();
    let stmt = handle_out(c.out);
    let text = if c.n > 0 { Text::Bytes(c.b, c.n as u64) } else { Text::Str(c.b, MAX_CAPTURE) };
    emit_text(pid_tgid, sqlite_op::PREPARE, &c, stmt, c.a, i64::from(rc), text);
    0
}

/// `int sqlite3_bind_parameter_count(sqlite3_stmt*)`: Python's `sqlite3` calls it once
/// per parameter set, right before the statement's first step.
#[uprobe]
pub fn sqlite_bind_count(ctx: ProbeContext) -> u32 {
    emit(sqlite_op::BIND, ctx.arg(0).unwrap_or(0));
    0
}

/// `int sqlite3_stmt_readonly(sqlite3_stmt*)`: once per `executemany`.
#[uprobe]
pub fn sqlite_readonly(ctx: ProbeContext) -> u32 {
    emit(sqlite_op::READONLY, ctx.arg(0).unwrap_or(0));
    0
}

/// `int sqlite3_changes(sqlite3*)`: after each step of a DML statement.
#[uprobe]
pub fn sqlite_changes(ctx: ProbeContext) -> u32 {
    emit(sqlite_op::CHANGES, ctx.arg(0).unwrap_or(0));
    0
}

/// `sqlite3_int64 sqlite3_last_insert_rowid(sqlite3*)`: the end of a successful execute.
#[uprobe]
pub fn sqlite_last_rowid(ctx: ProbeContext) -> u32 {
    emit(sqlite_op::LAST_ROWID, ctx.arg(0).unwrap_or(0));
    0
}

/// `int sqlite3_extended_errcode(sqlite3 *db)`: Python asks only when raising.
#[uprobe]
pub fn sqlite_errcode(ctx: ProbeContext) -> u32 {
    stash(sqlite_op::ERRCODE, ctx.arg(0).unwrap_or(0), 0, 0, 0);
    0
}

#[uretprobe]
pub fn sqlite_errcode_ret(ctx: RetProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(c) = take(pid_tgid, sqlite_op::ERRCODE) else { return 0 };
    let code: i32 = ctx.ret();
    emit_text(pid_tgid, sqlite_op::ERRCODE, &c, c.a, 0, i64::from(code), Text::None);
    0
}

/// `int sqlite3_exec(sqlite3*, const char *sql, callback, void *, char **errmsg)`: only
/// what it calls is skipped (Python's `sqlite3` module does not call it).
#[uprobe]
pub fn sqlite_exec(_ctx: ProbeContext) -> u32 {
    stash(EXEC, 0, 0, 0, 0);
    0
}

#[uretprobe]
pub fn sqlite_exec_ret(_ctx: RetProbeContext) -> u32 {
    let _ = take(bpf_get_current_pid_tgid(), EXEC);
    0
}

/// `int sqlite3_finalize(sqlite3_stmt*)`: the handle may be reused for another statement.
#[uprobe]
pub fn sqlite_finalize(ctx: ProbeContext) -> u32 {
    emit(sqlite_op::FINALIZE, ctx.arg(0).unwrap_or(0));
    0
}

/// `int sqlite3_close_v2(sqlite3*)`, `int sqlite3_close(sqlite3*)`.
#[uprobe]
pub fn sqlite_close(ctx: ProbeContext) -> u32 {
    emit(sqlite_op::CLOSE, ctx.arg(0).unwrap_or(0));
    0
}
