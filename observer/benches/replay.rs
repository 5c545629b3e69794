//! Userspace replay benchmarks: recorded record streams through each protocol parser and
//! through the whole metrics pipeline, reported as records per second on one core.
//! `cargo xtask bench` runs them and puts the figures in its results; alone:
//! `cargo bench -p observer --bench replay`.
//!
//! Streams: `benches/data/django-gunicorn.jsonl` is `observer trace --json` of the test
//! app under gunicorn (2 sync workers) serving pages, database views (PostgreSQL,
//! persistent connections) and cache views (django-redis); the per-protocol client
//! streams are the parsers' test captures (src/protocol/testdata).
//!
//! Each stream's heap allocations per record are counted too (a counting global
//! allocator, over one pass after a warm one, outside criterion's timing) and written to
//! the file `OBSERVER_REPLAY_ALLOCATIONS` names, when set, one `name records allocations`
//! line per stream.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::HashMap,
    hint::black_box,
    io::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use observer::{
    events::Role,
    pipeline::Pipeline,
    protocol::{CacheLimits, CacheParser, Chunk, fixtures, http1, memcached, postgres, redis},
    replay::{self, Item, Recording},
    server::Exposition,
};

/// The system allocator, counting allocations (reallocations included).
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Allocations of `pass` (run once to warm, then counted), reported for `name`.
fn allocations(name: &str, records: usize, mut pass: impl FnMut()) {
    pass();
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    pass();
    let n = ALLOCATIONS.load(Ordering::Relaxed) - before;
    eprintln!("replay/{name}: {n} allocations for {records} records");
    if let Some(path) = std::env::var_os("OBSERVER_REPLAY_ALLOCATIONS") {
        let mut f =
            std::fs::OpenOptions::new().create(true).append(true).open(path).expect("allocations file");
        writeln!(f, "{name} {records} {n}").expect("allocations file");
    }
}

/// Feeds one chunk to a PostgreSQL parser; returns how many events it gave.
fn pg_feed(p: &mut postgres::PgParser, c: &Chunk<'_>) -> usize {
    let mut ev = Vec::new();
    p.feed(c, &mut ev);
    ev.len()
}

/// Feeds one chunk to a Redis or memcached parser; returns how many events it gave.
fn cache_feed<P: CacheParser>(p: &mut P, c: &Chunk<'_>) -> usize {
    let mut ev = Vec::new();
    p.feed(c, &mut ev);
    ev.len()
}

/// The HTTP server side of the recording, per connection, as the pipeline feeds it.
fn http1(c: &mut Criterion, rec: &Recording) {
    let chunks: Vec<(u64, Chunk<'_>)> = rec
        .items
        .iter()
        .filter_map(|i| match i {
            Item::Data { d, conn, .. } if conn.role == Role::Server => Some((
                conn.conn_id,
                Chunk {
                    dir: d.dir,
                    enter_ns: d.enter_ns,
                    exit_ns: d.exit_ns,
                    bytes: &d.bytes,
                    total_len: d.total_len,
                },
            )),
            _ => None,
        })
        .collect();
    let pass = || {
        let mut parsers: HashMap<u64, http1::Http1Parser> = HashMap::new();
        let mut out = Vec::new();
        for (id, ch) in &chunks {
            let p = parsers.entry(*id).or_insert_with(|| {
                http1::Http1Parser::new(http1::Limits::default(), http1::Config::default())
            });
            p.feed(ch, &mut out);
            black_box(out.len());
            out.clear();
        }
    };
    allocations("http1", chunks.len(), pass);
    let mut g = c.benchmark_group("replay");
    g.throughput(Throughput::Elements(chunks.len() as u64));
    g.bench_function("http1", |b| b.iter(pass));
    g.finish();
}

/// A client-side capture through one parser kind (a parser per connection, dropped at
/// its close).
fn client<P>(
    c: &mut Criterion,
    name: &str,
    file: &str,
    new: impl Fn() -> P,
    feed: impl Fn(&mut P, &Chunk<'_>) -> usize,
) {
    let recs = fixtures::load(file);
    let n = recs.iter().filter(|r| r.step.is_some()).count();
    let pass = || {
        let mut parsers: HashMap<u32, P> = HashMap::new();
        for r in &recs {
            match &r.step {
                Some(s) => {
                    let p = parsers.entry(r.conn).or_insert_with(&new);
                    black_box(feed(p, &s.chunk(usize::MAX)));
                }
                None => {
                    parsers.remove(&r.conn);
                }
            }
        }
    };
    allocations(name, n, pass);
    let mut g = c.benchmark_group("replay");
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function(name, |b| b.iter(pass));
    g.finish();
}

/// The whole recording through the pipeline: connection routing, the parsers, view
/// resolution, the django_* families.
fn pipeline(c: &mut Criterion, rec: &Recording) {
    // Steady state: the recording replayed again into the pipeline that has seen it.
    let mut p =
        Pipeline::new(replay::django_gunicorn_settings(), Arc::new(Mutex::new(Exposition::default())));
    allocations("pipeline", rec.data_records(), || rec.replay(&mut p));
    let mut g = c.benchmark_group("replay");
    g.throughput(Throughput::Elements(rec.data_records() as u64));
    g.bench_function("pipeline", |b| {
        b.iter_batched(
            || Pipeline::new(replay::django_gunicorn_settings(), Arc::new(Mutex::new(Exposition::default()))),
            |mut p| {
                rec.replay(&mut p);
                p
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    let rec = replay::django_gunicorn();
    http1(c, &rec);
    let pg = postgres::Limits::default();
    client(c, "postgres", "postgres-django-views.jsonl", || postgres::PgParser::new(pg), pg_feed);
    let cl = CacheLimits::default();
    client(c, "redis", "redis-django-redis.jsonl", || redis::RedisParser::new(cl), cache_feed);
    client(c, "redis-resp3", "redis-native-resp3.jsonl", || redis::RedisParser::new(cl), cache_feed);
    client(c, "memcached", "memcached-pymemcache.jsonl", || memcached::MemcachedParser::new(cl), cache_feed);
    pipeline(c, &rec);
}

criterion_group!(replay_benches, benches);
criterion_main!(replay_benches);
