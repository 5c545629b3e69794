//! Per-program statistics from BPF_OBJ_GET_INFO_BY_FD (aya 0.14 does not expose them).

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::programs::ProgramFd;

/// What the kernel counts for one program. `run_cnt` and `run_time_ns` only move while
/// `kernel.bpf_stats_enabled` is 1; `recursion_misses` counts runs the kernel skipped
/// because another program was running on that CPU: records lost before we saw them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProgramStats {
    pub run_cnt: u64,
    pub run_time_ns: u64,
    pub recursion_misses: u64,
}

/// `struct bpf_prog_info` (include/uapi/linux/bpf.h) is 232 bytes on 64-bit; the fields we
/// read sit at fixed UAPI offsets.
const INFO_WORDS: usize = 29;
const RUN_TIME_NS: usize = 192 / 8;
const RUN_CNT: usize = 200 / 8;
const RECURSION_MISSES: usize = 208 / 8;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

pub(super) fn read(fd: &ProgramFd) -> io::Result<ProgramStats> {
    let mut info = [0u64; INFO_WORDS];
    let mut attr = InfoAttr {
        bpf_fd: fd.as_fd().as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: attr points to a valid bpf_attr prefix for this command, and info to a
    // buffer of info_len bytes that the kernel fills.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &mut attr as *mut InfoAttr,
            std::mem::size_of::<InfoAttr>(),
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ProgramStats {
        run_cnt: info[RUN_CNT],
        run_time_ns: info[RUN_TIME_NS],
        recursion_misses: info[RECURSION_MISSES],
    })
}
