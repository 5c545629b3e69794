//! Redis and memcached end to end: a private Redis and memcached started here, the test
//! app's /cache/ views (a hit, a miss, get_or_set, get_many, has_key, set then delete, an
//! integer, a stored None, a 200 KB value, a cache whose server is down, and another
//! client's GET on the same server) with django-prometheus's cache backends inside the
//! app and observer outside, for each backend, protocol and socket kind.

mod harness;

use std::collections::BTreeMap;

use harness::{
    caches::{Memcached, Redis},
    django::{Gunicorn, Metrics, ObserverRun, delta, family, free_port, http_get},
    ebpf_available,
};
use serde_json::{Value, json};

const FAMILIES: [&str; 4] = [
    "django_cache_get_total",
    "django_cache_get_hits_total",
    "django_cache_get_misses_total",
    "django_cache_get_fail_total",
];

/// The views, in order.
const OPS: [&str; 11] = [
    "hit",
    "miss",
    "get_or_set",
    "get_many",
    "has_key",
    "set_delete",
    "integer",
    "none",
    "big",
    "down",
    "foreign",
];

type Family = BTreeMap<String, f64>;

fn fam(backend: &str, v: f64) -> Family {
    if v == 0.0 { Family::new() } else { [(format!("backend={backend}"), v)].into_iter().collect() }
}

/// Runs `ops` on a fresh app with `cache` settings, observer tracing it; returns
/// django-prometheus's gains, observer's scrape, and what each view answered.
struct Pass {
    theirs: BTreeMap<&'static str, Family>,
    ours: Metrics,
    answers: Vec<String>,
}

fn pass(
    app: &Gunicorn,
    obs: &ObserverRun,
    ops: &[&str],
    expect: impl Fn(&BTreeMap<&str, Family>) -> bool,
) -> Pass {
    let before_theirs = Metrics::parse(&http_get(app.port, "/metrics"));
    let answers: Vec<String> =
        ops.iter().map(|op| http_get(app.port, &format!("/cache/{op}")).trim().to_string()).collect();
    let after_theirs = Metrics::parse(&http_get(app.port, "/metrics"));
    let theirs: BTreeMap<&str, Family> =
        FAMILIES.iter().map(|n| (*n, delta(&after_theirs, &before_theirs, n))).collect();
    let deadline = std::time::Instant::now() + harness::patience(20);
    let mut ours = obs.metrics();
    while !expect(&FAMILIES.iter().map(|n| (*n, family(&ours, n))).collect())
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(200));
        ours = obs.metrics();
    }
    if !expect(&FAMILIES.iter().map(|n| (*n, family(&ours, n))).collect()) {
        // What the agent saw, for the failure that follows.
        for s in ours.samples.iter().filter(|s| s.name.starts_with("observer_") && s.value != 0.0) {
            eprintln!("  {} {:?} {}", s.name, s.labels, s.value);
        }
    }
    Pass { theirs, ours, answers }
}

fn start(cache: &Value) -> (Gunicorn, ObserverRun) {
    let app = Gunicorn::start_with("sync", 1, true, &[("OBSERVER_TEST_CACHE", &cache.to_string())]);
    let obs = ObserverRun::start(&["--pid", &app.pid().to_string()]);
    (app, obs)
}

fn ours_of(m: &Metrics) -> BTreeMap<&'static str, Family> {
    FAMILIES.iter().map(|n| (*n, family(m, n))).collect()
}

/// django-redis over TCP and a Unix socket, RESP2 and RESP3 (the kernel matrix runs
/// this one).
#[test]
fn django_redis_matches_django_prometheus() {
    if !ebpf_available() {
        return;
    }
    let redis = Redis::start();
    redis_side_by_side(&[
        (
            "django-redis, RESP2, TCP, KEY_PREFIX",
            json!({"kind": "django_redis", "location": redis.url(), "key_prefix": "shop"}),
            "redis",
        ),
        (
            "django-redis, RESP3, Unix socket, IGNORE_EXCEPTIONS",
            json!({"kind": "django_redis", "location": redis.unix_url(), "protocol": 3, "ignore_exceptions": true}),
            "redis",
        ),
    ]);
}

