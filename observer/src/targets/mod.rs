//! Which processes to trace, and the sockets they already have.
//!
//! Selectors (`--pid`, `--comm`, `--port`) are matched against a scan of /proc; a selected
//! PID brings its descendants. Connections that exist before the observer starts are
//! found from the process's fd links and its network namespace's /proc/net tables, so they
//! can be entered into the kernel's socket table and traced from the next syscall on.

pub mod detect;
pub mod procfs;
pub mod unix_diag;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    net::SocketAddr,
    path::Path,
};

use procfs::{TcpRow, UnixRow};

use crate::events::{Role, SockAddr};

/// What /proc says about one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    pub pid: u32,
    pub ppid: u32,
    pub comm: String,
}

/// A /proc file as text. A process chooses its own name (prctl, setproctitle) and so the
/// bytes of `comm` and of status's `Name:`: invalid UTF-8 there becomes U+FFFD instead of
/// making the whole file unreadable (and the process invisible).
pub fn read_proc_text(path: impl AsRef<std::path::Path>) -> Option<String> {
    let b = fs::read(path).ok()?;
    Some(String::from_utf8(b).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
}

/// Reads one process; `None` if it is gone or is a thread id.
pub fn read_process(pid: u32) -> Option<ProcInfo> {
    read_status(pid).map(|(p, _)| p)
}

/// A process and whether it is a zombie (exited, not reaped yet).
fn read_status(pid: u32) -> Option<(ProcInfo, bool)> {
    let status = read_proc_text(format!("/proc/{pid}/status"))?;
    if procfs::status_tgid(&status) != Some(pid) {
        return None;
    }
    let comm = read_proc_text(format!("/proc/{pid}/comm"))?;
    let info = ProcInfo { pid, ppid: procfs::status_ppid(&status)?, comm: comm.trim_end().to_string() };
    Some((info, procfs::status_zombie(&status)))
}

/// Every live process on the host (as seen from our pid namespace): a zombie has exited
/// already (the kernel forgot it) and is never selected again.
pub fn list_processes() -> Vec<ProcInfo> {
    let Ok(dir) = fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(read_status)
        .filter_map(|(p, zombie)| (!zombie).then_some(p))
        .collect()
}

/// Process selectors of `observer trace` (and later `observer run`).
#[derive(Debug, Clone, Default)]
pub struct Selector {
    /// These processes and their descendants.
    pub pids: Vec<u32>,
    /// Processes whose `comm` is exactly one of these.
    pub comms: Vec<String>,
    /// Processes with a TCP socket listening on one of these ports.
    pub ports: Vec<u16>,
    /// Find Django processes (see `detect`), now and when they start.
    pub detect_django: bool,
}

impl Selector {
    pub fn is_empty(&self) -> bool {
        self.pids.is_empty() && self.comms.is_empty() && self.ports.is_empty() && !self.detect_django
    }

    /// Whether a process that just exec'd is selected by name or by detection; the reason.
    pub fn matches_new(&self, pid: u32) -> Option<String> {
        if !self.comms.is_empty()
            && let Some(p) = read_process(pid)
            && self.comms.contains(&p.comm)
        {
            return Some(format!("its name is {}", p.comm));
        }
        if self.detect_django {
            return detect::evidence(pid).as_ref().and_then(detect::why_django);
        }
        None
    }

    /// The selected processes among `procs` with the reason for each; never `own_pid`
    /// nor its descendants (the observer's own helpers).
    pub fn select(&self, procs: &[ProcInfo], own_pid: u32) -> BTreeMap<u32, String> {
        let mut out: BTreeMap<u32, String> = BTreeMap::new();
        for p in procs {
            if self.pids.contains(&p.pid) {
                out.insert(p.pid, "selected by --pid".into());
            } else if self.comms.contains(&p.comm) {
                out.insert(p.pid, format!("its name is {}", p.comm));
            } else if self.detect_django
                && let Some(why) = detect::evidence(p.pid).as_ref().and_then(detect::why_django)
            {
                out.insert(p.pid, why);
            }
        }
        if !self.ports.is_empty() {
            for pid in listeners_on(procs, &self.ports) {
                out.entry(pid).or_insert_with(|| "listens on a selected port".into());
            }
        }
        let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
        for p in procs {
            children.entry(p.ppid).or_default().push(p.pid);
        }
        let descendants = |roots: Vec<u32>| {
            let mut seen = BTreeSet::new();
            let mut stack = roots;
            while let Some(pid) = stack.pop() {
                for &c in children.get(&pid).into_iter().flatten() {
                    if seen.insert(c) {
                        stack.push(c);
                    }
                }
            }
            seen
        };
        // Descendants of selected processes (a gunicorn master's workers).
        for c in descendants(out.keys().copied().collect()) {
            out.entry(c).or_insert_with(|| "child of a traced process".into());
        }
        out.remove(&own_pid);
        for c in descendants(vec![own_pid]) {
            out.remove(&c);
        }
        out
    }
}

/// The processes with a TCP socket in LISTEN state on one of `ports`.
fn listeners_on(procs: &[ProcInfo], ports: &[u16]) -> BTreeSet<u32> {
    let mut nets = NetCache::default();
    let mut out = BTreeSet::new();
    for p in procs {
        let Some(net) = nets.for_pid(p.pid) else { continue };
        let inodes: BTreeSet<u64> = net
            .tcp
            .iter()
            .filter(|r| r.state == procfs::TCP_LISTEN && ports.contains(&r.local.port()))
            .map(|r| r.inode)
            .collect();
        if !inodes.is_empty() && socket_fds(p.pid).iter().any(|(_, ino)| inodes.contains(ino)) {
            out.insert(p.pid);
        }
    }
    out
}

/// The socket tables of one network namespace.
#[derive(Debug, Default, Clone)]
pub struct NetTables {
    /// tcp and tcp6 rows together.
    pub tcp: Vec<TcpRow>,
    pub unix: Vec<UnixRow>,
    /// Unix socket inode -> its peer's inode (sock_diag; our namespace only).
    pub unix_peers: HashMap<u64, u64>,
}

impl NetTables {
    /// Reads the tables of the namespace `pid` lives in.
    pub fn read(pid: u32) -> Option<Self> {
        let base = format!("/proc/{pid}/net");
        let mut tcp = procfs::parse_tcp(&fs::read_to_string(format!("{base}/tcp")).ok()?);
        if let Ok(t6) = fs::read_to_string(format!("{base}/tcp6")) {
            tcp.extend(procfs::parse_tcp(&t6));
        }
        let unix = fs::read(format!("{base}/unix")).map(|t| procfs::parse_unix(&t)).unwrap_or_default();
        let same_netns =
            fs::read_link(format!("/proc/{pid}/ns/net")).ok() == fs::read_link("/proc/self/ns/net").ok();
        let unix_peers = if same_netns { unix_diag::peers().unwrap_or_default() } else { HashMap::new() };
        Some(Self { tcp, unix, unix_peers })
    }

    /// Classifies the socket with this inode.
    pub fn classify(&self, inode: u64) -> Option<SocketState> {
        if let Some(r) = self.tcp.iter().find(|r| r.inode == inode) {
            return Some(if r.is_connection() {
                SocketState::Connected(Endpoints {
                    role: if self.tcp_is_accepted(r) { Role::Server } else { Role::Client },
                    local: Some(SockAddr::Inet(r.local)),
                    peer: Some(SockAddr::Inet(r.remote)),
                })
            } else if r.state == procfs::TCP_CLOSE {
                SocketState::Unconnected
            } else {
                SocketState::Other
            });
        }
        let r = self.unix.iter().find(|r| r.inode == inode)?;
        if !r.is_stream() || r.listening {
            return Some(SocketState::Other);
        }
        Some(match r.state {
            procfs::SS_CONNECTED => {
                // An accepted Unix socket carries its listener's name; a client is unnamed.
                let accepted = r.path.is_some() && self.unix.iter().any(|l| l.listening && l.path == r.path);
                let peer = self
                    .unix_peers
                    .get(&inode)
                    .and_then(|p| self.unix.iter().find(|u| u.inode == *p))
                    .map(UnixRow::addr);
                SocketState::Connected(Endpoints {
                    role: if accepted { Role::Server } else { Role::Client },
                    local: Some(r.addr()),
                    peer,
                })
            }
            procfs::SS_UNCONNECTED => SocketState::Unconnected,
            _ => SocketState::Other,
        })
    }

    /// A TCP connection whose local port has a listener (on its address or a wildcard)
    /// was accepted; otherwise it was connected.
    fn tcp_is_accepted(&self, conn: &TcpRow) -> bool {
        self.tcp.iter().any(|l| {
            l.state == procfs::TCP_LISTEN
                && l.local.port() == conn.local.port()
                && (l.local.ip().is_unspecified() || same_ip(l.local, conn.local))
        })
    }

    /// The bound address of a listening socket.
    pub fn listener_addr(&self, inode: u64) -> Option<SockAddr> {
        if let Some(r) = self.tcp.iter().find(|r| r.inode == inode && r.state == procfs::TCP_LISTEN) {
            return Some(SockAddr::Inet(r.local));
        }
        self.unix.iter().find(|r| r.inode == inode && r.listening).map(UnixRow::addr)
    }

    /// Local (and, for TCP, peer) address of a socket, for connections opened after start.
    pub fn endpoints(&self, inode: u64) -> Option<Endpoints> {
        match self.classify(inode)? {
            SocketState::Connected(e) => Some(e),
            _ => None,
        }
    }
}

/// Compares addresses, treating IPv4-mapped IPv6 as IPv4.
fn same_ip(a: SocketAddr, b: SocketAddr) -> bool {
    a.ip().to_canonical() == b.ip().to_canonical()
}

/// What a socket fd is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketState {
    /// A stream connection.
    Connected(Endpoints),
    /// A stream socket not connected yet: enter it so that its `connect` is traced.
    Unconnected,
    /// A listener, a datagram socket, or a family we do not trace.
    Other,
}

