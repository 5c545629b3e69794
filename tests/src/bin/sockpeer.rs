//! A process the end-to-end tests trace: it makes real sockets and moves known bytes with
//! exactly the syscalls a scenario names, then reports what it did, as JSON, so the test
//! can compare the observer's records with the ground truth.
//!
//! Protocol: prints `{"pid": N, ...}` on a line, waits for a line on stdin (the observer is
//! attached by then), runs the scenario, prints one JSON result line and exits.
//!
//! Usage: `sockpeer <scenario> <inet|inet6|unix> <tmpdir>`; scenarios are the `fn`s below.

use std::{
    ffi::CString,
    io::{BufRead as _, Write as _},
    mem::{size_of, zeroed},
    os::fd::RawFd,
    time::Duration,
};

use base64::Engine as _;
use serde_json::{Value, json};

type Fd = RawFd;

fn check(ret: isize, what: &str) -> usize {
    if ret < 0 {
        panic!("{what}: {}", std::io::Error::last_os_error());
    }
    ret as usize
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Every successful data syscall this process made: the ground truth.
#[derive(Default)]
struct Ops(Vec<Value>);

impl Ops {
    fn push(&mut self, fd: Fd, syscall: &str, dir: &str, total: usize, bytes: &[u8]) {
        self.0
            .push(json!({"fd": fd, "syscall": syscall, "dir": dir, "total_len": total, "data": b64(bytes)}));
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Family {
    Inet,
    Inet6,
    Unix,
}

/// A socket address in the observer's text form.
fn addr_string(sa: &libc::sockaddr_storage, len: libc::socklen_t) -> String {
    match i32::from(sa.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this is a sockaddr_in.
            let a = unsafe { &*(sa as *const _ as *const libc::sockaddr_in) };
            let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            format!("{ip}:{}", u16::from_be(a.sin_port))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this is a sockaddr_in6.
            let a = unsafe { &*(sa as *const _ as *const libc::sockaddr_in6) };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            format!("[{ip}]:{}", u16::from_be(a.sin6_port))
        }
        libc::AF_UNIX => {
            // SAFETY: the family says this is a sockaddr_un.
            let a = unsafe { &*(sa as *const _ as *const libc::sockaddr_un) };
            let n = (len as usize).saturating_sub(2).min(a.sun_path.len());
            let path: Vec<u8> = a.sun_path[..n].iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
            if path.is_empty() {
                "unix:(unnamed)".to_string()
            } else {
                format!("unix:{}", String::from_utf8_lossy(&path))
            }
        }
        f => format!("family {f}"),
    }
}

fn name_of(fd: Fd, peer: bool) -> String {
    // SAFETY: zeroed sockaddr_storage is valid; len is its size.
    let mut sa: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let p = &mut sa as *mut _ as *mut libc::sockaddr;
    // SAFETY: sa/len are valid out-parameters.
    let r =
        unsafe { if peer { libc::getpeername(fd, p, &mut len) } else { libc::getsockname(fd, p, &mut len) } };
    check(r as isize, "getsockname");
    addr_string(&sa, len)
}

fn endpoint(fd: Fd) -> Value {
    json!({"fd": fd, "local": name_of(fd, false), "peer": name_of(fd, true)})
}

struct Listener {
    fd: Fd,
    addr: libc::sockaddr_storage,
    len: libc::socklen_t,
    family: Family,
}

fn listen(family: Family, dir: &str) -> Listener {
    // SAFETY: plain socket syscalls on values we own; the sockaddr structs are zeroed
    // then filled in for their family.
    unsafe {
        let domain = match family {
            Family::Inet => libc::AF_INET,
            Family::Inet6 => libc::AF_INET6,
            Family::Unix => libc::AF_UNIX,
        };
        let fd = libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        check(fd as isize, "socket");
        let mut sa: libc::sockaddr_storage = zeroed();
        let len = match family {
            Family::Inet => {
                let a = &mut *(&mut sa as *mut _ as *mut libc::sockaddr_in);
                a.sin_family = libc::AF_INET as u16;
                a.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
                size_of::<libc::sockaddr_in>()
            }
            Family::Inet6 => {
                let a = &mut *(&mut sa as *mut _ as *mut libc::sockaddr_in6);
                a.sin6_family = libc::AF_INET6 as u16;
                a.sin6_addr.s6_addr = std::net::Ipv6Addr::LOCALHOST.octets();
                size_of::<libc::sockaddr_in6>()
            }
            Family::Unix => {
                let a = &mut *(&mut sa as *mut _ as *mut libc::sockaddr_un);
                a.sun_family = libc::AF_UNIX as u16;
                let path = format!("{dir}/peer-{}.sock", std::process::id());
                for (i, b) in path.bytes().enumerate() {
                    a.sun_path[i] = b as libc::c_char;
                }
                2 + path.len() + 1
            }
        } as libc::socklen_t;
        check(libc::bind(fd, &sa as *const _ as *const libc::sockaddr, len) as isize, "bind");
        check(libc::listen(fd, 128) as isize, "listen");
        let mut bound: libc::sockaddr_storage = zeroed();
        let mut blen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        check(
            libc::getsockname(fd, &mut bound as *mut _ as *mut libc::sockaddr, &mut blen) as isize,
            "getsockname",
        );
        Listener { fd, addr: bound, len: blen, family }
    }
}

impl Listener {
    fn connect_with(&self, flags: i32) -> (Fd, i32) {
        let domain = match self.family {
            Family::Inet => libc::AF_INET,
            Family::Inet6 => libc::AF_INET6,
            Family::Unix => libc::AF_UNIX,
        };
        // SAFETY: plain socket syscalls; addr/len come from getsockname.
        unsafe {
            let fd = libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | flags, 0);
            check(fd as isize, "socket");
            let r = libc::connect(fd, &self.addr as *const _ as *const libc::sockaddr, self.len);
            let errno = if r < 0 { *libc::__errno_location() } else { 0 };
            (fd, errno)
        }
    }

    fn connect(&self) -> Fd {
        let (fd, errno) = self.connect_with(0);
        assert_eq!(errno, 0, "connect failed");
        fd
    }

    fn accept(&self) -> Fd {
        // SAFETY: out-parameters sized for sockaddr_storage.
        unsafe {
            let mut sa: libc::sockaddr_storage = zeroed();
            let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            let fd = libc::accept4(
                self.fd,
                &mut sa as *mut _ as *mut libc::sockaddr,
                &mut len,
                libc::SOCK_CLOEXEC,
            );
            check(fd as isize, "accept4");
            fd
        }
    }
}

// ---- the data syscalls, each recorded in Ops --------------------------------------------

fn write(ops: &mut Ops, fd: Fd, b: &[u8]) {
    // SAFETY: b is a valid buffer.
    let n = check(unsafe { libc::write(fd, b.as_ptr().cast(), b.len()) }, "write");
    ops.push(fd, "write", "send", n, &b[..n]);
}

fn sendto(ops: &mut Ops, fd: Fd, b: &[u8]) {
    // SAFETY: b is a valid buffer; no address for a connected socket.
    let n = check(unsafe { libc::sendto(fd, b.as_ptr().cast(), b.len(), 0, std::ptr::null(), 0) }, "sendto");
    ops.push(fd, "sendto", "send", n, &b[..n]);
}

fn iovecs(parts: &[&[u8]]) -> Vec<libc::iovec> {
    parts.iter().map(|p| libc::iovec { iov_base: p.as_ptr() as *mut _, iov_len: p.len() }).collect()
}

fn writev(ops: &mut Ops, fd: Fd, parts: &[&[u8]]) {
    let iov = iovecs(parts);
    // SAFETY: iov points to valid buffers.
    let n = check(unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as i32) }, "writev");
    let all = parts.concat();
    ops.push(fd, "writev", "send", n, &all[..n]);
}

