//! Loader: embeds the kernel object, checks the machine, loads and attaches every program,
//! and gives typed access to the maps userspace reads and writes.
//!
//! Every failure a user can meet on a real machine (not root, no BTF, kernel too old, a
//! program the verifier rejects) is a [`LoadError`] with a one-line message.
//!
//! Attachments: raw tracepoints only (`sys_enter`, `sys_exit` and three sched events);
//! the syscall handlers are tail-call targets in the `ENTER`/`EXIT` tables (`syscalls`).
//! Raw tracepoints detach without waiting for RCU grace periods, so the agent exits at
//! once, and they need no tracefs.

pub mod btf;
mod preflight;
mod stats;
mod syscalls;

use std::{collections::BTreeMap, io};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, ProgramArray, RingBuf},
    programs::{
        Program, ProgramError, RawTracePoint, UProbe,
        raw_trace_point::RawTracePointLinkId,
        uprobe::{UProbeLinkId, UProbeScope},
    },
};
use observer_ebpf::{KernelOffsets, MAX_CAPTURE, ProcVal, SockKey, SockVal, counter};
pub use stats::ProgramStats;

/// The kernel object built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer-ebpf"));

/// Bpf flag for map updates: fail if the key exists.
const BPF_NOEXIST: u64 = 1;

/// Load-time settings; each is a bound with a flag (see `cli`).
#[derive(Debug, Clone)]
pub struct Options {
    /// Bytes captured per syscall.
    pub capture_bytes: u32,
    /// Ring buffer size in bytes (a power of two, at least one page).
    pub ring_bytes: u32,
    /// Socket table entries (sockets of tracked processes).
    pub max_connections: u32,
    /// Tracked processes.
    pub max_processes: u32,
    /// Syscalls in flight at once (one per thread inside a traced syscall).
    pub max_inflight: u32,
    /// The uprobes' libraries (userspace bounds).
    pub libraries: crate::libs::Bounds,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            capture_bytes: crate::DEFAULT_CAPTURE_BYTES,
            ring_bytes: 8 << 20,
            max_connections: 65_536,
            max_processes: 8_192,
            max_inflight: 16_384,
            libraries: crate::libs::Bounds::default(),
        }
    }
}

