//! Socket addresses as the syscalls carry them (`struct sockaddr_*`), and as /proc shows them.

use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
};

const AF_UNIX: u16 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// An IPv4/IPv6 or Unix-domain socket address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SockAddr {
    Inet(SocketAddr),
    /// A path-bound Unix socket (bytes of the path, without the trailing NUL).
    UnixPath(Vec<u8>),
    /// An abstract Unix socket (the name after the leading NUL).
    UnixAbstract(Vec<u8>),
    /// A Unix socket without a name (the usual client side).
    UnixUnnamed,
}

impl SockAddr {
    /// Decodes a raw `struct sockaddr` (family in host byte order first). `None` for an
    /// empty buffer or a family we do not trace.
    pub fn from_raw(raw: &[u8]) -> Option<Self> {
        let family = u16::from_ne_bytes(raw.get(..2)?.try_into().ok()?);
        match family {
            AF_INET => {
                let port = u16::from_be_bytes(raw.get(2..4)?.try_into().ok()?);
                let ip: [u8; 4] = raw.get(4..8)?.try_into().ok()?;
                Some(Self::Inet(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port))))
            }
            AF_INET6 => {
                let port = u16::from_be_bytes(raw.get(2..4)?.try_into().ok()?);
                let flow = u32::from_be_bytes(raw.get(4..8)?.try_into().ok()?);
                let ip: [u8; 16] = raw.get(8..24)?.try_into().ok()?;
                let scope = raw.get(24..28).map_or(0, |s| u32::from_ne_bytes(s.try_into().unwrap_or([0; 4])));
                Some(Self::Inet(SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), port, flow, scope))))
            }
            AF_UNIX => {
                let path = raw.get(2..).unwrap_or(&[]);
                Some(match path.first() {
                    None => Self::UnixUnnamed,
                    Some(0) => {
                        let name = &path[1..];
                        if name.is_empty() { Self::UnixUnnamed } else { Self::UnixAbstract(name.to_vec()) }
                    }
                    Some(_) => {
                        let end = path.iter().position(|&b| b == 0).unwrap_or(path.len());
                        Self::UnixPath(path[..end].to_vec())
                    }
                })
            }
            _ => None,
        }
    }

    /// The address family's name, as the trace output shows it.
    pub fn family(&self) -> &'static str {
        match self {
            Self::Inet(SocketAddr::V4(_)) => "inet",
            Self::Inet(SocketAddr::V6(_)) => "inet6",
            _ => "unix",
        }
    }

    /// The TCP port, for IP addresses.
    pub fn port(&self) -> Option<u16> {
        match self {
            Self::Inet(a) => Some(a.port()),
            _ => None,
        }
    }
}

impl fmt::Display for SockAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Inet(a) => write!(f, "{a}"),
            // A socket's name is any bytes its creator chose: shown with controls escaped,
            // so that a name printed in a log or a terminal cannot forge or drive either.
            Self::UnixPath(p) => write!(f, "unix:{}", printable(p)),
            Self::UnixAbstract(p) => write!(f, "unix:@{}", printable(p)),
            Self::UnixUnnamed => write!(f, "unix:(unnamed)"),
        }
    }
}

fn printable(name: &[u8]) -> String {
    crate::text::printable(&String::from_utf8_lossy(name), usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_with_port() {
        let mut raw = vec![0u8; 28];
        raw[..2].copy_from_slice(&AF_INET6.to_ne_bytes());
        raw[2..4].copy_from_slice(&443u16.to_be_bytes());
        raw[23] = 1; // ::1
        assert_eq!(SockAddr::from_raw(&raw).unwrap().to_string(), "[::1]:443");
    }

    #[test]
    fn unix_forms() {
        let mut raw = AF_UNIX.to_ne_bytes().to_vec();
        assert_eq!(SockAddr::from_raw(&raw), Some(SockAddr::UnixUnnamed));
        raw.extend_from_slice(b"/run/pg/.s.PGSQL.5432\0\0\0");
        assert_eq!(SockAddr::from_raw(&raw).unwrap().to_string(), "unix:/run/pg/.s.PGSQL.5432");
        let mut abs = AF_UNIX.to_ne_bytes().to_vec();
        abs.extend_from_slice(b"\0redis");
        assert_eq!(SockAddr::from_raw(&abs).unwrap().to_string(), "unix:@redis");
        let mut hostile = AF_UNIX.to_ne_bytes().to_vec();
        hostile.extend_from_slice(b"\0x\x1b[2J\nlevel=ERROR \xff");
        assert_eq!(
            SockAddr::from_raw(&hostile).unwrap().to_string(),
            "unix:@x\\u{1b}[2J\\nlevel=ERROR \u{fffd}"
        );
    }

    #[test]
    fn other_families_and_short_buffers() {
        assert_eq!(SockAddr::from_raw(&[]), None);
        assert_eq!(SockAddr::from_raw(&[16, 0, 1, 2]), None); // AF_NETLINK
        assert_eq!(SockAddr::from_raw(&[2, 0, 1]), None);
    }
}
