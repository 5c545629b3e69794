//! The tracepoint programs. See `lib.rs` for the records they emit.
//!
//! Two raw tracepoints, `raw_syscalls:sys_enter` and `sys_exit`, are the only syscall
//! attachments: each tail-calls the handler of its syscall number (`ENTER`, `EXIT`, filled
//! by userspace) and returns at once for every other syscall. Raw tracepoints, because a
//! perf-event tracepoint per syscall waited for RCU grace periods one after the other
//! when detached (47 of them held the agent's exit for seconds), and because their
//! arguments are the kernel's own (registers, tasks) with offsets from BTF, not the
//! record layout of a tracefs format that changes between kernels.
//!
//! Shape of every traced syscall: the `sys_enter_*` handler checks that the calling process
//! is tracked (and, for data syscalls, that the fd is a known connected socket of the
//! current fd-table epoch) and stashes the arguments in `INFLIGHT` under the thread's
//! pid_tgid; the `sys_exit_*` handler takes the stash back and, on success, emits a record.
//! Handlers read the arguments from the user registers (`arg`) and the result from the
//! raw tracepoint (`ret`). A 32-bit (compat) process has other syscall numbers: it is
//! never tracked (the selectors pick Python servers, 64-bit on every supported node).

use core::{mem::size_of, ptr::addr_of_mut};

use aya_ebpf::{
    Global,
    bindings::BPF_EXIST,
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_kernel, bpf_probe_read_user,
        generated::{
            bpf_get_current_task, bpf_get_smp_processor_id, bpf_ktime_get_ns,
            bpf_probe_read_kernel as read_kernel_raw, bpf_probe_read_user as read_user_raw,
        },
    },
    macros::{map, raw_tracepoint},
    maps::{HashMap, PerCpuArray, ProgramArray, RingBuf},
    programs::RawTracePointContext,
};
use observer_ebpf::{
    ConnFd, ConnOpen, DIR_RECV, DIR_SEND, DataHeader, FLAG_CIPHERTEXT, FLAG_FAULT, FLAG_NO_CAPTURE,
    FLAG_NO_SEQ, FLAG_TRUNCATED, FdEpoch, KernelOffsets, MAX_CAPTURE, MAX_IOVECS, MAX_MMSG, ProcEvent,
    ProcVal, ROLE_CLIENT, ROLE_SERVER, ROLE_UNCONNECTED, RecordKind, SOCKADDR_BYTES, SYSCALL_SLOTS, SockKey,
    SockVal, Syscall, counter,
};

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The observer's own TGID: never traced, whatever the selectors say.
#[unsafe(no_mangle)]
static OWN_TGID: Global<u32> = Global::new(0);

/// Kernel struct offsets from the running kernel's BTF (see `KernelOffsets`).
#[unsafe(no_mangle)]
static KOFFS: Global<KernelOffsets> = Global::new(KernelOffsets {
    task_tgid: 0,
    task_signal: 0,
    signal_live: 0,
    regs_arg: [0; 6],
    regs_orig_ax: 0,
    ok: 0,
    task_files: 0,
    files_fdt: 0,
    fdt_max_fds: 0,
    fdt_fd: 0,
    file_private_data: 0,
    socket_sk: 0,
    skc_family: 0,
    skc_num: 0,
    skc_dport: 0,
    skc_rcv_saddr: 0,
    skc_daddr: 0,
    skc_v6_rcv_saddr: 0,
    skc_v6_daddr: 0,
    unix_addr: 0,
    unix_peer: 0,
    unix_address_len: 0,
    unix_address_name: 0,
});

/// Bytes captured per syscall (`--capture-bytes`), clamped to `MAX_CAPTURE`.
#[unsafe(no_mangle)]
static CAPTURE_BYTES: Global<u32> = Global::new(4096);

/// Unread bytes in the ring above which a data record wakes the reader (set to a
/// fraction of the ring size by the loader).
#[unsafe(no_mangle)]
static WAKEUP_BYTES: Global<u32> = Global::new(1 << 20);

/// All records, in order. Userspace sets the size (`--ring-buffer-bytes`).
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 24, 0);

/// Tracked processes by TGID. Userspace adds the selected ones; forks add children.
#[map]
static TRACKED: HashMap<u32, ProcVal> = HashMap::with_max_entries(8192, 0);

/// Sockets of tracked processes: (tgid, fd) -> connection. Sized by `--max-connections`.
#[map]
static SOCKS: HashMap<SockKey, SockVal> = HashMap::with_max_entries(65536, 0);

/// Arguments of syscalls in flight, by pid_tgid (one syscall per thread at a time): a slot
/// per thread of a traced process, reused by each syscall, removed when the thread exits.
#[map]
static INFLIGHT: HashMap<u64, Inflight> = HashMap::with_max_entries(16384, 0);

/// Scratch space for a data record: header plus up to 2 * MAX_CAPTURE bytes (the upper
/// half only exists so the verifier can bound "masked offset + clamped length").
#[map]
pub(crate) static SCRATCH: PerCpuArray<DataRecord> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU sequence for connection ids.
#[map]
static CONN_SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Loss and activity counters, indexed by `observer_ebpf::counter`.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[repr(C)]
pub(crate) struct DataRecord {
    hdr: DataHeader,
    pub(crate) data: [u8; 2 * MAX_CAPTURE],
}

const HDR: usize = size_of::<DataHeader>();

/// What a thread is in the middle of. `op` is a `Syscall` tag (1..=11) or one of the OP_*.
#[repr(C)]
#[derive(Clone, Copy)]
struct Inflight {
    enter_ns: u64,
    /// buffer / iovec array / msghdr / sockaddr pointer
    ptr: u64,
    /// count / vlen / addrlen pointer / new fd
    arg: u64,
    conn_id: u64,
    fd: u32,
    op: u8,
    /// The syscall last completed on the thread (`op` taken back by its exit), with
    /// `conn_id`, `fd` and `enter_ns` still its own: see [`last_recv`].
    done: u8,
    _pad: [u8; 2],
}

const OP_SOCKET: u8 = 32;
const OP_CONNECT: u8 = 33;
const OP_ACCEPT: u8 = 34;
const OP_DUP: u8 = 35;

const AF_UNIX: u16 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const SOCK_STREAM: u64 = 1;
const SOCK_TYPE_MASK: u64 = 0xf;
const MSG_PEEK: u64 = 2;
const EINPROGRESS: i64 = 115;
const EINTR: i64 = 4;
const EALREADY: i64 = 114;
const EISCONN: i64 = 106;
const CLOSE_RANGE_CLOEXEC: u64 = 4;
const F_DUPFD: u64 = 0;
const F_DUPFD_CLOEXEC: u64 = 1030;
const NO_FD: u64 = u64::MAX;

// ---------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------

