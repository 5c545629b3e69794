//! Migration counts for django-prometheus's `django_migrations_applied_total` and
//! `django_migrations_unapplied_total` gauges, computed by the app's own interpreter and
//! settings the way django-prometheus's `ExportMigrations()` does.

use std::{collections::BTreeMap, time::Duration};

use serde::Deserialize;

const SCRIPT: &str = include_str!("migrations.py");
const MARKER: &str = "OBSERVER-MIGRATIONS ";

/// One alias's counts, or why they could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum AliasMigrations {
    Counts { applied: u64, unapplied: u64 },
    Failed { error: String },
}

#[derive(Debug, Deserialize)]
struct Output {
    aliases: Option<BTreeMap<String, AliasMigrations>>,
    error: Option<String>,
}

/// Counts the migrations of every DATABASES alias of the app `pid` belongs to.
pub fn count(pid: u32, timeout: Duration) -> Result<BTreeMap<String, AliasMigrations>, String> {
    let script = format!("{}\n{SCRIPT}", super::COMMON);
    parse_line(&super::run_script(pid, &script, MARKER, timeout)?)
}

fn parse_line(line: &str) -> Result<BTreeMap<String, AliasMigrations>, String> {
    let o: Output = serde_json::from_str(line).map_err(|e| format!("migrations output: {e}"))?;
    if let Some(e) = o.error {
        return Err(crate::text::printable(&e, super::MAX_ERROR));
    }
    let mut aliases = o.aliases.ok_or("empty migrations output")?;
    for m in aliases.values_mut() {
        if let AliasMigrations::Failed { error } = m {
            *error = crate::text::printable(error, super::MAX_ERROR);
        }
    }
    Ok(aliases)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_per_alias_failures() {
        let m = parse_line(
            r#"{"aliases": {"default": {"applied": 19, "unapplied": 1}, "broken": {"error": "OperationalError: refused"}}}"#,
        )
        .unwrap();
        assert_eq!(m["default"], AliasMigrations::Counts { applied: 19, unapplied: 1 });
        assert!(matches!(&m["broken"], AliasMigrations::Failed { error } if error.contains("refused")));
        assert!(parse_line(r#"{"error": "ImproperlyConfigured: x"}"#).is_err());
        // The app's exception text is logged bounded and with its controls escaped.
        let long = format!(r#"{{"aliases": {{"x": {{"error": "a\u001b[2J{}"}}}}}}"#, "é".repeat(2000));
        let AliasMigrations::Failed { error } = &parse_line(&long).unwrap()["x"] else { panic!() };
        assert!(error.starts_with("a\\u{1b}[2J") && error.len() <= super::super::MAX_ERROR, "{error}");
        let e = parse_line(&format!(r#"{{"error": "{}\n"}}"#, "x".repeat(5000))).unwrap_err();
        assert_eq!(e.len(), super::super::MAX_ERROR);
        assert!(parse_line(r#"{"aliases": {}}"#).unwrap().is_empty());
    }
}
