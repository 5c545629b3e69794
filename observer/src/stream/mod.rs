//! The stream stage: each connection's records as ordered segments, with the gaps
//! marked, before any protocol is known and whatever produced the bytes (a socket
//! syscall today; a TLS library's plaintext through the same type tomorrow).
//!
//! Three kinds of gap exist. A syscall that moved more than was captured keeps its true
//! length in the [`Chunk`] (`total_len > bytes.len()`): a hole of known size, which
//! length-delimited framing steps over, so it is carried, not reported here. A record
//! the kernel could not deliver (the ring was full) shows as a skip in the per-fd
//! sequence numbers: [`Gap::Lost`]. A record that arrives after a later one of the same
//! fd (two threads on one socket, their records reserved in the other order):
//! [`Gap::OutOfOrder`]. Parsers see gaps only through their `lost()` step, so each stays
//! a pure function of its segments, and gaps are counted here, once, for every
//! connection, including those whose protocol is not decided yet.

pub mod tls;

use std::collections::{HashMap, hash_map::Entry};

use crate::{IdMap, events::Data, protocol::Chunk};

/// Bytes of the connection are missing before this segment, or arrive out of order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Gap {
    /// Records of the fd were lost before this one.
    Lost,
    /// A later record of the fd was already delivered.
    OutOfOrder,
}

impl Gap {
    /// The `reason` label of `observer_stream_gaps_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lost => "records_lost",
            Self::OutOfOrder => "out_of_order",
        }
    }
}

/// One record of a connection as the parsers take it.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    pub chunk: Chunk<'a>,
    /// What is missing right before it (None: it follows the previous one exactly).
    pub gap: Option<Gap>,
}

/// Sequence numbers wrap; a distance of half the space or more is behind, not ahead.
const BEHIND: u32 = 1 << 31;

/// The next expected sequence number of every traced (process, fd): one lookup per
/// record; the fds of each process are listed apart (written only when a fd is first
/// seen) so that a process's exit forgets its fds without a walk of every other one's.
#[derive(Debug, Default)]
pub struct Streams {
    next: IdMap<u64, u32>,
    fds: IdMap<u32, Vec<u32>>,
    /// Gaps seen, by kind.
    pub gaps: HashMap<Gap, u64>,
}

fn key(tgid: u32, fd: u32) -> u64 {
    (u64::from(tgid) << 32) | u64::from(fd)
}

/// A socket's TLS plaintext is a sequence of its own (numbered by the kernel per `SSL*`),
/// kept under the fd with this bit set (fd numbers stay far below it).
const PLAINTEXT: u32 = 1 << 31;

impl Streams {
    /// The kernel saw the fd open: its record sequence starts at 0.
    pub fn opened(&mut self, tgid: u32, fd: u32) {
        if self.next.insert(key(tgid, fd), 0).is_none() {
            self.fds.entry(tgid).or_default().push(fd);
        }
    }

    /// The fd closed: a new socket under the same number starts its own sequence.
    pub fn closed(&mut self, tgid: u32, fd: u32) {
        let plain = self.next.remove(&key(tgid, fd)).is_some();
        let tls = self.next.remove(&key(tgid, fd | PLAINTEXT)).is_some();
        if (plain || tls)
            && let Some(fds) = self.fds.get_mut(&tgid)
        {
            fds.retain(|&f| f & !PLAINTEXT != fd);
            if fds.is_empty() {
                self.fds.remove(&tgid);
            }
        }
    }

    /// The process is gone, and every fd it had.
    pub fn process_gone(&mut self, tgid: u32) {
        for fd in self.fds.remove(&tgid).unwrap_or_default() {
            self.next.remove(&key(tgid, fd));
        }
    }