/// Syscall argument `n` (0-based, a constant below 6), from the user registers the raw
/// tracepoint passes first. 0 when they cannot be read.
#[inline(always)]
fn arg(ctx: &RawTracePointContext, n: usize) -> u64 {
    let regs: u64 = ctx.arg(0);
    let o = KOFFS.load();
    kread::<u64>(regs + u64::from(o.regs_arg[n])).unwrap_or(0)
}

/// The syscall's result, at `sys_exit` (the raw tracepoint's second argument).
#[inline(always)]
fn ret(ctx: &RawTracePointContext) -> i64 {
    ctx.arg::<u64>(1) as i64
}

#[inline(always)]
pub(crate) fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
pub(crate) fn count(idx: u32, n: u64) {
    if let Some(p) = COUNTERS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot of this map; programs do not nest on one CPU.
        unsafe { *p += n };
    }
}

/// The kernel's answer to an insert into a full hash map.
const E2BIG: i64 = 7;

/// Counts a failed map insert under its true reason: the table was full, or the update
/// failed otherwise.
#[inline(always)]
pub(crate) fn insert_failed(err: impl Into<i64>, full: u32, other: u32) {
    count(if err.into() == -E2BIG { full } else { other }, 1);
}

#[inline(always)]
fn own_tgid(tgid: u32) -> bool {
    tgid == OWN_TGID.load()
}

/// The tracked-process entry of the caller, unless it is the observer itself.
#[inline(always)]
pub(crate) fn tracked(tgid: u32) -> Option<ProcVal> {
    if own_tgid(tgid) {
        return None;
    }
    // SAFETY: the value is copied out at once.
    unsafe { TRACKED.get(tgid).copied() }
}

/// The socket entry of (tgid, fd) if it belongs to the current fd-table epoch.
#[inline(always)]
fn socket(tgid: u32, fd: u32, proc_: &ProcVal) -> Option<SockVal> {
    // SAFETY: the value is copied out at once.
    let s = unsafe { SOCKS.get(SockKey { tgid, fd }).copied() }?;
    if s.epoch != proc_.epoch {
        return None;
    }
    Some(s)
}

/// No syscall in flight on the thread (its slot is kept for the next one).
const OP_NONE: u8 = 0;

/// Stashes a syscall's arguments in the thread's slot. The slot is written in place when
/// the thread has one: a hash-map insert allocates an element and frees the old one,
/// which the profile showed as the costliest part of the enter programs.
#[inline(always)]
fn stash(pid_tgid: u64, op: u8, fd: u32, ptr: u64, arg: u64, conn_id: u64) {
    let v = Inflight { enter_ns: now(), ptr, arg, conn_id, fd, op, done: OP_NONE, _pad: [0; 2] };
    if let Some(p) = INFLIGHT.get_ptr_mut(pid_tgid) {
        // SAFETY: the thread's own slot: only this thread's programs touch it.
        unsafe { *p = v };
        return;
    }
    if let Err(e) = INFLIGHT.insert(pid_tgid, v, 0) {
        insert_failed(e, counter::INFLIGHT_TABLE_FULL, counter::INFLIGHT_TABLE_ERROR);
    }
}

/// Takes the caller's stash back if it is for `op`, leaving the slot empty (the slot
/// itself goes when the thread exits).
#[inline(always)]
fn unstash(pid_tgid: u64, op: u8) -> Option<Inflight> {
    let p = INFLIGHT.get_ptr_mut(pid_tgid)?;
    // SAFETY: the thread's own slot, copied out before it is marked empty.
    let v = unsafe {
        let v = *p;
        (*p).op = OP_NONE;
        (*p).done = if v.op == op { op } else { OP_NONE };
        v
    };
    if v.op != op || op == OP_NONE {
        return None;
    }
    Some(v)
}

/// The connection the thread's last syscall read from, if that was a successful read of
/// a traced socket, and when it started: an OpenSSL on a memory BIO (asyncio's
/// `SSLObject`: uvicorn, daphne) decrypts what the event loop has just read off the
/// socket, with no socket syscall of its own.
#[inline(always)]
pub(crate) fn last_recv(pid_tgid: u64) -> Option<(u64, u32, u64)> {
    let p = INFLIGHT.get_ptr_mut(pid_tgid)?;
    // SAFETY: the thread's own slot, copied out.
    let v = unsafe { *p };
    let read = v.done == Syscall::Read as u8
        || v.done == Syscall::Readv as u8
        || v.done == Syscall::Recvfrom as u8
        || v.done == Syscall::Recvmsg as u8;
    if !read || v.conn_id == 0 {
        return None;
    }
    Some((v.conn_id, v.fd, v.enter_ns))
}

#[inline(always)]
fn next_conn_id() -> u64 {
    let Some(p) = CONN_SEQ.get_ptr_mut(0) else { return 0 };
    // SAFETY: per-CPU slot; programs do not nest on one CPU.
    let seq = unsafe {
        *p += 1;
        *p
    };
    // SAFETY: helper without arguments.
    let cpu = u64::from(unsafe { bpf_get_smp_processor_id() }) & 0xfff;
    (seq << 12) | cpu
}