fn sendmsg(ops: &mut Ops, fd: Fd, parts: &[&[u8]]) {
    let mut iov = iovecs(parts);
    // SAFETY: zeroed msghdr is valid; iov points to valid buffers.
    let n = unsafe {
        let mut msg: libc::msghdr = zeroed();
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = iov.len();
        check(libc::sendmsg(fd, &msg, 0), "sendmsg")
    };
    let all = parts.concat();
    ops.push(fd, "sendmsg", "send", n, &all[..n]);
}

fn sendmmsg(ops: &mut Ops, fd: Fd, msgs: &[&[u8]]) {
    let mut iovs = iovecs(msgs);
    // SAFETY: zeroed mmsghdr is valid; each points to one valid iovec.
    let sent = unsafe {
        let mut hdrs: Vec<libc::mmsghdr> = (0..msgs.len()).map(|_| zeroed()).collect();
        for (h, iov) in hdrs.iter_mut().zip(iovs.iter_mut()) {
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
        }
        let r = libc::sendmmsg(fd, hdrs.as_mut_ptr(), hdrs.len() as u32, 0);
        check(r as isize, "sendmmsg");
        hdrs[..r as usize].iter().map(|h| h.msg_len as usize).sum::<usize>()
    };
    ops.push(fd, "sendmmsg", "send", sent, &[]);
}

