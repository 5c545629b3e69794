//! django-prometheus's HTTP middleware families (section A.4), one set per target.
//!
//! What a wire exchange becomes, family by family (README "Metrics" table):
//! - exact: requests/responses before middlewares, by method, by transport, by status,
//!   by status/view/method, AJAX, request body size (the Content-Length header value),
//!   response body size and streaming (Content-Length vs chunked/close framing), charset;
//! - derived: both latency histograms (first request byte read to last response byte
//!   written, so they include the WSGI server and every middleware), by
//!   view/transport/method (counted for every resolved URL: a middleware that answers
//!   before the view, like a CSRF 403, is counted where django-prometheus would not);
//! - absent: template names and exception types and views, which never reach the wire.

use std::collections::{HashMap, HashSet};

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry};

use super::{LATENCY_BUCKETS, body_size_buckets, counter_vec};

/// Methods django-prometheus keeps as they are; others become `<invalid method>`
/// (except in the latency histogram, which uses the raw method).
const KNOWN_METHODS: [&str; 9] =
    ["GET", "HEAD", "POST", "PUT", "DELETE", "TRACE", "OPTIONS", "CONNECT", "PATCH"];
/// The label value django-prometheus gives other methods.
pub const INVALID_METHOD: &str = "<invalid method>";
/// Label value for a view of an unresolved URL (what Django gives).
pub const UNNAMED_VIEW: &str = "<unnamed view>";
/// Label value past a cardinality bound.
pub const OTHER: &str = "<other>";

/// Distinct raw (non-standard) methods kept per target in the latency histogram.
const MAX_RAW_METHODS: usize = 16;
/// Distinct charsets kept per target.
const MAX_CHARSETS: usize = 16;
/// Kinds of exchange whose series are kept resolved (past it, each exchange resolves its
/// own, as before).
const MAX_RESOLVED: usize = 4096;

/// What one request/response pair contributes.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpObservation<'a> {
    /// The method as sent.
    pub method: &'a str,
    /// The view label: a view name, or [`UNNAMED_VIEW`] for an unresolved URL.
    pub view: &'a str,
    /// The URL resolved to a view (django-prometheus counts by view/transport/method then).
    pub resolved: bool,
    pub secure: bool,
    pub ajax: bool,
    pub status: u16,
    /// The request's Content-Length header value (0 when absent).
    pub request_body: f64,
    pub response_body: Body,
    pub charset: &'a str,
    /// Seconds from the request's first byte read to the response's last byte written.
    pub latency_s: f64,
}

/// What the response body histogram gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// `len(response.content)` of a non-streaming response.
    Size(u64),
    /// A streaming response: counted, not observed.
    Streaming,
    /// Not on the wire (the response django-prometheus saw was replaced later).
    Unknown,
}

/// Label values dropped to [`OTHER`] because a bound bit.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Overflows {
    pub methods: u64,
    pub charsets: u64,
}

pub struct HttpMetrics {
    requests_before: IntCounter,
    responses_before: IntCounter,
    latency_including: Histogram,
    // Registered so they are exported (at 0): every exchange the wire completes has a
    // known start and end.
    _unknown_latency_including: IntCounter,
    latency_by_view_method: HistogramVec,
    _unknown_latency: IntCounter,
    ajax: IntCounter,
    by_method: IntCounterVec,
    by_transport: IntCounterVec,
    by_view_transport_method: IntCounterVec,
    request_body: Histogram,
    by_status: IntCounterVec,
    by_status_view_method: IntCounterVec,
    response_body: Histogram,
    by_charset: IntCounterVec,
    streaming: IntCounter,
    raw_methods: HashSet<String>,
    charsets: HashSet<String>,
    /// By view: the series each kind of exchange moves, resolved once.
    resolved: HashMap<Box<str>, Vec<(Kind, Series)>>,
    resolved_len: usize,
    pub overflows: Overflows,
}

/// What picks an exchange's labelled series, besides its view.
#[derive(Debug, PartialEq, Eq)]
struct Kind {
    method: Box<str>,
    secure: bool,
    status: u16,
    charset: Box<str>,
    resolved: bool,
}

impl Kind {
    fn of(o: &HttpObservation<'_>) -> Self {
        Self {
            method: o.method.into(),
            secure: o.secure,
            status: o.status,
            charset: o.charset.into(),
            resolved: o.resolved,
        }
    }

    fn is(&self, o: &HttpObservation<'_>) -> bool {
        self.status == o.status
            && self.secure == o.secure
            && self.resolved == o.resolved
            && *self.method == *o.method
            && *self.charset == *o.charset
    }
}