/// Waking the reader costs more than the rest of a record (an irq_work per record: over
/// 1 µs measured here for data records, 7-11 µs for connection records on this VM), so
/// records wake it only once a good part of the ring is used; the reader also polls on a
/// short timer.
#[inline(always)]
pub(crate) fn wakeup_flag() -> u64 {
    const BPF_RB_AVAIL_DATA: u64 = 0;
    const BPF_RB_NO_WAKEUP: u64 = 1;
    const BPF_RB_FORCE_WAKEUP: u64 = 2;
    if EVENTS.query(BPF_RB_AVAIL_DATA) >= u64::from(WAKEUP_BYTES.load()) {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

#[inline(always)]
pub(crate) fn capture_limit() -> u64 {
    let c = u64::from(CAPTURE_BYTES.load());
    if c > MAX_CAPTURE as u64 { MAX_CAPTURE as u64 } else { c }
}

/// Copies `len` (<= MAX_CAPTURE) user bytes from `src` to `dst + off` (off < MAX_CAPTURE).
/// Returns false on a fault.
#[inline(always)]
pub(crate) fn read_into(data: *mut u8, off: u64, len: u64, src: u64) -> bool {
    let o = verifier_off(off) as usize;
    let mut l = len;
    if l > MAX_CAPTURE as u64 {
        l = MAX_CAPTURE as u64;
    }
    if l == 0 {
        return true;
    }
    // SAFETY: o < MAX_CAPTURE and l <= MAX_CAPTURE, and data points to 2 * MAX_CAPTURE
    // bytes of the scratch map value; the helper checks the user pointer itself.
    unsafe { read_user_raw(data.add(o).cast(), verifier_len(l), src as *const _) == 0 }
}

/// `len` (already in 1..=MAX_CAPTURE) as a value every kernel's verifier knows is in
/// 1..=MAX_CAPTURE. The compiler may spill a length to the stack before its bound check
/// and reload it after; verifiers before 6.2 or so keep no bounds for a scalar that was
/// unbounded when spilled (6.1: "R2 min value is negative"). `((len - 1) & (MAX - 1)) +
/// 1`, an identity on 1..=MAX_CAPTURE, in `asm!` so that the compiler, which knows the
/// range already, cannot drop it: the verifier sees the range on the very register passed
/// to the helper. (Real instructions: an empty template gets a line-info entry at the
/// same offset as the next, which 6.1 refuses.)
#[inline(always)]
fn verifier_off(off: u64) -> u64 {
    let mut v = off;
    // `off & (MAX_CAPTURE - 1)`, kept for the verifier as in `verifier_len`: the
    // compiler drops a plain mask when the loop's `got < want` already bounds it, and
    // verifiers before 6.8 do not learn a bound from a comparison of two registers.
    // SAFETY: one ALU instruction on one register; no memory, no flags.
    unsafe {
        core::arch::asm!("{0} &= {mask}", inout(reg) v, mask = const MAX_CAPTURE - 1, options(pure, nomem, nostack))
    };
    v
}

#[inline(always)]
fn verifier_len(len: u64) -> u32 {
    let mut v = len;
    // SAFETY: three ALU instructions on one register; no memory, no flags.
    unsafe {
        core::arch::asm!(
            "{0} += -1",
            "{0} &= {mask}",
            "{0} += 1",
            inout(reg) v,
            mask = const MAX_CAPTURE - 1,
            options(pure, nomem, nostack),
        )
    };
    v as u32
}

// ---------------------------------------------------------------------------------------
// Data syscalls
// ---------------------------------------------------------------------------------------

#[inline(always)]
fn enter_data(sys: Syscall, fd: u64, ptr: u64, len: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some(p) = tracked(tgid) else { return };
    let Some(s) = socket(tgid, fd as u32, &p) else { return };
    if s.role == ROLE_UNCONNECTED {
        return;
    }
    stash(pid_tgid, sys as u8, fd as u32, ptr, len, s.conn_id);
}

/// How the exit program finds the bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// One buffer: `ptr`.
    Flat,
    /// An iovec array `ptr` with `arg` entries.
    Iov,
    /// A `struct user_msghdr` at `ptr`.
    Msg,
    /// Nothing captured; `ret` is the byte count.
    Counted,
    /// Nothing captured; `ret` is a message count, sum `msg_len` of the mmsghdr array.
    Mmsg,
}

#[inline(always)]
fn exit_data(ctx: &RawTracePointContext, sys: Syscall, shape: Shape) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(inf) = unstash(pid_tgid, sys as u8) else { return };
    let ret = ret(ctx);
    if ret <= 0 {
        // Nothing was read: not what a memory BIO decrypts next.
        if let Some(p) = INFLIGHT.get_ptr_mut(pid_tgid) {
            // SAFETY: the thread's own slot.
            unsafe { (*p).done = OP_NONE };
        }
        return;
    }
    // Number this record in its fd's sequence, whether or not it reaches the ring.
    let tgid = (pid_tgid >> 32) as u32;
    let mut flags = 0u8;
    let mut seq = 0u32;
    match SOCKS.get_ptr_mut(SockKey { tgid, fd: inf.fd }) {
        // SAFETY: p points to the map value; concurrent writers on one fd only make the
        // sequence skip or repeat, which userspace treats as a possible hole.
        Some(p) if unsafe { (*p).conn_id } == inf.conn_id => unsafe {
            seq = (*p).seq;
            (*p).seq = seq.wrapping_add(1);
        },
        _ => flags |= FLAG_NO_SEQ,
    }
    // Inside an SSL_* call these are TLS records: the plaintext comes from the uprobes.
    let shape = if crate::tls::nested(pid_tgid, inf.conn_id, inf.fd) {
        flags |= FLAG_CIPHERTEXT;
        if shape == Shape::Mmsg { shape } else { Shape::Counted }
    } else {
        shape
    };
    let Some(rec) = SCRATCH.get_ptr_mut(0) else { return };
    // SAFETY: rec points to this CPU's scratch value; fields are written in place so no
    // large temporary lands on the 512-byte stack.
    let data: *mut u8 = unsafe { addr_of_mut!((*rec).data).cast() };

    let mut total = ret as u64;
    let want = {
        let c = capture_limit();
        if total < c { total } else { c }
    };
    let mut got: u64 = 0;
    match shape {
        Shape::Flat => {
            if read_into(data, 0, want, inf.ptr) {
                got = want;
            } else {
                flags |= FLAG_FAULT;
            }
        }
        Shape::Iov | Shape::Msg => {
            let (mut iov, mut vlen) = (inf.ptr, inf.arg);
            if shape == Shape::Msg {
                // struct user_msghdr: msg_iov @16, msg_iovlen @24
                // SAFETY: the helper checks the user pointer.
                let hdr = unsafe { bpf_probe_read_user((inf.ptr + 16) as *const [u64; 2]) };
                match hdr {
                    Ok([i, n]) => {
                        iov = i;
                        vlen = n;
                    }
                    Err(_) => {
                        vlen = 0;
                        flags |= FLAG_FAULT;
                    }
                }
            }
            for i in 0..MAX_IOVECS as u64 {
                if i >= vlen || got >= want {
                    break;
                }
                // SAFETY: the helper checks the user pointer.
                let Ok([base, len]) = (unsafe { bpf_probe_read_user((iov + 16 * i) as *const [u64; 2]) })
                else {
                    flags |= FLAG_FAULT;
                    break;
                };
                let room = want - got;
                let n = if len < room { len } else { room };
                if !read_into(data, got, n, base) {
                    flags |= FLAG_FAULT;
                    break;
                }
                got += n;
            }
        }
        Shape::Counted => flags |= FLAG_NO_CAPTURE,
        Shape::Mmsg => {
            flags |= FLAG_NO_CAPTURE;
            // struct mmsghdr { struct user_msghdr msg_hdr (56 bytes); unsigned msg_len; }
            let mut sum = 0u64;
            for i in 0..MAX_MMSG as u64 {
                if i >= total {
                    break;
                }
                // SAFETY: the helper checks the user pointer.
                match unsafe { bpf_probe_read_user((inf.ptr + 64 * i + 56) as *const u32) } {
                    Ok(l) => sum += u64::from(l),
                    Err(_) => {
                        flags |= FLAG_FAULT;
                        break;
                    }
                }
            }
            total = sum;
        }
    }
    if flags & FLAG_FAULT != 0 {
        count(counter::READ_FAULT, 1);
    }
    if got < total && flags & FLAG_NO_CAPTURE == 0 {
        flags |= FLAG_TRUNCATED;
        count(counter::CAPTURE_TRUNCATED, 1);
    }
    let dir = if sys.is_recv() { DIR_RECV } else { DIR_SEND };
    output_data(rec, sys, dir, inf.enter_ns, inf.conn_id, total, got, pid_tgid, inf.fd, flags, seq);
}

