//! The registry against real library files and a fake attacher.

use std::{os::unix::fs::MetadataExt, time::Instant};

use super::*;

fn now() -> Instant {
    Instant::now()
}

fn grace() -> std::time::Duration {
    Bounds::default().idle_grace
}

/// Records what would be attached; fails the `fail_at`-th attach.
#[derive(Default)]
struct Fake {
    next: u32,
    live: Vec<(&'static str, PathBuf, u64, u32)>,
    fail_at: Option<usize>,
    calls: usize,
}

impl Attach for Fake {
    type Link = u32;
    fn attach(&mut self, program: &'static str, path: &Path, offset: u64) -> Result<u32, String> {
        self.calls += 1;
        if self.fail_at == Some(self.calls) {
            return Err("refused".into());
        }
        self.next += 1;
        self.live.push((program, path.to_path_buf(), offset, self.next));
        Ok(self.next)
    }
    fn detach(&mut self, _program: &'static str, link: u32) {
        self.live.retain(|l| l.3 != link);
    }
}

const SYSTEM_LIBSSL: &str = "/usr/lib/x86_64-linux-gnu/libssl.so.3";

fn mapping(path: &str) -> ExecMapping {
    let md = std::fs::metadata(path).unwrap();
    // As /proc/PID/maps writes the device: major << 32 | minor.
    let dev = (u64::from(libc::major(md.dev())) << 32) | u64::from(libc::minor(md.dev()));
    ExecMapping { file: FileId { dev, inode: md.ino() }, path: path.to_string() }
}

/// The system's OpenSSL (Python's `ssl` module links it on Debian), or None: skipped.
fn libssl() -> Option<ExecMapping> {
    if !Path::new(SYSTEM_LIBSSL).exists() {
        eprintln!("skipped: no {SYSTEM_LIBSSL} on this machine");
        return None;
    }
    Some(mapping(SYSTEM_LIBSSL))
}

#[test]
fn a_library_gets_its_probes_once_and_loses_them_with_its_last_process() {
    let Some(ssl) = libssl() else { return };
    let mut libs = Libraries::new(std::slice::from_ref(&OPENSSL), Bounds::default());
    let mut a = Fake::default();
    libs.mapped(10, std::slice::from_ref(&ssl), Path::new("/"), &mut a);
    let set = a.live.len();
    // OpenSSL 3 defines every function the probes name.
    assert_eq!(set, OPENSSL.points.len(), "{:?}", a.live);
    assert!(a.live.iter().all(|l| l.1 == Path::new(SYSTEM_LIBSSL) && l.2 > 0));
    let read = a.live.iter().find(|l| l.0 == "ssl_read").unwrap().2;
    let read_ret = a.live.iter().find(|l| l.0 == "ssl_read_ret" && l.2 == read);
    assert!(read_ret.is_some(), "entry and return probes share the function's offset");
    // Another process, a rescan of the first, a fork: no new probes.
    libs.mapped(11, std::slice::from_ref(&ssl), Path::new("/"), &mut a);
    libs.mapped(10, std::slice::from_ref(&ssl), Path::new("/"), &mut a);
    libs.forked(11, 12);
    assert_eq!((a.live.len(), libs.files(), libs.processes()), (set, 1, 3));
    assert_eq!((libs.state(12, 0), libs.state(99, 0)), (LibState::Probed, LibState::None));
    libs.gone(10, now());
    libs.gone(11, now());
    assert_eq!(a.live.len(), set, "the child still maps it");
    let t0 = now();
    libs.gone(12, t0);
    // Idle: kept a while, in case another process maps it again soon.
    libs.sweep(t0 + grace() / 2, &mut a);
    assert_eq!((a.live.len(), libs.files(), libs.processes()), (set, 1, 0));
    libs.mapped(13, std::slice::from_ref(&ssl), Path::new("/"), &mut a);
    assert_eq!((a.calls, libs.stats.attached), (set, 1), "taken back from idle, not set again");
    libs.gone(13, t0);
    libs.sweep(t0 + grace(), &mut a);
    assert!(a.live.is_empty());
    assert_eq!((libs.files(), libs.processes()), (0, 0));
    assert_eq!((libs.stats.attached, libs.stats.detached, libs.stats.attach_errors), (1, 1, 0));
    // A later process gets them again, from the cached verdict.
    libs.mapped(14, &[ssl], Path::new("/"), &mut a);
    assert_eq!((a.live.len(), libs.stats.attached), (set, 2));
}

#[test]
fn many_short_lived_processes_keep_one_set_of_probes() {
    let Some(ssl) = libssl() else { return };
    let mut libs = Libraries::new(std::slice::from_ref(&OPENSSL), Bounds::default());
    let mut a = Fake::default();
    let t0 = now();
    for pid in 0..10_000u32 {
        let t = t0 + std::time::Duration::from_millis(u64::from(pid));
        libs.mapped(pid, std::slice::from_ref(&ssl), Path::new("/"), &mut a);
        libs.gone(pid, t);
        libs.sweep(t, &mut a);
    }
    assert_eq!((a.calls, a.live.len(), libs.stats.attached), (OPENSSL.points.len(), OPENSSL.points.len(), 1));
    assert_eq!(libs.processes(), 0, "no memory per process left");
}

#[test]
fn the_verdicts_are_bounded_and_say_when_they_start_over() {
    let Some(ssl) = libssl() else { return };
    let exe = mapping(std::fs::read_link("/proc/self/exe").unwrap().to_str().unwrap());
    let mut libs =
        Libraries::new(std::slice::from_ref(&OPENSSL), Bounds { max_files: 1, ..Bounds::default() });
    let mut a = Fake::default();
    libs.mapped(10, &[exe.clone(), ssl.clone()], Path::new("/"), &mut a);
    assert_eq!(libs.stats.verdicts_full, 1, "the second file's verdict made room");
    // Its symbols are read again, but its probes stay the ones set.
    libs.mapped(11, std::slice::from_ref(&ssl), Path::new("/"), &mut a);
    assert_eq!((a.calls, libs.stats.verdicts_full), (OPENSSL.points.len(), 2));
    // Known now: nothing read, nothing reset.
    libs.mapped(12, &[ssl], Path::new("/"), &mut a);
    assert_eq!(libs.stats.verdicts_full, 2);
    libs.mapped(13, &[exe], Path::new("/"), &mut a);
    assert_eq!(libs.stats.verdicts_full, 3);
}

#[test]
fn a_file_without_the_functions_gets_nothing() {
    let exe = std::fs::read_link("/proc/self/exe").unwrap();
    let mut libs: Libraries<u32> = Libraries::new(std::slice::from_ref(&OPENSSL), Bounds::default());
    let mut a = Fake::default();
    libs.mapped(10, &[mapping(exe.to_str().unwrap())], Path::new("/"), &mut a);
    assert_eq!((a.calls, libs.files(), libs.stats.without_symbols), (0, 0, 0));
}

#[test]
fn a_libssl_without_symbols_is_reported_once() {
    let dir = std::env::temp_dir().join(format!("observer-libs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fake = dir.join("libssl-0123abcd.so.3");
    std::fs::copy(std::fs::read_link("/proc/self/exe").unwrap(), &fake).unwrap();
    let m = mapping(fake.to_str().unwrap());
    let mut libs: Libraries<u32> = Libraries::new(std::slice::from_ref(&OPENSSL), Bounds::default());
    let mut a = Fake::default();
    libs.mapped(10, std::slice::from_ref(&m), Path::new("/"), &mut a);
    libs.mapped(11, &[m], Path::new("/"), &mut a);
    assert_eq!((a.calls, libs.stats.without_symbols), (0, 1));
    // Why those processes' TLS stays opaque; a child inherits it, an exit forgets it.
    assert_eq!(
        (libs.state(10, 0), libs.state(11, 0), libs.state(12, 0)),
        (LibState::Unusable, LibState::Unusable, LibState::None)
    );
    libs.forked(11, 12);
    libs.gone(11, now());
    assert_eq!((libs.state(11, 0), libs.state(12, 0)), (LibState::None, LibState::Unusable));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_refused_probe_removes_the_others_and_is_not_retried() {
    let Some(ssl) = libssl() else { return };
    let mut libs = Libraries::new(std::slice::from_ref(&OPENSSL), Bounds::default());
    let mut a = Fake { fail_at: Some(3), ..Fake::default() };
    libs.mapped(10, std::slice::from_ref(&ssl), Path::new("/"), &mut a);
    assert!(a.live.is_empty());
    assert_eq!((libs.stats.attach_errors, libs.files(), libs.processes()), (1, 0, 0));
    libs.mapped(11, &[ssl], Path::new("/"), &mut a);
    assert_eq!(a.calls, 3, "not tried again");
    assert_eq!((libs.state(10, 0), libs.state(11, 0)), (LibState::Unusable, LibState::Unusable));
    libs.gone(10, now());
}

#[test]
fn the_agents_own_process_scans() {
    let mut libs: Libraries<u32> = Libraries::new(std::slice::from_ref(&OPENSSL), Bounds::default());
    let mut a = Fake::default();
    libs.scan(std::process::id(), &mut a);
    assert_eq!(libs.stats.scans, 1);
    libs.gone(std::process::id(), now());
    assert!(a.live.is_empty());
}

const SYSTEM_LIBSQLITE: &str = "/usr/lib/x86_64-linux-gnu/libsqlite3.so.0";

#[test]
fn sqlite_and_openssl_are_told_apart_in_one_registry() {
    let Some(ssl) = libssl() else { return };
    if !Path::new(SYSTEM_LIBSQLITE).exists() {
        eprintln!("skipped: no {SYSTEM_LIBSQLITE} on this machine");
        return;
    }
    let lite = mapping(std::fs::canonicalize(SYSTEM_LIBSQLITE).unwrap().to_str().unwrap());
    let mut libs = Libraries::new(&KINDS, Bounds::default());
    let mut a = Fake::default();
    libs.mapped(10, std::slice::from_ref(&lite), Path::new("/"), &mut a);
    // Debian's libsqlite3 defines every function the probes name.
    assert_eq!(a.live.len(), SQLITE.points.len(), "{:?}", a.live);
    assert!(a.live.iter().all(|l| l.0.starts_with("sqlite_")));
    assert_eq!((libs.state(10, SQLITE_KIND), libs.state(10, TLS)), (LibState::Probed, LibState::None));
    libs.mapped(11, &[ssl, lite], Path::new("/"), &mut a);
    assert_eq!(a.live.len(), SQLITE.points.len() + OPENSSL.points.len());
    assert_eq!((libs.state(11, SQLITE_KIND), libs.state(11, TLS)), (LibState::Probed, LibState::Probed));
    libs.gone(10, now());
    assert_eq!(libs.state(10, SQLITE_KIND), LibState::None);
}
