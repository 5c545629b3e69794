//! `cargo xtask demo`: a private PostgreSQL and Redis, the test Django app
//! (tests/apps/djangoapp) on them under gunicorn with two workers, `observer run` on it,
//! some traffic (pages, database and cache views), then where /metrics is and a summary
//! of what it says. Every process
//! started here is stopped by its PID; the database's files are removed.

use std::{
    fs,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    root, run,
    services::{Guard, Postgres, family, free_port, request, scalar, start_redis, wait_port},
};

pub fn demo(serve: bool) -> Result<()> {
    run(Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())).args([
        "build",
        "--quiet",
        "--package",
        "observer",
    ]))?;
    let venv = root().join("target/venv/bin");
    let pg = Postgres::start()?;
    let app_dir = root().join("tests/apps/djangoapp");
    let out = Command::new(venv.join("python"))
        .args(["manage.py", "migrate", "--verbosity", "0"])
        .current_dir(&app_dir)
        .env("OBSERVER_TEST_PG", pg.settings())
        .output()
        .context("manage.py migrate (cargo xtask setup makes the venv)")?;
    if !out.status.success() {
        bail!("migrate: {}", String::from_utf8_lossy(&out.stderr));
    }
    println!("demo: PostgreSQL on 127.0.0.1:{} (database app, migrated)", pg.port);
    let (redis, redis_port) = start_redis(&pg.dir)?;
    // The test app's "default" cache on it (django-redis), and a "down" one on a closed port.
    let cache = format!(
        r#"{{"kind": "django_redis", "location": "redis://127.0.0.1:{redis_port}/0", "down": "redis://127.0.0.1:{}/0"}}"#,
        free_port()?
    );
    println!("demo: Redis on 127.0.0.1:{redis_port} (the app's django-redis cache)");
    let app_port = free_port()?;
    let app = Guard(
        Command::new(venv.join("python"))
            .arg(venv.join("gunicorn"))
            .args(["--chdir", app_dir.to_str().context("path")?])
            .args(["--bind", &format!("127.0.0.1:{app_port}"), "--workers", "2", "--log-level", "warning"])
            .arg("testproj.wsgi:application")
            .env("OBSERVER_TEST_PG", pg.settings())
            .env("OBSERVER_TEST_CACHE", &cache)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting gunicorn (cargo xtask setup makes the venv)")?,
    );
    wait_port(app_port)?;
    println!(
        "demo: Django test app under gunicorn (pid {}, 2 workers, CONN_MAX_AGE=60) on 127.0.0.1:{app_port}",
        app.0.id()
    );

    let metrics_port = free_port()?;
    let log_path = std::env::temp_dir().join(format!("observer-demo-{}.log", std::process::id()));
    let observer = Guard(
        Command::new(root().join("target/debug/observer"))
            .args(["run", "--listen", &format!("127.0.0.1:{metrics_port}"), "--pid", &app.0.id().to_string()])
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log_path)?)
            .spawn()
            .context("starting observer run")?,
    );
    wait_port(metrics_port)?;
    // /healthz answers 200 once the observer traces the app.
    let deadline = Instant::now() + Duration::from_secs(30);
    while request(metrics_port, "GET", "/healthz", "", "")?.0 != 200 {
        if Instant::now() > deadline {
            bail!("observer did not become healthy:\n{}", fs::read_to_string(&log_path)?);
        }
        thread::sleep(Duration::from_millis(100));
    }

    let mix: &[(&str, &str, &str, &str)] = &[
        ("GET", "/", "", ""),
        ("GET", "/shop/items/7/", "", ""),
        ("GET", "/shop/items/8/", "X-Requested-With: XMLHttpRequest\r\n", ""),
        ("GET", "/shop/c/hats/", "", ""),
        ("GET", "/other/legacy/2021/", "", ""),
        ("GET", "/thing/", "", ""),
        ("GET", "/tmpl", "", ""),
        ("GET", "/stream", "", ""),
        ("GET", "/big", "", ""),
        ("GET", "/nope", "", ""),
        ("GET", "/boom", "", ""),
        ("POST", "/upload", "Content-Length: 11\r\n", "hello world"),
        ("GET", "/db/create", "", ""),
        ("GET", "/db/save", "", ""),
        ("GET", "/db/list", "", ""),
        ("GET", "/db/executemany", "", ""),
        ("GET", "/db/unique-uncaught", "", ""),
        ("GET", "/db/timeout", "", ""),
        ("GET", "/db/broken", "", ""),
        ("GET", "/cache/hit", "", ""),
        ("GET", "/cache/miss", "", ""),
        ("GET", "/cache/get_or_set", "", ""),
        ("GET", "/cache/get_many", "", ""),
        ("GET", "/cache/down", "", ""),
    ];
    let mut sent = 0;
    for round in 0..3 {
        for (method, path, headers, body) in mix {
            let (status, _) = request(app_port, method, path, headers, body)?;
            if round == 0 {
                println!("demo: {method:6} {path:22} -> {status}");
            }
            sent += 1;
        }
    }
    // The pump reads the ring buffer every 10 ms; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let (_, m) = request(metrics_port, "GET", "/metrics", "", "")?;
        // The agent's own counters are published once a second.
        let done = scalar(&m, "django_http_responses_before_middlewares_total") >= f64::from(sent)
            && scalar(&m, "observer_http_exchanges_total") >= f64::from(sent)
            && scalar(&m, "django_migrations_applied_total") > 0.0
            // Per round: hit 1, miss 1, get_or_set 2 (a miss, then a hit), down 1 (failed).
            && scalar(&m, "django_cache_get_total") >= 15.0;
        if done || Instant::now() > deadline {
            break m;
        }
        thread::sleep(Duration::from_millis(100));
    };

    println!("\ndemo: observer run --pid {} (pid {}) logged:", app.0.id(), observer.0.id());
    for line in fs::read_to_string(&log_path)?.lines() {
        println!("demo:   {line}");
    }
    println!("\ndemo: {sent} requests sent; /metrics is at http://127.0.0.1:{metrics_port}/metrics");
    println!("demo: django_http_responses_total_by_status_view_method_total:");
    let mut rows = family(&metrics, "django_http_responses_total_by_status_view_method_total");
    rows.sort_by(|a, b| a.0.get("view").cmp(&b.0.get("view")));
    for (l, v) in rows {
        let get = |k: &str| l.get(k).map_or("", String::as_str);
        println!("demo:   view={:28} method={:5} status={} {v}", get("view"), get("method"), get("status"));
    }
    for name in [
        "django_http_requests_before_middlewares_total",
        "django_http_ajax_requests_total",
        "django_http_responses_streaming_total",
        "django_http_requests_latency_including_middlewares_seconds_count",
        "observer_http_exchanges_total",
        "observer_db_statements_total",
        "observer_cache_gets_total",
        "observer_records_lost_total",
        "observer_parse_errors_total",
    ] {
        println!("demo:   {name} {}", scalar(&metrics, name));
    }
    println!("demo: database and cache families:");
    for name in [
        "django_db_new_connections_total",
        "django_db_new_connection_errors_total",
        "django_db_execute_total",
        "django_db_execute_many_total",
        "django_db_errors_total",
        "django_db_query_duration_seconds_count",
        "django_model_inserts_total",
        "django_model_updates_total",
        "django_migrations_applied_total",
        "django_migrations_unapplied_total",
        "django_cache_get_total",
        "django_cache_get_hits_total",
        "django_cache_get_misses_total",
        "django_cache_get_fail_total",
    ] {
        for (l, v) in family(&metrics, name) {
            let shown: Vec<String> = l
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "job" | "instance"))
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            println!("demo:   {name}{{{}}} {v}", shown.join(","));
        }
    }
    if serve {
        println!(
            "\ndemo: serving until Ctrl-C (curl http://127.0.0.1:{metrics_port}/metrics, or send traffic to :{app_port})"
        );
        wait_for_interrupt();
    }
    drop(observer);
    drop(app);
    drop(redis);
    drop(pg);
    let _ = fs::remove_file(&log_path);
    Ok(())
}

/// Blocks until SIGINT or SIGTERM, which are then handled (so the guards run).
fn wait_for_interrupt() {
    // SAFETY: plain signal-mask syscalls on a local sigset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
    }
}
