//! Pure parsers for the /proc files the observer reads: `net/tcp`, `net/tcp6`, `net/unix`,
//! `status` and fd links. No I/O here; `targets` reads the files.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use crate::events::SockAddr;

/// TCP states as /proc/net/tcp prints them (include/net/tcp_states.h).
pub const TCP_ESTABLISHED: u8 = 0x01;
pub const TCP_CLOSE: u8 = 0x07;
pub const TCP_LISTEN: u8 = 0x0A;
const TCP_TIME_WAIT: u8 = 0x06;
const TCP_NEW_SYN_RECV: u8 = 0x0C;

/// One row of /proc/net/tcp or tcp6.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpRow {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: u8,
    pub inode: u64,
}

impl TcpRow {
    /// A socket that carries (or may still carry) a byte stream between two ends.
    pub fn is_connection(&self) -> bool {
        !matches!(self.state, TCP_LISTEN | TCP_CLOSE | TCP_TIME_WAIT | TCP_NEW_SYN_RECV)
    }
}

/// `AAAAAAAA:PPPP` (IPv4) or 32 hex digits `:PPPP` (IPv6); each 32-bit word is printed in
/// host byte order, the port as a number.
fn parse_hex_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Parses /proc/net/tcp or /proc/net/tcp6. Malformed rows are skipped.
pub fn parse_tcp(text: &str) -> Vec<TcpRow> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let _sl = f.next()?;
            let local = parse_hex_addr(f.next()?)?;
            let remote = parse_hex_addr(f.next()?)?;
            let state = u8::from_str_radix(f.next()?, 16).ok()?;
            // tx:rx, tr:when, retrnsmt, uid, timeout, then the inode
            let inode = f.nth(5)?.parse().ok()?;
            Some(TcpRow { local, remote, state, inode })
        })
        .collect()
}

/// Unix socket types and states as /proc/net/unix prints them.
pub const UNIX_STREAM: u16 = 1;
pub const UNIX_SEQPACKET: u16 = 5;
pub const SS_UNCONNECTED: u8 = 1;
pub const SS_CONNECTED: u8 = 3;
const SO_ACCEPTCON: u32 = 0x10000;

/// One row of /proc/net/unix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixRow {
    pub listening: bool,
    pub sock_type: u16,
    pub state: u8,
    pub inode: u64,
    /// The bound name, bytes as the kernel prints them (any bytes but NUL; `@name` for
    /// the abstract namespace).
    pub path: Option<Vec<u8>>,
}

impl UnixRow {
    pub fn is_stream(&self) -> bool {
        self.sock_type == UNIX_STREAM || self.sock_type == UNIX_SEQPACKET
    }

    pub fn addr(&self) -> SockAddr {
        match &self.path {
            None => SockAddr::UnixUnnamed,
            Some(p) => match p.strip_prefix(b"@") {
                Some(name) => SockAddr::UnixAbstract(name.to_vec()),
                None => SockAddr::UnixPath(p.clone()),
            },
        }
    }
}

/// Parses /proc/net/unix, as bytes: a socket name is any bytes an app chose (invalid
/// UTF-8 in one name must not empty the table). Malformed rows are skipped. A name may
/// hold a newline, and so forge a row of its choosing: an inode seen in two rows is
/// trusted in neither (a forged row names an inode that also has its real row).
pub fn parse_unix(text: &[u8]) -> Vec<UnixRow> {
    let mut rows: Vec<UnixRow> = text.split(|&b| b == b'\n').skip(1).filter_map(unix_row).collect();
    let mut seen = HashMap::with_capacity(rows.len());
    for r in &rows {
        *seen.entry(r.inode).or_insert(0u32) += 1;
    }
    rows.retain(|r| seen.get(&r.inode) == Some(&1));
    rows
}

fn unix_row(line: &[u8]) -> Option<UnixRow> {
    // Fields: Num RefCount Protocol Flags Type St Inode [Path]; the path is the rest of
    // the line (it may contain spaces).
    let mut rest = line;
    let mut field = || -> Option<&str> {
        let start = rest.iter().position(|b| !b.is_ascii_whitespace())?;
        let len = rest[start..].iter().position(u8::is_ascii_whitespace).unwrap_or(rest.len() - start);
        let f = &rest[start..start + len];
        rest = &rest[start + len..];
        std::str::from_utf8(f).ok()
    };
    let _num = field()?;
    let _refs = field()?;
    let _proto = field()?;
    let flags = u32::from_str_radix(field()?, 16).ok()?;
    let sock_type = u16::from_str_radix(field()?, 16).ok()?;
    let state = u8::from_str_radix(field()?, 16).ok()?;
    let inode = field()?.parse().ok()?;
    let path = rest.trim_ascii();
    Some(UnixRow {
        listening: flags & SO_ACCEPTCON != 0,
        sock_type,
        state,
        inode,
        path: (!path.is_empty()).then(|| path.to_vec()),
    })
}

/// The inode of an fd link target `socket:[12345]`.
pub fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// `PPid:` from /proc/PID/status.
pub fn status_ppid(status: &str) -> Option<u32> {
    status.lines().find_map(|l| l.strip_prefix("PPid:")).and_then(|v| v.trim().parse().ok())
}

/// Whether /proc/PID/status says `State: Z (zombie)`.
pub fn status_zombie(status: &str) -> bool {
    status.lines().find_map(|l| l.strip_prefix("State:")).is_some_and(|v| v.trim_start().starts_with('Z'))
}