    /// A data record as a segment of its connection, its gap marked and counted. A fd
    /// first met in the middle (open before tracing) has no gap until its sequence is
    /// known; a record without a sequence number (its fd closed during the syscall)
    /// marks none.
    pub fn segment<'a>(&mut self, d: &Data<'a>) -> Segment<'a> {
        let chunk = Chunk {
            dir: d.dir,
            enter_ns: d.enter_ns,
            exit_ns: d.exit_ns,
            bytes: d.bytes,
            total_len: d.total_len,
        };
        let Some(seq) = d.seq else { return Segment { chunk, gap: None } };
        let fd = if d.syscall.is_tls() { d.fd | PLAINTEXT } else { d.fd };
        let next = match self.next.entry(key(d.tgid, fd)) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(v) => {
                self.fds.entry(d.tgid).or_default().push(fd);
                v.insert(seq)
            }
        };
        let ahead = seq.wrapping_sub(*next);
        let gap = match ahead {
            0 => None,
            a if a < BEHIND => Some(Gap::Lost),
            _ => Some(Gap::OutOfOrder),
        };
        // A late record does not move the expectation back: the next in-order record
        // is no loss.
        if gap != Some(Gap::OutOfOrder) {
            *next = seq.wrapping_add(1);
        }
        if let Some(g) = gap {
            *self.gaps.entry(g).or_default() += 1;
        }
        Segment { chunk, gap }
    }

    /// Processes with fds tracked.
    #[cfg(test)]
    fn processes(&self) -> usize {
        self.fds.len()
    }

    /// Gives back memory after a burst of processes.
    pub fn shrink_idle(&mut self) {
        crate::conns::shrink_idle(&mut self.next);
        crate::conns::shrink_idle(&mut self.fds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Direction;
    use observer_ebpf::Syscall;

    fn data(tgid: u32, fd: u32, seq: Option<u32>, bytes: &[u8]) -> Data<'_> {
        Data {
            enter_ns: 1,
            exit_ns: 2,
            tgid,
            tid: tgid,
            fd,
            conn_id: 7,
            syscall: Syscall::Write,
            dir: Direction::Send,
            total_len: bytes.len() as u64 + 10,
            bytes,
            fault: false,
            no_capture: false,
            ciphertext: false,
            seq,
        }
    }

    fn gaps(s: &mut Streams, tgid: u32, fd: u32, seqs: &[u32]) -> Vec<Option<Gap>> {
        seqs.iter().map(|&q| s.segment(&data(tgid, fd, Some(q), b"x")).gap).collect()
    }

    #[test]
    fn in_order_records_have_no_gap_and_carry_their_hole() {
        let mut s = Streams::default();
        s.opened(1, 3);
        assert_eq!(gaps(&mut s, 1, 3, &[0, 1, 2, 3]), [None; 4]);
        let seg = s.segment(&data(1, 3, Some(4), b"abc"));
        assert_eq!((seg.chunk.bytes, seg.chunk.total_len), (&b"abc"[..], 13), "the hole is the parsers'");
        assert!(s.gaps.is_empty());
    }

    #[test]
    fn a_skipped_sequence_number_is_a_loss() {
        let mut s = Streams::default();
        s.opened(1, 3);
        assert_eq!(gaps(&mut s, 1, 3, &[0, 1, 4, 5]), [None, None, Some(Gap::Lost), None]);
        // The first records of a freshly opened fd were lost.
        s.opened(1, 4);
        assert_eq!(gaps(&mut s, 1, 4, &[2]), [Some(Gap::Lost)]);
        assert_eq!(s.gaps[&Gap::Lost], 2);
    }

    #[test]
    fn a_late_record_is_out_of_order_and_does_not_make_the_next_a_loss() {
        let mut s = Streams::default();
        s.opened(1, 3);
        assert_eq!(gaps(&mut s, 1, 3, &[0, 2, 1, 3]), [None, Some(Gap::Lost), Some(Gap::OutOfOrder), None]);
        assert_eq!((s.gaps[&Gap::Lost], s.gaps[&Gap::OutOfOrder]), (1, 1));
    }

    #[test]
    fn plaintext_is_numbered_apart_from_the_sockets_records() {
        let mut s = Streams::default();
        s.opened(1, 3);
        let tls = |q| Data { syscall: Syscall::SslWrite, ..data(1, 3, Some(q), b"x") };
        assert_eq!(gaps(&mut s, 1, 3, &[0, 1]), [None, None]);
        assert_eq!(s.segment(&tls(0)).gap, None);
        assert_eq!(gaps(&mut s, 1, 3, &[2]), [None]);
        assert_eq!(s.segment(&tls(2)).gap, Some(Gap::Lost), "a plaintext record was lost");
        s.closed(1, 3);
        assert_eq!(s.processes(), 0, "both sequences go with the fd");
    }

    #[test]
    fn sequences_wrap() {
        let mut s = Streams::default();
        assert_eq!(gaps(&mut s, 1, 3, &[u32::MAX - 1, u32::MAX, 0, 1]), [None; 4]);
        assert_eq!(gaps(&mut s, 1, 3, &[u32::MAX]), [Some(Gap::OutOfOrder)]);
    }

    #[test]
    fn a_fd_met_in_the_middle_starts_where_it_is_met() {
        let mut s = Streams::default();
        assert_eq!(gaps(&mut s, 1, 9, &[1234, 1235]), [None, None]);
        assert_eq!(s.segment(&data(1, 9, None, b"x")).gap, None, "no sequence, no verdict");
    }

    #[test]
    fn fds_are_per_process_and_forgotten_with_their_process() {
        let mut s = Streams::default();
        s.opened(1, 3);
        s.opened(2, 3);
        assert_eq!(gaps(&mut s, 1, 3, &[0, 1]), [None, None]);
        assert_eq!(gaps(&mut s, 2, 3, &[0]), [None], "another process's fd 3 is its own");
        s.closed(1, 3);
        // The number is reused by a socket met in the middle: no loss against the old one.
        assert_eq!(gaps(&mut s, 1, 3, &[0]), [None]);
        s.process_gone(2);
        assert_eq!(s.processes(), 1);
        s.closed(1, 3);
        assert_eq!(s.processes(), 0, "a process without fds takes no room");
    }
}