/// Fills the header of the data record in `rec` (its first `got` bytes captured already)
/// and writes it to the ring, counting it or its loss. True when it was written.
#[inline(always)]
#[allow(clippy::too_many_arguments, reason = "inlined; the header's fields")]
pub(crate) fn output_data(
    rec: *mut DataRecord,
    sys: Syscall,
    dir: u8,
    enter_ns: u64,
    conn_id: u64,
    total: u64,
    got: u64,
    pid_tgid: u64,
    fd: u32,
    flags: u8,
    seq: u32,
) -> bool {
    let got = if got > MAX_CAPTURE as u64 { MAX_CAPTURE as u64 } else { got };
    // SAFETY: rec is this CPU's scratch value; fields are written in place so no large
    // temporary lands on the 512-byte stack.
    unsafe {
        let h = addr_of_mut!((*rec).hdr);
        (*h).kind = RecordKind::Data as u32;
        (*h).cap_len = got as u32;
        (*h).enter_ns = enter_ns;
        (*h).exit_ns = now();
        (*h).conn_id = conn_id;
        (*h).total_len = total;
        (*h).tgid = (pid_tgid >> 32) as u32;
        (*h).tid = pid_tgid as u32;
        (*h).fd = fd;
        (*h).syscall = sys as u8;
        (*h).dir = dir;
        (*h).flags = flags;
        (*h)._pad = 0;
        (*h).seq = seq;
        (*h)._pad2 = 0;
    }
    let len = HDR + got as usize;
    // SAFETY: len <= HDR + MAX_CAPTURE <= size_of::<DataRecord>(), inside the map value.
    let bytes = unsafe { core::slice::from_raw_parts(rec as *const u8, len) };
    if EVENTS.output::<[u8]>(bytes, wakeup_flag()).is_ok() {
        count(counter::DATA_RECORDS, 1);
        count(counter::CAPTURED_BYTES, got);
        true
    } else {
        count(counter::RING_FULL_DATA, 1);
        count(counter::RING_FULL_DATA_BYTES, total);
        false
    }
}

macro_rules! data_programs {
    ($enter:ident, $exit:ident, $sys:expr, $shape:expr, |$ctx:ident| $args:expr) => {
        #[raw_tracepoint]
        pub fn $enter($ctx: RawTracePointContext) -> u32 {
            let (fd, ptr, len) = $args;
            enter_data($sys, fd, ptr, len);
            0
        }

        #[raw_tracepoint]
        pub fn $exit(ctx: RawTracePointContext) -> u32 {
            exit_data(&ctx, $sys, $shape);
            0
        }
    };
}

data_programs!(sys_enter_read, sys_exit_read, Syscall::Read, Shape::Flat, |c| (
    arg(&c, 0),
    arg(&c, 1),
    arg(&c, 2)
));
data_programs!(sys_enter_write, sys_exit_write, Syscall::Write, Shape::Flat, |c| (
    arg(&c, 0),
    arg(&c, 1),
    arg(&c, 2)
));
data_programs!(sys_enter_readv, sys_exit_readv, Syscall::Readv, Shape::Iov, |c| (
    arg(&c, 0),
    arg(&c, 1),
    arg(&c, 2)
));
data_programs!(sys_enter_writev, sys_exit_writev, Syscall::Writev, Shape::Iov, |c| (
    arg(&c, 0),
    arg(&c, 1),
    arg(&c, 2)
));
data_programs!(sys_enter_sendto, sys_exit_sendto, Syscall::Sendto, Shape::Flat, |c| (
    arg(&c, 0),
    arg(&c, 1),
    arg(&c, 2)
));
data_programs!(sys_enter_sendmsg, sys_exit_sendmsg, Syscall::Sendmsg, Shape::Msg, |c| (
    arg(&c, 0),
    arg(&c, 1),
    0
));
data_programs!(sys_enter_sendmmsg, sys_exit_sendmmsg, Syscall::Sendmmsg, Shape::Mmsg, |c| (
    arg(&c, 0),
    arg(&c, 1),
    0
));
data_programs!(sys_enter_recvmmsg, sys_exit_recvmmsg, Syscall::Recvmmsg, Shape::Mmsg, |c| (
    arg(&c, 0),
    arg(&c, 1),
    0
));
// sendfile64(out_fd, in_fd, offset, count): the socket is out_fd.
data_programs!(sys_enter_sendfile64, sys_exit_sendfile64, Syscall::Sendfile, Shape::Counted, |c| (
    arg(&c, 0),
    0,
    0
));

/// recvfrom and recvmsg skip MSG_PEEK: peeked bytes are read again by a later call.
#[inline(always)]
fn enter_recv(sys: Syscall, fd: u64, ptr: u64, len: u64, flags: u64) {
    if flags & MSG_PEEK != 0 {
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        if tracked(tgid).is_some() {
            count(counter::PEEK_SKIPPED, 1);
        }
        return;
    }
    enter_data(sys, fd, ptr, len);
}

#[raw_tracepoint]
pub fn sys_enter_recvfrom(c: RawTracePointContext) -> u32 {
    // recvfrom(fd, ubuf, size, flags, addr, addr_len)
    enter_recv(Syscall::Recvfrom, arg(&c, 0), arg(&c, 1), arg(&c, 2), arg(&c, 3));
    0
}

#[raw_tracepoint]
pub fn sys_exit_recvfrom(c: RawTracePointContext) -> u32 {
    exit_data(&c, Syscall::Recvfrom, Shape::Flat);
    0
}

#[raw_tracepoint]
pub fn sys_enter_recvmsg(c: RawTracePointContext) -> u32 {
    // recvmsg(fd, msg, flags)
    enter_recv(Syscall::Recvmsg, arg(&c, 0), arg(&c, 1), 0, arg(&c, 2));
    0
}

#[raw_tracepoint]
pub fn sys_exit_recvmsg(c: RawTracePointContext) -> u32 {
    exit_data(&c, Syscall::Recvmsg, Shape::Msg);
    0
}

// ---------------------------------------------------------------------------------------
// Connections: socket, connect, accept, close, dup*, fcntl, close_range
// ---------------------------------------------------------------------------------------

