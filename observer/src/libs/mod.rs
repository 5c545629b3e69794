//! The libraries in traced processes that uprobes serve: OpenSSL (TLS plaintext) and
//! SQLite (the database calls of apps without a database socket).
//!
//! A uprobe is set on a file (device and inode), not on a process: once on a library it
//! fires in every process that maps it, and the kernel programs return at once for a
//! process that is not tracked. So each file gets its probes once, when the first tracked
//! process is seen mapping it, and loses them when the last one is gone. Which files a
//! process maps comes from `/proc/PID/maps` (at tracking, after exec, and when the kernel
//! reports a new executable mapping: a `dlopen` on a worker's first request); the file is
//! read through `/proc/PID/root` so that a containerised app's libraries are found from
//! the DaemonSet's mount namespace; what a file is (which functions it defines) is read
//! once per file and kept.

pub mod elf;
pub mod maps;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

pub use maps::{ExecMapping, FileId};

use crate::IdMap;

/// A uprobe program and the function it is placed on (entry or return: the program's
/// own kind says which).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Point {
    pub symbol: &'static str,
    pub program: &'static str,
}

/// A library the agent has probes for.
#[derive(Debug)]
pub struct Kind {
    pub name: &'static str,
    /// Without all of these a file is not one to probe (an OpenSSL without its I/O).
    pub required: &'static [&'static str],
    /// Where the programs go; a point whose symbol the file lacks is left out.
    pub points: &'static [Point],
    /// A file named like this but without the required symbols (stripped, or another
    /// TLS library under the name) is reported once as unusable.
    pub file_hint: &'static str,
}

const fn p(symbol: &'static str, program: &'static str) -> Point {
    Point { symbol, program }
}

/// OpenSSL 1.1 and 3 (the system's `libssl.so.*`, the copies wheels bundle as
/// `libssl-<hash>.so.*`, or linked into a binary): libpq uses `SSL_read`/`SSL_write`,
/// Python's `ssl` module the `_ex` forms.
pub const OPENSSL: Kind = Kind {
    name: "openssl",
    required: &["SSL_read", "SSL_write"],
    points: &[
        p("SSL_read", "ssl_read"),
        p("SSL_read", "ssl_read_ret"),
        p("SSL_read_ex", "ssl_read_ex"),
        p("SSL_read_ex", "ssl_read_ret"),
        p("SSL_write", "ssl_write"),
        p("SSL_write", "ssl_write_ret"),
        p("SSL_write_ex", "ssl_write_ex"),
        p("SSL_write_ex", "ssl_write_ret"),
        p("SSL_do_handshake", "ssl_ctrl"),
        p("SSL_do_handshake", "ssl_ctrl_ret"),
        p("SSL_connect", "ssl_ctrl"),
        p("SSL_connect", "ssl_ctrl_ret"),
        p("SSL_accept", "ssl_ctrl"),
        p("SSL_accept", "ssl_ctrl_ret"),
        p("SSL_shutdown", "ssl_ctrl"),
        p("SSL_shutdown", "ssl_ctrl_ret"),
        p("SSL_free", "ssl_free"),
    ],
    file_hint: "libssl",
};

/// SQLite 3 (the system's `libsqlite3.so.0` that Python's `_sqlite3` links on Debian, or
/// compiled into `_sqlite3` or the interpreter). Only calls made once per execute, per
/// statement or per connection are probed, never one made per row (`sqlite3_step`,
/// `sqlite3_column_*`): see `protocol::sqlite` for what each one tells.
pub const SQLITE: Kind = Kind {
    name: "sqlite",
    required: &[
        "sqlite3_open_v2",
        "sqlite3_prepare_v2",
        "sqlite3_bind_parameter_count",
        "sqlite3_last_insert_rowid",
    ],
    points: &[
        p("sqlite3_open_v2", "sqlite_open"),
        p("sqlite3_open_v2", "sqlite_open_ret"),
        p("sqlite3_prepare_v2", "sqlite_prepare"),
        p("sqlite3_prepare_v2", "sqlite_prepare_ret"),
        p("sqlite3_prepare_v3", "sqlite_prepare_v3"),
        p("sqlite3_prepare_v3", "sqlite_prepare_ret"),
        p("sqlite3_bind_parameter_count", "sqlite_bind_count"),
        p("sqlite3_stmt_readonly", "sqlite_readonly"),
        p("sqlite3_changes", "sqlite_changes"),
        p("sqlite3_last_insert_rowid", "sqlite_last_rowid"),
        p("sqlite3_extended_errcode", "sqlite_errcode"),
        p("sqlite3_extended_errcode", "sqlite_errcode_ret"),
        p("sqlite3_exec", "sqlite_exec"),
        p("sqlite3_exec", "sqlite_exec_ret"),
        p("sqlite3_finalize", "sqlite_finalize"),
        p("sqlite3_close_v2", "sqlite_close"),
        p("sqlite3_close", "sqlite_close"),
    ],
    file_hint: "libsqlite3",
};

