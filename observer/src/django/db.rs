//! django-prometheus's database families (sections A.5, A.7, A.8), one set per target.
//!
//! What the wire becomes (README "Metrics" table):
//! - exact: new connections and connection errors (each connection attempt: a startup
//!   message, or a connect that failed; its outcome), executes (a Query, or an Execute of
//!   the extended protocol; psycopg's own BEGIN/COMMIT/ROLLBACK are not cursor executes),
//!   executemany parameter sets, errors by psycopg exception class, the count of query
//!   durations (one per execute()/executemany() call);
//! - derived: the duration itself (first byte of the statement written to its
//!   ReadyForQuery read), model counters (from INSERT/UPDATE/DELETE statements, see
//!   [`ModelMetrics`]), migrations (the app's own interpreter runs the same computation
//!   as django-prometheus, at start and on an interval).

use std::collections::{HashMap, HashSet};

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

use super::{LATENCY_BUCKETS, counter_vec};
use crate::protocol::postgres::sql::WriteOp;

/// `DatabaseWrapper.vendor` of Django's PostgreSQL (and PostGIS) backends.
pub const POSTGRESQL: &str = "postgresql";
/// django-prometheus's `vendor` for SQLite (Django's `DatabaseWrapper.vendor`).
pub const SQLITE: &str = "sqlite";

/// What one statement unit (one execute() or executemany() call) contributes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DbObservation<'a> {
    pub alias: &'a str,
    pub vendor: &'a str,
    /// Statements: 1 for execute(), the parameter sets for executemany().
    pub executes: u64,
    pub many: bool,
    /// The driver's exception class, when it failed.
    pub error_type: Option<&'a str>,
    pub seconds: f64,
}

pub struct DbMetrics {
    new_connections: IntCounterVec,
    new_connection_errors: IntCounterVec,
    execute: IntCounterVec,
    execute_many: IntCounterVec,
    errors: IntCounterVec,
    duration: HistogramVec,
}

impl DbMetrics {
    pub fn new(r: &Registry) -> prometheus::Result<Self> {
        let l = &["alias", "vendor"];
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "django_db_query_duration_seconds",
                "Histogram of query duration by database and vendor.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            l,
        )?;
        r.register(Box::new(duration.clone()))?;
        Ok(Self {
            new_connections: counter_vec(
                r,
                "django_db_new_connections_total",
                "Counter of created connections by database and by vendor.",
                l,
            )?,
            new_connection_errors: counter_vec(
                r,
                "django_db_new_connection_errors_total",
                "Counter of connection failures by database and by vendor.",
                l,
            )?,
            execute: counter_vec(
                r,
                "django_db_execute_total",
                "Counter of executed statements by database and by vendor, including bulk executions.",
                l,
            )?,
            execute_many: counter_vec(
                r,
                "django_db_execute_many_total",
                "Counter of executed statements in bulk operations by database and by vendor.",
                l,
            )?,
            errors: counter_vec(
                r,
                "django_db_errors_total",
                "Counter of execution errors by database, vendor and exception type.",
                &["alias", "vendor", "type"],
            )?,
            duration,
        })
    }

    /// A connection attempt (django-prometheus counts it before connecting).
    pub fn attempt(&self, alias: &str, vendor: &str) {
        self.new_connections.with_label_values(&[alias, vendor]).inc();
    }

    pub fn attempt_failed(&self, alias: &str, vendor: &str) {
        self.new_connection_errors.with_label_values(&[alias, vendor]).inc();
    }

    pub fn observe(&self, o: &DbObservation<'_>) {
        let l = [o.alias, o.vendor];
        self.execute.with_label_values(&l).inc_by(o.executes);
        if o.many {
            self.execute_many.with_label_values(&l).inc_by(o.executes);
        }
        if let Some(t) = o.error_type {
            self.errors.with_label_values(&[o.alias, o.vendor, t]).inc();
        }
        self.duration.with_label_values(&l).observe(o.seconds);
    }
}

/// Which model a table's writes count for.
///
/// django-prometheus counts `save()`/`create()`/instance `delete()` of models that use
/// its mixin, by the name given to the mixin. Here every INSERT, UPDATE and DELETE
/// statement on a model's table counts for its model: the same numbers for those calls
/// (including a failed insert, and the update-then-insert fallback of `save()`), and
/// more for what django-prometheus does not see (`bulk_create` and `QuerySet.update()`
/// count one per statement, `QuerySet.delete()` and cascades one per table, raw SQL).
#[derive(Debug, Clone, Default)]
pub struct ModelMap {
    /// Table -> label, from the app's model registry (the mixin's name, else
    /// `_meta.model_name`). Empty when discovery did not run: then `<app>_<model>`.
    tables: HashMap<String, String>,
    /// Labels django-prometheus creates at 0 (models with its mixin, or the allowlist).
    precreate: Vec<String>,
    known: bool,
    allow: Option<HashSet<String>>,
}