/// Why the kernel programs could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Preflight(String),
    #[error("invalid setting: {0}")]
    Setting(String),
    #[error("this observer binary was built without its eBPF programs (AYA_BUILD_SKIP); rebuild it")]
    NoObject,
    #[error("loading the eBPF object failed: {0}")]
    Object(#[source] aya::EbpfError),
    #[error("the kernel rejected program {program}: {reason}")]
    Rejected { program: String, reason: String },
    #[error("attaching {program} failed: {source}")]
    Attach {
        program: String,
        #[source]
        source: ProgramError,
    },
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// The loaded and attached programs with their maps.
pub struct Probe {
    ebpf: Ebpf,
    ring: Option<RingBuf<MapData>>,
    /// Each attached program's link, detached on drop.
    links: Vec<(String, RawTracePointLinkId)>,
}

impl Probe {
    /// Checks the machine, loads every program with `opts`, and attaches them.
    pub fn load(opts: &Options) -> Result<Self, LoadError> {
        if OBJECT.is_empty() {
            return Err(LoadError::NoObject);
        }
        preflight::check()?;
        if opts.capture_bytes as usize > MAX_CAPTURE {
            return Err(LoadError::Setting(format!("--capture-bytes must be at most {MAX_CAPTURE}")));
        }
        let page = page_size();
        if !opts.ring_bytes.is_power_of_two() || (opts.ring_bytes as usize) < page {
            return Err(LoadError::Setting(format!(
                "--ring-buffer-bytes must be a power of two of at least {page}"
            )));
        }
        for (name, v) in [
            ("--max-connections", opts.max_connections),
            ("--max-processes", opts.max_processes),
            ("--max-inflight-syscalls", opts.max_inflight),
        ] {
            if v == 0 {
                return Err(LoadError::Setting(format!("{name} must be positive")));
            }
        }
        let own_tgid = std::process::id();
        let offsets = kernel_offsets()?;
        let mut ebpf = EbpfLoader::new()
            .override_global("OWN_TGID", &own_tgid, true)
            .override_global("KOFFS", &offsets, true)
            .override_global("CAPTURE_BYTES", &opts.capture_bytes, true)
            .override_global("WAKEUP_BYTES", &(opts.ring_bytes / 8), true)
            .map_max_entries("EVENTS", opts.ring_bytes)
            .map_max_entries("SOCKS", opts.max_connections)
            .map_max_entries("TRACKED", opts.max_processes)
            .map_max_entries("INFLIGHT", opts.max_inflight)
            .map_max_entries("SSL_CALLS", opts.max_inflight)
            .map_max_entries("SSL_CONNS", opts.max_connections)
            .map_max_entries("SQL_CALLS", opts.max_inflight)
            .load(OBJECT)
            .map_err(LoadError::Object)?;

        let names: Vec<String> = ebpf.programs().map(|(n, _)| n.to_string()).collect();
        let mut links = Vec::new();
        let mut handlers = Vec::new();
        let mut uprobes = 0;
        for name in names {
            // Uprobes are loaded now and placed on each library when one is found
            // (`crate::libs`).
            if let Some(Program::UProbe(p)) = ebpf.program_mut(&name) {
                p.load().map_err(|e| rejected(&name, e))?;
                uprobes += 1;
                continue;
            }
            let prog: &mut RawTracePoint =
                ebpf.program_mut(&name).and_then(|p| p.try_into().ok()).ok_or_else(|| {
                    LoadError::Rejected { program: name.clone(), reason: "not a raw tracepoint".into() }
                })?;
            prog.load().map_err(|e| rejected(&name, e))?;
            match syscalls::slot(&name) {
                Some((side, syscall)) => {
                    let nr = syscalls::number(syscall).ok_or_else(|| LoadError::Rejected {
                        program: name.clone(),
                        reason: "no syscall number for this handler".into(),
                    })?;
                    let fd =
                        prog.fd().map_err(|e| rejected(&name, e))?.try_clone().map_err(|e| {
                            LoadError::Rejected { program: name.clone(), reason: e.to_string() }
                        })?;
                    handlers.push((side, nr, fd));
                }
                None => {
                    // The program's name is its tracepoint's (sys_enter, sched_process_fork...).
                    let link = prog
                        .attach(&name)
                        .map_err(|source| LoadError::Attach { program: name.clone(), source })?;
                    links.push((name, link));
                }
            }
        }
        // Handlers go in before any syscall can reach them: until then a slot is empty
        // and the dispatcher returns at once.
        for (side, table) in [(syscalls::Side::Enter, "ENTER"), (syscalls::Side::Exit, "EXIT")] {
            let map = ebpf.map_mut(table).ok_or(LoadError::MissingMap(table))?;
            let mut slots =
                ProgramArray::try_from(map).map_err(|source| LoadError::Map { name: table, source })?;
            for (_, nr, fd) in handlers.iter().filter(|(s, _, _)| *s == side) {
                slots.set(*nr, fd, 0).map_err(|source| LoadError::Map { name: table, source })?;
            }
        }
        let ring = RingBuf::try_from(ebpf.take_map("EVENTS").ok_or(LoadError::MissingMap("EVENTS"))?)
            .map_err(|source| LoadError::Map { name: "EVENTS", source })?;
        // What an operator needs to know of this kernel at start: which it is, and what of
        // the optional parts are in use (socket addresses from the kernel's own structs,
        // else from the syscalls' arguments and /proc).
        tracing::info!(
            kernel = preflight::kernel_release(),
            tracepoints = links.len(),
            syscall_handlers = handlers.len(),
            uprobe_programs = uprobes,
            socket_offsets = offsets.ok == 1,
            ring_buffer_bytes = opts.ring_bytes,
            capture_bytes = opts.capture_bytes,
            "eBPF programs loaded and attached"
        );
        Ok(Self { ebpf, ring: Some(ring), links })
    }

    /// The ring buffer, to be read by the event pump (once).
    pub fn take_ring(&mut self) -> Option<RingBuf<MapData>> {
        self.ring.take()
    }

    fn tracked_map(&mut self) -> Result<HashMap<&mut MapData, u32, ProcVal>, LoadError> {
        let map = self.ebpf.map_mut("TRACKED").ok_or(LoadError::MissingMap("TRACKED"))?;
        HashMap::try_from(map).map_err(|source| LoadError::Map { name: "TRACKED", source })
    }

    fn socks_map(&mut self) -> Result<HashMap<&mut MapData, SockKey, SockVal>, LoadError> {
        let map = self.ebpf.map_mut("SOCKS").ok_or(LoadError::MissingMap("SOCKS"))?;
        HashMap::try_from(map).map_err(|source| LoadError::Map { name: "SOCKS", source })
    }

    /// Starts tracking a process. Returns its fd-table epoch (0 when new; the current one if
    /// the kernel already tracks it, e.g. as the child of a tracked process).
    pub fn track(&mut self, tgid: u32) -> Result<u32, TableError> {
        let mut map = self.tracked_map().map_err(TableError::Map)?;
        if let Ok(v) = map.get(&tgid, 0) {
            return Ok(v.epoch);
        }
        match map.insert(tgid, ProcVal::default(), BPF_NOEXIST) {
            Ok(()) => Ok(0),
            Err(e) => match map.get(&tgid, 0) {
                Ok(v) => Ok(v.epoch),
                Err(_) => Err(TableError::from_insert(&e)),
            },
        }
    }

    /// Stops tracking a process (the kernel also forgets it when it exits).
    pub fn untrack(&mut self, tgid: u32) {
        if let Ok(mut map) = self.tracked_map() {
            let _ = map.remove(&tgid);
        }
    }

    /// The tracked processes.
    pub fn tracked(&mut self) -> Vec<u32> {
        self.tracked_map().map(|m| m.keys().filter_map(Result::ok).collect()).unwrap_or_default()
    }

    /// The fd-table epoch of a tracked process.
    pub fn epoch(&mut self, tgid: u32) -> Option<u32> {
        self.tracked_map().ok()?.get(&tgid, 0).ok().map(|v| v.epoch)
    }

    /// Enters a socket. With `only_new`, an existing entry (made by the kernel meanwhile)
    /// wins. Returns whether the entry was written.
    pub fn insert_socket(&mut self, key: SockKey, val: SockVal, only_new: bool) -> Result<bool, TableError> {
        let mut map = self.socks_map().map_err(TableError::Map)?;
        match map.insert(key, val, if only_new { BPF_NOEXIST } else { 0 }) {
            Ok(()) => Ok(true),
            Err(_) if only_new && map.get(&key, 0).is_ok() => Ok(false),
            Err(e) => Err(TableError::from_insert(&e)),
        }
    }

    /// The socket entry of (tgid, fd).
    pub fn socket(&mut self, key: SockKey) -> Option<SockVal> {
        self.socks_map().ok()?.get(&key, 0).ok()
    }

    /// Forgets (tgid, fd).
    pub fn remove_socket(&mut self, key: SockKey) {
        if let Ok(mut map) = self.socks_map() {
            let _ = map.remove(&key);
        }
    }

    /// Every key of the socket table.
    pub fn socket_keys(&mut self) -> Vec<SockKey> {
        self.socks_map().map(|m| m.keys().filter_map(Result::ok).collect()).unwrap_or_default()
    }

    /// The kernel counters (see `observer_ebpf::counter`), summed over CPUs.
    pub fn counters(&self) -> [u64; counter::COUNT as usize] {
        let mut out = [0u64; counter::COUNT as usize];
        let Some(map) = self.ebpf.map("COUNTERS") else { return out };
        let Ok(arr) = PerCpuArray::<&MapData, u64>::try_from(map) else { return out };
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(v) = arr.get(&(i as u32), 0) {
                *slot = v.iter().sum();
            }
        }
        out
    }

    /// Run counts, run time (when kernel.bpf_stats_enabled=1) and recursion misses of
    /// every program, by name.
    pub fn program_stats(&self) -> BTreeMap<String, ProgramStats> {
        self.ebpf
            .programs()
            .filter_map(|(name, p)| Some((name.to_string(), stats::read(p.fd().ok()?).ok()?)))
            .collect()
    }
}