/// Every library the agent probes; [`TLS`] and [`SQLITE_KIND`] index it.
pub static KINDS: [Kind; 2] = [OPENSSL, SQLITE];
/// Index of OpenSSL in [`KINDS`] (what decides whether TLS is decrypted).
pub const TLS: usize = 0;
/// Index of SQLite in [`KINDS`].
pub const SQLITE_KIND: usize = 1;

/// Sets and removes uprobes (the loaded kernel programs; a fake in tests).
pub trait Attach {
    type Link;
    fn attach(&mut self, program: &'static str, path: &Path, offset: u64) -> Result<Self::Link, String>;
    fn detach(&mut self, program: &'static str, link: Self::Link);
}

/// What a file is, read once.
#[derive(Debug, Clone)]
enum Verdict {
    /// Nothing the agent probes.
    Nothing,
    /// A file of the kinds in `kinds` (a bit per index of the registry's kinds; a
    /// static build may hold OpenSSL and SQLite both), its programs' file offsets; it is
    /// unusable for the kinds in `unusable`.
    Probe { kinds: u32, unusable: u32, points: Vec<(&'static str, u64)> },
    /// Named like a probed library but without its functions (stripped, static without
    /// symbols, another implementation under the name), or attaching failed once (not
    /// tried again), for the kinds in the mask: the process's TLS through it stays opaque.
    Unusable(u32),
}

/// What a process has of the probed libraries: why its TLS connections are, or are
/// not, decrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum LibState {
    /// It maps no library the agent knows (Go's TLS, rustls, a static build without its
    /// symbols named like nothing).
    #[default]
    None,
    /// It maps one that cannot be probed (see [`Verdict::Unusable`]).
    Unusable,
    /// It maps one with its probes set.
    Probed,
}

struct Attached<L> {
    links: Vec<(&'static str, L)>,
    /// What the file is (bits of kind indexes).
    kinds: u32,
    /// Tracked processes mapping it.
    users: usize,
}

/// Counters of the libraries' probes (exported as `observer_uprobe_*`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LibStats {
    /// Files that got their probes, and lost them again (no tracked process left).
    pub attached: u64,
    pub detached: u64,
    /// Files whose probes could not be set (the kernel refused, the file changed).
    pub attach_errors: u64,
    /// Files named like a probed library but without its functions (stripped, static
    /// without symbols, another implementation): no symbol, no probe.
    pub without_symbols: u64,
    /// `/proc/PID/maps` reads.
    pub scans: u64,
    /// Times the file verdicts filled [`Bounds::max_files`] and started over.
    pub verdicts_full: u64,
}

/// The registry's bounds (`--max-library-files`, `--uprobe-idle-grace`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Files whose verdict (what they are, their functions' offsets) is kept; past it
    /// the cache starts over (reading a file's symbol tables again is the only cost).
    pub max_files: usize,
    /// How long a library no tracked process maps keeps its probes: an app that keeps
    /// starting short-lived processes mapping it (a worker's helper, a cron-like loop)
    /// must not set and remove 17 probes each time.
    pub idle_grace: Duration,
}

impl Default for Bounds {
    fn default() -> Self {
        Self { max_files: 8192, idle_grace: Duration::from_secs(30) }
    }
}

/// The probed libraries and which tracked processes map them.
pub struct Libraries<L> {
    kinds: &'static [Kind],
    bounds: Bounds,
    verdicts: HashMap<FileId, Verdict>,
    attached: HashMap<FileId, Attached<L>>,
    /// Probed files no tracked process maps, since when (removed after the idle grace).
    idle: HashMap<FileId, (Attached<L>, Instant)>,
    /// The probed files each tracked process maps.
    by_pid: IdMap<u32, Vec<FileId>>,
    /// Tracked processes mapping a library that cannot be probed (bits of kind indexes).
    unusable: IdMap<u32, u32>,
    pub stats: LibStats,
}

impl<L> Libraries<L> {
    pub fn new(kinds: &'static [Kind], bounds: Bounds) -> Self {
        Self {
            kinds,
            bounds,
            verdicts: HashMap::new(),
            attached: HashMap::new(),
            idle: HashMap::new(),
            by_pid: IdMap::default(),
            unusable: IdMap::default(),
            stats: LibStats::default(),
        }
    }

    /// Files with probes now (used or idle).
    pub fn files(&self) -> usize {
        self.attached.len() + self.idle.len()
    }

    /// Reads the mappings of `pid` and probes the libraries among them not probed yet.
    pub fn scan<A: Attach<Link = L>>(&mut self, pid: u32, a: &mut A) {
        self.stats.scans += 1;

        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else { return };
        let root = PathBuf::from(format!("/proc/{pid}/root"));
        self.mapped(pid, &maps::exec_mappings(&text), &root, a);
    }

    /// `pid` maps `files` (paths as seen under `root`): each library among them is
    /// probed (once per file) and counted as used by `pid`.
    pub fn mapped<A: Attach<Link = L>>(&mut self, pid: u32, files: &[ExecMapping], root: &Path, a: &mut A) {
        // Files named like a probed library first: reading the symbol tables of every
        // other new file (libcrypto's take 20 ms) must not delay the probes of the one
        // the app is about to call (its first TLS call follows its load closely).
        let hinted = |m: &&ExecMapping| {
            let name = m.path.rsplit('/').next().unwrap_or("");
            self.kinds.iter().any(|k| name.starts_with(k.file_hint))
        };
        let (first, rest): (Vec<&ExecMapping>, Vec<&ExecMapping>) = files.iter().partition(hinted);
        for m in first.into_iter().chain(rest) {
            if self.by_pid.get(&pid).is_some_and(|f| f.contains(&m.file)) {
                continue;
            }
            let path = root.join(m.path.trim_start_matches('/'));
            let verdict = self.verdict(m, &path);
            let (kinds, points) = match verdict {
                Verdict::Probe { kinds, unusable, points } => {
                    if unusable != 0 {
                        *self.unusable.entry(pid).or_default() |= unusable;
                    }
                    (kinds, points)
                }
                Verdict::Unusable(mask) => {
                    *self.unusable.entry(pid).or_default() |= mask;
                    continue;
                }
                Verdict::Nothing => continue,
            };
            let library = self.names(kinds);
            if let Some((at, _)) = self.idle.remove(&m.file) {
                self.attached.insert(m.file, at);
            }
            if !self.attached.contains_key(&m.file) {
                let started = std::time::Instant::now();
                match attach_all(a, &path, &points) {
                    Ok(links) => {
                        tracing::info!(
                            library,
                            path = m.path,
                            pid,
                            probes = links.len(),
                            micros = started.elapsed().as_micros() as u64,
                            "uprobes set on a library"
                        );
                        self.stats.attached += 1;
                        self.attached.insert(m.file, Attached { links, kinds, users: 0 });
                    }
                    Err(e) => {
                        tracing::warn!(
                            library,
                            path = m.path,
                            error = e,
                            "cannot set uprobes on a library: its calls stay unseen (TLS opaque)"
                        );
                        self.stats.attach_errors += 1;
                        self.verdicts.insert(m.file, Verdict::Unusable(kinds));
                        *self.unusable.entry(pid).or_default() |= kinds;
                        continue;
                    }
                }
            }
            if let Some(at) = self.attached.get_mut(&m.file) {
                at.users += 1;
                self.by_pid.entry(pid).or_default().push(m.file);
            }
        }
    }

    /// What `m` is, from the cache or its symbol tables (read through `path`, which must
    /// still be the mapped file).
    fn verdict(&mut self, m: &ExecMapping, path: &Path) -> Verdict {
        if let Some(v) = self.verdicts.get(&m.file) {
            return v.clone();
        }
        if self.verdicts.len() >= self.bounds.max_files {
            self.verdicts.clear();
            self.stats.verdicts_full += 1;
        }
        let v = self.read_verdict(m, path);
        self.verdicts.insert(m.file, v.clone());
        v
    }

    /// The symbols are read through the same path the probes are then set on, so the
    /// offsets are always those of the file probed. (That file is not compared with
    /// the mapping's device and inode: on overlayfs, a container's root, the mapping
    /// names the real file underneath while the path shows the overlay's; the kernel
    /// sets a uprobe on the real file, as the process maps it.)
    /// The file's symbol tables are read once for all kinds.
    fn read_verdict(&mut self, m: &ExecMapping, path: &Path) -> Verdict {
        let name = m.path.rsplit('/').next().unwrap_or("");
        let symbols: Vec<&'static str> =
            self.kinds.iter().flat_map(|k| k.points.iter().map(|p| p.symbol)).collect();
        let Ok(offsets) = elf::function_offsets(path, &symbols) else { return Verdict::Nothing };
        let (mut kinds, mut unusable, mut points) = (0u32, 0u32, Vec::new());
        for (i, kind) in self.kinds.iter().enumerate() {
            if kind.required.iter().all(|r| offsets.contains_key(r)) {
                kinds |= 1 << i;
                points.extend(
                    kind.points.iter().filter_map(|p| offsets.get(p.symbol).map(|&off| (p.program, off))),
                );
            } else if name.starts_with(kind.file_hint)
                || kind.points.iter().any(|p| offsets.contains_key(p.symbol))
            {
                unusable |= 1 << i;
                self.stats.without_symbols += 1;
                tracing::warn!(
                    library = kind.name,
                    path = m.path,
                    "a library without the functions the probes need (stripped or another implementation): its calls stay unseen (TLS opaque)"
                );
            }
        }
        match (kinds, unusable) {
            (0, 0) => Verdict::Nothing,
            (0, u) => Verdict::Unusable(u),
            (k, u) => Verdict::Probe { kinds: k, unusable: u, points },
        }
    }

    /// The names of the kinds in `mask`, for the log.
    fn names(&self, mask: u32) -> String {
        let names: Vec<&str> = self
            .kinds
            .iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, k)| k.name)
            .collect();
        names.join("+")
    }