fn sendfile(ops: &mut Ops, fd: Fd, dir: &str, b: &[u8]) {
    let path = format!("{dir}/sendfile-{}", std::process::id());
    std::fs::write(&path, b).expect("write sendfile source");
    let cpath = CString::new(path.clone()).unwrap();
    // SAFETY: cpath is NUL-terminated; file fd is ours.
    let n = unsafe {
        let f = libc::open(cpath.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        check(f as isize, "open");
        let n = check(libc::sendfile(fd, f, std::ptr::null_mut(), b.len()), "sendfile");
        libc::close(f);
        n
    };
    let _ = std::fs::remove_file(path);
    ops.push(fd, "sendfile", "send", n, &[]);
}

/// Receives exactly `want` bytes with `syscall`, recording each call.
fn recv_exact(ops: &mut Ops, fd: Fd, syscall: &str, want: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < want {
        let mut buf = vec![0u8; want - got.len()];
        // SAFETY: buf is a valid, writable buffer of its length for every call below.
        let n = unsafe {
            match syscall {
                "read" => check(libc::read(fd, buf.as_mut_ptr().cast(), buf.len()), "read"),
                "recvfrom" => check(
                    libc::recvfrom(
                        fd,
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                    ),
                    "recvfrom",
                ),
                "readv" | "recvmsg" => {
                    // two iovecs: the first 3 bytes, then the rest
                    let split = buf.len().min(3);
                    let (a, b) = buf.split_at_mut(split);
                    let iov = [
                        libc::iovec { iov_base: a.as_mut_ptr().cast(), iov_len: a.len() },
                        libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() },
                    ];
                    if syscall == "readv" {
                        check(libc::readv(fd, iov.as_ptr(), 2), "readv")
                    } else {
                        let mut msg: libc::msghdr = zeroed();
                        msg.msg_iov = iov.as_ptr() as *mut _;
                        msg.msg_iovlen = 2;
                        check(libc::recvmsg(fd, &mut msg, 0), "recvmsg")
                    }
                }
                "recvmmsg" => {
                    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
                    let mut h: libc::mmsghdr = zeroed();
                    h.msg_hdr.msg_iov = &mut iov;
                    h.msg_hdr.msg_iovlen = 1;
                    let r = libc::recvmmsg(fd, &mut h, 1, 0, std::ptr::null_mut());
                    check(r as isize, "recvmmsg");
                    h.msg_len as usize
                }
                other => panic!("unknown recv syscall {other}"),
            }
        };
        assert!(n > 0, "peer closed early");
        let bytes = if syscall == "recvmmsg" { Vec::new() } else { buf[..n].to_vec() };
        ops.push(fd, syscall, "recv", n, &bytes);
        got.extend_from_slice(&buf[..n]);
    }
    got
}

fn close(fd: Fd) {
    // SAFETY: closing an fd we own.
    unsafe { libc::close(fd) };
}

// ---- scenarios ----------------------------------------------------------------------------

