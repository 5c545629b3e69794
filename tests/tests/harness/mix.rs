//! The request mix the end-to-end tests send to the Django test app, and what
//! django-prometheus's middlewares record for each request (django-metrics.md A.4).

use std::collections::BTreeMap;

use super::{
    django::{Metrics, Response, raw_exchange_over, read_response},
    tls::Transport,
};

pub const UUID: &str = "123e4567-e89b-12d3-a456-426614174000";

/// A request of the mix.
#[derive(Clone)]
pub struct Req {
    pub method: &'static str,
    pub path: String,
    pub headers: Vec<(&'static str, &'static str)>,
    pub body: Body,
}

#[derive(Clone)]
pub enum Body {
    None,
    Length(usize),
    Chunked(Vec<usize>),
    /// Content-Length body announced with `Expect: 100-continue`.
    Continue(usize),
}

pub fn req(method: &'static str, path: &str) -> Req {
    Req { method, path: path.into(), headers: vec![], body: Body::None }
}

impl Req {
    pub fn header(mut self, k: &'static str, v: &'static str) -> Self {
        self.headers.push((k, v));
        self
    }

    pub fn body(mut self, b: Body) -> Self {
        self.body = b;
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut out = format!("{} {} HTTP/1.1\r\nHost: test\r\n", self.method, self.path).into_bytes();
        for (k, v) in &self.headers {
            out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
        }
        match &self.body {
            Body::None => out.extend_from_slice(b"\r\n"),
            Body::Length(n) => {
                out.extend_from_slice(format!("Content-Length: {n}\r\n\r\n").as_bytes());
                out.extend(std::iter::repeat_n(b'b', *n));
            }
            Body::Continue(n) => {
                out.extend_from_slice(
                    format!("Content-Length: {n}\r\nExpect: 100-continue\r\n\r\n").as_bytes(),
                );
                out.extend(std::iter::repeat_n(b'c', *n));
            }
            Body::Chunked(sizes) => {
                out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                for n in sizes {
                    out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                    out.extend(std::iter::repeat_n(b'k', *n));
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\n\r\n");
            }
        }
        out
    }

    pub fn content_length(&self) -> u64 {
        match self.body {
            Body::Length(n) | Body::Continue(n) => n as u64,
            Body::None | Body::Chunked(_) => 0,
        }
    }
}

/// The test app's URLconf, as Django resolves it: the view name of a path.
pub fn view_of(path: &str) -> Option<String> {
    let p = path.split('?').next().unwrap();
    let seg: Vec<&str> = p.trim_start_matches('/').split('/').collect();
    let v = match seg.as_slice() {
        [""] => "index",
        ["plain"] => "testproj.views.plain",
        ["thing", ""] => "testproj.views.Thing",
        ["shop", "items", n, ""] if n.parse::<u64>().is_ok() => "shop:item",
        ["shop", "c", _, ""] => "shop:shop.views.category",
        ["other", "legacy", y, ""] if y.len() == 4 => "other:legacy",
        ["u", u, ""] if *u == UUID => "by-uuid",
        ["files", rest @ ..] if !rest.is_empty() && !rest.concat().is_empty() => "files",
        ["boom"] => "boom",
        ["missing"] => "missing",
        ["go"] => "go",
        ["tmpl"] => "tmpl",
        ["stream"] => "stream",
        ["big"] => "big",
        ["upload"] => "upload",
        ["slow"] => "slow",
        ["async", ""] => "async-view",
        ["async", "stream"] => "async-stream",
        _ => return None,
    };
    Some(v.into())
}

/// What django-prometheus's middlewares record for one request and the response the
/// client received.
pub struct Expected {
    pub view: String,
    pub resolved: bool,
    pub raw_method: String,
    pub method: String,
    pub transport: &'static str,
    pub status: String,
    pub ajax: bool,
    pub request_body: u64,
    pub response: Option<u64>,
    pub streaming: bool,
    pub charset: String,
}

pub fn expected(r: &Req, resp: &Response) -> Expected {
    expected_over(r, resp, false)
}

/// [`expected`] for a request sent over TLS (`tls`) or not: Django's scheme is the
/// server's unless the test app's SECURE_PROXY_SSL_HEADER is in the request.
pub fn expected_over(r: &Req, resp: &Response, tls: bool) -> Expected {
    let known = ["GET", "HEAD", "POST", "PUT", "DELETE", "TRACE", "OPTIONS", "CONNECT", "PATCH"];
    let view = view_of(&r.path);
    // Chunked, or delimited by closing the connection (no Content-Length).
    let length = resp.header("content-length").map(|v| v.parse::<u64>().unwrap());
    let mut streaming = resp.header("transfer-encoding").is_some() || length.is_none();
    let mut status = resp.status;
    let mut response = if streaming { None } else { length };
    // APPEND_SLASH: After saw the resolver 404 before CommonMiddleware redirected.
    if view.is_none() && status == 301 && view_of(&format!("{}/", r.path)).is_some() {
        status = 404;
        response = None;
        streaming = false;
    }
    let charset = resp
        .header("content-type")
        .and_then(|ct| ct.split(';').find_map(|p| p.trim().strip_prefix("charset=")).map(String::from))
        .unwrap_or_else(|| "utf-8".into());
    Expected {
        resolved: view.is_some(),
        view: view.unwrap_or_else(|| "<unnamed view>".into()),
        raw_method: r.method.into(),
        method: if known.contains(&r.method) { r.method.into() } else { "<invalid method>".into() },
        transport: match r.headers.iter().find(|(k, _)| *k == "X-Forwarded-Proto") {
            Some((_, v)) if *v == "https" => "https",
            None if tls => "https",
            _ => "http",
        },
        status: status.to_string(),
        ajax: r.headers.iter().any(|(k, v)| *k == "X-Requested-With" && *v == "XMLHttpRequest"),
        request_body: r.content_length(),
        response,
        streaming,
        charset,
    }
}

/// The mix every worker class gets (one connection per request).
pub fn single_requests() -> Vec<Req> {
    vec![
        req("GET", "/"),
        req("GET", "/plain"),
        req("GET", "/thing/"),
        req("GET", "/shop/items/42/").header("X-Requested-With", "XMLHttpRequest"),
        req("GET", "/shop/c/red-hat_2/"),
        req("GET", "/other/legacy/2020/"),
        req("GET", &format!("/u/{UUID}/")),
        req("GET", "/files/a/b%20c.txt?download=1"),
        req("GET", "/boom"),
        req("GET", "/missing"),
        req("GET", "/nope/nothing"),
        req("GET", "/shop/items/42"),
        req("GET", "/go"),
        req("GET", "/tmpl"),
        req("GET", "/stream"),
        req("GET", "/big"),
        req("POST", "/upload").body(Body::Length(5000)),
        req("POST", "/upload").body(Body::Chunked(vec![100, 3000, 7])),
        req("POST", "/upload").body(Body::Continue(300)),
        req("HEAD", "/"),
        req("PROPFIND", "/plain"),
        req("GET", "/").header("X-Forwarded-Proto", "https"),
        req("DELETE", "/tmpl"),
    ]
}

/// Sends the mix; returns each request with the response the client read.
pub fn drive(port: u16, keep_alive: bool) -> Vec<(Req, Response)> {
    drive_over(&Transport::Plain, port, keep_alive)
}

/// [`drive`] over `t` (TLS or not).
pub fn drive_over(t: &Transport, port: u16, keep_alive: bool) -> Vec<(Req, Response)> {
    let mut done = Vec::new();
    for r in single_requests() {
        let resp = raw_exchange_over(t, port, &r.bytes(), &[r.method == "HEAD"]).remove(0);
        done.push((r, resp));
    }
    if keep_alive {
        // Keep-alive: three requests one after the other on one connection.
        let seq = [req("GET", "/"), req("GET", "/shop/items/1/"), req("GET", "/nope")];
        let mut reader = std::io::BufReader::new(t.connect(port));
        for r in seq {
            std::io::Write::write_all(reader.get_mut(), &r.bytes()).unwrap();
            let resp = read_response(&mut reader, false);
            done.push((r, resp));
        }
        // Pipelined: four requests in one write, answered in order.
        let pipe = [
            req("GET", "/thing/"),
            req("HEAD", "/plain"),
            req("POST", "/upload").body(Body::Length(64)),
            req("GET", "/shop/items/7/"),
        ];
        let bytes: Vec<u8> = pipe.iter().flat_map(Req::bytes).collect();
        let heads: Vec<bool> = pipe.iter().map(|r| r.method == "HEAD").collect();
        let resps = raw_exchange_over(t, port, &bytes, &heads);
        done.extend(pipe.into_iter().zip(resps));
    }
    done
}

fn key(pairs: &[(&str, &str)]) -> String {
    let mut p: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    p.sort();
    p.join(",")
}

fn count(map: &mut BTreeMap<String, f64>, pairs: &[(&str, &str)]) {
    *map.entry(key(pairs)).or_insert(0.0) += 1.0;
}

/// Cumulative bucket counts of a PowersOf(2, 30) histogram for these observations.
fn body_buckets(values: &[u64]) -> BTreeMap<u64, f64> {
    let mut bounds: Vec<u64> = vec![0];
    bounds.extend((0..30).map(|i| 1u64 << i));
    bounds.into_iter().map(|b| (b, values.iter().filter(|&&v| v <= b).count() as f64)).collect()
}

fn buckets(m: &Metrics, name: &str) -> BTreeMap<u64, f64> {
    let mut out = BTreeMap::new();
    for s in m.samples.iter().filter(|s| s.name == name) {
        let le = &s.labels["le"];
        if le != "+Inf" {
            out.insert(le.parse::<f64>().unwrap() as u64, s.value);
        }
    }
    out
}

/// Every family, exactly.
pub fn assert_metrics(m: &Metrics, done: &[(Req, Response)]) {
    assert_metrics_over(m, done, false)
}

/// [`assert_metrics`] for requests sent over TLS (`tls`) or not.
pub fn assert_metrics_over(m: &Metrics, done: &[(Req, Response)], tls: bool) {
    let ex: Vec<Expected> = done.iter().map(|(r, resp)| expected_over(r, resp, tls)).collect();
    let n = ex.len() as f64;
    let ignore = ["job", "instance"];
    assert_eq!(m.sum("django_http_requests_before_middlewares_total", &[]), n);
    assert_eq!(m.sum("django_http_responses_before_middlewares_total", &[]), n);
    assert_eq!(m.sum("django_http_requests_latency_including_middlewares_seconds_count", &[]), n);
    assert!(m.sum("django_http_requests_latency_including_middlewares_seconds_sum", &[]) > 0.0);
    assert_eq!(m.sum("django_http_requests_unknown_latency_total", &[]), 0.0);
    assert_eq!(m.sum("django_http_ajax_requests_total", &[]), ex.iter().filter(|e| e.ajax).count() as f64);
    assert_eq!(
        m.sum("django_http_responses_streaming_total", &[]),
        ex.iter().filter(|e| e.streaming).count() as f64
    );

    let mut by_method = BTreeMap::new();
    let mut by_transport = BTreeMap::new();
    let mut by_vtm = BTreeMap::new();
    let mut by_status = BTreeMap::new();
    let mut by_svm = BTreeMap::new();
    let mut by_charset = BTreeMap::new();
    let mut latency = BTreeMap::new();
    for e in &ex {
        count(&mut by_method, &[("method", &e.method)]);
        count(&mut by_transport, &[("transport", e.transport)]);
        if e.resolved {
            count(&mut by_vtm, &[("view", &e.view), ("transport", e.transport), ("method", &e.method)]);
        }
        count(&mut by_status, &[("status", &e.status)]);
        count(&mut by_svm, &[("status", &e.status), ("view", &e.view), ("method", &e.method)]);
        count(&mut by_charset, &[("charset", &e.charset)]);
        count(&mut latency, &[("view", &e.view), ("method", &e.raw_method)]);
    }
    for (family, want) in [
        ("django_http_requests_total_by_method_total", &by_method),
        ("django_http_requests_total_by_transport_total", &by_transport),
        ("django_http_requests_total_by_view_transport_method_total", &by_vtm),
        ("django_http_responses_total_by_status_total", &by_status),
        ("django_http_responses_total_by_status_view_method_total", &by_svm),
        ("django_http_responses_total_by_charset_total", &by_charset),
        ("django_http_requests_latency_seconds_by_view_method_count", &latency),
    ] {
        assert_eq!(&m.family(family, &ignore), want, "{family}");
    }

    let req_bodies: Vec<u64> = ex.iter().map(|e| e.request_body).collect();
    assert_eq!(m.sum("django_http_requests_body_total_bytes_count", &[]), n);
    assert_eq!(
        m.sum("django_http_requests_body_total_bytes_sum", &[]),
        req_bodies.iter().sum::<u64>() as f64
    );
    assert_eq!(buckets(m, "django_http_requests_body_total_bytes_bucket"), body_buckets(&req_bodies));
    let resp_bodies: Vec<u64> = ex.iter().filter_map(|e| e.response).collect();
    assert_eq!(m.sum("django_http_responses_body_total_bytes_count", &[]), resp_bodies.len() as f64);
    assert_eq!(
        m.sum("django_http_responses_body_total_bytes_sum", &[]),
        resp_bodies.iter().sum::<u64>() as f64
    );
    assert_eq!(buckets(m, "django_http_responses_body_total_bytes_bucket"), body_buckets(&resp_bodies));

    // Every series carries the target labels.
    for s in m.samples.iter().filter(|s| s.name.starts_with("django_http_")) {
        assert_eq!(s.labels.get("job").map(String::as_str), Some("django"), "{s:?}");
        assert!(s.labels.contains_key("instance"), "{s:?}");
    }
}
