//! observer's kernel programs: syscall tracepoints that record what tracked processes send
//! and receive on their stream sockets, and sched tracepoints that follow their children.
//!
//! The programs stay small and dumb (DESIGN.md, decision 2): they filter (tracked TGID,
//! known socket fd), timestamp, copy at most `CAPTURE_BYTES` of each syscall's buffer and
//! the syscall's true length into the ring buffer, and count every loss. All parsing is in
//! userspace. Every helper is `#[inline(always)]` so each program is verified on its own.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// For `asm!` (programs.rs, `verifier_len`): how a bound reaches the verifier of 6.1.
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

#[cfg(target_arch = "bpf")]
mod programs;
#[cfg(target_arch = "bpf")]
mod sqlite;
#[cfg(target_arch = "bpf")]
mod tls;

/// The host build of this bin is only a placeholder so that `cargo build --workspace`
/// works; the real object is built for `bpfel-unknown-none` by observer's build.rs.
#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("observer-ebpf is a set of eBPF programs; it is embedded in the observer binary");
}
