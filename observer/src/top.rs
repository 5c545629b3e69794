//! `observer top`: for an operator on the node, per app and view, refreshed every second:
//! requests/s, p50/p99 latency, database statements and time per request, cache hit
//! ratio, and the statement shapes a view repeats most within one request (normalised:
//! no literal ever shown). This is the only place shapes are shown, on the terminal of
//! whoever runs it; nothing here is exported or logged.

use std::{
    collections::{HashMap, VecDeque},
    io::Write,
    time::Instant,
};

use crate::profile::Profile;

/// Latencies kept per view for the percentiles (the most recent ones).
const LATENCIES: usize = 1024;
/// Shapes remembered per view.
const SHAPES: usize = 32;
/// Shapes shown under each view.
const SHOWN_SHAPES: usize = 3;
/// View rows shown (the busiest).
const ROWS: usize = 40;

#[derive(Debug, Default)]
struct ShapeStats {
    text: Box<str>,
    /// The most times it ran in one request.
    max_per_request: u32,
    /// Requests it ran in.
    requests: u64,
}

#[derive(Debug, Default)]
struct ViewStats {
    requests: u64,
    /// Requests since the last screen, for requests/s.
    recent: u64,
    rps: f64,
    latencies: VecDeque<f64>,
    statements: u64,
    db_seconds: f64,
    cache_gets: u64,
    cache_hits: u64,
    shapes: HashMap<u64, ShapeStats>,
}

#[derive(Debug)]
struct App {
    name: String,
    views: HashMap<String, ViewStats>,
}

/// What one request did, as `top` takes it.
pub struct Sample<'a> {
    pub root: u32,
    pub view: &'a str,
    pub latency_s: f64,
    pub profile: &'a Profile,
    pub cache_gets: u64,
    pub cache_hits: u64,
}

pub struct Top {
    apps: HashMap<u32, App>,
    last: Instant,
    out: Box<dyn Write + Send>,
    tty: bool,
    width: usize,
}

impl Top {
    /// Screens go to `out`; on a terminal each replaces the last.
    pub fn new(out: Box<dyn Write + Send>, tty: bool, width: usize) -> Self {
        Self { apps: HashMap::new(), last: Instant::now(), out, tty, width: width.max(80) }
    }

    pub fn observe(&mut self, s: &Sample<'_>) {
        let app =
            self.apps.entry(s.root).or_insert_with(|| App { name: app_name(s.root), views: HashMap::new() });
        let v = app.views.entry(s.view.to_string()).or_default();
        v.requests += 1;
        v.recent += 1;
        if v.latencies.len() >= LATENCIES {
            v.latencies.pop_front();
        }
        v.latencies.push_back(s.latency_s);
        v.statements += u64::from(s.profile.statements);
        v.db_seconds += s.profile.db_seconds;
        v.cache_gets += s.cache_gets;
        v.cache_hits += s.cache_hits;
        for (h, n, text) in &s.profile.shapes {
            if !v.shapes.contains_key(h) && v.shapes.len() >= SHAPES {
                // Make room: forget the shape that repeats least.
                if let Some((&k, _)) = v.shapes.iter().min_by_key(|(_, x)| (x.max_per_request, x.requests)) {
                    v.shapes.remove(&k);
                }
            }
            let e = v.shapes.entry(*h).or_default();
            if e.text.is_empty() {
                e.text = text.clone().unwrap_or_else(|| format!("(shape {h:016x})").into());
            }
            e.max_per_request = e.max_per_request.max(*n);
            e.requests += 1;
        }
    }

    /// The app is gone.
    pub fn forget(&mut self, root: u32) {
        self.apps.remove(&root);
    }

    /// Once a second: requests/s since the last screen, then the screen.
    pub fn tick(&mut self) {
        let dt = self.last.elapsed().as_secs_f64().max(1e-3);
        self.last = Instant::now();
        for app in self.apps.values_mut() {
            for v in app.views.values_mut() {
                v.rps = v.recent as f64 / dt;
                v.recent = 0;
            }
        }
        let screen = self.screen();
        let clear = if self.tty { "\x1b[H\x1b[2J" } else { "" };
        let _ = write!(self.out, "{clear}{screen}{}", if self.tty { "" } else { "\n" });
        let _ = self.out.flush();
    }