/// `Tgid:` from /proc/PID/status (differs from the pid for a thread).
pub fn status_tgid(status: &str) -> Option<u32> {
    status.lines().find_map(|l| l.strip_prefix("Tgid:")).and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Recorded on this machine (`cat /proc/net/tcp` with a listener on 127.0.0.1:8000
    // and one accepted connection).
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 41157 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F40 0100007F:D4A2 01 00000000:00000000 00:00000000 00000000     0        0 41158 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:D4A2 0100007F:1F40 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000
";

    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 52001 1 0000000000000000 100 0 0 10 0
";

    const UNIX: &str = "Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 30001 /run/postgresql/.s.PGSQL.5432
0000000000000000: 00000003 00000000 00000000 0001 03 30002 /run/postgresql/.s.PGSQL.5432
0000000000000000: 00000003 00000000 00000000 0001 03 30003
0000000000000000: 00000002 00000000 00000000 0002 01 30004 @abstract name
";

    #[test]
    fn tcp_rows() {
        let rows = parse_tcp(TCP);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].local.to_string(), "127.0.0.1:8000");
        assert_eq!(rows[0].state, TCP_LISTEN);
        assert!(!rows[0].is_connection());
        assert_eq!(rows[1].remote.to_string(), "127.0.0.1:54434");
        assert_eq!(rows[1].inode, 41158);
        assert!(rows[1].is_connection());
        assert!(!rows[2].is_connection());
    }

    #[test]
    fn tcp6_rows() {
        let rows = parse_tcp(TCP6);
        assert_eq!(rows[0].local.to_string(), "[::1]:8080");
        assert_eq!(rows[0].inode, 52001);
    }

    #[test]
    fn unix_rows() {
        let rows = parse_unix(UNIX.as_bytes());
        assert_eq!(rows.len(), 4);
        assert!(rows[0].listening);
        assert_eq!(rows[1].state, SS_CONNECTED);
        assert_eq!(rows[1].addr().to_string(), "unix:/run/postgresql/.s.PGSQL.5432");
        assert_eq!(rows[2].path, None);
        assert!(!rows[3].is_stream());
        assert_eq!(rows[3].addr().to_string(), "unix:@abstract name");
    }

    /// An app's socket name is any bytes: one that is not UTF-8 costs nothing to the
    /// other rows (read as text, it emptied the table), and one holding a newline that
    /// forges a row for another socket's inode leaves that inode trusted by no row.
    #[test]
    fn hostile_unix_names_neither_empty_nor_forge_the_table() {
        let mut t = b"Num       RefCount Protocol Flags    Type St Inode Path\n".to_vec();
        t.extend_from_slice(b"0000000000000000: 00000002 00000000 00010000 0001 01 7 /tmp/\xff\xfe.sock\n");
        t.extend_from_slice(
            b"0000000000000000: 00000003 00000000 00000000 0001 03 8 /run/postgresql/.s.PGSQL.5432\n",
        );
        // A name with a newline: its own row, and a forged one claiming inode 8.
        t.extend_from_slice(b"0000000000000000: 00000002 00000000 00010000 0001 01 9 /tmp/x\n");
        t.extend_from_slice(b"0000000000000000: 00000003 00000000 00000000 0001 03 8 /tmp/forged\n");
        let rows = parse_unix(&t);
        let inodes: Vec<u64> = rows.iter().map(|r| r.inode).collect();
        assert_eq!(inodes, [7, 9]);
        assert_eq!(rows[0].path.as_deref(), Some(&b"/tmp/\xff\xfe.sock"[..]));
        assert!(rows[0].listening);
    }

    #[test]
    fn links_and_status() {
        assert_eq!(socket_inode("socket:[41158]"), Some(41158));
        assert_eq!(socket_inode("pipe:[1]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
        let status = "Name:\tpython3\nTgid:\t77\nPid:\t78\nPPid:\t1\n";
        assert_eq!(status_ppid(status), Some(1));
        assert_eq!(status_tgid(status), Some(77));
        assert!(!status_zombie("Name:\tpython3\nState:\tS (sleeping)\n"));
        assert!(status_zombie("Name:\tpython3\nState:\tZ (zombie)\n"));
        assert!(!status_zombie(status), "no State line: not a zombie");
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(text in "[ -~\n]{0,400}") {
            let _ = parse_tcp(&text);
            let _ = parse_unix(text.as_bytes());
            let _ = status_ppid(&text);
            let _ = socket_inode(&text);
        }

        #[test]
        fn tcp_rows_round_trip(a in proptest::prelude::any::<[u8; 4]>(), port in proptest::prelude::any::<u16>(), inode in 1u64..u64::from(u32::MAX)) {
            let hex = format!("{:08X}:{port:04X}", u32::from_ne_bytes(a));
            let text = format!("h\n   0: {hex} 00000000:0000 01 00000000:00000000 00:00000000 00000000     0        0 {inode} 1\n");
            let rows = parse_tcp(&text);
            proptest::prop_assert_eq!(rows.len(), 1);
            proptest::prop_assert_eq!(rows[0].local, SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), port));
            proptest::prop_assert_eq!(rows[0].inode, inode);
        }
    }

    #[test]
    fn garbage_is_skipped() {
        assert!(parse_tcp("header\nnot a row\n   0: zz:zz").is_empty());
        assert!(parse_unix(b"header\n0000: 1 2").is_empty());
    }
}
