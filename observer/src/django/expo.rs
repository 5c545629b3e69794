//! Exposition: the families of every target's registry (and the agent's own) merged into
//! one family per name, written in the Prometheus text format or, when the scraper asks
//! for it, in OpenMetrics.

use std::{collections::BTreeMap, fmt::Write as _};

use prometheus::proto::{MetricFamily, MetricType};

/// Content type of the Prometheus text format.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Content type of OpenMetrics text.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One family per name, with the samples of every registry (targets differ by their
/// const labels, so samples never collide).
pub fn merge(sets: Vec<Vec<MetricFamily>>) -> Vec<MetricFamily> {
    let mut by_name: BTreeMap<String, MetricFamily> = BTreeMap::new();
    for set in sets {
        for mut mf in set {
            match by_name.get_mut(mf.name()) {
                Some(have) if have.get_field_type() == mf.get_field_type() => {
                    let mut metrics = have.take_metric();
                    metrics.extend(mf.take_metric());
                    have.set_metric(metrics);
                }
                Some(_) => {} // same name, other type: first registration wins
                None => {
                    by_name.insert(mf.name().to_string(), mf);
                }
            }
        }
    }
    by_name.into_values().collect()
}

/// The Prometheus text format (0.0.4).
pub fn encode_text(families: &[MetricFamily]) -> String {
    encode(families, false)
}

/// OpenMetrics 1.0 text.
pub fn encode_openmetrics(families: &[MetricFamily]) -> String {
    encode(families, true)
}

/// A float as prometheus_client writes it (`floatToGoString`): Python's repr, with an
/// exponent from 1e7 on (`1.048576e+06`). Used for `le`, so that bucket label sets are
/// the ones django-prometheus exports.
pub fn go_float(v: f64) -> String {
    if v == f64::INFINITY {
        return "+Inf".into();
    }
    if v == f64::NEG_INFINITY {
        return "-Inf".into();
    }
    if v.is_nan() {
        return "NaN".into();
    }
    let s = format!("{v:?}");
    match s.find('.') {
        Some(dot) if v > 0.0 && dot > 6 && !s.contains('e') => {
            let digits = format!("{}{}", &s[1..dot], &s[dot + 1..]);
            let mantissa = format!("{}.{}", &s[..1], digits);
            let mantissa = mantissa.trim_end_matches(['0', '.']);
            format!("{mantissa}e+0{}", dot - 1)
        }
        _ => s,
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', r"\\").replace('"', "\\\"").replace('\n', r"\n")
}

fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
    format!("{{{}}}", inner.join(","))
}

/// A sample value (Python-like repr: `3.0`, `0.25`).
fn value(v: f64) -> String {
    if v.is_finite() { format!("{v:?}") } else { go_float(v) }
}

fn encode(families: &[MetricFamily], om: bool) -> String {
    let mut out = String::new();
    for mf in families.iter().filter(|mf| !mf.get_metric().is_empty()) {
        let name = mf.name();
        let kind = mf.get_field_type();
        let (family, type_name) = match kind {
            MetricType::COUNTER if om => (name.strip_suffix("_total").unwrap_or(name), "counter"),
            MetricType::COUNTER => (name, "counter"),
            MetricType::GAUGE => (name, "gauge"),
            MetricType::HISTOGRAM => (name, "histogram"),
            _ => (name, if om { "unknown" } else { "untyped" }),
        };
        let help = mf.help().replace('\\', r"\\").replace('\n', r"\n");
        let _ = writeln!(out, "# HELP {family} {help}");
        let _ = writeln!(out, "# TYPE {family} {type_name}");
        for m in mf.get_metric() {
            let base: Vec<(&str, &str)> = m.get_label().iter().map(|l| (l.name(), l.value())).collect();
            match kind {
                MetricType::COUNTER => {
                    let sample = if om { format!("{family}_total") } else { name.to_string() };
                    let _ = writeln!(out, "{sample}{} {}", labels(&base), value(m.get_counter().get_value()));
                }
                MetricType::GAUGE => {
                    let _ = writeln!(out, "{family}{} {}", labels(&base), value(m.get_gauge().get_value()));
                }
                MetricType::HISTOGRAM => {
                    let h = m.get_histogram();
                    let mut saw_inf = false;
                    for b in h.get_bucket() {
                        let le = go_float(b.upper_bound());
                        saw_inf |= b.upper_bound().is_infinite();
                        let mut l = base.clone();
                        l.push(("le", &le));
                        let _ = writeln!(
                            out,
                            "{family}_bucket{} {}",
                            labels(&l),
                            value(b.cumulative_count() as f64)
                        );
                    }
                    if !saw_inf {
                        let mut l = base.clone();
                        l.push(("le", "+Inf"));
                        let _ = writeln!(
                            out,
                            "{family}_bucket{} {}",
                            labels(&l),
                            value(h.get_sample_count() as f64)
                        );
                    }
                    let _ = writeln!(
                        out,
                        "{family}_count{} {}",
                        labels(&base),
                        value(h.get_sample_count() as f64)
                    );
                    let _ = writeln!(out, "{family}_sum{} {}", labels(&base), value(h.get_sample_sum()));
                }
                _ => {}
            }
        }
    }
    if om {
        out.push_str("# EOF\n");
    }
    out
}

/// One sample of a text exposition, labels sorted by name.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// `name{a="1",b="2"}` with labels sorted: a key independent of label order.
    pub fn series(&self) -> String {
        let l: Vec<(&str, &str)> = self.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        format!("{}{}", self.name, labels(&l))
    }
}

fn parse_value(v: &str) -> Option<f64> {
    match v {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => v.parse().ok(),
    }
}