impl ModelMap {
    /// From discovery's (table, model_name, mixin name) triples.
    pub fn new<'a>(
        models: impl IntoIterator<Item = (&'a str, &'a str, Option<&'a str>)>,
        allow: Option<&[String]>,
    ) -> Self {
        let mut tables = HashMap::new();
        let mut precreate = Vec::new();
        let mut known = false;
        for (table, model, mixin) in models {
            known = true;
            let label = mixin.unwrap_or(model).to_string();
            if mixin.is_some() {
                precreate.push(label.clone());
            }
            tables.insert(table.to_string(), label);
        }
        let allow: Option<HashSet<String>> = allow.map(|a| a.iter().cloned().collect());
        if let Some(a) = &allow {
            precreate = a.iter().cloned().collect();
            precreate.sort();
        }
        Self { tables, precreate, known, allow }
    }

    /// No discovery: only the `<app>_<model>` rule and the allowlist.
    pub fn by_rule(allow: Option<&[String]>) -> Self {
        Self::new(std::iter::empty(), allow)
    }

    pub fn label(&self, table: &str) -> Option<String> {
        let label = if self.known {
            self.tables.get(table).cloned()?
        } else {
            // Django's default db_table: "<app_label>_<model_name>".
            let (_, model) = table.split_once('_')?;
            if model.is_empty() || table == "django_migrations" {
                return None;
            }
            model.to_string()
        };
        match &self.allow {
            Some(a) if !a.contains(&label) => None,
            _ => Some(label),
        }
    }

    pub fn precreate(&self) -> &[String] {
        &self.precreate
    }
}

pub struct ModelMetrics {
    inserts: IntCounterVec,
    updates: IntCounterVec,
    deletes: IntCounterVec,
    labels: HashSet<String>,
    max: usize,
    /// Labels refused because `max` was reached.
    pub overflowed: u64,
}

impl ModelMetrics {
    pub fn new(r: &Registry, max: usize) -> prometheus::Result<Self> {
        let l = &["model"];
        Ok(Self {
            inserts: counter_vec(
                r,
                "django_model_inserts_total",
                "Number of insert operations by model.",
                l,
            )?,
            updates: counter_vec(
                r,
                "django_model_updates_total",
                "Number of update operations by model.",
                l,
            )?,
            deletes: counter_vec(
                r,
                "django_model_deletes_total",
                "Number of delete operations by model.",
                l,
            )?,
            labels: HashSet::new(),
            max,
            overflowed: 0,
        })
    }

    fn admit(&mut self, label: &str) -> bool {
        if self.labels.contains(label) {
            return true;
        }
        if self.labels.len() >= self.max {
            self.overflowed += 1;
            return false;
        }
        self.labels.insert(label.to_string());
        true
    }

    /// Creates the model's three series at 0, as django-prometheus's mixin does.
    pub fn precreate(&mut self, label: &str) {
        if self.admit(label) {
            for c in [&self.inserts, &self.updates, &self.deletes] {
                c.with_label_values(&[label]);
            }
        }
    }

    pub fn count(&mut self, op: WriteOp, label: &str, n: u64) {
        if !self.admit(label) {
            return;
        }
        let c = match op {
            WriteOp::Insert => &self.inserts,
            WriteOp::Update => &self.updates,
            WriteOp::Delete => &self.deletes,
        };
        c.with_label_values(&[label]).inc_by(n);
    }
}

/// The most DATABASES aliases one app's migration gauges keep. The aliases come from the
/// app's own settings through a helper that runs the app's code, so they are bounded
/// like any other label: beyond this, new aliases are counted, not exported.
pub const MAX_MIGRATION_ALIASES: usize = 64;

pub struct MigrationMetrics {
    applied: IntGaugeVec,
    unapplied: IntGaugeVec,
    aliases: std::collections::BTreeSet<String>,
    /// Aliases refused for [`MAX_MIGRATION_ALIASES`] (`observer_label_overflow_total{label="connection"}`).
    pub overflowed: u64,
}

impl MigrationMetrics {
    pub fn new(r: &Registry) -> prometheus::Result<Self> {
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGaugeVec> {
            let g = IntGaugeVec::new(Opts::new(name, help), &["connection"])?;
            r.register(Box::new(g.clone()))?;
            Ok(g)
        };
        Ok(Self {
            unapplied: gauge(
                "django_migrations_unapplied_total",
                "Count of unapplied migrations by database connection",
            )?,
            applied: gauge(
                "django_migrations_applied_total",
                "Count of applied migrations by database connection",
            )?,
            aliases: Default::default(),
            overflowed: 0,
        })
    }

