//! Unix socket peers from NETLINK_SOCK_DIAG (what `ss -x` shows): /proc/net/unix has no
//! peer column, and a connection found at start needs its peer to name the server it
//! talks to (e.g. PostgreSQL's `.s.PGSQL.5432`). Only sockets of the observer's own
//! network namespace are visible this way.

use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const UDIAG_SHOW_PEER: u32 = 0x4;
const UNIX_DIAG_PEER: u16 = 2;
const NLMSG_HDR: usize = 16;
const UNIX_DIAG_MSG: usize = 16;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(o..o + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(o..o + 4)?.try_into().ok()?))
}

/// What one buffer of netlink replies said.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// socket inode -> peer socket inode
    pub peers: Vec<(u64, u64)>,
    /// The dump is complete (NLMSG_DONE or an error).
    pub done: bool,
}

/// Parses a buffer of netlink messages carrying `unix_diag_msg` replies.
pub fn parse(buf: &[u8]) -> Batch {
    let mut out = Batch::default();
    let mut o = 0;
    while o + NLMSG_HDR <= buf.len() {
        let Some(len) = u32_at(buf, o).map(|l| l as usize) else { break };
        let Some(kind) = u16_at(buf, o + 4) else { break };
        if len < NLMSG_HDR || o + len > buf.len() {
            break;
        }
        if kind == NLMSG_DONE || kind == NLMSG_ERROR {
            out.done = true;
            break;
        }
        let msg = &buf[o + NLMSG_HDR..o + len];
        if let Some(ino) = u32_at(msg, 4) {
            let mut a = UNIX_DIAG_MSG;
            while a + 4 <= msg.len() {
                let (Some(alen), Some(atype)) = (u16_at(msg, a), u16_at(msg, a + 2)) else { break };
                let alen = alen as usize;
                if alen < 4 || a + alen > msg.len() {
                    break;
                }
                if atype == UNIX_DIAG_PEER
                    && let Some(peer) = u32_at(msg, a + 4)
                {
                    out.peers.push((u64::from(ino), u64::from(peer)));
                }
                a += align4(alen);
            }
        }
        o += align4(len);
    }
    out
}

/// Dumps every Unix socket of our network namespace: inode -> peer inode.
pub fn peers() -> io::Result<HashMap<u64, u64>> {
    // SAFETY: plain socket syscall.
    let fd =
        unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a socket we just opened; OwnedFd closes it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let raw = fd.as_raw_fd();

    // nlmsghdr + unix_diag_req { family, protocol, pad, states, ino, show, cookie[2] }
    let mut req = Vec::with_capacity(NLMSG_HDR + 24);
    req.extend_from_slice(&((NLMSG_HDR + 24) as u32).to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid
    req.extend_from_slice(&[libc::AF_UNIX as u8, 0, 0, 0]);
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // all states
    req.extend_from_slice(&0u32.to_ne_bytes()); // ino
    req.extend_from_slice(&UDIAG_SHOW_PEER.to_ne_bytes());
    req.extend_from_slice(&[0xff; 8]); // no cookie
    // SAFETY: req is a valid buffer of its length.
    if unsafe { libc::send(raw, req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = HashMap::new();
    let mut buf = vec![0u8; 64 * 1024];
    // Bounded: a dump ends with NLMSG_DONE; stop anyway after this many reads.
    for _ in 0..100_000 {
        // SAFETY: buf is a valid, writable buffer of its length.
        let n = unsafe { libc::recv(raw, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            break;
        }
        let batch = parse(&buf[..n as usize]);
        out.extend(batch.peers);
        if batch.done {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(ino: u32, peer: Option<u32>) -> Vec<u8> {
        let mut body = vec![1u8, 1, 1, 0];
        body.extend_from_slice(&ino.to_ne_bytes());
        body.extend_from_slice(&[0xff; 8]);
        if let Some(p) = peer {
            body.extend_from_slice(&8u16.to_ne_bytes());
            body.extend_from_slice(&UNIX_DIAG_PEER.to_ne_bytes());
            body.extend_from_slice(&p.to_ne_bytes());
        }
        let mut m = ((NLMSG_HDR + body.len()) as u32).to_ne_bytes().to_vec();
        m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&body);
        m
    }

    #[test]
    fn peers_and_done() {
        let mut buf = msg(10, Some(11));
        buf.extend(msg(12, None));
        buf.extend(msg(11, Some(10)));
        let b = parse(&buf);
        assert_eq!(b.peers, vec![(10, 11), (11, 10)]);
        assert!(!b.done);
        let mut done = 16u32.to_ne_bytes().to_vec();
        done.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        done.extend_from_slice(&[0; 10]);
        assert!(parse(&done).done);
    }

    #[test]
    fn truncated_messages_stop_parsing() {
        let buf = msg(10, Some(11));
        for cut in 0..buf.len() {
            let _ = parse(&buf[..cut]);
        }
        assert_eq!(parse(&buf[..buf.len() - 1]).peers, vec![]);
    }

    #[test]
    fn live_dump_sees_a_socket_pair() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let ino = |s: &std::os::unix::net::UnixStream| {
            use std::os::fd::AsRawFd;
            let link = std::fs::read_link(format!("/proc/self/fd/{}", s.as_raw_fd())).unwrap();
            crate::targets::procfs::socket_inode(link.to_str().unwrap()).unwrap()
        };
        let Ok(map) = peers() else { return };
        assert_eq!(map.get(&ino(&a)), Some(&ino(&b)));
    }
}
