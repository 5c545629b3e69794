//! observer: django-prometheus metrics for Django processes, rebuilt from their socket
//! syscalls with eBPF. Modules follow the data flow (see DESIGN.md):
//! `ebpf` (loader) -> `pump` (ring buffer, process and connection bookkeeping, with
//! `events`, `conns`, `targets`) -> sinks (`trace` today).

pub mod cli;
pub mod conns;
pub mod ebpf;
pub mod events;
pub mod loss;
pub mod pump;
pub mod targets;
pub mod trace;

/// Default bytes captured per syscall (`--capture-bytes`).
pub const DEFAULT_CAPTURE_BYTES: u32 = 4096;