    /// A tracked process forked: the child maps what its parent maps.
    pub fn forked(&mut self, parent: u32, child: u32) {
        if let Some(&mask) = self.unusable.get(&parent) {
            self.unusable.insert(child, mask);
        }
        let Some(files) = self.by_pid.get(&parent).cloned() else { return };
        for f in &files {
            if let Some(at) = self.attached.get_mut(f) {
                at.users += 1;
            }
        }
        self.by_pid.insert(child, files);
    }

    /// `pid` is gone (or replaced its image): a library no tracked process maps any more
    /// goes idle, and loses its probes in [`sweep`](Self::sweep) if none maps it again
    /// within the idle grace.
    pub fn gone(&mut self, pid: u32, now: Instant) {
        self.unusable.remove(&pid);
        for f in self.by_pid.remove(&pid).unwrap_or_default() {
            let Some(at) = self.attached.get_mut(&f) else { continue };
            at.users = at.users.saturating_sub(1);
            if at.users == 0
                && let Some(at) = self.attached.remove(&f)
            {
                self.idle.insert(f, (at, now));
            }
        }
    }

    /// Removes the probes of libraries idle for the idle grace by `now`.
    pub fn sweep<A: Attach<Link = L>>(&mut self, now: Instant, a: &mut A) {
        let expired: Vec<FileId> = self
            .idle
            .iter()
            .filter(|(_, (_, since))| now.saturating_duration_since(*since) >= self.bounds.idle_grace)
            .map(|(f, _)| *f)
            .collect();
        for f in expired {
            if let Some((at, _)) = self.idle.remove(&f) {
                for (program, link) in at.links {
                    a.detach(program, link);
                }
                self.stats.detached += 1;
            }
        }
    }

