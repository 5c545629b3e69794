//! Request path to Django view name (`resolver_match.view_name`), the `view` label.
//!
//! Route sources, in order: the app's own URL resolver, dumped by running its interpreter
//! with its environment (`crate::app::discover`); a routes file (`--routes`); and when neither is
//! available, a templated path under a hard cap. Matching follows Django's resolver: the
//! patterns of each include are tried in order, first match wins, a `path()` segment is
//! matched from the start (to the end for endpoints), a `re_path()` one is searched, or
//! fully matched when it is an endpoint ending in `$`.

use std::{collections::HashMap, sync::Arc};

use regex::{Regex, RegexBuilder};
use serde::Deserialize;

/// What kind of Django pattern a segment came from (its matching rule differs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `path()`: RoutePattern, anchored at the start.
    Route,
    /// `re_path()`: RegexPattern, searched (or fully matched, see [`Segment`]).
    Regex,
    /// `i18n_patterns()`: the language prefix.
    Locale,
}

/// One pattern on the way from the root URLconf to a view, as the discovery dumps it.
#[derive(Debug, Clone, Deserialize)]
pub struct RawSegment {
    pub kind: Kind,
    /// The compiled pattern's regex source (Python syntax).
    pub regex: String,
    /// The pattern is the view's own (not an include).
    pub endpoint: bool,
}

/// One route: the patterns from the root to a view, and the view's name.
#[derive(Debug, Clone, Deserialize)]
pub struct RawRoute {
    pub view: String,
    pub segments: Vec<RawSegment>,
}

#[derive(Debug)]
struct Segment {
    regex: Regex,
    /// Search anywhere (re_path without a leading `^`) rather than at the start.
    search: bool,
}

#[derive(Debug)]
struct Route {
    segments: Vec<Segment>,
    view: Arc<str>,
}

/// Translates a Python `re` pattern to the `regex` crate's syntax, or `None` for the
/// features it lacks (backreferences, lookaround).
pub fn python_to_rust(p: &str) -> Option<String> {
    for unsupported in ["(?P=", "(?=", "(?!", "(?<=", "(?<!", "(?#"] {
        if p.contains(unsupported) {
            return None;
        }
    }
    let mut out = String::with_capacity(p.len());
    let mut chars = p.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('Z') => out.push_str(r"\z"),
                Some(n) => {
                    out.push('\\');
                    out.push(n);
                }
                None => return None,
            }
        } else {
            out.push(c);
        }
    }
    Some(out)
}

fn compile(s: &RawSegment) -> Option<Segment> {
    let p = python_to_rust(&s.regex)?;
    let (src, search) = match s.kind {
        Kind::Route | Kind::Locale => (format!("^(?:{p})"), false),
        // RegexPattern.match: fullmatch for an endpoint ending in `$`, else search.
        Kind::Regex if s.endpoint && s.regex.ends_with('$') => (format!("^(?:{p})\\z"), false),
        Kind::Regex => (p, true),
    };
    let regex = RegexBuilder::new(&src).size_limit(REGEX_SIZE).dfa_size_limit(REGEX_SIZE).build().ok()?;
    Some(Segment { regex, search })
}

/// Compiled size allowed per pattern (the regex crate's default is 10 MiB): Django's own
/// patterns compile to a few KiB; one that needs more is skipped as unsupported rather
/// than held in memory for every app.
const REGEX_SIZE: usize = 256 << 10;

/// Routes kept per app, in resolution order (the largest Django sites have a few
/// thousand); the rest are counted in [`RouteTable::dropped`] and resolve to nothing.
pub const MAX_ROUTES: usize = 5_000;

/// A Django path converter's regex (django/urls/converters.py).
fn converter_regex(name: &str) -> Option<&'static str> {
    Some(match name {
        "int" => "[0-9]+",
        "str" => "[^/]+",
        "slug" => "[-a-zA-Z0-9_]+",
        "uuid" => "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
        "path" => ".+",
        _ => return None,
    })
}