#[raw_tracepoint]
pub fn sys_enter_socket(c: RawTracePointContext) -> u32 {
    // socket(family, type, protocol): only IPv4, IPv6 and Unix stream sockets.
    let family = arg(&c, 0) as u16;
    let ty = arg(&c, 1);
    if !matches!(family, AF_UNIX | AF_INET | AF_INET6) || ty & SOCK_TYPE_MASK != SOCK_STREAM {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if tracked((pid_tgid >> 32) as u32).is_some() {
        stash(pid_tgid, OP_SOCKET, 0, 0, 0, 0);
    }
    0
}

#[raw_tracepoint]
pub fn sys_exit_socket(c: RawTracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if unstash(pid_tgid, OP_SOCKET).is_none() {
        return 0;
    }
    let fd = ret(&c);
    let tgid = (pid_tgid >> 32) as u32;
    if fd < 0 {
        return 0;
    }
    let Some(p) = tracked(tgid) else { return 0 };
    let v = SockVal::new(0, p.epoch, ROLE_UNCONNECTED);
    if let Err(e) = SOCKS.insert(SockKey { tgid, fd: fd as u32 }, v, 0) {
        insert_failed(e, counter::SOCK_TABLE_FULL, counter::SOCK_TABLE_ERROR);
    }
    0
}

/// Reads a value from kernel memory.
#[inline(always)]
fn kread<T>(addr: u64) -> Option<T> {
    // SAFETY: the helper checks the address and reports a fault instead of faulting.
    unsafe { bpf_probe_read_kernel(addr as *const T).ok() }
}

/// The `struct sock` behind the calling process's `fd`:
/// current->files->fdt->fd[fd]->private_data (a `struct socket`)->sk.
#[inline(always)]
fn sock_of_fd(fd: u32, o: &KernelOffsets) -> Option<u64> {
    // SAFETY: helper without arguments.
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = kread(task + u64::from(o.task_files))?;
    let fdt: u64 = kread(files + u64::from(o.files_fdt))?;
    let max: u32 = kread(fdt + u64::from(o.fdt_max_fds))?;
    if fd >= max {
        return None;
    }
    let arr: u64 = kread(fdt + u64::from(o.fdt_fd))?;
    let file: u64 = kread(arr + 8 * u64::from(fd))?;
    let sock: u64 = kread(file + u64::from(o.file_private_data))?;
    let sk: u64 = kread(sock + u64::from(o.socket_sk))?;
    (sk != 0).then_some(sk)
}

/// Writes the bound name of a Unix socket (`unix_sk(sk)->addr`) as a sockaddr_un into
/// `dst`; an unnamed socket is just the family. Returns the length.
#[inline(always)]
fn unix_name(sk: u64, o: &KernelOffsets, dst: *mut u8) -> u32 {
    let ua: u64 = kread(sk + u64::from(o.unix_addr)).unwrap_or(0);
    if ua != 0 {
        let len: i32 = kread(ua + u64::from(o.unix_address_len)).unwrap_or(0);
        let mut n = if len > 0 { len as u32 } else { 0 };
        if n > SOCKADDR_BYTES as u32 {
            n = SOCKADDR_BYTES as u32;
        }
        let src = (ua + u64::from(o.unix_address_name)) as *const _;
        // SAFETY: dst points to SOCKADDR_BYTES bytes of a ring reservation; n is bounded;
        // the helper checks the kernel address.
        let ok = n > 0 && unsafe { read_kernel_raw(dst.cast(), n, src) } == 0;
        if ok {
            return n;
        }
    }
    // SAFETY: dst has room for the family.
    unsafe { core::ptr::write_unaligned(dst.cast::<u16>(), AF_UNIX) };
    2
}

/// Fills `local` and `peer` of a ConnOpen from the socket itself. Returns false when the
/// socket could not be read (the caller falls back to the syscall's address).
#[inline(always)]
fn addrs_from_sock(fd: u32, p: *mut ConnOpen) -> bool {
    let o = KOFFS.load();
    if o.ok == 0 {
        return false;
    }
    let Some(sk) = sock_of_fd(fd, &o) else { return false };
    let Some(family) = kread::<u16>(sk + u64::from(o.skc_family)) else { return false };
    // SAFETY: p points to a reserved ConnOpen; every write below stays inside its local
    // and peer arrays (at most 28 bytes for IP, SOCKADDR_BYTES for Unix).
    unsafe {
        let local: *mut u8 = addr_of_mut!((*p).local).cast();
        let peer: *mut u8 = addr_of_mut!((*p).peer).cast();
        match family {
            AF_INET | AF_INET6 => {
                // skc_num is the local port in host order; skc_dport is in network order.
                let lport: u16 = kread(sk + u64::from(o.skc_num)).unwrap_or(0);
                let dport: u16 = kread(sk + u64::from(o.skc_dport)).unwrap_or(0);
                core::ptr::write_bytes(local, 0, 28);
                core::ptr::write_bytes(peer, 0, 28);
                core::ptr::write_unaligned(local.cast::<u16>(), family);
                core::ptr::write_unaligned(peer.cast::<u16>(), family);
                core::ptr::write_unaligned(local.add(2).cast::<u16>(), lport.to_be());
                core::ptr::write_unaligned(peer.add(2).cast::<u16>(), dport);
                let n = if family == AF_INET {
                    let l: u32 = kread(sk + u64::from(o.skc_rcv_saddr)).unwrap_or(0);
                    let d: u32 = kread(sk + u64::from(o.skc_daddr)).unwrap_or(0);
                    core::ptr::write_unaligned(local.add(4).cast::<u32>(), l);
                    core::ptr::write_unaligned(peer.add(4).cast::<u32>(), d);
                    16
                } else {
                    let l: [u64; 2] = kread(sk + u64::from(o.skc_v6_rcv_saddr)).unwrap_or([0; 2]);
                    let d: [u64; 2] = kread(sk + u64::from(o.skc_v6_daddr)).unwrap_or([0; 2]);
                    core::ptr::write_unaligned(local.add(8).cast::<[u64; 2]>(), l);
                    core::ptr::write_unaligned(peer.add(8).cast::<[u64; 2]>(), d);
                    28
                };
                (*p).local_len = n;
                (*p).peer_len = n;
            }
            AF_UNIX => {
                (*p).local_len = unix_name(sk, &o, local);
                let psk: u64 = kread(sk + u64::from(o.unix_peer)).unwrap_or(0);
                (*p).peer_len = if psk != 0 { unix_name(psk, &o, peer) } else { 0 };
            }
            _ => return false,
        }
    }
    true
}

/// Emits a ConnOpen record. Addresses come from the socket when the kernel offsets are
/// known; otherwise the peer is copied from the syscall's user sockaddr at `addr`
/// (`addr_len` is the caller's buffer size, or the kernel's result for accept).
#[inline(always)]
#[allow(clippy::too_many_arguments, reason = "inlined; one call per role")]
fn emit_open(
    kind: RecordKind,
    error: u16,
    pid_tgid: u64,
    fd: u32,
    conn_id: u64,
    role: u8,
    in_progress: bool,
    listen_fd: u32,
    addr: u64,
    addr_len: u64,
) {
    let Some(mut e) = EVENTS.reserve::<ConnOpen>(0) else {
        count(counter::RING_FULL_CONTROL, 1);
        return;
    };
    let p = e.as_mut_ptr();
    // SAFETY: p points to a reserved ConnOpen in the ring buffer.
    unsafe {
        (*p).kind = kind as u32;
        (*p).tgid = (pid_tgid >> 32) as u32;
        (*p).ts_ns = now();
        (*p).conn_id = conn_id;
        (*p).tid = pid_tgid as u32;
        (*p).fd = fd;
        (*p).role = role;
        (*p).in_progress = u8::from(in_progress);
        (*p).error = error;
        (*p).listen_fd = listen_fd;
        (*p).local_len = 0;
        (*p).peer_len = 0;
    }
    // A failed connect leaves the socket without a peer: take the syscall's argument.
    if (kind == RecordKind::ConnFailed || !addrs_from_sock(fd, p)) && addr != 0 {
        let n = if addr_len > SOCKADDR_BYTES as u64 { SOCKADDR_BYTES as u32 } else { addr_len as u32 };
        // SAFETY: p points to a reserved ConnOpen; n <= SOCKADDR_BYTES.
        unsafe {
            let dst: *mut u8 = addr_of_mut!((*p).peer).cast();
            if n > 0 && read_user_raw(dst.cast(), n, addr as *const _) != 0 {
                count(counter::READ_FAULT, 1);
            } else {
                (*p).peer_len = n;
            }
        }
    }
    e.submit(wakeup_flag());
}

#[inline(always)]
fn emit_fd(kind: RecordKind, pid_tgid: u64, fd: u32, conn_id: u64) {
    let Some(mut e) = EVENTS.reserve::<ConnFd>(0) else {
        count(counter::RING_FULL_CONTROL, 1);
        return;
    };
    let p = e.as_mut_ptr();
    // SAFETY: p points to a reserved ConnFd in the ring buffer.
    unsafe {
        (*p).kind = kind as u32;
        (*p).tgid = (pid_tgid >> 32) as u32;
        (*p).ts_ns = now();
        (*p).conn_id = conn_id;
        (*p).tid = pid_tgid as u32;
        (*p).fd = fd;
    }
    e.submit(wakeup_flag());
}

#[raw_tracepoint]
pub fn sys_enter_connect(c: RawTracePointContext) -> u32 {
    // connect(fd, uservaddr, addrlen)
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some(p) = tracked(tgid) else { return 0 };
    let fd = arg(&c, 0) as u32;
    // Only stream sockets whose socket() we saw (or that /proc showed unconnected).
    let Some(s) = socket(tgid, fd, &p) else { return 0 };
    if s.role != ROLE_UNCONNECTED {
        return 0;
    }
    stash(pid_tgid, OP_CONNECT, fd, arg(&c, 1), arg(&c, 2), 0);
    0
}

#[raw_tracepoint]
pub fn sys_exit_connect(c: RawTracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(inf) = unstash(pid_tgid, OP_CONNECT) else { return 0 };
    let ret = ret(&c);
    let tgid = (pid_tgid >> 32) as u32;
    let Some(p) = tracked(tgid) else { return 0 };
    // A non-blocking connect returns EINPROGRESS and completes later: trace it from now,
    // the first successful read or write proves the connection. One that failed at once
    // is reported (a database connection error) and not traced; a connect interrupted
    // (EINTR) or repeated (EALREADY, EISCONN) says nothing new.
    if ret != 0 && ret != -EINPROGRESS {
        if ret != -EINTR && ret != -EALREADY && ret != -EISCONN && ret > -4096 {
            let conn_id = next_conn_id();
            emit_open(
                RecordKind::ConnFailed,
                (-ret) as u16,
                pid_tgid,
                inf.fd,
                conn_id,
                ROLE_CLIENT,
                false,
                u32::MAX,
                inf.ptr,
                inf.arg,
            );
        }
        return 0;
    }
    let conn_id = next_conn_id();
    let v = SockVal::new(conn_id, p.epoch, ROLE_CLIENT);
    if let Err(e) = SOCKS.insert(SockKey { tgid, fd: inf.fd }, v, 0) {
        insert_failed(e, counter::SOCK_TABLE_FULL, counter::SOCK_TABLE_ERROR);
        return 0;
    }
    emit_open(
        RecordKind::ConnOpen,
        0,
        pid_tgid,
        inf.fd,
        conn_id,
        ROLE_CLIENT,
        ret != 0,
        u32::MAX,
        inf.ptr,
        inf.arg,
    );
    0
}

#[inline(always)]
fn enter_accept(c: &RawTracePointContext) {
    // accept(fd, upeer_sockaddr, upeer_addrlen) / accept4(..., flags)
    let pid_tgid = bpf_get_current_pid_tgid();
    if tracked((pid_tgid >> 32) as u32).is_some() {
        stash(pid_tgid, OP_ACCEPT, arg(c, 0) as u32, arg(c, 1), arg(c, 2), 0);
    }
}

#[inline(always)]
fn exit_accept(c: &RawTracePointContext) {
    let pid_tgid = bpf_get_current_pid_tgid();
    // No stash: the thread was already blocked in accept() when the programs attached (or
    // its process was not traced yet). The new socket is still a connection of a traced
    // process: taken without the listener and the user's sockaddr (addresses come from
    // the socket itself).
    let inf = unstash(pid_tgid, OP_ACCEPT).unwrap_or(Inflight {
        enter_ns: 0,
        ptr: 0,
        arg: 0,
        conn_id: 0,
        fd: u32::MAX,
        op: OP_ACCEPT,
        done: OP_NONE,
        _pad: [0; 2],
    });
    let fd = ret(c);
    if fd < 0 {
        return;
    }
    let tgid = (pid_tgid >> 32) as u32;
    let Some(p) = tracked(tgid) else { return };
    let mut addr_len = 0u64;
    if inf.ptr != 0 && inf.arg != 0 {
        // SAFETY: the helper checks the user pointer.
        if let Ok(l) = unsafe { bpf_probe_read_user(inf.arg as *const i32) } {
            addr_len = if l > 0 { l as u64 } else { 0 };
        }
        // The family tells whether this is a socket kind we trace.
        // SAFETY: the helper checks the user pointer.
        if let Ok(family) = unsafe { bpf_probe_read_user(inf.ptr as *const u16) }
            && addr_len >= 2
            && !matches!(family, AF_UNIX | AF_INET | AF_INET6)
        {
            return;
        }
    }
    let conn_id = next_conn_id();
    let v = SockVal::new(conn_id, p.epoch, ROLE_SERVER);
    if let Err(e) = SOCKS.insert(SockKey { tgid, fd: fd as u32 }, v, 0) {
        insert_failed(e, counter::SOCK_TABLE_FULL, counter::SOCK_TABLE_ERROR);
        return;
    }
    emit_open(
        RecordKind::ConnOpen,
        0,
        pid_tgid,
        fd as u32,
        conn_id,
        ROLE_SERVER,
        false,
        inf.fd,
        inf.ptr,
        addr_len,
    );
}

#[raw_tracepoint]
pub fn sys_enter_accept(c: RawTracePointContext) -> u32 {
    enter_accept(&c);
    0
}

#[raw_tracepoint]
pub fn sys_exit_accept(c: RawTracePointContext) -> u32 {
    exit_accept(&c);
    0
}

#[raw_tracepoint]
pub fn sys_enter_accept4(c: RawTracePointContext) -> u32 {
    enter_accept(&c);
    0
}

#[raw_tracepoint]
pub fn sys_exit_accept4(c: RawTracePointContext) -> u32 {
    exit_accept(&c);
    0
}

/// Forgets (tgid, fd); says so to userspace if it was a connection of the current epoch.
#[inline(always)]
fn forget_fd(pid_tgid: u64, fd: u32, p: &ProcVal) {
    let key = SockKey { tgid: (pid_tgid >> 32) as u32, fd };
    // SAFETY: the value is copied out at once.
    let Some(s) = (unsafe { SOCKS.get(key).copied() }) else { return };
    let _ = SOCKS.remove(key);
    if s.epoch == p.epoch && s.role != ROLE_UNCONNECTED {
        emit_fd(RecordKind::ConnClose, pid_tgid, fd, s.conn_id);
    }
}

#[raw_tracepoint]
pub fn sys_enter_close(c: RawTracePointContext) -> u32 {
    // close(fd): the fd is released even when close reports an error (but EBADF).
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(p) = tracked((pid_tgid >> 32) as u32) else { return 0 };
    forget_fd(pid_tgid, arg(&c, 0) as u32, &p);
    0
}

#[inline(always)]
fn enter_dup(oldfd: u64, newfd: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    if tracked((pid_tgid >> 32) as u32).is_some() {
        stash(pid_tgid, OP_DUP, oldfd as u32, 0, newfd, 0);
    }
}

/// After dup/dup2/dup3/fcntl(F_DUPFD*) returned `newfd`: a socket that was at newfd is
/// gone (dup2/dup3 close it), and newfd now names the same socket as oldfd.
#[inline(always)]
fn exit_dup(c: &RawTracePointContext) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(inf) = unstash(pid_tgid, OP_DUP) else { return };
    let ret = ret(c);
    if ret < 0 || ret as u32 == inf.fd {
        return;
    }
    let tgid = (pid_tgid >> 32) as u32;
    let Some(p) = tracked(tgid) else { return };
    let newfd = ret as u32;
    forget_fd(pid_tgid, newfd, &p);
    let Some(s) = socket(tgid, inf.fd, &p) else { return };
    if let Err(e) = SOCKS.insert(SockKey { tgid, fd: newfd }, s, 0) {
        insert_failed(e, counter::SOCK_TABLE_FULL, counter::SOCK_TABLE_ERROR);
        return;
    }
    if s.role != ROLE_UNCONNECTED {
        emit_fd(RecordKind::ConnDup, pid_tgid, newfd, s.conn_id);
    }
}