/// A kernel table update that failed.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("{0}")]
    Map(LoadError),
    /// The kernel said the table is full (E2BIG).
    #[error("table full: {0}")]
    Full(String),
    /// The update failed for another reason.
    #[error("update refused: {0}")]
    Refused(String),
}

impl TableError {
    /// A failed insert under its true reason: full, or refused otherwise.
    fn from_insert(e: &aya::maps::MapError) -> Self {
        let full = matches!(e, aya::maps::MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG));
        if full { Self::Full(e.to_string()) } else { Self::Refused(e.to_string()) }
    }

    /// Whether the table was full (else: an error of another kind).
    pub fn is_full(&self) -> bool {
        matches!(self, Self::Full(_))
    }
}

/// The uprobes go on a library for every process (`AllProcesses`): the programs filter
/// by tracked process themselves, so a file needs one set whoever maps it.
impl crate::libs::Attach for Probe {
    type Link = UProbeLinkId;

    fn attach(
        &mut self,
        program: &'static str,
        path: &std::path::Path,
        offset: u64,
    ) -> Result<UProbeLinkId, String> {
        let p: &mut UProbe = self
            .ebpf
            .program_mut(program)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| format!("no uprobe program {program}"))?;
        p.attach(offset, path, UProbeScope::AllProcesses).map_err(|e| error_chain(&e))
    }

    fn detach(&mut self, program: &'static str, link: UProbeLinkId) {
        let p: Option<&mut UProbe> = self.ebpf.program_mut(program).and_then(|p| p.try_into().ok());
        if let Some(p) = p {
            let _ = p.detach(link);
        }
    }
}