/// Role and addresses of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    pub role: Role,
    pub local: Option<SockAddr>,
    pub peer: Option<SockAddr>,
}

/// Network tables by namespace, read once per scan.
#[derive(Debug, Default)]
pub struct NetCache {
    by_ns: HashMap<String, Option<NetTables>>,
}

impl NetCache {
    pub fn for_pid(&mut self, pid: u32) -> Option<&NetTables> {
        let ns = fs::read_link(format!("/proc/{pid}/ns/net")).ok()?.to_string_lossy().into_owned();
        self.by_ns.entry(ns).or_insert_with(|| NetTables::read(pid)).as_ref()
    }
}

/// The socket fds of a process: (fd, socket inode).
pub fn socket_fds(pid: u32) -> Vec<(u32, u64)> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let fd: u32 = e.file_name().to_str()?.parse().ok()?;
        let link = fs::read_link(e.path()).ok()?;
        Some((fd, procfs::socket_inode(link.to_str()?)?))
    })
    .collect()
}

/// The SQLite database files a process has open (their first bytes say so), as their
/// fd links name them; journals and WAL files are not databases.
pub fn open_sqlite_files(pid: u32) -> Vec<String> {
    use std::io::Read as _;
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    let mut out: Vec<String> = Vec::new();
    for e in dir.flatten() {
        let Ok(link) = fs::read_link(e.path()) else { continue };
        let Some(path) = link.to_str() else { continue };
        if !path.starts_with('/') || ["-journal", "-wal", "-shm"].iter().any(|s| path.ends_with(s)) {
            continue;
        }
        let mut head = [0u8; 16];
        let is_db = fs::File::open(e.path()).and_then(|mut f| f.read_exact(&mut head)).is_ok()
            && &head == b"SQLite format 3\0";
        if is_db && !out.iter().any(|p| p == path) {
            out.push(path.to_string());
        }
    }
    out
}