/// Django's own Redis backend, over TCP and a Unix socket, RESP3 and RESP2.
#[test]
fn djangos_redis_backend_matches_django_prometheus() {
    if !ebpf_available() {
        return;
    }
    let redis = Redis::start();
    redis_side_by_side(&[
        (
            "Django's Redis backend, RESP3, TCP",
            json!({"kind": "native_redis", "location": redis.url(), "protocol": 3}),
            "native_redis",
        ),
        (
            "Django's Redis backend, RESP2, Unix socket",
            json!({"kind": "native_redis", "location": redis.unix_url()}),
            "native_redis",
        ),
    ]);
}

/// Redis over TLS (`rediss://`), with django-redis and with Django's own backend: the
/// plaintext comes from the OpenSSL Python's `ssl` module links, and every family is
/// what it is on plaintext.
#[test]
fn redis_over_tls_matches_django_prometheus() {
    if !ebpf_available() {
        return;
    }
    let redis = Redis::start_tls();
    redis_side_by_side(&[
        ("django-redis, RESP2, rediss://", json!({"kind": "django_redis", "location": redis.url()}), "redis"),
        (
            "Django's Redis backend, RESP3, rediss://",
            json!({"kind": "native_redis", "location": redis.url(), "protocol": 3}),
            "native_redis",
        ),
    ]);
}

/// Each (name, cache settings, backend label) against django-prometheus, with a second
/// cache that is down.
fn redis_side_by_side(setups: &[(&str, Value, &str)]) {
    let down = format!("redis://127.0.0.1:{}/0", free_port());
    for (name, cache, backend) in setups {
        let (name, backend) = (*name, *backend);
        let mut cache = cache.clone();
        cache["down"] = json!(down);
        let (app, obs) = start(&cache);
        let p = pass(&app, &obs, &OPS, |ours| ours["django_cache_get_total"] == fam(backend, 9.0));
        eprintln!("[{name}] django-prometheus gained {:#?}\nanswers {:?}", p.theirs, p.answers);
        // What the app saw: hit, miss, get_or_set, ..., then the down cache.
        assert_eq!(p.answers[0], "'value'", "[{name}]");
        assert_eq!(p.answers[7], "'default'", "[{name}] a stored None");
        assert_eq!(p.answers[8], "200000", "[{name}]");
        let ignore = cache["ignore_exceptions"] == json!(true);
        assert_eq!(p.answers[9], if ignore { "None" } else { "'ConnectionError'" }, "[{name}] down");
        // django-prometheus: 9 gets (get_or_set's miss makes 2; get_many's MGET and
        // has_key's EXISTS are no gets), 4 hits, 4 misses, the down cache's get failed.
        let want: BTreeMap<&str, Family> = [
            ("django_cache_get_total", fam(backend, 9.0)),
            ("django_cache_get_hits_total", fam(backend, 4.0)),
            ("django_cache_get_misses_total", fam(backend, 4.0)),
            ("django_cache_get_fail_total", fam(backend, 1.0)),
        ]
        .into_iter()
        .collect();
        assert_eq!(p.theirs, want, "[{name}] django-prometheus");
        assert_eq!(ours_of(&p.ours), want, "[{name}] observer");
        // The other client's GET on the same server was seen, and left out.
        obs.wait_until("the other client's GET", |m| m.sum("observer_cache_gets_ignored_total", &[]) >= 1.0);
        assert_eq!(p.ours.sum("observer_parse_errors_total", &[("protocol", "redis")]), 0.0, "[{name}]");
    }
}