/// The labelled series one kind of exchange moves: `with_label_values` hashes every
/// label value on each call, the costliest part of an exchange in the agent's profile.
struct Series {
    latency: Histogram,
    by_method: IntCounter,
    by_transport: IntCounter,
    by_view_transport_method: Option<IntCounter>,
    by_status: IntCounter,
    by_status_view_method: IntCounter,
    by_charset: IntCounter,
    /// Its method or charset was folded into `<other>` (counted per exchange).
    method_overflow: bool,
    charset_overflow: bool,
}

impl Series {
    fn count(&self, o: &HttpObservation<'_>) {
        self.latency.observe(o.latency_s);
        self.by_method.inc();
        self.by_transport.inc();
        if let Some(c) = &self.by_view_transport_method {
            c.inc();
        }
        self.by_status.inc();
        self.by_status_view_method.inc();
        self.by_charset.inc();
    }
}

fn counter(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    let c = IntCounter::with_opts(Opts::new(name, help))?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> prometheus::Result<Histogram> {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

/// django-prometheus's `_method()`.
pub fn sanitize_method(m: &str) -> &str {
    if KNOWN_METHODS.contains(&m) { m } else { INVALID_METHOD }
}

impl HttpMetrics {
    /// Registers every family in `r`.
    pub fn new(r: &Registry) -> prometheus::Result<Self> {
        Ok(Self {
            requests_before: counter(
                r,
                "django_http_requests_before_middlewares_total",
                "Total count of requests before middlewares run.",
            )?,
            responses_before: counter(
                r,
                "django_http_responses_before_middlewares_total",
                "Total count of responses before middlewares run.",
            )?,
            latency_including: histogram(
                r,
                "django_http_requests_latency_including_middlewares_seconds",
                "Histogram of requests processing time (including middleware processing time).",
                LATENCY_BUCKETS.to_vec(),
            )?,
            _unknown_latency_including: counter(
                r,
                "django_http_requests_unknown_latency_including_middlewares_total",
                "Count of requests for which the latency was unknown (when computing django_http_requests_latency_including_middlewares_seconds).",
            )?,
            latency_by_view_method: {
                let h = HistogramVec::new(
                    HistogramOpts::new(
                        "django_http_requests_latency_seconds_by_view_method",
                        "Histogram of request processing time labelled by view.",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                    &["view", "method"],
                )?;
                r.register(Box::new(h.clone()))?;
                h
            },
            _unknown_latency: counter(
                r,
                "django_http_requests_unknown_latency_total",
                "Count of requests for which the latency was unknown.",
            )?,
            ajax: counter(r, "django_http_ajax_requests_total", "Count of AJAX requests.")?,
            by_method: counter_vec(
                r,
                "django_http_requests_total_by_method_total",
                "Count of requests by method.",
                &["method"],
            )?,
            by_transport: counter_vec(
                r,
                "django_http_requests_total_by_transport_total",
                "Count of requests by transport.",
                &["transport"],
            )?,
            by_view_transport_method: counter_vec(
                r,
                "django_http_requests_total_by_view_transport_method_total",
                "Count of requests by view, transport, method.",
                &["view", "transport", "method"],
            )?,
            request_body: histogram(
                r,
                "django_http_requests_body_total_bytes",
                "Histogram of requests by body size.",
                body_size_buckets(),
            )?,
            by_status: counter_vec(
                r,
                "django_http_responses_total_by_status_total",
                "Count of responses by status.",
                &["status"],
            )?,
            by_status_view_method: counter_vec(
                r,
                "django_http_responses_total_by_status_view_method_total",
                "Count of responses by status, view, method.",
                &["status", "view", "method"],
            )?,
            response_body: histogram(
                r,
                "django_http_responses_body_total_bytes",
                "Histogram of responses by body size.",
                body_size_buckets(),
            )?,
            by_charset: counter_vec(
                r,
                "django_http_responses_total_by_charset_total",
                "Count of responses by charset.",
                &["charset"],
            )?,
            streaming: counter(r, "django_http_responses_streaming_total", "Count of streaming responses.")?,
            raw_methods: HashSet::new(),
            charsets: HashSet::new(),
            resolved: HashMap::new(),
            resolved_len: 0,
            overflows: Overflows::default(),
        })
    }

    /// The raw method for the latency histogram, bounded: standard methods always,
    /// others up to [`MAX_RAW_METHODS`] distinct values.
    fn raw_method<'a>(&mut self, m: &'a str) -> &'a str {
        if KNOWN_METHODS.contains(&m) || self.raw_methods.contains(m) {
            return m;
        }
        if self.raw_methods.len() < MAX_RAW_METHODS {
            self.raw_methods.insert(m.to_string());
            return m;
        }
        self.overflows.methods += 1;
        OTHER
    }

    fn charset<'a>(&mut self, c: &'a str) -> &'a str {
        if self.charsets.contains(c) {
            return c;
        }
        if self.charsets.len() < MAX_CHARSETS {
            self.charsets.insert(c.to_string());
            return c;
        }
        self.overflows.charsets += 1;
        OTHER
    }

    /// Records one request/response pair, as django-prometheus's Before and After
    /// middlewares would.
    pub fn observe(&mut self, o: &HttpObservation<'_>) {
        self.requests_before.inc();
        self.responses_before.inc();
        self.latency_including.observe(o.latency_s);
        if o.ajax {
            self.ajax.inc();
        }
        self.request_body.observe(o.request_body);
        match o.response_body {
            Body::Size(n) => self.response_body.observe(n as f64),
            Body::Streaming => self.streaming.inc(),
            Body::Unknown => {}
        }
        let known = self.resolved.get(o.view).and_then(|v| v.iter().find(|(k, _)| k.is(o)));
        if let Some((_, s)) = known {
            self.overflows.methods += u64::from(s.method_overflow);
            self.overflows.charsets += u64::from(s.charset_overflow);
            s.count(o);
            return;
        }
        let s = self.resolve(o);
        s.count(o);
        if self.resolved_len < MAX_RESOLVED {
            self.resolved_len += 1;
            self.resolved.entry(o.view.into()).or_default().push((Kind::of(o), s));
        }
    }

    /// The labelled series of an exchange like `o`, looked up in the families.
    fn resolve(&mut self, o: &HttpObservation<'_>) -> Series {
        let before = self.overflows;
        let method = sanitize_method(o.method);
        let raw = self.raw_method(o.method);
        let transport = if o.secure { "https" } else { "http" };
        let status = o.status.to_string();
        let charset = self.charset(o.charset);
        Series {
            latency: self.latency_by_view_method.with_label_values(&[o.view, raw]),
            by_method: self.by_method.with_label_values(&[method]),
            by_transport: self.by_transport.with_label_values(&[transport]),
            by_view_transport_method: o
                .resolved
                .then(|| self.by_view_transport_method.with_label_values(&[o.view, transport, method])),
            by_status: self.by_status.with_label_values(&[status.as_str()]),
            by_status_view_method: self.by_status_view_method.with_label_values(&[
                status.as_str(),
                o.view,
                method,
            ]),
            by_charset: self.by_charset.with_label_values(&[charset]),
            method_overflow: self.overflows.methods > before.methods,
            charset_overflow: self.overflows.charsets > before.charsets,
        }
    }
}