#[raw_tracepoint]
pub fn sys_enter_dup(c: RawTracePointContext) -> u32 {
    enter_dup(arg(&c, 0), NO_FD);
    0
}

#[raw_tracepoint]
pub fn sys_exit_dup(c: RawTracePointContext) -> u32 {
    exit_dup(&c);
    0
}

#[raw_tracepoint]
pub fn sys_enter_dup2(c: RawTracePointContext) -> u32 {
    enter_dup(arg(&c, 0), arg(&c, 1));
    0
}

#[raw_tracepoint]
pub fn sys_exit_dup2(c: RawTracePointContext) -> u32 {
    exit_dup(&c);
    0
}

#[raw_tracepoint]
pub fn sys_enter_dup3(c: RawTracePointContext) -> u32 {
    enter_dup(arg(&c, 0), arg(&c, 1));
    0
}

#[raw_tracepoint]
pub fn sys_exit_dup3(c: RawTracePointContext) -> u32 {
    exit_dup(&c);
    0
}

#[raw_tracepoint]
pub fn sys_enter_fcntl(c: RawTracePointContext) -> u32 {
    // fcntl(fd, cmd, arg): only the duplicating commands matter.
    let cmd = arg(&c, 1);
    if cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC {
        enter_dup(arg(&c, 0), NO_FD);
    }
    0
}