#[test]
fn memcached_matches_django_prometheus_except_failures() {
    if !ebpf_available() {
        return;
    }
    let mc = Memcached::start();
    let cache = json!({"kind": "pymemcache", "location": mc.location(), "down": format!("127.0.0.1:{}", free_port())});
    let (app, obs) = start(&cache);
    let p = pass(&app, &obs, &OPS, |ours| ours["django_cache_get_total"] == fam("memcached", 11.0));
    eprintln!("[pymemcache] django-prometheus gained {:#?}\nanswers {:?}", p.theirs, p.answers);
    assert_eq!(p.answers[0], "'value'");
    assert_eq!(p.answers[4], "(True, False)", "has_key");
    assert_eq!(p.answers[7], "'default'", "a stored None");
    assert_eq!(p.answers[8], "200000");
    // 10 lookups (has_key is a get on memcached), 5 hits, 5 misses; the down server's get.
    let ours = ours_of(&p.ours);
    for name in ["django_cache_get_total", "django_cache_get_hits_total", "django_cache_get_misses_total"] {
        assert_eq!(ours[name], p.theirs[name], "{name}");
    }
    assert_eq!(p.theirs["django_cache_get_total"], fam("memcached", 11.0));
    assert_eq!(p.theirs["django_cache_get_hits_total"], fam("memcached", 5.0));
    assert_eq!(p.theirs["django_cache_get_misses_total"], fam("memcached", 5.0));
    // django-prometheus never counts a memcached failure (the client's exception goes
    // through uncounted); observer does, so that total = hits + misses + failures.
    assert_eq!(p.theirs["django_cache_get_fail_total"], Family::new());
    assert_eq!(ours["django_cache_get_fail_total"], fam("memcached", 1.0));
    obs.wait_until("the other client's get", |m| m.sum("observer_cache_gets_ignored_total", &[]) >= 1.0);
    assert_eq!(p.ours.sum("observer_parse_errors_total", &[("protocol", "memcached")]), 0.0);
}

#[test]
fn a_redis_that_stops_answering_or_goes_away_counts_failures_not_misses() {
    if !ebpf_available() {
        return;
    }
    // (kind, IGNORE_EXCEPTIONS, backend label, freeze the server before killing it). Not
    // frozen for Django's backend: after its client times out, redis-py 8 sometimes keeps
    // the socket open past the test (a GET in flight counts when its connection ends).
    for (kind, ignore, backend, freeze) in [
        ("django_redis", false, "redis", true),
        ("django_redis", true, "redis", true),
        ("native_redis", false, "native_redis", false),
    ] {
        let name = format!("{kind}, IGNORE_EXCEPTIONS={ignore}");
        let mut redis = Redis::start();
        let cache = json!({
            "kind": kind, "location": redis.url(), "ignore_exceptions": ignore,
            "down": format!("redis://127.0.0.1:{}/0", free_port()),
        });
        let (app, obs) = start(&cache);
        // A pooled connection is open and has served a hit.
        let p = pass(&app, &obs, &["hit"], |ours| ours["django_cache_get_total"] == fam(backend, 1.0));
        assert_eq!(ours_of(&p.ours)["django_cache_get_hits_total"], fam(backend, 1.0), "[{name}]");
        let failed = |n: f64| {
            let want = fam(backend, n);
            move |ours: &BTreeMap<&str, Family>| ours["django_cache_get_fail_total"] == want
        };
        // The server freezes: the get times out (SOCKET_TIMEOUT 2 s) and the client drops
        // the connection.
        let frozen = if freeze { 1.0 } else { 0.0 };
        let p = if freeze {
            redis.pause();
            let p = pass(&app, &obs, &["main_down"], failed(1.0));
            redis.resume();
            p
        } else {
            pass(&app, &obs, &[], failed(0.0))
        };
        // Then it is killed: the next gets fail on connects that are refused.
        redis.stop();
        let q = pass(&app, &obs, &["main_down", "main_down"], failed(frozen + 2.0));
        eprintln!(
            "[{name}] django-prometheus gained {:#?} then {:#?}\nanswers {:?} {:?}",
            p.theirs, q.theirs, p.answers, q.answers
        );
        for a in p.answers.iter().chain(&q.answers) {
            assert_eq!(a == "None", ignore, "[{name}] the app saw {a}");
        }
        for (pass, n) in [(&p, frozen), (&q, 2.0)] {
            assert_eq!(pass.theirs["django_cache_get_fail_total"], fam(backend, n), "[{name}]");
            assert_eq!(pass.theirs["django_cache_get_total"], fam(backend, n), "[{name}]");
            assert_eq!(pass.theirs["django_cache_get_misses_total"], Family::new(), "[{name}]");
        }
        let ours = ours_of(&q.ours);
        assert_eq!(ours["django_cache_get_fail_total"], fam(backend, frozen + 2.0), "[{name}]");
        assert_eq!(ours["django_cache_get_total"], fam(backend, frozen + 3.0), "[{name}]");
        assert_eq!(ours["django_cache_get_misses_total"], Family::new(), "[{name}]");
    }
}