    /// Processes with a probed library.
    pub fn processes(&self) -> usize {
        self.by_pid.len()
    }

    /// What `pid` maps of the libraries of kind `kind` (an index of the kinds given to
    /// [`new`](Self::new)), as far as its mappings were read.
    pub fn state(&self, pid: u32, kind: usize) -> LibState {
        let bit = 1u32 << kind;
        let probed = |f: &FileId| self.attached.get(f).is_some_and(|a| a.kinds & bit != 0);
        if self.by_pid.get(&pid).is_some_and(|f| f.iter().any(probed)) {
            LibState::Probed
        } else if self.unusable.get(&pid).is_some_and(|m| m & bit != 0) {
            LibState::Unusable
        } else {
            LibState::None
        }
    }
}

/// All of a file's probes, or none (what was set is removed again).
fn attach_all<A: Attach>(
    a: &mut A,
    path: &Path,
    points: &[(&'static str, u64)],
) -> Result<Vec<(&'static str, A::Link)>, String> {
    let mut links = Vec::with_capacity(points.len());
    for &(program, off) in points {
        match a.attach(program, path, off) {
            Ok(l) => links.push((program, l)),
            Err(e) => {
                for (program, l) in links {
                    a.detach(program, l);
                }
                return Err(format!("{program}: {e}"));
            }
        }
    }
    Ok(links)
}

#[cfg(test)]
mod tests;