/// Client and server in this process: each data syscall kind in both directions, a
/// MSG_PEEK (must not be recorded) and, for TCP, a non-blocking connect.
fn exchange(family: Family, dir: &str) -> Value {
    let l = listen(family, dir);
    let c = l.connect();
    let s = l.accept();
    let mut ops = Ops::default();
    let pairs: [(&str, &str); 6] = [
        ("write", "read"),
        ("writev", "readv"),
        ("sendto", "recvfrom"),
        ("sendmsg", "recvmsg"),
        ("sendmmsg", "recvmmsg"),
        ("sendfile", "read"),
    ];
    for (send, recv) in pairs {
        for (from, to, who) in [(c, s, "client"), (s, c, "server")] {
            let payload = format!("{send}->{recv} from the {who}: {}", "0123456789".repeat(3));
            let p = payload.as_bytes();
            let (a, b) = p.split_at(7);
            match send {
                "write" => write(&mut ops, from, p),
                "sendto" => sendto(&mut ops, from, p),
                "writev" => writev(&mut ops, from, &[a, b]),
                "sendmsg" => sendmsg(&mut ops, from, &[a, b]),
                "sendmmsg" => sendmmsg(&mut ops, from, &[a, b]),
                "sendfile" => sendfile(&mut ops, from, dir, p),
                _ => unreachable!(),
            }
            if recv == "recvfrom" {
                // Peeked bytes are read again below: the peek must not be recorded.
                let mut peek = [0u8; 4];
                // SAFETY: peek is a valid buffer.
                let n = unsafe { libc::recv(to, peek.as_mut_ptr().cast(), peek.len(), libc::MSG_PEEK) };
                check(n, "recv MSG_PEEK");
            }
            let got = recv_exact(&mut ops, to, recv, p.len());
            assert_eq!(got, p);
        }
    }
    let mut result = json!({"client": endpoint(c), "server": endpoint(s), "peeks": 2});
    if family != Family::Unix {
        let (nb, errno) = l.connect_with(libc::SOCK_NONBLOCK);
        assert!(errno == libc::EINPROGRESS || errno == 0, "non-blocking connect: errno {errno}");
        let mut pfd = libc::pollfd { fd: nb, events: libc::POLLOUT, revents: 0 };
        // SAFETY: one valid pollfd.
        check(unsafe { libc::poll(&mut pfd, 1, 5000) } as isize, "poll");
        let ns = l.accept();
        const HELLO: &[u8] = b"hello after a non-blocking connect";
        write(&mut ops, nb, HELLO);
        recv_exact(&mut ops, ns, "read", HELLO.len());
        result["nonblocking"] =
            json!({"client": endpoint(nb), "server": endpoint(ns), "in_progress": errno != 0});
        close(nb);
        close(ns);
    }
    close(c);
    close(s);
    close(l.fd);
    result["ops"] = Value::Array(ops.0);
    result
}