/// Whether a process exists (a zombie still does).
pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether a thread of a process exists.
pub fn thread_alive(tgid: u32, tid: u32) -> bool {
    Path::new(&format!("/proc/{tgid}/task/{tid}")).exists()
}

/// A process's parent, unless it is init (or the process is gone).
pub fn parent_of(pid: u32) -> Option<u32> {
    read_process(pid).map(|p| p.ppid).filter(|&p| p > 1)
}

/// This host's name (the `instance` label's host part outside a pod).
pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

/// Where a process listens, for the `instance` label: its lowest TCP port, else the
/// path of its listening Unix socket.
pub fn listen_addr(pid: u32) -> Option<String> {
    let net = NetTables::read(pid)?;
    let fds = socket_fds(pid);
    let owned = |inode: u64| fds.iter().any(|(_, i)| *i == inode);
    let port = net
        .tcp
        .iter()
        .filter(|r| r.state == procfs::TCP_LISTEN && owned(r.inode))
        .map(|r| r.local.port())
        .min();
    if let Some(p) = port {
        return Some(p.to_string());
    }
    net.unix
        .iter()
        .filter(|r| r.listening && owned(r.inode))
        .find_map(|r| r.path.as_deref().map(|p| String::from_utf8_lossy(p).into_owned()))
}

