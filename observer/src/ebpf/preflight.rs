//! Machine checks before loading, each failing with a one-line reason a user can act on.

use std::{fs, path::Path};

use super::LoadError;

/// Capability bits (include/uapi/linux/capability.h).
const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

pub(super) fn check() -> Result<(), LoadError> {
    check_privileges()?;
    check_kernel_version()?;
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(LoadError::Preflight(
            "this kernel has no BTF (/sys/kernel/btf/vmlinux is missing; needs CONFIG_DEBUG_INFO_BTF=y)"
                .into(),
        ));
    }
    Ok(())
}

fn effective_caps() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim().to_string();
            u64::from_str_radix(&hex, 16).ok()
        })
        .unwrap_or(0)
}

fn check_privileges() -> Result<(), LoadError> {
    let caps = effective_caps();
    let has = |c: u32| caps & (1 << c) != 0;
    let bpf = has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON));
    if !bpf {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        return Err(LoadError::Preflight(if euid == 0 {
            "running as root without CAP_BPF+CAP_PERFMON (or CAP_SYS_ADMIN): grant them to the container or unit".into()
        } else {
            "needs root (or CAP_BPF, CAP_PERFMON and CAP_DAC_READ_SEARCH): run it as root".into()
        }));
    }
    if !has(CAP_DAC_READ_SEARCH) && !has(CAP_SYS_ADMIN) {
        tracing::warn!("without CAP_DAC_READ_SEARCH, /proc/PID/fd of other users' processes is unreadable");
    }
    Ok(())
}

/// The running kernel's release (`uname -r`), empty if unreadable.
pub(super) fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string()
}

/// Ring buffers need Linux 5.8.
fn check_kernel_version() -> Result<(), LoadError> {
    let release = kernel_release();
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) < (5, 8) {
        return Err(LoadError::Preflight(format!(
            "kernel {release} is too old: observer needs Linux 5.8 or later (BPF ring buffer)"
        )));
    }
    Ok(())
}