/// Django's `_route_to_regex` for a `path()` route, as an endpoint (`\Z` at the end).
pub fn route_to_regex(route: &str) -> Option<String> {
    let mut out = String::from("^");
    let mut rest = route;
    while let Some(open) = rest.find('<') {
        out.push_str(&regex::escape(&rest[..open]));
        let close = rest[open..].find('>')? + open;
        let spec = &rest[open + 1..close];
        let (conv, name) = spec.split_once(':').unwrap_or(("str", spec));
        if name.is_empty() || !name.chars().all(|c| c.is_alphanumeric() || c == '_') {
            return None;
        }
        out.push_str(&format!("(?P<{name}>{})", converter_regex(conv)?));
        rest = &rest[close + 1..];
    }
    out.push_str(&regex::escape(rest));
    out.push_str(r"\Z");
    Some(out)
}

/// Django settings that change what django-prometheus reports for a request.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct AppSettings {
    #[serde(default = "yes")]
    pub append_slash: bool,
    #[serde(default = "utf8")]
    pub default_charset: String,
    /// (META key, value), e.g. ("HTTP_X_FORWARDED_PROTO", "https").
    #[serde(default)]
    pub secure_proxy_ssl_header: Option<(String, String)>,
}

fn yes() -> bool {
    true
}

fn utf8() -> String {
    "utf-8".into()
}

impl Default for AppSettings {
    fn default() -> Self {
        Self { append_slash: true, default_charset: utf8(), secure_proxy_ssl_header: None }
    }
}

impl AppSettings {
    /// The header of SECURE_PROXY_SSL_HEADER as it is on the wire: `HTTP_X_FORWARDED_PROTO`
    /// is `x-forwarded-proto`.
    pub fn secure_header(&self) -> Option<(String, String)> {
        let (key, value) = self.secure_proxy_ssl_header.as_ref()?;
        let name = key.strip_prefix("HTTP_")?.replace('_', "-").to_ascii_lowercase();
        Some((name, value.clone()))
    }
}

/// An app's routes, in resolution order.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
    /// Patterns the `regex` crate cannot express, or too large to compile (skipped).
    pub unsupported: usize,
    /// Routes past [`MAX_ROUTES`] (not kept).
    pub dropped: usize,
}

impl RouteTable {
    pub fn new(raw: &[RawRoute]) -> Self {
        let mut t = Self::default();
        for r in raw {
            if t.routes.len() >= MAX_ROUTES {
                t.dropped += 1;
                continue;
            }
            match r.segments.iter().map(compile).collect::<Option<Vec<_>>>() {
                Some(segments) => t.routes.push(Route { segments, view: Arc::from(r.view.as_str()) }),
                None => t.unsupported += 1,
            }
        }
        t
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Parses a routes file: `PATTERN VIEW_NAME` per line (Django path syntax with the
    /// int/str/slug/uuid/path converters, or `re:REGEX` for a regex), `#` comments.
    pub fn from_routes_file(text: &str) -> Result<Self, String> {
        let mut raw = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (pattern, view) = line
                .rsplit_once(char::is_whitespace)
                .ok_or_else(|| format!("line {}: expected PATTERN VIEW_NAME", i + 1))?;
            let (pattern, view) = (pattern.trim(), view.trim());
            let segment = match pattern.strip_prefix("re:") {
                Some(re) => RawSegment {
                    kind: Kind::Regex,
                    regex: re.trim_start_matches('/').to_string(),
                    endpoint: true,
                },
                None => RawSegment {
                    kind: Kind::Route,
                    regex: route_to_regex(pattern.trim_start_matches('/'))
                        .ok_or_else(|| format!("line {}: bad route {pattern:?}", i + 1))?,
                    endpoint: true,
                },
            };
            if compile(&segment).is_none() {
                return Err(format!("line {}: pattern not supported: {pattern:?}", i + 1));
            }
            raw.push(RawRoute { view: view.to_string(), segments: vec![segment] });
        }
        Ok(Self::new(&raw))
    }

    /// The view name for a request path (percent-encoded, as on the wire), as Django's
    /// resolver would give it.
    pub fn resolve(&self, path: &str) -> Option<Arc<str>> {
        let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
        // The root URLconf's pattern is `^/`.
        let rest = decoded.strip_prefix('/')?;
        'routes: for r in &self.routes {
            let mut p = rest;
            for s in &r.segments {
                let m = if s.search { s.regex.find(p) } else { s.regex.find(p).filter(|m| m.start() == 0) };
                match m {
                    Some(m) => p = &p[m.end()..],
                    None => continue 'routes,
                }
            }
            return Some(r.view.clone());
        }
        None
    }
}

