//! The Prometheus side, proven with a real Prometheus (Debian's): the shipped scrape
//! configs, alerting rules and their unit tests pass promtool; then a Prometheus scrapes
//! observer in front of the test app (on PostgreSQL and Redis) with the shipped host
//! scrape config, and every expression of our alerts and dashboards, and of the
//! django-mixin's (read from ../shared/peers/django-mixin as fixtures), returns data,
//! except those on families the wire cannot show; 4xx, 5xx, database-error and
//! unapplied-migration alerts fire, ours and the mixin's.

mod harness;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use harness::{
    TempDir,
    caches::Redis,
    django::{Gunicorn, ObserverRun, http_status, root},
    ebpf_available,
    postgres::Postgres,
    prometheus::Prometheus,
};
use serde_json::{Value, json};

/// Families observer cannot export (their facts never reach the wire): expressions on
/// them return nothing, and only they may.
const ABSENT: [&str; 3] = [
    "django_http_exceptions_total_by_view_total",
    "django_http_exceptions_total_by_type_total",
    "django_http_responses_total_by_templatename_total",
];

fn deploy(file: &str) -> PathBuf {
    root().join("deploy/prometheus").join(file)
}

fn mixin_dir() -> Option<PathBuf> {
    let d = root().join("../shared/peers/django-mixin");
    d.join("prometheus_alerts.yaml").exists().then_some(d)
}

fn promtool(args: &[&str], cwd: &Path) {
    let out = Command::new("promtool").args(args).current_dir(cwd).output().expect("run promtool");
    assert!(
        out.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn shipped_prometheus_files_pass_promtool() {
    let dir = root().join("deploy/prometheus");
    promtool(&["check", "rules", "alerts.yaml"], &dir);
    promtool(&["test", "rules", "alerts_test.yaml"], &dir);
    let tmp = TempDir::new("promtool");
    std::fs::copy(deploy("alerts.yaml"), Path::new(tmp.path()).join("alerts.yaml")).unwrap();
    let host = std::fs::read_to_string(deploy("scrape-host.yaml")).unwrap();
    std::fs::write(Path::new(tmp.path()).join("host.yml"), format!("rule_files: [alerts.yaml]\n{host}"))
        .unwrap();
    promtool(&["check", "config", "host.yml"], Path::new(tmp.path()));
    // Debian's Prometheus is built without Kubernetes discovery: check everything else
    // of that config (its relabelling) with a file discovery in its place.
    let k8s = std::fs::read_to_string(deploy("scrape-kubernetes.yaml")).unwrap();
    let swapped = k8s.replace(
        "kubernetes_sd_configs:\n      - role: pod",
        "file_sd_configs:\n      - files: [targets.json]",
    );
    assert_ne!(swapped, k8s, "the kubernetes config has its pod discovery where expected");
    std::fs::write(Path::new(tmp.path()).join("k8s.yml"), swapped).unwrap();
    promtool(&["check", "config", "k8s.yml"], Path::new(tmp.path()));
}

#[test]
fn dashboards_are_what_their_generator_writes() {
    let out = Command::new("python3")
        .arg(root().join("deploy/grafana/generate.py"))
        .arg("--check")
        .output()
        .expect("run python3");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Grafana's variables replaced as a dashboard user would have them (`$name`, `${name}`):
/// no cluster or namespace labels on a host, job "django", "All" for the rest.
fn substitute(expr: &str) -> String {
    let vars: BTreeMap<&str, &str> = [
        ("__rate_interval", "1m"),
        ("__interval", "15s"),
        ("__range", "5m"),
        ("cluster", ""),
        ("namespace", ""),
        ("job", "django"),
        ("view", ".*"),
        ("method", ".*"),
        ("model", ".*"),
        ("instance", ".*"),
        ("backend", ".*"),
        ("alias", ".*"),
    ]
    .into_iter()
    .collect();
    let mut out = String::new();
    let mut rest = expr;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, len) = if let Some(inner) = after.strip_prefix('{') {
            let end = inner.find('}').expect("closing brace");
            (&inner[..end], end + 2)
        } else {
            let end = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
            (&after[..end], end)
        };
        if name.chars().all(|c| c.is_ascii_digit()) {
            // A regex group of label_replace (`${1}`): Grafana leaves it alone.
            out.push_str(&rest[i..i + 1 + len]);
        } else {
            let v = vars.get(name).unwrap_or_else(|| panic!("unknown dashboard variable ${name} in {expr}"));
            out.push_str(v);
        }
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// Every PromQL expression of a Grafana dashboard (panels, rows' panels), and the metric
/// selectors of its `label_values(...)` variables.
fn dashboard_exprs(path: &Path) -> Vec<String> {
    let d: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut out = Vec::new();
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(e)) = m.get("expr")
                    && !e.trim().is_empty()
                {
                    out.push(e.clone());
                }
                for (k, x) in m {
                    if k != "templating" {
                        walk(x, out);
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(&d["panels"], &mut out);
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        let q = match &v["query"] {
            Value::String(s) => s.clone(),
            Value::Object(o) => o.get("query").and_then(Value::as_str).unwrap_or_default().to_string(),
            _ => String::new(),
        };
        if let Some(inner) = q.strip_prefix("label_values(") {
            // label_values(<selector>, <label>): the selector must match series.
            let selector = inner.rsplit_once(',').map_or(inner, |(s, _)| s);
            out.push(selector.to_string());
        }
    }
    out
}

/// Metric selectors (`name{...}` or a bare `name` followed by `[`) of an expression.
fn selectors(expr: &str) -> Vec<String> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let starts = (c.is_ascii_alphabetic() || c == b'_')
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_' || b[i - 1] == b'"'));
        if !starts {
            i += 1;
            continue;
        }
        let s = i;
        while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':') {
            i += 1;
        }
        let name = &expr[s..i];
        let mut j = i;
        while j < b.len() && b[j].is_ascii_whitespace() {
            j += 1;
        }
        if (name.starts_with("django_") || name.starts_with("observer_") || name == "up") && j < b.len() {
            if b[j] == b'{' {
                let end = expr[j..].find('}').map_or(b.len(), |e| j + e + 1);
                out.push(expr[s..end].to_string());
                i = end;
            } else {
                out.push(name.to_string());
            }
        }
    }
    out
}

