//! Per-view families django-prometheus cannot have (it does not know which view issued a
//! query). Named `django_view_*`, a prefix django-prometheus does not use, with the same
//! `view` label values as its `*_by_view_*` families. Statement text or shapes never
//! become label values.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Registry};

use super::Profile;
use crate::django::{counter_vec, http::sanitize_method};

/// Statements (or cache gets) per request: small integers.
pub const COUNT_BUCKETS: [f64; 12] = [0.0, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];
/// Database time per request, seconds.
pub const DB_SECONDS_BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Share of a request's latency spent waiting for the database.
pub const SHARE_BUCKETS: [f64; 9] = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9, 1.0];

pub struct ViewProfileMetrics {
    statements: HistogramVec,
    db_seconds: HistogramVec,
    db_share: HistogramVec,
    cache_gets: HistogramVec,
    cache_hits: IntCounterVec,
    cache_misses: IntCounterVec,
    n_plus_one: IntCounterVec,
}

/// One counted request's profile, as the families take it.
pub struct ViewObservation<'a> {
    pub view: &'a str,
    pub method: &'a str,
    pub latency_s: f64,
    pub profile: &'a Profile,
    /// Its cache gets on the app's caches, and of those, hits and misses.
    pub cache_gets: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    /// One statement shape ran at least this many times: an N+1 suspect.
    pub n_plus_one_threshold: u32,
}

fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> prometheus::Result<HistogramVec> {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels)?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

impl ViewProfileMetrics {
    pub fn new(r: &Registry) -> prometheus::Result<Self> {
        Ok(Self {
            statements: histogram_vec(
                r,
                "django_view_db_statements_per_request",
                "Database statements executed per request, by view and method.",
                &["view", "method"],
                &COUNT_BUCKETS,
            )?,
            db_seconds: histogram_vec(
                r,
                "django_view_db_seconds_per_request",
                "Time spent waiting for the database per request, by view.",
                &["view"],
                &DB_SECONDS_BUCKETS,
            )?,
            db_share: histogram_vec(
                r,
                "django_view_db_latency_share",
                "Share of each request's latency spent waiting for the database, by view.",
                &["view"],
                &SHARE_BUCKETS,
            )?,
            cache_gets: histogram_vec(
                r,
                "django_view_cache_gets_per_request",
                "Cache gets per request, by view.",
                &["view"],
                &COUNT_BUCKETS,
            )?,
            cache_hits: counter_vec(
                r,
                "django_view_cache_get_hits_total",
                "Cache get hits, by view.",
                &["view"],
            )?,
            cache_misses: counter_vec(
                r,
                "django_view_cache_get_misses_total",
                "Cache get misses, by view.",
                &["view"],
            )?,
            n_plus_one: counter_vec(
                r,
                "django_view_n_plus_one_requests_total",
                "Requests in which one statement shape ran at least --n-plus-one-threshold times (an N+1 query suspect), by view.",
                &["view"],
            )?,
        })
    }

    pub fn observe(&self, o: &ViewObservation<'_>) {
        let p = o.profile;
        let method = sanitize_method(o.method);
        self.statements.with_label_values(&[o.view, method]).observe(f64::from(p.statements));
        self.db_seconds.with_label_values(&[o.view]).observe(p.db_seconds);
        let share = if o.latency_s > 0.0 { (p.db_seconds / o.latency_s).min(1.0) } else { 0.0 };
        self.db_share.with_label_values(&[o.view]).observe(share);
        self.cache_gets.with_label_values(&[o.view]).observe(o.cache_gets as f64);
        if o.cache_hits > 0 {
            self.cache_hits.with_label_values(&[o.view]).inc_by(o.cache_hits);
        }
        if o.cache_misses > 0 {
            self.cache_misses.with_label_values(&[o.view]).inc_by(o.cache_misses);
        }
        let n_plus_one = self.n_plus_one.with_label_values(&[o.view]);
        if o.n_plus_one_threshold > 0 && p.max_repeats() >= o.n_plus_one_threshold {
            n_plus_one.inc();
        }
    }
}