/// An error with its sources, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

impl Drop for Probe {
    /// Detaches the raw tracepoints. Each detach returns at once (the kernel frees the
    /// probe after an RCU grace period, asynchronously); the handler tables empty when
    /// their maps close with `ebpf`.
    fn drop(&mut self) {
        for (name, id) in self.links.drain(..) {
            let prog: Option<&mut RawTracePoint> =
                self.ebpf.program_mut(&name).and_then(|p| p.try_into().ok());
            if let Some(p) = prog {
                let _ = p.detach(id);
            }
        }
    }
}

/// The kernel struct offsets the programs use, from the running kernel's BTF. The task,
/// signal and register offsets are required (fork, exit and every syscall argument need
/// them); without the socket ones (`ok == 0`) addresses come from syscall arguments and
/// /proc only.
pub fn kernel_offsets() -> Result<KernelOffsets, LoadError> {
    let b = btf::Btf::from_sys_fs()
        .ok_or_else(|| LoadError::Preflight("kernel BTF (/sys/kernel/btf/vmlinux) is unreadable".into()))?;
    let need = |s: &str, path: &[&str]| {
        b.offset(s, path).ok_or_else(|| {
            LoadError::Preflight(format!(
                "this kernel's BTF has no {s}.{}: unsupported kernel",
                path.join(".")
            ))
        })
    };
    let reg = |r: &str| need("pt_regs", &[r]);
    let mut o = KernelOffsets {
        task_tgid: need("task_struct", &["tgid"])?,
        task_signal: need("task_struct", &["signal"])?,
        signal_live: need("signal_struct", &["live"])?,
        regs_arg: [reg("di")?, reg("si")?, reg("dx")?, reg("r10")?, reg("r8")?, reg("r9")?],
        regs_orig_ax: reg("orig_ax")?,
        ..KernelOffsets::default()
    };
    let sk = |m: &str| b.offset("sock", &["__sk_common", m]);
    let sockets = (|| {
        Some(KernelOffsets {
            ok: 1,
            task_files: b.offset("task_struct", &["files"])?,
            files_fdt: b.offset("files_struct", &["fdt"])?,
            fdt_max_fds: b.offset("fdtable", &["max_fds"])?,
            fdt_fd: b.offset("fdtable", &["fd"])?,
            file_private_data: b.offset("file", &["private_data"])?,
            socket_sk: b.offset("socket", &["sk"])?,
            skc_family: sk("skc_family")?,
            skc_num: sk("skc_num")?,
            skc_dport: sk("skc_dport")?,
            skc_rcv_saddr: sk("skc_rcv_saddr")?,
            skc_daddr: sk("skc_daddr")?,
            skc_v6_rcv_saddr: sk("skc_v6_rcv_saddr")?,
            skc_v6_daddr: sk("skc_v6_daddr")?,
            unix_addr: b.offset("unix_sock", &["addr"])?,
            unix_peer: b.offset("unix_sock", &["peer"])?,
            unix_address_len: b.offset("unix_address", &["len"])?,
            unix_address_name: b.offset("unix_address", &["name"])?,
            ..o
        })
    })();
    match sockets {
        Some(full) => o = full,
        None => tracing::warn!(
            "kernel BTF lacks a socket field: connection addresses from syscall arguments only"
        ),
    }
    Ok(o)
}