#[raw_tracepoint]
pub fn sys_exit_fcntl(c: RawTracePointContext) -> u32 {
    exit_dup(&c);
    0
}

/// Moves the process to a new fd-table epoch (every socket entry becomes stale) and tells
/// userspace, which re-enters the connections that are still open.
#[inline(always)]
fn bump_epoch(tgid: u32, p: &ProcVal) -> u32 {
    let epoch = p.epoch.wrapping_add(1);
    let v = ProcVal { epoch, _pad: 0 };
    // Only an update (BPF_EXIST): a process untracked meanwhile is not tracked again. On
    // failure the table still holds the old epoch, and the old epoch is what is reported.
    if let Err(e) = TRACKED.insert(tgid, v, u64::from(BPF_EXIST)) {
        insert_failed(e, counter::PROC_TABLE_FULL, counter::PROC_TABLE_ERROR);
        return p.epoch;
    }
    epoch
}

/// close_range ranges up to this long are forgotten fd by fd; longer ones (typically
/// `close_range(3, ~0U)` before exec) move the process to a new fd-table epoch.
const CLOSE_RANGE_LOOP: u32 = 64;

#[raw_tracepoint]
pub fn sys_enter_close_range(c: RawTracePointContext) -> u32 {
    // close_range(fd, max_fd, flags); CLOSE_RANGE_CLOEXEC only marks them (exec closes).
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some(p) = tracked(tgid) else { return 0 };
    if arg(&c, 2) & CLOSE_RANGE_CLOEXEC != 0 {
        return 0;
    }
    let (lo, hi) = (arg(&c, 0) as u32, arg(&c, 1) as u32);
    if hi < lo {
        return 0;
    }
    if hi - lo < CLOSE_RANGE_LOOP {
        for i in 0..CLOSE_RANGE_LOOP {
            let fd = lo + i;
            if fd > hi {
                break;
            }
            forget_fd(pid_tgid, fd, &p);
        }
        return 0;
    }
    let epoch = bump_epoch(tgid, &p);
    let Some(mut e) = EVENTS.reserve::<FdEpoch>(0) else {
        count(counter::RING_FULL_CONTROL, 1);
        return 0;
    };
    let r = e.as_mut_ptr();
    // SAFETY: r points to a reserved FdEpoch in the ring buffer.
    unsafe {
        (*r).kind = RecordKind::FdEpoch as u32;
        (*r).tgid = tgid;
        (*r).ts_ns = now();
        (*r).lo = lo;
        (*r).hi = hi;
        (*r).epoch = epoch;
        (*r)._pad = 0;
    }
    e.submit(wakeup_flag());
    0
}

