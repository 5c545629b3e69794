//! The bodies of the fuzz targets (observer/fuzz), here so that `cargo test` replays the
//! corpus kept in observer/fuzz/corpus through exactly what `cargo xtask fuzz` runs.
//!
//! Each function takes arbitrary bytes and must neither panic nor let a parser grow past
//! its bound; the asserts are the bounds.

use crate::{
    ebpf::btf::Btf,
    events::{Direction, Record, Role, SqliteCall, SqliteOp, decode},
    protocol::{
        CacheEvent, CacheLimits, CacheParser, Chunk, KEY_HEAD,
        detect::{self as detection, Peer, Protocol},
        http1::{self, Config, Event as Http1Event, Http1Parser, Limits},
        memcached::{self, MemcachedParser},
        postgres::{self, PgParser, sql},
        redis::{self, RedisParser},
        sqlite::{self, Sqlite},
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
    ("detect", detect),
    ("http1", http1),
    ("memcached", memcached),
    ("postgres", postgres),
    ("proc_tables", proc_tables),
    ("redis", redis),
    ("routes", routes),
    ("sqlite", sqlite),
    ("unix_diag", unix_diag),
];

/// One syscall of a connection, and whether records of it were lost after it.
#[derive(Debug, Clone)]
pub struct Step {
    pub dir: Direction,
    /// The bytes captured.
    pub bytes: Vec<u8>,
    /// What the syscall moved: usually the captured bytes and a hole after them.
    pub total_len: u64,
    pub lost: bool,
    /// When the syscall ended (time may run backwards between CPUs).
    pub ts: u64,
}

impl Step {
    /// This step as a syscall.
    pub fn chunk(&self) -> Chunk<'_> {
        Chunk {
            dir: self.dir,
            enter_ns: self.ts,
            exit_ns: self.ts,
            bytes: &self.bytes,
            total_len: self.total_len,
        }
    }

    /// Bytes wholly captured, nothing lost.
    fn whole(dir: Direction, bytes: Vec<u8>, ts: u64) -> Self {
        Self { dir, total_len: bytes.len() as u64, bytes, lost: false, ts }
    }
}

/// The input format every parser target shares: a config byte, then steps.
///
/// The config byte: bit 0 set gives the parser its real default limits (so that
/// inputs go past them), clear gives small ones (so that short inputs do; bits 1-2
/// pick how small, down to one pending command); bits 1-7 seed the re-split of
/// [`split_invariant`].
///
/// A step is a control byte (bit 0: send, else receive; bit 1: records lost after it;
/// bit 2: repeat; bit 3: its clock runs behind the previous step's; high nibble: a hole
/// of that many times 997 bytes after the captured ones, 14 a record that claims fewer
/// bytes than it carries, 15 a length of u64::MAX), a length byte, with bit 2 a repeat
/// count byte, then the bytes: repeated `count + 1` times, so that a few input bytes
/// make a head, a path or a key of up to 64 KiB, past every limit the parsers have.
pub fn steps(data: &[u8]) -> (u8, Vec<Step>) {
    let Some((&config, mut rest)) = data.split_first() else { return (0, Vec::new()) };
    let mut out = Vec::new();
    let mut ts = 1_000_000u64;
    while let Some((&[ctl, len], tail)) = rest.split_first_chunk::<2>() {
        let (repeat, tail) = match tail.split_first() {
            Some((&r, t)) if ctl & 4 != 0 => (usize::from(r) + 1, t),
            _ => (1, tail),
        };
        let n = usize::from(len).min(tail.len());
        let (bytes, tail) = tail.split_at(n);
        rest = tail;
        let bytes = bytes.repeat(repeat);
        let captured = bytes.len() as u64;
        let total_len = match ctl >> 4 {
            14 => captured / 2,
            15 => u64::MAX,
            h => captured + u64::from(h) * 997,
        };
        ts = if ctl & 8 != 0 { ts.saturating_sub(7) } else { ts + 1 };
        let dir = if ctl & 1 == 0 { Direction::Recv } else { Direction::Send };
        out.push(Step { dir, bytes, total_len, lost: ctl & 2 != 0, ts });
    }
    (config, out)
}