fn rejected(name: &str, e: ProgramError) -> LoadError {
    let reason = match &e {
        ProgramError::LoadError { io_error, verifier_log } => {
            let log = verifier_log.to_string();
            tracing::debug!(program = name, "verifier log:\n{log}");
            let last = log.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string();
            if io_error.kind() == io::ErrorKind::PermissionDenied && last.is_empty() {
                "permission denied (is the kernel locked down, or are CAP_BPF and CAP_PERFMON missing?)"
                    .to_string()
            } else {
                format!("{io_error}: {last} (RUST_LOG=debug shows the verifier log)")
            }
        }
        other => other.to_string(),
    };
    LoadError::Rejected { program: name.to_string(), reason }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(v).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::TableError;

    /// Every offset the programs read comes from the running kernel's BTF: on each kernel
    /// of the matrix (`cargo xtask test --kernel`), every one of them is found.
    #[test]
    fn every_kernel_offset_resolves_on_the_running_kernel() {
        if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
            assert!(std::env::var_os("OBSERVER_REQUIRE_EBPF").is_none(), "no kernel BTF here");
            eprintln!("SKIPPED every_kernel_offset_resolves_on_the_running_kernel: no kernel BTF");
            return;
        }
        let o = super::kernel_offsets().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(o.ok, 1, "the socket offsets resolved too");
        assert!(o.task_tgid > 0 && o.task_signal > 0 && o.signal_live > 0);
        // pt_regs: di, si, dx, r10, r8, r9 are distinct 8-byte slots.
        let mut regs = o.regs_arg.to_vec();
        regs.sort_unstable();
        regs.dedup();
        assert_eq!(regs.len(), 6);
        assert!(regs.iter().all(|r| r.is_multiple_of(8)) && o.regs_orig_ax.is_multiple_of(8));
    }

    /// A full table and a refused update are told apart by the kernel's errno: each is
    /// counted under its own reason.
    #[test]
    fn a_full_table_is_told_from_a_refused_update() {
        let err = |errno| {
            aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_update_elem",
                io_error: std::io::Error::from_raw_os_error(errno),
            })
        };
        assert!(TableError::from_insert(&err(libc::E2BIG)).is_full());
        assert!(!TableError::from_insert(&err(libc::ENOMEM)).is_full());
        assert!(!TableError::from_insert(&err(libc::EPERM)).is_full());
    }
}