    /// The screen as text.
    pub fn screen(&self) -> String {
        let mut s = String::new();
        let views: usize = self.apps.values().map(|a| a.views.len()).sum();
        s.push_str(&format!(
            "observer top: {} app(s), {views} view(s); statement shapes are normalised (no literals). Ctrl-C quits.\n\n",
            self.apps.len()
        ));
        s.push_str(&format!(
            "{:<40} {:>8} {:>9} {:>9} {:>9} {:>10} {:>9}\n",
            "APP / VIEW", "REQ/S", "P50 MS", "P99 MS", "STMT/REQ", "DB MS/REQ", "CACHE HIT"
        ));
        let mut apps: Vec<(&u32, &App)> = self.apps.iter().collect();
        apps.sort_by_key(|(root, _)| **root);
        let mut rows = 0;
        for (_, app) in apps {
            s.push_str(&format!("{}\n", clip(&app.name, self.width)));
            let mut views: Vec<(&String, &ViewStats)> = app.views.iter().collect();
            views.sort_by(|a, b| b.1.requests.cmp(&a.1.requests).then(a.0.cmp(b.0)));
            for (name, v) in views {
                if rows >= ROWS {
                    break;
                }
                rows += 1;
                let n = v.requests.max(1) as f64;
                let hit = if v.cache_gets > 0 {
                    format!("{:.0}%", 100.0 * v.cache_hits as f64 / v.cache_gets as f64)
                } else {
                    "-".into()
                };
                s.push_str(&format!(
                    "  {:<38} {:>8.1} {:>9.1} {:>9.1} {:>9.1} {:>10.2} {:>9}\n",
                    clip(name, 38),
                    v.rps,
                    percentile(&v.latencies, 0.5) * 1e3,
                    percentile(&v.latencies, 0.99) * 1e3,
                    v.statements as f64 / n,
                    v.db_seconds * 1e3 / n,
                    hit
                ));
                let mut shapes: Vec<&ShapeStats> =
                    v.shapes.values().filter(|x| x.max_per_request >= 2).collect();
                shapes.sort_by(|a, b| b.max_per_request.cmp(&a.max_per_request).then(a.text.cmp(&b.text)));
                for sh in shapes.into_iter().take(SHOWN_SHAPES) {
                    let line = format!("      {:>4}x  {}", sh.max_per_request, sh.text);
                    s.push_str(&clip(&line, self.width));
                    s.push('\n');
                }
            }
        }
        s
    }
}

/// The app server's name (the first argument that is not the interpreter: `gunicorn`
/// for `python .../bin/gunicorn ...`) and its PID.
fn app_name(root: u32) -> String {
    let cmdline = std::fs::read(format!("/proc/{root}/cmdline")).unwrap_or_default();
    let name = cmdline
        .split(|&b| b == 0)
        .map(String::from_utf8_lossy)
        .map(|a| a.rsplit('/').next().unwrap_or(&a).to_string())
        .find(|a| !a.is_empty() && !a.starts_with("python") && !a.starts_with('-'))
        .unwrap_or_else(|| {
            crate::targets::read_proc_text(format!("/proc/{root}/comm"))
                .unwrap_or_default()
                .trim()
                .to_string()
        });
    format!("{name} (pid {root})")
}

fn percentile(xs: &VecDeque<f64>, q: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let mut v: Vec<f64> = xs.iter().copied().collect();
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// At most `width` characters of `s` for the terminal: names, views and statement shapes
/// come from other processes and from the wire, so their control characters are escaped
/// (a name cannot move the cursor or clear the screen).
fn clip(s: &str, width: usize) -> String {
    let escaped;
    let s = if s.chars().any(char::is_control) {
        escaped = crate::text::printable(s, s.len().saturating_mul(10));
        escaped.as_str()
    } else {
        s
    };
    if s.chars().count() <= width {
        return s.to_string();
    }
    let mut out: String = s.chars().take(width.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(statements: u32, shapes: &[(u64, u32, &str)]) -> Profile {
        Profile {
            statements,
            db_seconds: 0.002,
            shapes: shapes.iter().map(|(h, n, t)| (*h, *n, Some(Box::from(*t)))).collect(),
            ..Profile::default()
        }
    }

    #[test]
    fn names_cannot_drive_the_terminal() {
        assert_eq!(clip("app\x1b[2J\r", 80), "app\\u{1b}[2J\\r");
        assert_eq!(clip("abcdef", 4), "abc…");
        assert_eq!(clip("\x1b\x1b", 4), "\\u{…");
    }

    #[test]
    fn the_screen_shows_views_their_costs_and_repeated_shapes() {
        let mut top = Top::new(Box::new(std::io::sink()), false, 160);
        let looped = profile(13, &[(1, 1, "SELECT tags"), (2, 12, "SELECT item WHERE id = ?")]);
        let fixed = profile(1, &[(3, 1, "SELECT tags JOIN item")]);
        for i in 0..4 {
            top.observe(&Sample {
                root: 1,
                view: "list",
                latency_s: 0.010 + f64::from(i) * 0.001,
                profile: &looped,
                cache_gets: 2,
                cache_hits: 1,
            });
            top.observe(&Sample {
                root: 1,
                view: "list-fixed",
                latency_s: 0.002,
                profile: &fixed,
                cache_gets: 0,
                cache_hits: 0,
            });
        }
        top.tick();
        let screen = top.screen();
        let list = screen.lines().find(|l| l.trim_start().starts_with("list ")).unwrap();
        let cols: Vec<&str> = list.split_whitespace().collect();
        assert_eq!(&cols[..1], ["list"]);
        assert_eq!(cols[3], "13.0", "{list}"); // p99 ms
        assert_eq!(cols[4], "13.0", "{list}"); // statements per request
        assert_eq!(cols[6], "50%", "{list}");
        assert!(screen.contains("  12x  SELECT item WHERE id = ?"), "{screen}");
        // A shape that runs once per request is no repeat: not shown.
        assert!(!screen.contains("SELECT tags JOIN item"), "{screen}");
        let fixed_row = screen.lines().find(|l| l.trim_start().starts_with("list-fixed")).unwrap();
        assert!(fixed_row.split_whitespace().nth(4) == Some("1.0"), "{fixed_row}");
    }
}