/// One large write through writev (several iovecs) and one large write; the capture is
/// smaller than both, so the records must carry the exact prefix and the true length.
fn large(family: Family, dir: &str) -> Value {
    let l = listen(family, dir);
    let c = l.connect();
    let s = l.accept();
    let mut ops = Ops::default();
    let body: Vec<u8> = (0..10_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    write(&mut ops, c, &body);
    recv_exact(&mut ops, s, "read", body.len());
    let (a, rest) = body.split_at(100);
    let (b, d) = rest.split_at(200);
    writev(&mut ops, s, &[a, b, d]);
    recv_exact(&mut ops, c, "recvfrom", body.len());
    close(c);
    close(s);
    json!({"ops": ops.0})
}

/// The pair is made before the observer starts (printed with the pid); after "go" it
/// carries data.
fn preexisting_setup(family: Family, dir: &str) -> (Listener, Fd, Fd) {
    let l = listen(family, dir);
    let c = l.connect();
    let s = l.accept();
    (l, c, s)
}

fn preexisting_run(c: Fd, s: Fd) -> Value {
    const REQUEST: &[u8] = b"request on a connection older than the observer";
    const RESPONSE: &[u8] = b"response on it";
    let mut ops = Ops::default();
    write(&mut ops, c, REQUEST);
    recv_exact(&mut ops, s, "read", REQUEST.len());
    sendto(&mut ops, s, RESPONSE);
    recv_exact(&mut ops, c, "recvfrom", RESPONSE.len());
    json!({"client": endpoint(c), "server": endpoint(s), "ops": ops.0})
}

/// A thread already blocked in accept() when the observer attaches (its syscall entry was
/// never seen): the connection it accepts must still be traced.
fn blocked_accept_setup(family: Family, dir: &str) -> (Listener, std::thread::JoinHandle<Fd>) {
    let l = listen(family, dir);
    let lfd = l.fd;
    let t = std::thread::spawn(move || {
        // SAFETY: accept on our listening fd, without asking for the peer's address.
        let fd =
            unsafe { libc::accept4(lfd, std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
        check(fd as isize, "accept4") as Fd
    });
    // Let the thread reach accept() before the observer is told to attach.
    std::thread::sleep(Duration::from_millis(200));
    (l, t)
}

fn blocked_accept_run(l: &Listener, t: std::thread::JoinHandle<Fd>) -> Value {
    let c = l.connect();
    let s = t.join().expect("accepting thread");
    preexisting_run(c, s)
}

/// A forked child uses an inherited connection and opens one of its own.
fn fork(family: Family, dir: &str) -> Value {
    let l = listen(family, dir);
    let c = l.connect();
    let s = l.accept();
    let mut ops = Ops::default();
    write(&mut ops, c, b"parent before fork");
    recv_exact(&mut ops, s, "read", 18);
    // SAFETY: the child only makes syscalls and exits with _exit.
    let child = unsafe { libc::fork() };
    if child == 0 {
        // Connections inherited across fork are entered for the child when the observer
        // handles the fork record; give it that moment (the child's own new connections
        // need no such wait: the kernel sees them being made).
        std::thread::sleep(Duration::from_millis(300));
        let inherited = b"child on the inherited connection";
        // SAFETY: valid buffers and fds.
        unsafe {
            libc::write(c, inherited.as_ptr().cast(), inherited.len());
            let (own, _) = l.connect_with(0);
            let msg = b"child on its own connection";
            libc::write(own, msg.as_ptr().cast(), msg.len());
            libc::close(own);
            libc::_exit(0);
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(child, &mut status, 0) };
    recv_exact(&mut ops, s, "read", 33);
    let own = l.accept();
    recv_exact(&mut ops, own, "read", 27);
    json!({"child": child, "client": endpoint(c), "server": endpoint(s), "ops": ops.0})
}

fn open_file(dir: &str) -> Fd {
    let path = format!("{dir}/file-{}", std::process::id());
    std::fs::write(&path, b"file contents, not socket data").unwrap();
    let cpath = CString::new(path).unwrap();
    // SAFETY: NUL-terminated path.
    let f = unsafe { libc::open(cpath.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    check(f as isize, "open");
    f
}

fn read_file(fd: Fd) {
    let mut buf = [0u8; 64];
    // SAFETY: buf is valid.
    unsafe { libc::lseek(fd, 0, libc::SEEK_SET) };
    // SAFETY: buf is valid.
    check(unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) }, "read file");
}

/// fd numbers reused after close, dup2 over a socket, dup and fcntl(F_DUPFD_CLOEXEC)
/// aliases, and close_range: file reads must never be recorded, aliases must carry
/// their connection's id.
fn fdreuse(family: Family, dir: &str) -> Value {
    let l = listen(family, dir);
    let mut ops = Ops::default();
    let mut reused = Vec::new();

    // close, then the same number for a file
    let a = l.connect();
    let sa = l.accept();
    write(&mut ops, a, b"A before close");
    close(a);
    let f = open_file(dir);
    reused.push(json!({"case": "close", "fd": a, "file_fd": f}));
    read_file(f);
    close(f);
    // ... then the same number for a new connection
    let b = l.connect();
    let sb = l.accept();
    write(&mut ops, b, b"B on a reused fd number");
    reused.push(json!({"case": "new connection", "fd": b}));

    // dup2 a file over a connected socket
    let c = l.connect();
    let sc = l.accept();
    write(&mut ops, c, b"C before dup2");
    let f2 = open_file(dir);
    // SAFETY: both fds are ours.
    check(unsafe { libc::dup2(f2, c) } as isize, "dup2");
    read_file(c);
    reused.push(json!({"case": "dup2", "fd": c}));
    close(f2);

    // dup and fcntl(F_DUPFD_CLOEXEC) of a connected socket
    let d = l.connect();
    let sd = l.accept();
    // SAFETY: d is ours.
    let d2 = unsafe { libc::dup(d) };
    check(d2 as isize, "dup");
    write(&mut ops, d2, b"D through dup");
    close(d);
    write(&mut ops, d2, b"D through dup after the original closed");
    // SAFETY: d2 is ours.
    let d3 = unsafe { libc::fcntl(d2, libc::F_DUPFD_CLOEXEC, 100) };
    check(d3 as isize, "fcntl");
    write(&mut ops, d3, b"D through fcntl F_DUPFD_CLOEXEC");

    // close_range over a connected socket, the number then reused for a file
    let e = l.connect();
    let se = l.accept();
    write(&mut ops, e, b"E before close_range");
    // SAFETY: closing our own fd.
    check(unsafe { libc::syscall(libc::SYS_close_range, e, e, 0) } as isize, "close_range");
    let f3 = open_file(dir);
    read_file(f3);
    reused.push(json!({"case": "close_range", "fd": e, "file_fd": f3}));

    // Drain what the servers received so that every op is a recorded syscall.
    recv_exact(&mut ops, sa, "read", 14);
    recv_exact(&mut ops, sb, "read", 23);
    recv_exact(&mut ops, sc, "read", 13);
    recv_exact(&mut ops, sd, "read", 13 + 39 + 31);
    recv_exact(&mut ops, se, "read", 20);
    json!({"reused": reused, "dup": {"fds": [d, d2, d3]}, "ops": ops.0})
}

/// Connects to an address nobody listens on any more: once blocking (fails at once),
/// once non-blocking (a TCP connect returns EINPROGRESS and fails later; a Unix one fails
/// at once).
fn refused(family: Family, dir: &str) -> Value {
    let l = listen(family, dir);
    let addr = addr_string(&l.addr, l.len);
    close(l.fd);
    if family == Family::Unix {
        let path = format!("{dir}/peer-{}.sock", std::process::id());
        std::fs::remove_file(path).expect("remove socket file");
    }
    let mut attempts = Vec::new();
    for flags in [0, libc::SOCK_NONBLOCK] {
        let (fd, errno) = l.connect_with(flags);
        attempts.push(json!({"fd": fd, "errno": errno, "nonblocking": flags != 0}));
        close(fd);
    }
    json!({"peer": addr, "attempts": attempts})
}

/// Many small writes and reads as fast as possible, for the ring-buffer overflow test.
fn burst(family: Family, dir: &str, count: usize) -> Value {
    let l = listen(family, dir);
    let c = l.connect();
    let s = l.accept();
    let msg = [b'z'; 100];
    let mut buf = [0u8; 100];
    let mut syscalls = 0u64;
    for _ in 0..count {
        // SAFETY: valid buffers and fds.
        unsafe {
            check(libc::write(c, msg.as_ptr().cast(), msg.len()), "write");
            let mut got = 0;
            while got < msg.len() {
                got += check(libc::read(s, buf.as_mut_ptr().add(got).cast(), msg.len() - got), "read");
                syscalls += 1;
            }
        }
        syscalls += 1;
    }
    close(c);
    close(s);
    json!({"data_syscalls": syscalls})
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let scenario = args.get(1).expect("scenario").as_str();
    let family = match args.get(2).map(String::as_str) {
        Some("inet") => Family::Inet,
        Some("inet6") => Family::Inet6,
        Some("unix") => Family::Unix,
        other => panic!("family: {other:?}"),
    };
    let dir = args.get(3).expect("tmpdir").clone();
    let count: usize = args.get(4).and_then(|c| c.parse().ok()).unwrap_or(10_000);

    let pre = (scenario == "preexisting").then(|| preexisting_setup(family, &dir));
    let blocked = (scenario == "blocked-accept").then(|| blocked_accept_setup(family, &dir));
    let mut hello = json!({"pid": std::process::id()});
    if let Some((_, c, s)) = &pre {
        hello["client"] = endpoint(*c);
        hello["server"] = endpoint(*s);
    }
    println!("{hello}");
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).expect("waiting for go");

    let result = match scenario {
        "exchange" => exchange(family, &dir),
        "large" => large(family, &dir),
        "preexisting" => {
            let (_l, c, s) = pre.expect("set up above");
            preexisting_run(c, s)
        }
        "blocked-accept" => {
            let (l, t) = blocked.expect("set up above");
            blocked_accept_run(&l, t)
        }
        "fork" => fork(family, &dir),
        "fdreuse" => fdreuse(family, &dir),
        "burst" => burst(family, &dir, count),
        "refused" => refused(family, &dir),
        other => panic!("unknown scenario {other}"),
    };
    println!("{result}");
    std::io::stdout().flush().unwrap();
}