/// Cut points for [`split_invariant`]: a small deterministic generator (xorshift), so
/// that a failing input fails again.
fn cuts(seed: u8) -> impl FnMut(usize) -> usize {
    let mut x = u32::from(seed) | 0x9e37_7900;
    move |len| {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        // Mostly short pieces (1..=64 bytes), sometimes the whole rest.
        if x % 8 == 0 { len } else { (x as usize % 64 + 1).min(len) }
    }
}

/// The same conversation, fully captured, delivered twice: as the steps give it, and
/// with the bytes of each run of same-direction steps re-split at other points (1 to N
/// pieces). Where the first delivery gives no error, the second must give the same
/// events, time stamps aside (`run` strips them): how a stream is split into syscalls
/// must not change what is counted. Where the first gives errors, the parser
/// resynchronises at syscall boundaries by design, and only the bounds are checked.
pub fn split_invariant<E: PartialEq + std::fmt::Debug>(
    steps: &[Step],
    seed: u8,
    run: impl Fn(&[Step]) -> Vec<E>,
    is_error: impl Fn(&E) -> bool,
) {
    let whole: Vec<Step> = steps.iter().map(|s| Step::whole(s.dir, s.bytes.clone(), s.ts)).collect();
    let first = run(&whole);
    if first.iter().any(&is_error) {
        return;
    }
    let resplit = resplit(&whole, seed);
    let second = run(&resplit);
    assert_eq!(first, second, "the same bytes split otherwise gave other events");
}