/// The socket inode behind one fd, if it is a socket.
pub fn fd_inode(pid: u32, fd: u32) -> Option<u64> {
    let link = fs::read_link(Path::new(&format!("/proc/{pid}/fd/{fd}"))).ok()?;
    procfs::socket_inode(link.to_str()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pid: u32, ppid: u32, comm: &str) -> ProcInfo {
        ProcInfo { pid, ppid, comm: comm.into() }
    }

    #[test]
    fn a_name_of_invalid_utf8_leaves_the_process_readable() {
        // A thread names itself with bytes that are not UTF-8, as any process may.
        let seen = std::thread::spawn(|| {
            // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
            unsafe { libc::prctl(libc::PR_SET_NAME, c"gunicorn\xff\xfe".as_ptr()) };
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            read_proc_text(format!("/proc/self/task/{tid}/comm"))
        })
        .join()
        .unwrap();
        assert_eq!(seen.as_deref(), Some("gunicorn\u{fffd}\u{fffd}\n"));
    }

    #[test]
    fn pid_selector_brings_descendants_but_never_self() {
        let procs = [
            p(1, 0, "init"),
            p(10, 1, "gunicorn"),
            p(11, 10, "gunicorn"),
            p(12, 11, "sh"),
            p(20, 1, "other"),
            p(99, 10, "observer"),
        ];
        let sel = Selector { pids: vec![10], ..Default::default() };
        let got: BTreeSet<u32> = sel.select(&procs, 99).into_keys().collect();
        assert_eq!(got, BTreeSet::from([10, 11, 12]));
    }

    #[test]
    fn comm_selector_is_exact() {
        let procs = [p(1, 0, "init"), p(5, 1, "python3"), p(6, 1, "python3.11")];
        let sel = Selector { comms: vec!["python3".into()], ..Default::default() };
        let got: BTreeSet<u32> = sel.select(&procs, 99).into_keys().collect();
        assert_eq!(got, BTreeSet::from([5]));
    }

    #[test]
    fn accepted_and_connected_tcp_are_told_apart() {
        let t = procfs::parse_tcp(
            "h
   0: 00000000:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 0100007F:1F40 0100007F:D4A2 01 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 0100007F:D4A2 0100007F:1F40 01 00000000:00000000 00:00000000 00000000     0        0 3 1
   3: 00000000:0000 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4 1
",
        );
        let net = NetTables { tcp: t, ..Default::default() };
        assert_eq!(net.endpoints(2).unwrap().role, Role::Server);
        assert_eq!(net.endpoints(3).unwrap().role, Role::Client);
        assert_eq!(net.classify(1), Some(SocketState::Other));
        assert_eq!(net.classify(4), Some(SocketState::Unconnected));
        assert_eq!(net.classify(5), None);
    }

    #[test]
    fn accepted_unix_socket_carries_listener_path() {
        let u = procfs::parse_unix(
            b"h
0000000000000000: 00000002 00000000 00010000 0001 01 1 /tmp/app.sock
0000000000000000: 00000003 00000000 00000000 0001 03 2 /tmp/app.sock
0000000000000000: 00000003 00000000 00000000 0001 03 3
",
        );
        let net = NetTables { unix: u, unix_peers: HashMap::from([(2, 3), (3, 2)]), ..Default::default() };
        let server = net.endpoints(2).unwrap();
        assert_eq!(server.role, Role::Server);
        assert_eq!(server.local.unwrap().to_string(), "unix:/tmp/app.sock");
        assert_eq!(server.peer.unwrap().to_string(), "unix:(unnamed)");
        let client = net.endpoints(3).unwrap();
        assert_eq!(client.role, Role::Client);
        assert_eq!(client.peer.unwrap().to_string(), "unix:/tmp/app.sock");
        assert_eq!(net.classify(1), Some(SocketState::Other));
    }
}