/// Why a mixin expression may return nothing here: a family observer cannot export, a
/// week-ago comparison (the test has no last week), or the Django admin's views (the
/// test app has no admin site).
fn expected_empty(expr: &str) -> Option<&'static str> {
    if ABSENT.iter().any(|a| expr.contains(a)) {
        Some("a family the wire cannot show")
    } else if expr.contains("offset 1w") {
        Some("compares with a week ago")
    } else if expr.contains("view=~\"admin.*\"") {
        Some("the Django admin's views (the test app has none)")
    } else {
        None
    }
}

/// Runs a bounded loop of requests on its own thread until `stop` (or 5 minutes).
fn traffic(port: u16, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let paths = [
            "/",
            "/shop/items/7/",
            "/boom",
            "/missing",
            "/db/create",
            "/db/save",
            "/db/delete",
            "/db/list",
            "/db/unique-caught",
            "/cache/hit",
            "/cache/miss",
            "/cache/get_or_set",
            "/cache/down",
            "/db/broken",
            "/go",
        ];
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut sent = 0;
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && sent < 50_000 {
            for p in paths {
                let _ = http_status(port, p);
                sent += 1;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        sent
    })
}

/// A rule file with every `for:` shortened, so alerts fire within the test.
fn fast(rules: &str) -> String {
    let mut out = String::new();
    for line in rules.lines() {
        let t = line.trim_start();
        if t.starts_with("for:") || t.starts_with("\"for\":") {
            let indent = &line[..line.len() - t.len()];
            out.push_str(&format!("{indent}for: 5s\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[test]
fn a_real_prometheus_sees_what_the_dashboards_and_alerts_ask_for() {
    if !ebpf_available() {
        return;
    }
    let pg = Postgres::start();
    let settings = pg.settings(json!({}));
    pg.migrate(&settings, &[]);
    // One migration of the app left unapplied.
    pg.migrate(&settings, &["shop", "0001"]);
    let redis = Redis::start();
    let down = format!("redis://127.0.0.1:{}/0", harness::django::free_port());
    let cache = json!({"kind": "django_redis", "location": redis.url(), "down": down}).to_string();
    let app = Gunicorn::start_with(
        "sync",
        2,
        false,
        &[("OBSERVER_TEST_PG", &settings), ("OBSERVER_TEST_CACHE", &cache)],
    );
    let obs = ObserverRun::start(&["--pid", &app.pid().to_string()]);

    // The shipped host scrape config, pointed at this observer and scraping every second.
    let host = std::fs::read_to_string(deploy("scrape-host.yaml")).unwrap();
    let targets_line =
        host.lines().find(|l| l.trim_start().starts_with("- targets:")).expect("a targets line");
    let indent = &targets_line[..targets_line.len() - targets_line.trim_start().len()];
    let scrape = host
        .replace(targets_line, &format!("{indent}- targets: [\"127.0.0.1:{}\"]", obs.port))
        .replace("scrape_interval: 30s", "scrape_interval: 1s");
    let mut files =
        vec![("observer-alerts.yaml", fast(&std::fs::read_to_string(deploy("alerts.yaml")).unwrap()))];
    let mixin = mixin_dir();
    match &mixin {
        Some(d) => files.push((
            "mixin-alerts.yaml",
            fast(&std::fs::read_to_string(d.join("prometheus_alerts.yaml")).unwrap()),
        )),
        None => eprintln!("../shared/peers/django-mixin is not here: the mixin's files are not checked"),
    }
    let rule_files: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: {}\n{scrape}",
        serde_json::to_string(&rule_files).unwrap()
    );
    let prom = Prometheus::start(&config, &files);

    let stop = Arc::new(AtomicBool::new(false));
    let driver = traffic(app.port, stop.clone());
    // Series in Prometheus, with the app's own job label (honor_labels), and some history.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let r = prom
            .query("django_http_responses_total_by_status_view_method_total{job=\"django\",view=\"boom\"}")
            .unwrap();
        if !r.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "Prometheus never got the app's series: {}", obs.log());
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_secs(20));

    // Every dashboard expression, ours and the mixin's.
    let mut dashboards: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/grafana"))
        .unwrap()
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    dashboards.sort();
    assert!(dashboards.len() >= 5, "our five dashboards: {dashboards:?}");
    let ours = dashboards.len();
    if let Some(d) = &mixin {
        let mut m: Vec<PathBuf> = std::fs::read_dir(d.join("dashboards_out"))
            .unwrap()
            .filter_map(|e| Some(e.ok()?.path()))
            .collect();
        m.sort();
        dashboards.extend(m);
    }
    let mut empty = BTreeSet::new();
    let mut checked = 0;
    let mut absent_ok = BTreeSet::new();
    for (i, path) in dashboards.iter().enumerate() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        for expr in dashboard_exprs(path) {
            let q = substitute(&expr);
            let r = prom.query(&q).unwrap_or_else(|e| panic!("{name}: {e}\n{q}"));
            checked += 1;
            if r.is_empty() {
                if let Some(why) = expected_empty(&expr).filter(|_| i >= ours) {
                    absent_ok.insert(format!(
                        "{name} ({why}): {}",
                        q.split_whitespace().collect::<Vec<_>>().join(" ")
                    ));
                } else {
                    empty.insert(format!("{name}: {q}"));
                }
            }
        }
    }

    // Every rule loads and evaluates; every series it selects exists.
    let rules = prom.api("rules");
    let mut alerts = 0;
    for g in rules["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            let name = r["name"].as_str().unwrap();
            assert_eq!(r["health"], "ok", "rule {name}: {}", r["lastError"]);
            let query = r["query"].as_str().unwrap();
            for sel in selectors(query) {
                // up{job="observer"}: the scrape job of the shipped config.
                if prom.query(&format!("count({sel})")).unwrap().is_empty() {
                    empty.insert(format!("rule {name}: {sel}"));
                }
                checked += 1;
            }
            alerts += 1;
        }
    }
    assert_eq!(alerts, 10 + if mixin.is_some() { 4 } else { 0 }, "rules loaded");

    // The alerts the traffic calls for fire: ours and the mixin's.
    let mut want: BTreeSet<(String, String)> = [
        ("DjangoMigrationsUnapplied", "default"),
        ("DjangoDatabaseErrors", "UniqueViolation"),
        ("DjangoHigh5xxRate", "boom"),
        ("DjangoHigh4xxRate", "missing"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    if mixin.is_some() {
        want.extend(
            [
                ("DjangoMigrationsUnapplied", ""),
                ("DjangoDatabaseException", "UniqueViolation"),
                ("DjangoHighHttp5xxErrorRate", "boom"),
                ("DjangoHighHttp4xxErrorRate", "missing"),
            ]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string())),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    let firing = loop {
        let firing: BTreeSet<(String, String)> = prom.api("alerts")["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["state"] == "firing")
            .map(|a| {
                let l = &a["labels"];
                let detail = ["view", "type", "connection"]
                    .iter()
                    .find_map(|k| l[*k].as_str())
                    .unwrap_or_default()
                    .to_string();
                (l["alertname"].as_str().unwrap_or_default().to_string(), detail)
            })
            .collect();
        if want.is_subset(&firing) || Instant::now() > deadline {
            break firing;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    stop.store(true, Ordering::Relaxed);
    let sent = driver.join().unwrap();
    eprintln!("{sent} requests; {checked} expressions and selectors checked; firing: {firing:?}");
    eprintln!("mixin expressions with no data here, and why:");
    for e in &absent_ok {
        eprintln!("  {e}");
    }
    assert!(
        empty.is_empty(),
        "expressions with no data:\n{}",
        empty.into_iter().collect::<Vec<_>>().join("\n")
    );
    assert!(want.is_subset(&firing), "alerts not firing: {:?}", want.difference(&firing).collect::<Vec<_>>());
    // Nothing wrong with the agent itself.
    for quiet in ["ObserverDown", "ObserverEventsLost", "ObserverNoTargets", "ObserverRouteDiscoveryFailing"]
    {
        assert!(!firing.iter().any(|(a, _)| a == quiet), "{quiet} fired");
    }
    drop(prom);
    drop(obs);
    drop(app);
    drop(redis);
    drop(pg);
}