/// Django's `request.is_secure()`: under `SECURE_PROXY_SSL_HEADER` (`header`: the
/// header's lower-case name and the value that means HTTPS), when the request has that
/// header, the first element of it, stripped, must equal the value (the server joins
/// repeated headers with commas before Django sees them, so the first header's first
/// element is what counts); otherwise the server's own scheme: `tls`, the connection
/// was TLS (gunicorn `--certfile`, uvicorn `--ssl-certfile`).
pub fn is_secure(proxy_headers: &[(String, String)], header: Option<(String, String)>, tls: bool) -> bool {
    let Some((name, value)) = header else { return tls };
    match proxy_headers.iter().find(|(n, _)| *n == name) {
        Some((_, v)) => v.split(',').next().unwrap_or_default().trim() == value,
        None => tls,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the hostile end-to-end test ([9a]): the header was matched whole, so
    /// `https, http` (a proxy chain) was not secure to the agent and was to Django.
    #[test]
    fn is_secure_reads_the_first_element_of_the_first_header() {
        let h = || Some(("x-forwarded-proto".to_string(), "https".to_string()));
        let hs = |vs: &[&str]| -> Vec<(String, String)> {
            vs.iter().map(|v| ("x-forwarded-proto".to_string(), v.to_string())).collect()
        };
        assert!(is_secure(&hs(&["https"]), h(), false));
        assert!(is_secure(&hs(&[" https , http"]), h(), false));
        assert!(!is_secure(&hs(&["http, https"]), h(), false));
        assert!(!is_secure(&hs(&["http", "https"]), h(), false));
        assert!(!is_secure(&hs(&["HTTPS"]), h(), false));
        assert!(!is_secure(&hs(&["https"]), None, false));
        assert!(!is_secure(&[], h(), false));
        // Over TLS: the scheme is https unless the header, when present, says otherwise.
        assert!(is_secure(&[], h(), true));
        assert!(is_secure(&hs(&["https"]), None, true));
        assert!(!is_secure(&hs(&["http"]), h(), true));
    }
    use crate::django::expo;

    fn obs<'a>(method: &'a str, view: &'a str, status: u16) -> HttpObservation<'a> {
        HttpObservation {
            method,
            view,
            resolved: view != UNNAMED_VIEW,
            secure: false,
            ajax: false,
            status,
            request_body: 0.0,
            response_body: Body::Size(5),
            charset: "utf-8",
            latency_s: 0.003,
        }
    }

    fn text(r: &Registry) -> String {
        expo::encode_text(&expo::merge(vec![r.gather()]))
    }

    fn values(r: &Registry) -> std::collections::BTreeMap<String, f64> {
        expo::parse_text(&text(r)).into_iter().map(|s| (s.series(), s.value)).collect()
    }

    #[test]
    fn names_labels_and_values_follow_django_prometheus() {
        let r = Registry::new();
        let mut m = HttpMetrics::new(&r).unwrap();
        m.observe(&obs("GET", "shop:item", 200));
        m.observe(&HttpObservation {
            ajax: true,
            request_body: 300.0,
            ..obs("PROPFIND", "demo.views.dav", 405)
        });
        m.observe(&HttpObservation { response_body: Body::Streaming, ..obs("GET", UNNAMED_VIEW, 404) });
        let t = text(&r);
        let v = values(&r);
        for (series, want) in [
            ("django_http_requests_before_middlewares_total", 3.0),
            ("django_http_responses_before_middlewares_total", 3.0),
            ("django_http_requests_unknown_latency_total", 0.0),
            ("django_http_requests_unknown_latency_including_middlewares_total", 0.0),
            ("django_http_ajax_requests_total", 1.0),
            (r#"django_http_requests_total_by_method_total{method="<invalid method>"}"#, 1.0),
            (r#"django_http_requests_total_by_method_total{method="GET"}"#, 2.0),
            (r#"django_http_requests_total_by_transport_total{transport="http"}"#, 3.0),
            (
                r#"django_http_requests_total_by_view_transport_method_total{method="GET",transport="http",view="shop:item"}"#,
                1.0,
            ),
            (
                r#"django_http_requests_latency_seconds_by_view_method_count{method="PROPFIND",view="demo.views.dav"}"#,
                1.0,
            ),
            (
                r#"django_http_responses_total_by_status_view_method_total{method="GET",status="404",view="<unnamed view>"}"#,
                1.0,
            ),
            (r#"django_http_responses_total_by_status_total{status="405"}"#, 1.0),
            ("django_http_responses_streaming_total", 1.0),
            ("django_http_responses_body_total_bytes_count", 2.0),
            (r#"django_http_requests_body_total_bytes_bucket{le="256.0"}"#, 2.0),
            (r#"django_http_requests_body_total_bytes_bucket{le="512.0"}"#, 3.0),
            (r#"django_http_responses_total_by_charset_total{charset="utf-8"}"#, 3.0),
        ] {
            assert_eq!(v.get(series), Some(&want), "{series} in\n{t}");
        }
        for line in [
            "# HELP django_http_requests_latency_including_middlewares_seconds Histogram of requests processing time (including middleware processing time).",
            "# TYPE django_http_requests_latency_seconds_by_view_method histogram",
        ] {
            assert!(t.lines().any(|l| l == line), "missing {line:?}");
        }
        // Unresolved URLs are not counted by view/transport/method.
        assert!(
            !v.keys().any(|k| k.starts_with("django_http_requests_total_by_view_transport_method_total")
                && k.contains("<unnamed view>"))
        );
    }

    #[test]
    fn raw_methods_are_bounded() {
        let r = Registry::new();
        let mut m = HttpMetrics::new(&r).unwrap();
        for i in 0..100 {
            let method = format!("M{i}");
            m.observe(&obs(&method, "v", 405));
        }
        assert_eq!(m.overflows.methods, 100 - MAX_RAW_METHODS as u64);
        let t = text(&r);
        let series = t
            .lines()
            .filter(|l| l.starts_with("django_http_requests_latency_seconds_by_view_method_count"))
            .count();
        assert_eq!(series, MAX_RAW_METHODS + 1);
    }

    /// The series an exchange moves are resolved once per kind of exchange: a repeated
    /// exchange counts in every family as the first did, and an overflowing method still
    /// counts once per exchange.
    #[test]
    fn repeated_exchanges_count_through_their_resolved_series() {
        let (r1, r2) = (Registry::new(), Registry::new());
        let (mut once, mut twice) = (HttpMetrics::new(&r1).unwrap(), HttpMetrics::new(&r2).unwrap());
        for m in [&mut once, &mut twice] {
            for i in 0..MAX_RAW_METHODS {
                m.observe(&obs(&format!("M{i}"), "v", 405));
            }
        }
        let repeated = [obs("GET", "shop:item", 200), obs("POST", "shop:item", 302), obs("MOVE", "v", 405)];
        for o in &repeated {
            once.observe(o);
            once.observe(o);
            twice.observe(o);
        }
        for o in &repeated {
            twice.observe(o);
        }
        assert_eq!(values(&r1), values(&r2));
        assert_eq!(values(&r1)[r#"django_http_requests_total_by_method_total{method="GET"}"#], 2.0);
        assert_eq!((once.overflows.methods, twice.overflows.methods), (2, 2), "MOVE folded, twice");
    }
}
