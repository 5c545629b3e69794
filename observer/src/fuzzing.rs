//! The bodies of the fuzz targets (observer/fuzz), here so that `cargo test` replays the
//! corpus kept in observer/fuzz/corpus through exactly what `cargo xtask fuzz` runs.
//!
//! Each function takes arbitrary bytes and must neither panic nor let a parser grow past
//! its bound; the asserts are the bounds.

use crate::{
    ebpf::btf::Btf,
    events::{Direction, Record, decode},
    protocol::{
        CacheEvent, CacheLimits, CacheParser, Chunk, KEY_HEAD,
        http1::{Config, Http1Parser, Limits},
        memcached::{self, MemcachedParser},
        postgres::{self, PgParser, sql},
        redis::{self, RedisParser},
    },
    targets::procfs,
    views::{self, RouteTable},
};

/// A target's body: arbitrary bytes in, a panic on a broken bound.
pub type Body = fn(&[u8]);

/// Every target: its name in observer/fuzz/Cargo.toml (and its corpus directory) and body.
pub const TARGETS: &[(&str, Body)] = &[
    ("btf", btf),
    ("decode_record", decode_record),
    ("http1", http1),
    ("memcached", memcached),
    ("postgres", postgres),
    ("proc_tables", proc_tables),
    ("redis", redis),
    ("routes", routes),
    ("unix_diag", unix_diag),
];

/// One syscall of a connection, and whether records of it were lost after it.
pub struct Step<'a> {
    pub chunk: Chunk<'a>,
    pub lost: bool,
}

/// The input format every parser target shares: a sequence of steps, each a control byte
/// (bit 0: send, else receive; bit 1: records lost after it; high nibble: a hole of that
/// many times 997 bytes after the captured ones), a length byte, then the bytes.
pub fn steps(data: &[u8]) -> impl Iterator<Item = Step<'_>> {
    let mut rest = data;
    let mut ts = 0;
    std::iter::from_fn(move || {
        let (&[ctl, len], tail) = rest.split_first_chunk::<2>()?;
        let n = usize::from(len).min(tail.len());
        let (bytes, tail) = tail.split_at(n);
        rest = tail;
        ts += 1;
        let dir = if ctl & 1 == 0 { Direction::Recv } else { Direction::Send };
        let hole = u64::from(ctl >> 4) * 997;
        let chunk = Chunk { dir, enter_ns: ts, exit_ns: ts, bytes, total_len: bytes.len() as u64 + hole };
        Some(Step { chunk, lost: ctl & 2 != 0 })
    })
}

/// The BTF member-offset parser on arbitrary blobs.
pub fn btf(data: &[u8]) {
    if let Some(btf) = Btf::parse(data) {
        let _ = btf.offset("sock", &["__sk_common", "skc_num"]);
    }
}

/// Ring-buffer items: any bytes decode to a record or an error, and a decoded data record
/// never claims more captured bytes than it moved.
pub fn decode_record(data: &[u8]) {
    if let Ok(Record::Data(d)) = decode(data) {
        assert!(d.no_capture || d.bytes.len() as u64 <= d.total_len);
    }
}

/// The HTTP/1 parser on arbitrary syscall sequences: bounded buffers and pending requests,
/// whatever the bytes, holes, losses and closes.
pub fn http1(data: &[u8]) {
    let limits = Limits { max_head_bytes: 2048, max_pending: 16 };
    let mut p = Http1Parser::new(limits, Config::default());
    let mut out = Vec::new();
    for s in steps(data) {
        p.feed(&s.chunk, &mut out);
        if s.lost {
            p.lost(&mut out);
        }
        assert!(p.pending() <= 16);
        assert!(p.buffered() <= 8 * 2048);
        out.clear();
    }
    p.close(&mut out);
}

/// The PostgreSQL parser (fresh or joined mid-stream, by the first byte) with bounded
/// state; the statement classifier and the detectors on the same bytes.
pub fn postgres(data: &[u8]) {
    let limits =
        postgres::Limits { max_pending: 16, max_prepared: 8, keep_shapes: data.len().is_multiple_of(2) };
    let mid = data.first().is_some_and(|b| b & 1 == 1);
    let mut p = if mid { PgParser::mid_stream(limits) } else { PgParser::new(limits) };
    let mut out = Vec::new();
    for s in steps(data.get(1..).unwrap_or_default()) {
        let (bytes, total) = (s.chunk.bytes, s.chunk.total_len);
        let _ =
            (postgres::is_startup(bytes), postgres::looks_like_frontend(bytes, total), sql::classify(bytes));
        p.feed(&s.chunk, &mut out);
        if s.lost {
            p.lost(&mut out);
        }
        assert!(p.pending() <= 2 * 16);
        let (statements, portals) = p.remembered();
        assert!(statements <= 8 && portals <= 8);
        out.clear();
    }
    p.close(&mut out);
}

/// The Redis parser and its protocol detector.
pub fn redis(data: &[u8]) {
    cache(&mut RedisParser::new(CacheLimits { max_pending: 16 }), 16, redis::is_command, data);
}

/// The memcached parser and its protocol detector.
pub fn memcached(data: &[u8]) {
    cache(&mut MemcachedParser::new(CacheLimits { max_pending: 16 }), 16, memcached::is_command, data);
}

/// A cache parser on arbitrary syscall sequences: bounded pending commands, key heads
/// within KEY_HEAD, time never running backwards.
fn cache(p: &mut dyn CacheParser, max_pending: usize, detect: fn(&[u8]) -> bool, data: &[u8]) {
    let mut out = Vec::new();
    for s in steps(data) {
        let _ = detect(s.chunk.bytes);
        p.feed(&s.chunk, &mut out);
        if s.lost {
            p.lost(&mut out);
        }
        assert!(p.pending() <= 2 * max_pending);
        for e in out.drain(..) {
            if let CacheEvent::Get(g) = e {
                assert!(g.key.len() <= KEY_HEAD && g.start_ns <= g.end_ns);
            }
        }
    }
    p.close(&mut out);
}

/// /proc/net/{tcp,tcp6,unix} and status parsers on arbitrary text.
pub fn proc_tables(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = procfs::parse_tcp(&text);
    let _ = procfs::parse_unix(&text);
    let _ = procfs::status_ppid(&text);
    let _ = procfs::socket_inode(&text);
}

/// Routes files and view resolution on arbitrary text and paths.
pub fn routes(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (file, path) = text.split_once('\n').unwrap_or((&text, "/"));
    if let Ok(t) = RouteTable::from_routes_file(file) {
        let _ = t.resolve(path);
    }
    let _ = views::template_path(path);
}

/// sock_diag netlink replies on arbitrary bytes.
pub fn unix_diag(data: &[u8]) {
    let _ = crate::targets::unix_diag::parse(data);
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::TARGETS;

    /// Every input the fuzzers kept (observer/fuzz/corpus, minimised by `cargo xtask
    /// fuzz`) runs again through its target: a regression there fails here, without
    /// nightly or libFuzzer.
    #[test]
    fn the_kept_corpus_replays_cleanly() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        for &(name, body) in TARGETS {
            let dir = root.join(name);
            let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            let mut n = 0;
            for entry in entries {
                let path = entry.expect("corpus entry").path();
                let data = std::fs::read(&path).expect("corpus file");
                let run = std::panic::catch_unwind(|| body(&data));
                assert!(run.is_ok(), "{name}: {} fails", path.display());
                n += 1;
            }
            assert!(n > 0, "{name}: no corpus in {}", dir.display());
        }
    }
}
