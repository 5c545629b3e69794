//! observer: django-prometheus metrics for Django processes, rebuilt from their socket
//! syscalls with eBPF. Modules follow the data flow (see DESIGN.md and the README's
//! Architecture section): `ebpf` (loader) -> `pump` (ring buffer, connection
//! bookkeeping, with `events`, `conns`, `targets`) -> sinks: `trace`, or `pipeline`, the
//! router: `stream` (ordered segments, gaps marked) -> `protocol::detect` and `parsers`
//! -> `protocol` parsers -> `exchange` (one path into the `django` metrics model) for the
//! apps of `app::lifecycle` (discovered in `app::background`, with `views`) -> `server`.

/// Maps keyed by ids the kernel assigns (pids, fds, connection ids), looked up several
/// times per record: a fast hasher, as nobody outside chooses these keys.
pub(crate) type IdMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub(crate) type IdSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

pub mod app;
pub mod cli;
pub mod config;
pub mod conns;
pub mod django;
pub mod ebpf;
pub mod events;
pub mod exchange;
pub mod fault;
#[doc(hidden)]
pub mod fuzzing;
pub mod k8s;
pub mod libs;
pub mod loss;
pub mod parsers;
pub mod pipeline;
pub mod profile;
pub mod protocol;
pub mod pump;
pub mod replay;
pub mod selfmetrics;
pub mod server;
pub mod settings;
pub mod stream;
pub mod targets;
pub mod text;
pub mod top;
pub mod trace;
pub mod views;

/// Default bytes captured per syscall (`--capture-bytes`).
///
/// Why 4096: the parsers need whole message heads inside the capture. Browser request
/// heads with cookies run to 2-4 KiB, Django response heads with Set-Cookie/CSP to 1-2 KiB,
/// and psycopg 3 sends Parse+Bind+Describe+Execute+Sync in one write, where a SQL text of
/// 1-3 KiB (a Django SELECT naming every column) must not push the later message headers
/// out of the capture. Cost, measured with `observer trace --program-stats` on the
/// development VM (2 vCPUs, kernel 6.18; one write+read pair traced): the copy is
/// min(length, capture), so small writes cost the same at any setting (about 0.9 µs per
/// sys_exit program for 100 bytes at 256, 1024, 4096 or 8192); a 16 KiB write costs about
/// 1.0 µs at 256, 1.9 µs at 1024 and 3.3-4.1 µs at 4096. A few µs per large response
/// against a Django request's milliseconds buys parsing that does not guess.
pub const DEFAULT_CAPTURE_BYTES: u32 = 4096;

/// Now on the clock of the kernel programs' timestamps (`bpf_ktime_get_ns`:
/// CLOCK_MONOTONIC), in ns.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid out-pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}