// ---------------------------------------------------------------------------------------
// Executable mappings: libraries loaded after the agent looked (dlopen)
// ---------------------------------------------------------------------------------------

const OP_MMAP: u8 = 36;
const PROT_EXEC: u64 = 4;
/// Errors of mmap are -4095..-1; every address it returns is above.
const MAX_ERRNO: i64 = 4095;

/// A tracked process maps a file executable (the loader does it for each library's code):
/// userspace looks at its mappings again for a TLS library to attach to.
#[raw_tracepoint]
pub fn sys_enter_mmap(c: RawTracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if tracked((pid_tgid >> 32) as u32).is_none() {
        return 0;
    }
    let fd = arg(&c, 4) as i32;
    if arg(&c, 2) & PROT_EXEC == 0 || fd < 0 {
        return 0;
    }
    stash(pid_tgid, OP_MMAP, fd as u32, 0, 0, 0);
    0
}

#[raw_tracepoint]
pub fn sys_exit_mmap(c: RawTracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(inf) = unstash(pid_tgid, OP_MMAP) else { return 0 };
    let r = ret(&c);
    if (-MAX_ERRNO..0).contains(&r) {
        return 0;
    }
    emit_proc(RecordKind::ProcMap, (pid_tgid >> 32) as u32, inf.fd, 0);
    0
}

// ---------------------------------------------------------------------------------------
// Processes: fork, exec, exit
// ---------------------------------------------------------------------------------------

#[inline(always)]
fn emit_proc(kind: RecordKind, pid: u32, arg: u32, epoch: u32) {
    let Some(mut e) = EVENTS.reserve::<ProcEvent>(0) else {
        count(counter::RING_FULL_CONTROL, 1);
        return;
    };
    let r = e.as_mut_ptr();
    // SAFETY: r points to a reserved ProcEvent in the ring buffer.
    unsafe {
        (*r).kind = kind as u32;
        (*r).pid = pid;
        (*r).ts_ns = now();
        (*r).arg = arg;
        (*r).epoch = epoch;
    }
    // A library being loaded is worth a wake-up: its probes should be set before the
    // app's first call into it, which often follows within milliseconds.
    const BPF_RB_FORCE_WAKEUP: u64 = 2;
    e.submit(if matches!(kind, RecordKind::ProcMap) { BPF_RB_FORCE_WAKEUP } else { wakeup_flag() });
}

/// A tracked process's new child is tracked too (pre-forked gunicorn/uwsgi workers).
/// It fires in the parent before the child first runs, so no child syscall is missed.
/// Raw arguments: the parent and the child `task_struct`.
#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn sched_process_fork(c: RawTracePointContext) -> u32 {
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    if tracked(parent).is_none() {
        return 0;
    }
    let task: u64 = c.arg(1);
    let Some(child) = kread::<u32>(task + u64::from(KOFFS.load().task_tgid)) else {
        return 0;
    };
    // A new thread is not a new process: it shares its parent's tgid.
    if child == parent {
        return 0;
    }
    // A new process starts at epoch 0, also over an entry already there (userspace found
    // it first, or a reused pid whose exit was missed: its old epoch would make every
    // socket of the child stale).
    let v = ProcVal { epoch: 0, _pad: 0 };
    if let Err(e) = TRACKED.insert(child, v, 0) {
        insert_failed(e, counter::PROC_TABLE_FULL, counter::PROC_TABLE_ERROR);
        return 0;
    }
    emit_proc(RecordKind::ProcFork, child, parent, 0);
    0
}

/// Every exec is reported (userspace selectors may start tracking the new program). For a
/// tracked process, exec closed its CLOEXEC fds without close(2): move to a new epoch.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sched_process_exec(_c: RawTracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if own_tgid(tgid) {
        return 0;
    }
    match tracked(tgid) {
        Some(p) => {
            let epoch = bump_epoch(tgid, &p);
            emit_proc(RecordKind::ProcExec, tgid, 1, epoch);
        }
        None => emit_proc(RecordKind::ProcExec, tgid, 0, 0),
    }
    0
}

/// A thread exits: drop its in-flight stash; the last thread of a tracked process drops
/// the process (userspace then drops its sockets).
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn sched_process_exit(_c: RawTracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // Slots stay with their thread: drop this one's whether or not its process is still
    // tracked (it may have been untracked since).
    let _ = INFLIGHT.remove(pid_tgid);
    crate::tls::thread_exit(pid_tgid);
    crate::sqlite::thread_exit(pid_tgid);
    if tracked(tgid).is_none() {
        return 0;
    }
    // The exiting task is current; its signal_struct's live count already excludes it
    // (the raw arguments differ between kernels: group_dead was added in 6.16).
    let o = KOFFS.load();
    // SAFETY: helper without arguments.
    let task = unsafe { bpf_get_current_task() };
    let Some(signal) = kread::<u64>(task + u64::from(o.task_signal)) else { return 0 };
    let Some(live) = kread::<i32>(signal + u64::from(o.signal_live)) else { return 0 };
    if live == 0 {
        let _ = TRACKED.remove(tgid);
        emit_proc(RecordKind::ProcExit, tgid, 0, 0);
    }
    0
}

// ---------------------------------------------------------------------------------------
// Dispatch: the only syscall attachments
// ---------------------------------------------------------------------------------------

/// Syscall entry handlers by syscall number (userspace fills the slots it handles).
#[map]
static ENTER: ProgramArray = ProgramArray::with_max_entries(SYSCALL_SLOTS, 0);

/// Syscall exit handlers by syscall number.
#[map]
static EXIT: ProgramArray = ProgramArray::with_max_entries(SYSCALL_SLOTS, 0);

/// Every syscall entry on the machine: a tail call to its handler, if it has one (a tail
/// call to an empty slot returns here).
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn sys_enter(c: RawTracePointContext) -> u32 {
    let nr: u64 = c.arg(1);
    if nr < u64::from(SYSCALL_SLOTS) {
        // SAFETY: the handlers are raw tracepoint programs that take this same context.
        unsafe { ENTER.tail_call(&c, nr as u32) };
    }
    0
}

/// Every syscall exit: the number is in the saved registers (`orig_ax`).
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn sys_exit(c: RawTracePointContext) -> u32 {
    let regs: u64 = c.arg(0);
    let Some(nr) = kread::<u64>(regs + u64::from(KOFFS.load().regs_orig_ax)) else { return 0 };
    if nr < u64::from(SYSCALL_SLOTS) {
        // SAFETY: as in sys_enter.
        unsafe { EXIT.tail_call(&c, nr as u32) };
    }
    0
}