/// Resolves paths for one target, with a bounded cache, and templated paths (under a
/// cap) when the app's routes are unknown.
#[derive(Debug)]
pub struct ViewResolver {
    table: Option<RouteTable>,
    cache: HashMap<String, Option<Arc<str>>>,
    cache_bytes: usize,
    templated: HashMap<String, Arc<str>>,
    max_views: usize,
    /// Templated paths not kept because `max_views` was reached.
    pub overflowed: u64,
}

/// Paths cached per target (a cache: cleared when full).
const CACHE: usize = 10_000;
/// ... and the bytes of their keys: paths are up to MAX_PATH (4 KiB) each and chosen
/// by clients, so a count alone would let them make it 40 MiB per app.
const CACHE_BYTES: usize = 1 << 20;
/// The longest templated view label: past it the template is cut (on a character
/// boundary), so that a client's path of 4 KiB of short segments cannot make a label
/// of 4 KiB.
pub const MAX_TEMPLATE: usize = 256;

/// What a path resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum View {
    /// A view of the app's URLconf.
    Resolved(Arc<str>),
    /// The URLconf has no match (Django's Resolver404).
    Unresolved,
    /// No route table: a templated path (or `<other>` past the cap).
    Templated(Arc<str>),
}

impl ViewResolver {
    pub fn new(table: Option<RouteTable>, max_views: usize) -> Self {
        Self {
            table,
            cache: HashMap::new(),
            cache_bytes: 0,
            templated: HashMap::new(),
            max_views,
            overflowed: 0,
        }
    }

    pub fn has_routes(&self) -> bool {
        self.table.is_some()
    }

    pub fn set_table(&mut self, table: Option<RouteTable>) {
        self.table = table;
        self.cache.clear();
        self.cache_bytes = 0;
    }

    pub fn table(&self) -> Option<&RouteTable> {
        self.table.as_ref()
    }

    pub fn resolve(&mut self, path: &str) -> View {
        let Some(table) = &self.table else { return self.template(path) };
        if let Some(hit) = self.cache.get(path) {
            return hit.clone().map_or(View::Unresolved, View::Resolved);
        }
        let v = table.resolve(path);
        if self.cache.len() >= CACHE || self.cache_bytes + path.len() > CACHE_BYTES {
            self.cache.clear();
            self.cache_bytes = 0;
        }
        self.cache_bytes += path.len();
        self.cache.insert(path.to_string(), v.clone());
        v.map_or(View::Unresolved, View::Resolved)
    }

    fn template(&mut self, path: &str) -> View {
        let t = template_path(path);
        if let Some(v) = self.templated.get(&t) {
            return View::Templated(v.clone());
        }
        if self.templated.len() >= self.max_views {
            self.overflowed += 1;
            return View::Templated(Arc::from(crate::django::http::OTHER));
        }
        let v: Arc<str> = Arc::from(t.as_str());
        self.templated.insert(t, v.clone());
        View::Templated(v)
    }
}

fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && [8, 4, 4, 4, 12]
            .iter()
            .zip(&parts)
            .all(|(n, p)| p.len() == *n && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// A path with its variable-looking segments replaced: numbers `{int}`, UUIDs `{uuid}`,
/// long hex `{hex}`, very long segments `{str}`.
pub fn template_path(path: &str) -> String {
    if !path.starts_with('/') {
        return path.chars().take(64).collect();
    }
    let segs: Vec<String> = path
        .split('/')
        .map(|s| {
            if !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()) {
                "{int}".into()
            } else if is_uuid(s) {
                "{uuid}".into()
            } else if s.len() >= 16 && s.chars().all(|c| c.is_ascii_hexdigit()) {
                "{hex}".into()
            } else if s.len() > 40 {
                "{str}".into()
            } else {
                s.into()
            }
        })
        .collect();
    let mut t = segs.join("/");
    t.truncate(crate::text::cut(&t, MAX_TEMPLATE).len());
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(kind: Kind, regex: &str, endpoint: bool) -> RawSegment {
        RawSegment { kind, regex: regex.into(), endpoint }
    }

    /// Regexes as Django 5.2 compiles them (checked with the test app's dump).
    fn table() -> RouteTable {
        RouteTable::new(&[
            RawRoute { view: "index".into(), segments: vec![seg(Kind::Route, r"^\Z", true)] },
            RawRoute {
                view: "shop:item".into(),
                segments: vec![
                    seg(Kind::Route, "^shop/", false),
                    seg(Kind::Route, r"^items/(?P<pk>[0-9]+)/\Z", true),
                ],
            },
            RawRoute {
                view: "shop:shop.views.by_slug".into(),
                segments: vec![
                    seg(Kind::Route, "^shop/", false),
                    seg(Kind::Route, r"^c/(?P<slug>[-a-zA-Z0-9_]+)/\Z", true),
                ],
            },
            RawRoute {
                view: "legacy".into(),
                segments: vec![seg(Kind::Regex, r"^old/(?P<year>[0-9]{4})/$", true)],
            },
            RawRoute { view: "prefix-only".into(), segments: vec![seg(Kind::Regex, r"^loose", true)] },
            RawRoute { view: "files".into(), segments: vec![seg(Kind::Route, r"^files/(?P<p>.+)\Z", true)] },
            RawRoute {
                view: "en-about".into(),
                segments: vec![seg(Kind::Locale, "en/", false), seg(Kind::Route, r"^about/\Z", true)],
            },
            RawRoute { view: "backref".into(), segments: vec![seg(Kind::Regex, r"^(?P<a>x)(?P=a)$", true)] },
        ])
    }

    #[test]
    fn resolves_like_djangos_resolver() {
        let t = table();
        assert_eq!(t.unsupported, 1, "the backreference pattern");
        let r = |p: &str| t.resolve(p).map(|v| v.to_string());
        assert_eq!(r("/").as_deref(), Some("index"));
        assert_eq!(r("/shop/items/42/").as_deref(), Some("shop:item"));
        assert_eq!(r("/shop/items/42"), None, "no slash: Resolver404");
        assert_eq!(r("/shop/items/x/"), None);
        assert_eq!(r("/shop/c/red-shoes_2/").as_deref(), Some("shop:shop.views.by_slug"));
        assert_eq!(r("/old/2024/").as_deref(), Some("legacy"));
        assert_eq!(r("/old/24/"), None);
        assert_eq!(r("/loosely/anything").as_deref(), Some("prefix-only"), "re_path without $ is searched");
        assert_eq!(r("/files/a/b%20c.txt").as_deref(), Some("files"), "percent-decoded like PATH_INFO");
        assert_eq!(r("/en/about/").as_deref(), Some("en-about"));
        assert_eq!(r("*"), None);
    }

    #[test]
    fn python_regex_translation() {
        assert_eq!(python_to_rust(r"^a\-b/\Z").as_deref(), Some(r"^a\-b/\z"));
        assert_eq!(python_to_rust(r"^(?=x)"), None);
        assert_eq!(python_to_rust(r"\\Z").as_deref(), Some(r"\\Z"), "an escaped backslash then Z");
    }

    #[test]
    fn routes_file() {
        let t = RouteTable::from_routes_file(
            "# comment\n\
             /shop/items/<int:pk>/   shop:item\n\
             shop/<slug:cat>/<uuid:id>/ shop:thing\n\
             files/<path:rest> files\n\
             re:^old/(?P<y>[0-9]+)/$ legacy\n\
             <name>/ by-name\n",
        )
        .unwrap();
        assert_eq!(t.len(), 5);
        let r = |p: &str| t.resolve(p).map(|v| v.to_string());
        assert_eq!(r("/shop/items/7/").as_deref(), Some("shop:item"));
        assert_eq!(r("/shop/hats/123e4567-e89b-12d3-a456-426614174000/").as_deref(), Some("shop:thing"));
        assert_eq!(r("/files/x/y").as_deref(), Some("files"));
        assert_eq!(r("/old/1999/").as_deref(), Some("legacy"));
        assert_eq!(r("/anything/").as_deref(), Some("by-name"));
        assert_eq!(r("/a/b/"), None);
        assert!(RouteTable::from_routes_file("just-one-field").is_err());
        assert!(RouteTable::from_routes_file("<weird:x>/ v").is_err());
    }

    #[test]
    fn templated_paths_are_capped() {
        let mut v = ViewResolver::new(None, 3);
        assert_eq!(v.resolve("/u/123/posts/9/"), View::Templated(Arc::from("/u/{int}/posts/{int}/")));
        assert_eq!(
            v.resolve("/o/123e4567-e89b-12d3-a456-426614174000"),
            View::Templated(Arc::from("/o/{uuid}"))
        );
        assert_eq!(v.resolve("/a"), View::Templated(Arc::from("/a")));
        assert_eq!(v.resolve("/b"), View::Templated(Arc::from("<other>")));
        assert_eq!(v.overflowed, 1);
        assert_eq!(v.resolve("/u/5/posts/6/"), View::Templated(Arc::from("/u/{int}/posts/{int}/")), "known");
    }

    #[test]
    fn templates_of_long_paths_are_cut_on_a_character_boundary() {
        let path = format!("/{}", "é/".repeat(2000));
        let t = template_path(&path);
        assert!(t.len() <= MAX_TEMPLATE && t.len() > MAX_TEMPLATE - 4, "{}", t.len());
        assert!(path.starts_with(&t));
    }

    #[test]
    fn the_path_cache_is_bounded_in_bytes() {
        let table = RouteTable::new(&[]);
        let mut v = ViewResolver::new(Some(table), 10);
        for i in 0..2000 {
            let path = format!("/{i}/{}", "a".repeat(4000));
            assert_eq!(v.resolve(&path), View::Unresolved);
            assert!(v.cache_bytes <= CACHE_BYTES);
            assert_eq!(v.cache_bytes, v.cache.keys().map(String::len).sum::<usize>());
        }
    }

    #[test]
    fn secure_header_name() {
        let s = AppSettings {
            secure_proxy_ssl_header: Some(("HTTP_X_FORWARDED_PROTO".into(), "https".into())),
            ..Default::default()
        };
        assert_eq!(s.secure_header(), Some(("x-forwarded-proto".into(), "https".into())));
    }

    #[test]
    fn routes_past_the_bound_are_dropped_and_counted() {
        let raw: Vec<RawRoute> = (0..MAX_ROUTES + 7)
            .map(|i| RawRoute {
                view: format!("v{i}"),
                segments: vec![seg(Kind::Route, &format!("^p{i}/\\Z"), true)],
            })
            .collect();
        let t = RouteTable::new(&raw);
        assert_eq!((t.len(), t.dropped, t.unsupported), (MAX_ROUTES, 7, 0));
        assert_eq!(t.resolve("/p0/").as_deref(), Some("v0"));
        assert_eq!(t.resolve(&format!("/p{}/", MAX_ROUTES + 3)), None);
    }

    #[test]
    fn a_pattern_too_large_to_compile_is_unsupported() {
        // Compiles to far more than REGEX_SIZE (fine for the regex crate's 10 MiB default
        // at a smaller repeat; this one is refused, not held).
        let huge = r"^(?:\w{200}){200}\Z";
        let t = RouteTable::new(&[
            RawRoute { view: "huge".into(), segments: vec![seg(Kind::Route, huge, true)] },
            RawRoute { view: "ok".into(), segments: vec![seg(Kind::Route, r"^ok/\Z", true)] },
        ]);
        assert_eq!((t.len(), t.unsupported), (1, 1));
        assert_eq!(t.resolve("/ok/").as_deref(), Some("ok"));
    }
}