/// Parses a Prometheus text (or OpenMetrics) exposition into samples; comment lines and
/// malformed lines are skipped. For tests and side-by-side comparisons.
pub fn parse_text(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, rest) = match line.find('{') {
            Some(open) => {
                // Find the closing brace outside quoted values.
                let mut in_quotes = false;
                let mut escaped = false;
                let mut close = None;
                for (i, c) in line[open..].char_indices() {
                    match c {
                        _ if escaped => escaped = false,
                        '\\' => escaped = true,
                        '"' => in_quotes = !in_quotes,
                        '}' if !in_quotes => {
                            close = Some(open + i);
                            break;
                        }
                        _ => {}
                    }
                }
                let Some(close) = close else { continue };
                (&line[..=close], &line[close + 1..])
            }
            None => match line.split_once(' ') {
                Some((n, r)) => (n, r),
                None => continue,
            },
        };
        let Some(value) = rest.split_whitespace().next().and_then(parse_value) else { continue };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, parse_labels(l.trim_end_matches('}'))),
            None => (series, BTreeMap::new()),
        };
        out.push(Sample { name: name.to_string(), labels, value });
    }
    out
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some(eq) = rest.find("=\"") {
        let key = rest[..eq].trim_start_matches(',').trim().to_string();
        let mut value = String::new();
        let mut chars = rest[eq + 2..].char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, o)) => value.push(o),
                    None => {}
                },
                '"' => {
                    end = Some(eq + 2 + i + 1);
                    break;
                }
                o => value.push(o),
            }
        }
        out.insert(key, value);
        match end {
            Some(e) => rest = &rest[e..],
            None => break,
        }
    }
    out
}

/// Whether an Accept header asks for OpenMetrics.
pub fn wants_openmetrics(accept: &str) -> bool {
    accept.split(',').any(|part| part.trim().starts_with("application/openmetrics-text"))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts, Registry};

    use super::*;

    fn registry(job: &str) -> Registry {
        let r =
            Registry::new_custom(None, Some(HashMap::from([("job".to_string(), job.to_string())]))).unwrap();
        let c = IntCounterVec::new(
            Opts::new("django_http_requests_total_by_method_total", "Count of requests by method."),
            &["method"],
        )
        .unwrap();
        r.register(Box::new(c.clone())).unwrap();
        c.with_label_values(&["GET"]).inc();
        let h = Histogram::with_opts(HistogramOpts::new("django_x_seconds", "h").buckets(vec![0.5, 1.0]))
            .unwrap();
        r.register(Box::new(h.clone())).unwrap();
        h.observe(0.7);
        r
    }

    fn values(text: &str) -> BTreeMap<String, f64> {
        parse_text(text).into_iter().map(|s| (s.series(), s.value)).collect()
    }

    #[test]
    fn families_of_several_targets_merge_into_one() {
        let merged = merge(vec![registry("a").gather(), registry("b").gather()]);
        let t = encode_text(&merged);
        assert_eq!(t.matches("# TYPE django_http_requests_total_by_method_total counter").count(), 1);
        let v = values(&t);
        assert_eq!(v[r#"django_http_requests_total_by_method_total{job="a",method="GET"}"#], 1.0, "{t}");
        assert_eq!(v[r#"django_http_requests_total_by_method_total{job="b",method="GET"}"#], 1.0);
    }

    #[test]
    fn openmetrics_names_counters_by_family_and_ends_with_eof() {
        let om = encode_openmetrics(&merge(vec![registry("a").gather()]));
        assert!(om.contains("# TYPE django_http_requests_total_by_method counter\n"), "{om}");
        let v = values(&om);
        assert_eq!(v[r#"django_http_requests_total_by_method_total{job="a",method="GET"}"#], 1.0, "{om}");
        assert!(om.contains(r#"le="1.0"} 1.0"#), "{om}");
        assert_eq!(v[r#"django_x_seconds_bucket{job="a",le="+Inf"}"#], 1.0);
        assert!(om.ends_with("# EOF\n"));
    }

    #[test]
    fn parse_text_handles_escapes_and_braces_in_values() {
        let s = parse_text("m{a=\"x}y\",b=\"q\\\"z\"} 2.5\n# HELP m h\nn 3\n");
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].labels["a"], "x}y");
        assert_eq!(s[0].labels["b"], "q\"z");
        assert_eq!(s[0].value, 2.5);
        assert_eq!(s[1].series(), "n");
    }

    #[test]
    fn an_empty_family_does_not_cut_the_exposition() {
        let mut empty = MetricFamily::default();
        empty.set_name("a_empty_total".into());
        empty.set_help("h".into());
        empty.set_field_type(MetricType::COUNTER);
        let mut fams = vec![empty];
        fams.extend(registry("a").gather());
        let t = encode_text(&fams);
        assert!(t.contains("django_x_seconds_count"), "{t}");
        assert!(!t.contains("a_empty_total"));
        assert!(encode_openmetrics(&fams).contains("django_x_seconds_count"));
    }

    #[test]
    fn le_is_written_as_prometheus_client_writes_it() {
        for (v, s) in [
            (0.0, "0.0"),
            (0.01, "0.01"),
            (1.0, "1.0"),
            (8192.0, "8192.0"),
            (524_288.0, "524288.0"),
            (1_048_576.0, "1.048576e+06"),
            (536_870_912.0, "5.36870912e+08"),
            (10_000_000.0, "1e+07"),
            (f64::INFINITY, "+Inf"),
        ] {
            assert_eq!(go_float(v), s, "{v}");
        }
    }

    #[test]
    fn accept_negotiation() {
        assert!(wants_openmetrics(
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        ));
        assert!(!wants_openmetrics("text/plain;version=0.0.4"));
        assert!(!wants_openmetrics("*/*"));
    }
}
