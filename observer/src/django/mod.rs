//! The django-prometheus metrics model: exact family names, types, label names, help
//! strings and buckets (shared/reference/django-metrics.md, section A), fed from what the
//! wire shows. Every name, label and bucket of the contract lives here and nowhere else.

pub mod aliases;
pub mod cache;
pub mod db;
pub mod expo;
pub mod http;

use std::collections::HashMap;

use prometheus::{IntCounterVec, Opts, Registry};

/// A counter family registered in `r` (every family of a target lives in its registry).
pub(crate) fn counter_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

/// django-prometheus's PROMETHEUS_LATENCY_BUCKETS default (the +Inf bucket is implicit).
pub const LATENCY_BUCKETS: [f64; 16] =
    [0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 25.0, 50.0, 75.0];

/// prometheus_client's `PowersOf(2, 30)`: 0, then 2^0 .. 2^29 (the +Inf bucket is implicit).
pub fn body_size_buckets() -> Vec<f64> {
    std::iter::once(0.0).chain((0..30).map(|i| f64::from(1u32 << i))).collect()
}

/// Labels every series of one target (one Django app) carries, so that one agent serves
/// many apps without clashes. Empty values are left out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TargetLabels {
    pub job: String,
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub instance: String,
}

impl TargetLabels {
    /// As const labels for a registry (non-empty ones only).
    pub fn as_map(&self) -> HashMap<String, String> {
        [
            ("job", &self.job),
            ("namespace", &self.namespace),
            ("pod", &self.pod),
            ("container", &self.container),
            ("instance", &self.instance),
        ]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_buckets_are_powers_of_two_with_zero() {
        let b = body_size_buckets();
        assert_eq!(b.len(), 31);
        assert_eq!(b[0], 0.0);
        assert_eq!(b[1], 1.0);
        assert_eq!(b[30], 536_870_912.0);
    }

    #[test]
    fn empty_target_labels_are_left_out() {
        let t = TargetLabels { job: "django".into(), instance: "h:8000".into(), ..Default::default() };
        let m = t.as_map();
        assert_eq!(m.len(), 2);
        assert_eq!(m["job"], "django");
    }
}