/// The SQLite call follower on arbitrary call sequences, as records would decode to.
///
/// Input: a config byte (bit 0: default limits, else two connections and two statements;
/// bit 1: keep shapes), then calls of seven bytes and a text: the op (its value mod 13:
/// the nine calls, then a thread's socket record, an idle timer, a process gone, threads
/// exiting; bit 7: the text repeated 64 times, past the capture limit, and marked
/// truncated), the thread (bits 0-1 the tid, bit 2 the process), the handle (mod 6, so
/// that handles collide), a clock step (bit 7: backwards), the result code (i16, little
/// endian: any code, extended ones too), the text's length, then the text.
pub fn sqlite(data: &[u8]) {
    const OPS: [SqliteOp; 9] = [
        SqliteOp::Open,
        SqliteOp::Prepare,
        SqliteOp::Bind,
        SqliteOp::Readonly,
        SqliteOp::Changes,
        SqliteOp::LastRowid,
        SqliteOp::Errcode,
        SqliteOp::Finalize,
        SqliteOp::Close,
    ];
    let Some((&config, mut rest)) = data.split_first() else { return };
    let limits = if config & 1 == 1 {
        sqlite::Limits::default()
    } else {
        sqlite::Limits { max_connections: 2, max_statements: 2, keep_shapes: false }
    };
    let limits = sqlite::Limits { keep_shapes: config & 2 != 0, ..limits };
    let mut s = Sqlite::new(limits);
    let mut out = Vec::new();
    let mut t = 1_000_000u64;
    while let Some((&[op, who, handle, dt, lo, hi, len], tail)) = rest.split_first_chunk::<7>() {
        let n = usize::from(len).min(tail.len());
        let (text, tail) = tail.split_at(n);
        rest = tail;
        let long = op & 0x80 != 0;
        let text = if long { text.repeat(64) } else { text.to_vec() };
        t = if dt & 0x80 != 0 { t.saturating_sub(u64::from(dt & 0x7f)) } else { t + u64::from(dt) * 1000 };
        let (tgid, tid) = (100 + u32::from(who >> 2 & 1), 200 + u32::from(who & 3));
        let before = out.len();
        match (op & 0x7f) % 13 {
            i @ 0..9 => {
                let handle = 0x1000 + u64::from(handle % 6);
                let c = SqliteCall {
                    enter_ns: t,
                    exit_ns: t + u64::from(dt),
                    tgid,
                    tid,
                    op: OPS[usize::from(i)],
                    handle,
                    arg: handle ^ 1,
                    ret: i64::from(i16::from_le_bytes([lo, hi])),
                    text: &text,
                    truncated: long,
                };
                s.call(&c, &mut out);
            }
            9 => s.quiesce(tgid, tid, &mut out),
            10 => s.expire(t, &mut out),
            11 => s.process_gone(tgid, &mut out),
            _ => s.retain_threads(|_, tid| tid % 2 == 0),
        }
        // One call ends at most a batch, an execute and what it starts; housekeeping
        // ends at most every thread's batch (eight threads).
        assert!(out.len() - before <= 8);
        let (conns, stmts, threads) = s.sizes();
        assert!(conns <= limits.max_connections && stmts <= limits.max_statements && threads <= 8);
        for e in out.drain(..) {
            if let sqlite::Event::Statement(st) = e.event {
                assert!(st.end_ns >= st.start_ns);
                assert!(st.many || st.executes == 1);
                assert!(st.writes.iter().all(|(w, _)| w.table.len() <= 64 * 255));
            }
        }
    }
    s.expire(u64::MAX, &mut out);
    s.process_gone(100, &mut out);
    s.process_gone(101, &mut out);
    assert_eq!(s.sizes(), (0, 0, 0));
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

/// `steps` with the bytes of each run of same-direction steps split at other points.
pub fn resplit(steps: &[Step], seed: u8) -> Vec<Step> {
    let mut next = cuts(seed);
    let mut resplit = Vec::new();
    let mut i = 0;
    while i < steps.len() {
        let dir = steps[i].dir;
        let mut stream = Vec::new();
        while i < steps.len() && steps[i].dir == dir {
            stream.extend_from_slice(&steps[i].bytes);
            i += 1;
        }
        let mut rest = stream.as_slice();
        while !rest.is_empty() {
            let (piece, tail) = rest.split_at(next(rest.len()));
            resplit.push(Step::whole(dir, piece.to_vec(), 0));
            rest = tail;
        }
    }
    resplit
}

/// The HTTP/1 parser on arbitrary syscall sequences: bounded buffers and pending
/// requests whatever the bytes, holes, losses and closes; and split-invariant.
pub fn http1(data: &[u8]) {
    let (config, steps) = steps(data);
    let limits =
        if config & 1 == 1 { Limits::default() } else { Limits { max_head_bytes: 2048, max_pending: 16 } };
    // Heads are bounded by max_head_bytes per direction; a chunk-size or trailer line
    // by MAX_CHUNK_LINE plus what one syscall added before it was found too long.
    let widest = steps.iter().map(|s| s.bytes.len()).max().unwrap_or(0);
    let bound = 2 * 2 * (limits.max_head_bytes + 1024 + widest);
    let mut p = Http1Parser::new(limits, Config::default());
    let mut out = Vec::new();
    for s in &steps {
        p.feed(&s.chunk(), &mut out);
        if s.lost {
            p.lost();
        }
        assert!(p.pending() <= limits.max_pending);
        assert!(p.buffered() <= bound, "{} buffered", p.buffered());
        check_http(&out);
        out.clear();
    }
    p.close(&mut out);
    check_http(&out);
    split_invariant(
        &steps,
        config >> 1,
        |steps| {
            let mut p = Http1Parser::new(limits, Config::default());
            let mut out = Vec::new();
            for s in steps {
                p.feed(&s.chunk(), &mut out);
            }
            p.close(&mut out);
            for e in &mut out {
                if let Http1Event::Exchange(x) = e {
                    (x.request.start_ns, x.response.end_ns) = (0, 0);
                }
            }
            out
        },
        |e| matches!(e, Http1Event::Error(_)),
    );
}

/// What every exchange must hold, whatever the input: label material within its bounds.
fn check_http(events: &[Http1Event]) {
    for e in events {
        if let Http1Event::Exchange(x) = e {
            assert!(x.request.path.len() <= http1::MAX_PATH);
            assert!(x.request.method.len() <= http1::MAX_METHOD);
            assert!(x.response.charset.as_ref().is_none_or(|c| c.len() <= http1::MAX_VALUE));
        }
    }
}

/// The PostgreSQL parser (fresh or joined mid-stream, by the config byte) with bounded
/// state; the statement classifier and the detectors on the same bytes; split-invariant.
pub fn postgres(data: &[u8]) {
    let (config, steps) = steps(data);
    let limits = if config & 1 == 1 {
        postgres::Limits { keep_shapes: config & 2 != 0, ..postgres::Limits::default() }
    } else {
        postgres::Limits { max_pending: 16, max_prepared: 8, keep_shapes: config & 2 != 0 }
    };
    let mid = config & 4 != 0;
    let fresh = || if mid { PgParser::mid_stream(limits) } else { PgParser::new(limits) };
    let mut p = fresh();
    let mut out = Vec::new();
    for s in &steps {
        let c = s.chunk();
        let _ = (
            postgres::is_startup(c.bytes),
            postgres::looks_like_frontend(c.bytes, c.total_len),
            sql::classify(c.bytes),
        );
        p.feed(&c, &mut out);
        if s.lost {
            p.lost();
        }
        assert!(p.pending() <= 2 * limits.max_pending);
        let (statements, portals) = p.remembered();
        assert!(statements <= limits.max_prepared && portals <= limits.max_prepared);
        out.clear();
    }
    p.close(&mut out);
    if mid {
        // Joined in the middle, the parser finds message boundaries at syscall starts
        // until it is in step: by design, where syscalls begin matters then.
        return;
    }
    split_invariant(
        &steps,
        config >> 1,
        |steps| {
            let mut p = fresh();
            let mut out = Vec::new();
            for s in steps {
                p.feed(&s.chunk(), &mut out);
            }
            p.close(&mut out);
            for e in &mut out {
                if let postgres::Event::Statement(st) = e {
                    (st.start_ns, st.end_ns) = (0, 0);
                    // By design, psycopg's executemany of one parameter set is told by
                    // its Sync coming in a write of its own: where writes end matters.
                    st.many &= st.executes > 1;
                }
            }
            out
        },
        |e| matches!(e, postgres::Event::Error(_)),
    );
}

/// The Redis parser and its protocol detector.
pub fn redis(data: &[u8]) {
    cache(|l| Box::new(RedisParser::new(l)), redis::is_command, data);
}

/// The memcached parser and its protocol detector.
pub fn memcached(data: &[u8]) {
    cache(|l| Box::new(MemcachedParser::new(l)), memcached::is_command, data);
}

/// A cache parser on arbitrary syscall sequences: bounded pending commands, key heads
/// within KEY_HEAD; and split-invariant.
fn cache(new: fn(CacheLimits) -> Box<dyn CacheParser>, detect: fn(&[u8]) -> bool, data: &[u8]) {
    let (config, steps) = steps(data);
    let small = [1, 2, 16, 16][usize::from(config >> 1 & 3)];
    let limits = if config & 1 == 1 { CacheLimits::default() } else { CacheLimits { max_pending: small } };
    let mut p = new(limits);
    let mut out = Vec::new();
    let check = |out: &mut Vec<CacheEvent>| {
        for e in out.drain(..) {
            if let CacheEvent::Get(g) = e {
                assert!(g.key.len() <= KEY_HEAD);
            }
        }
    };
    for s in &steps {
        let _ = detect(&s.bytes);
        p.feed(&s.chunk(), &mut out);
        if s.lost {
            p.lost();
        }
        assert!(p.pending() <= 2 * limits.max_pending);
        check(&mut out);
    }
    p.close(&mut out);
    check(&mut out);
    split_invariant(
        &steps,
        config >> 1,
        |steps| {
            let mut p = new(limits);
            let mut out = Vec::new();
            for s in steps {
                p.feed(&s.chunk(), &mut out);
            }
            p.close(&mut out);
            out
        },
        |e| matches!(e, CacheEvent::Error(_)),
    );
}

/// Protocol detection on arbitrary bytes, roles, directions, capture cuts and what the
/// app is known to use: a server side is always HTTP, a client's read decides nothing,
/// a client's write to a known app always decides, knowing the app only narrows a
/// verdict (a cache connection to a server that is no cache of the app is left alone),
/// and PostgreSQL is told by its bytes alone.
pub fn detect(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else { return };
    let role = if flags & 1 == 1 { Role::Server } else { Role::Client };
    let dir = if flags & 2 == 2 { Direction::Recv } else { Direction::Send };
    // Captured: all of it, or a prefix of 4..60 bytes with the rest a hole.
    let cut = match flags >> 4 {
        0 => rest.len(),
        n => rest.len().min(usize::from(n) * 4),
    };
    let c = Chunk { dir, enter_ns: 0, exit_ns: 0, bytes: &rest[..cut], total_len: rest.len() as u64 };
    let at = |known, is_cache| detection::detect(role, &c, Peer { known, is_cache });
    let (unknown, cache, not_cache) = (at(false, false), at(true, true), at(true, false));
    assert_eq!(unknown, at(false, true), "a peer's role means nothing before the app is known");
    if role == Role::Server {
        assert!([unknown, cache, not_cache].iter().all(|v| *v == Some(Protocol::Http)));
        return;
    }
    if dir == Direction::Recv {
        assert!([unknown, cache, not_cache].iter().all(Option::is_none));
        return;
    }
    assert!(cache.is_some() && not_cache.is_some(), "a known app decides at the first write");
    assert!(!matches!(not_cache, Some(Protocol::Cache(_))));
    match unknown {
        Some(p @ Protocol::Postgres { .. }) => assert!(cache == Some(p) && not_cache == Some(p)),
        Some(p @ Protocol::Cache(_)) => assert!(cache == Some(p) && not_cache == Some(Protocol::Other)),
        Some(p) => panic!("{p:?} decided before the app is known"),
        None => assert!(cache == Some(Protocol::Other) && not_cache == Some(Protocol::Other)),
    }
}

/// /proc/net/{tcp,tcp6,unix} and status parsers on arbitrary text.
pub fn proc_tables(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = procfs::parse_tcp(&text);
    let _ = procfs::parse_unix(data);
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
    /// fuzz`) and every input that once failed (observer/fuzz/regressions, kept as
    /// found, never minimised away) runs again through its target: a regression there
    /// fails here, without nightly or libFuzzer.
    #[test]
    fn the_kept_corpus_replays_cleanly() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        let mut failed = Vec::new();
        for &(name, body) in TARGETS {
            let dir = root.join("corpus").join(name);
            let kept = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            let found = std::fs::read_dir(root.join("regressions").join(name)).into_iter().flatten();
            let mut n = 0;
            for entry in kept.chain(found) {
                let path = entry.expect("corpus entry").path();
                let data = std::fs::read(&path).expect("corpus file");
                if std::panic::catch_unwind(|| body(&data)).is_err() {
                    failed.push(format!("{name}/{}", path.file_name().unwrap_or_default().to_string_lossy()));
                }
                n += 1;
            }
            assert!(n > 0, "{name}: no corpus in {}", dir.display());
        }
        assert!(failed.is_empty(), "{} inputs fail: {}", failed.len(), failed.join(" "));
    }
}