    pub fn set(&mut self, alias: &str, applied: u64, unapplied: u64) {
        if !self.aliases.contains(alias) {
            if self.aliases.len() >= MAX_MIGRATION_ALIASES {
                self.overflowed += 1;
                return;
            }
            self.aliases.insert(alias.to_owned());
        }
        self.applied.with_label_values(&[alias]).set(i64::try_from(applied).unwrap_or(i64::MAX));
        self.unapplied.with_label_values(&[alias]).set(i64::try_from(unapplied).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::django::expo;

    fn text(r: &Registry) -> String {
        expo::encode_text(&r.gather())
    }

    #[test]
    fn executemany_counts_parameter_sets_in_both_counters_and_one_duration() {
        let r = Registry::new();
        let m = DbMetrics::new(&r).unwrap();
        m.attempt("default", POSTGRESQL);
        let o = DbObservation {
            alias: "default",
            vendor: POSTGRESQL,
            executes: 4,
            many: true,
            error_type: None,
            seconds: 0.003,
        };
        m.observe(&o);
        m.observe(&DbObservation { executes: 1, many: false, error_type: Some("UniqueViolation"), ..o });
        let t = text(&r);
        assert!(
            t.contains("django_db_new_connections_total{alias=\"default\",vendor=\"postgresql\"} 1"),
            "{t}"
        );
        assert!(t.contains("django_db_execute_total{alias=\"default\",vendor=\"postgresql\"} 5"), "{t}");
        assert!(t.contains("django_db_execute_many_total{alias=\"default\",vendor=\"postgresql\"} 4"), "{t}");
        assert!(
            t.contains("django_db_query_duration_seconds_count{alias=\"default\",vendor=\"postgresql\"} 2")
        );
        assert!(t.contains(
            "django_db_query_duration_seconds_bucket{alias=\"default\",vendor=\"postgresql\",le=\"0.01\"} 2"
        ));
        assert!(t.contains(
            "django_db_errors_total{alias=\"default\",type=\"UniqueViolation\",vendor=\"postgresql\"} 1"
        ));
        assert!(!t.contains("django_db_new_connection_errors_total{"), "no child until the first error");
    }

    #[test]
    fn model_labels_from_the_registry_the_rule_and_the_allowlist() {
        let m = ModelMap::new([("shop_item", "item", None), ("shop_dog", "dog", Some("doggo"))], None);
        assert_eq!(m.label("shop_item").as_deref(), Some("item"));
        assert_eq!(m.label("shop_dog").as_deref(), Some("doggo"));
        assert_eq!(m.label("django_migrations"), None);
        assert_eq!(m.precreate(), ["doggo".to_string()]);
        let rule = ModelMap::by_rule(None);
        assert_eq!(rule.label("shop_item").as_deref(), Some("item"));
        assert_eq!(rule.label("auth_user_groups").as_deref(), Some("user_groups"));
        assert_eq!(rule.label("django_migrations"), None);
        assert_eq!(rule.label("plain"), None);
        let allow = ["item".to_string()];
        let only = ModelMap::new([("shop_item", "item", None), ("shop_dog", "dog", None)], Some(&allow));
        assert_eq!(only.label("shop_item").as_deref(), Some("item"));
        assert_eq!(only.label("shop_dog"), None);
        assert_eq!(only.precreate(), ["item".to_string()]);
    }

    #[test]
    fn model_counters_precreate_and_cap() {
        let r = Registry::new();
        let mut m = ModelMetrics::new(&r, 2).unwrap();
        m.precreate("item");
        m.count(WriteOp::Insert, "item", 2);
        m.count(WriteOp::Delete, "dog", 1);
        m.count(WriteOp::Update, "cat", 1);
        let t = text(&r);
        assert!(t.contains("django_model_inserts_total{model=\"item\"} 2"), "{t}");
        assert!(t.contains("django_model_updates_total{model=\"item\"} 0"), "{t}");
        assert!(t.contains("django_model_deletes_total{model=\"dog\"} 1"), "{t}");
        assert!(!t.contains("cat"));
        assert_eq!(m.overflowed, 1);
    }

    #[test]
    fn migration_gauges() {
        let r = Registry::new();
        let mut m = MigrationMetrics::new(&r).unwrap();
        m.set("default", 19, 1);
        let t = text(&r);
        assert!(t.contains("# TYPE django_migrations_applied_total gauge"), "{t}");
        assert!(t.contains("django_migrations_applied_total{connection=\"default\"} 19"), "{t}");
        assert!(t.contains("django_migrations_unapplied_total{connection=\"default\"} 1"), "{t}");
    }

    #[test]
    fn migration_aliases_are_bounded_and_known_ones_still_update() {
        let r = Registry::new();
        let mut m = MigrationMetrics::new(&r).unwrap();
        for i in 0..MAX_MIGRATION_ALIASES + 10 {
            m.set(&format!("db{i}"), 1, 0);
        }
        assert_eq!(m.overflowed, 10);
        m.set("db0", 7, 2);
        assert_eq!(m.overflowed, 10);
        let t = text(&r);
        assert_eq!(t.matches("django_migrations_applied_total{").count(), MAX_MIGRATION_ALIASES, "{t}");
        assert!(t.contains("django_migrations_applied_total{connection=\"db0\"} 7"), "{t}");
    }
}
