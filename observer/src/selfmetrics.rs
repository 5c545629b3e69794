//! The agent's own `observer_*` metrics: what it saw, what it lost and why, what it
//! traces, and its own CPU and memory. Built from snapshots at scrape time.

use std::collections::BTreeMap;

use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};

use crate::loss::LossReport;

/// Everything the agent reports about itself.
#[derive(Debug, Clone, Default)]
pub struct SelfStats {
    pub loss: LossReport,
    /// (protocol, reason) -> count
    pub parse_errors: BTreeMap<(&'static str, &'static str), u64>,
    /// Connections recognised as not HTTP/1 (and ignored).
    pub not_http_connections: u64,
    /// Request/response pairs turned into metrics.
    pub http_exchanges: u64,
    /// Exchanges dropped while a target's routes were being discovered (backlog full).
    pub backlog_dropped: u64,
    /// Data records of connections no target owns (e.g. right after a process exits).
    pub unattributed_records: u64,
    /// protocol -> parse steps that panicked (a bug, contained: that connection's
    /// parsing stops, or that backlogged event is dropped; the agent goes on).
    pub parser_faults: BTreeMap<&'static str, u64>,
    /// reason -> gaps in connections' record sequences (see `stream`).
    pub stream_gaps: BTreeMap<&'static str, u64>,
    /// Apps whose metric families could not be registered (their events are dropped).
    pub registration_errors: u64,
    /// Exchanges, statements and lookups dropped because their app has no families.
    pub unregistered_events: u64,
    /// Data records of new connections refused parser state (`--max-parsers` reached).
    pub parsers_full: u64,
    /// Data records dropped because their connection's parser had failed (the one it
    /// failed on included).
    pub records_lost_parser_fault: u64,
    pub connections: usize,
    pub parser_states: usize,
    pub processes: usize,
    pub targets: usize,
    pub route_discovery_ok: u64,
    pub route_discovery_failed: u64,
    /// label -> values dropped to `<other>`
    pub label_overflow: BTreeMap<&'static str, u64>,
    /// Database statement units turned into django_db_* metrics.
    pub db_statements: u64,
    /// Database connections that switched to TLS/GSS encryption (counted, not parsed).
    pub db_encrypted: u64,
    /// Failed connects released early from the encryption-retry hold (bound reached).
    pub held_failures_released: u64,
    /// TLS connections and ciphertext (`stream::tls`).
    pub tls: crate::stream::tls::TlsStats,
    /// Client connections recognised as no database or cache protocol (and ignored).
    pub not_db_connections: u64,
    /// What the SQLite calls could not be followed in (`protocol::sqlite`).
    pub sqlite: crate::protocol::sqlite::SqliteStats,
    /// SQLite statements and connections on files that are none of the app's DATABASES.
    pub sqlite_other_files: u64,
    /// Pods of this node known from the Kubernetes API (`--kubernetes`).
    pub kubernetes_pods: usize,
    /// Cache lookups turned into django_cache_get_* samples.
    pub cache_gets: u64,
    /// One-key lookups on Redis/memcached connections that are no lookup of the app's
    /// caches (another server, another key shape: Celery, sessions of another app).
    pub cache_gets_ignored: u64,
    pub migrations_ok: u64,
    pub migrations_failed: u64,
    /// kind (db, cache) -> statements and lookups attributed to a counted request.
    pub profile_attributed: BTreeMap<&'static str, u64>,
    /// (kind, reason) -> statements and lookups no request could be given.
    pub profile_unattributed: BTreeMap<(&'static str, &'static str), u64>,
}

fn pairs(labels: &[(&str, &str)]) -> Vec<LabelPair> {
    labels
        .iter()
        .map(|(k, v)| {
            let mut p = LabelPair::default();
            p.set_name(k.to_string());
            p.set_value(v.to_string());
            p
        })
        .collect()
}

/// Label pairs and a value.
type Samples<'a> = Vec<(Vec<(&'a str, &'a str)>, f64)>;

fn family(name: &str, help: &str, kind: MetricType, samples: Samples<'_>) -> MetricFamily {
    let mut mf = MetricFamily::default();
    mf.set_name(name.to_string());
    mf.set_help(help.to_string());
    mf.set_field_type(kind);
    let metrics = samples
        .into_iter()
        .map(|(labels, v)| {
            let mut m = Metric::default();
            m.set_label(pairs(&labels));
            if kind == MetricType::COUNTER {
                let mut c = Counter::default();
                c.set_value(v);
                m.set_counter(c);
            } else {
                let mut g = Gauge::default();
                g.set_value(v);
                m.set_gauge(g);
            }
            m
        })
        .collect();
    mf.set_metric(metrics);
    mf
}

fn counter(name: &str, help: &str, v: u64) -> MetricFamily {
    family(name, help, MetricType::COUNTER, vec![(vec![], v as f64)])
}

fn gauge(name: &str, help: &str, v: f64) -> MetricFamily {
    family(name, help, MetricType::GAUGE, vec![(vec![], v)])
}

/// Help text of the loss report's counters, by family name.
fn loss_help(name: &str) -> &'static str {
    match name {
        "observer_records_lost_total" => "Data records lost before parsing, by reason.",
        "observer_control_records_lost_total" => "Connection and process records lost, by reason.",
        "observer_bytes_lost_total" => "Bytes moved by data records that were lost, by reason.",
        "observer_capture_truncated_total" => {
            "Data records whose capture is shorter than what the syscall moved."
        }
        "observer_user_memory_faults_total" => "Reads of traced processes' memory that faulted.",
        "observer_table_full_total" => "Entries not added because a bounded table was full, by table.",
        "observer_unknown_connection_records_total" => {
            "Data records of connections whose opening was not seen."
        }
        "observer_records_total" => "Data records received from the kernel.",
        "observer_captured_bytes_total" => "Payload bytes captured by the kernel programs.",
        "observer_data_bytes_total" => "Bytes moved by the data syscalls recorded (captured or not).",
        "observer_connections_opened_total" => "Connections seen being opened (accepted or connected).",
        "observer_peek_skipped_total" => "MSG_PEEK reads skipped (their bytes are read again).",
        "observer_tls_records_total" => "TLS plaintext records read from the apps' OpenSSL (uprobes).",
        "observer_uprobe_libraries_attached_total" => {
            "Library files that got uprobes (a tracked process maps them)."
        }
        "observer_uprobe_libraries_detached_total" => {
            "Library files whose uprobes were removed (no tracked process maps them any more)."
        }
        "observer_uprobe_attach_errors_total" => {
            "Library files whose uprobes could not be set (their TLS stays opaque)."
        }
        "observer_uprobe_libraries_without_symbols_total" => {
            "Files named like a probed library without the functions the probes need (stripped or another implementation)."
        }
        _ => "observer counter.",
    }
}

/// The agent's own CPU seconds and resident bytes, from /proc/self.
fn own_usage() -> (f64, f64) {
    let ticks = {
        // SAFETY: sysconf has no memory-safety preconditions.
        let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if t > 0 { t as f64 } else { 100.0 }
    };
    let page = {
        // SAFETY: as above.
        let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if p > 0 { p as f64 } else { 4096.0 }
    };
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the parenthesised comm: utime is the 14th field, stime the 15th.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / ticks)
        })
        .unwrap_or(0.0);
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |p| p * page);
    (cpu, rss)
}

impl SelfStats {
    pub fn families(&self) -> Vec<MetricFamily> {
        let mut out = Vec::new();
        let mut by_name: BTreeMap<&'static str, Samples<'_>> = BTreeMap::new();
        for c in &self.loss.counters {
            by_name.entry(c.name).or_default().push((c.labels.clone(), c.value as f64));
        }
        by_name
            .entry("observer_records_lost_total")
            .or_default()
            .push((vec![("reason", "parser_fault")], self.records_lost_parser_fault as f64));
        let full = by_name.entry("observer_table_full_total").or_default();
        full.push((vec![("table", "parsers")], self.parsers_full as f64));
        full.push((vec![("table", "sqlite_connections")], self.sqlite.connections_full as f64));
        full.push((vec![("table", "sqlite_statements")], self.sqlite.statements_full as f64));
        for (name, samples) in by_name {
            out.push(family(name, loss_help(name), MetricType::COUNTER, samples));
        }
        // Only programs that ran while statistics were on: nothing to show otherwise.
        let ran: Vec<_> = self.loss.programs.iter().filter(|(_, p)| p.run_cnt > 0).collect();
        if !ran.is_empty() {
            out.push(family(
                "observer_bpf_program_runs_total",
                "Runs of each kernel program while BPF statistics were on (--bpf-stats or kernel.bpf_stats_enabled=1).",
                MetricType::COUNTER,
                ran.iter().map(|(n, p)| (vec![("program", n.as_str())], p.run_cnt as f64)).collect(),
            ));
            out.push(family(
                "observer_bpf_program_run_seconds_total",
                "Kernel time spent in each kernel program while BPF statistics were on.",
                MetricType::COUNTER,
                ran.iter()
                    .map(|(n, p)| (vec![("program", n.as_str())], p.run_time_ns as f64 / 1e9))
                    .collect(),
            ));
        }
        out.push(family(
            "observer_parse_errors_total",
            "Bytes a protocol parser could not follow, by protocol and reason (each followed by a resync).",
            MetricType::COUNTER,
            self.parse_errors
                .iter()
                .map(|((p, r), v)| (vec![("protocol", *p), ("reason", *r)], *v as f64))
                .collect(),
        ));
        out.push(family(
            "observer_parser_faults_total",
            "Parse steps that failed on a bug, contained, by protocol: the connection's records are dropped from then on (observer_records_lost_total{reason=\"parser_fault\"}), or the one event.",
            MetricType::COUNTER,
            self.parser_faults.iter().map(|(p, v)| (vec![("protocol", *p)], *v as f64)).collect(),
        ));
        out.push(family(
            "observer_stream_gaps_total",
            "Gaps in traced connections' record sequences, whatever their protocol, by reason: records lost before one, or one arriving after a later one (the parser resynchronises at both).",
            MetricType::COUNTER,
            self.stream_gaps.iter().map(|(r, v)| (vec![("reason", *r)], *v as f64)).collect(),
        ));
        out.push(family(
            "observer_profile_attributed_total",
            "Database statements and cache lookups attributed to the request (and view) they were made for, by kind.",
            MetricType::COUNTER,
            self.profile_attributed.iter().map(|(k, v)| (vec![("kind", *k)], *v as f64)).collect(),
        ));
        out.push(family(
            "observer_profile_unattributed_total",
            "Database statements and cache lookups no request could be given, by kind and reason (no_request, concurrent, unfinished, overflow).",
            MetricType::COUNTER,
            self.profile_unattributed
                .iter()
                .map(|((k, r), v)| (vec![("kind", *k), ("reason", *r)], *v as f64))
                .collect(),
        ));
        out.push(counter(
            "observer_not_http_connections_total",
            "Server connections recognised as not HTTP/1 and ignored.",
            self.not_http_connections,
        ));
        out.push(counter(
            "observer_http_exchanges_total",
            "HTTP request/response pairs turned into django_http_* metrics.",
            self.http_exchanges,
        ));
        out.push(counter(
            "observer_discovery_backlog_dropped_total",
            "Exchanges, database and cache events dropped while their app was being discovered.",
            self.backlog_dropped,
        ));
        out.push(counter(
            "observer_db_statements_total",
            "Database statement units (an execute() or executemany()) turned into django_db_* metrics.",
            self.db_statements,
        ));
        out.push(counter(
            "observer_tls_ciphertext_bytes_total",
            "Bytes of TLS records on traced sockets: counted, never parsed (the plaintext comes from the app's OpenSSL when it is probed).",
            self.tls.ciphertext_bytes,
        ));
        out.push(family(
            "observer_tls_connections_total",
            "TLS connections closed, by whether their plaintext was seen (decrypted) or not (opaque: each app's observer_tls_opaque_connections_total says which and why).",
            MetricType::COUNTER,
            vec![
                (vec![("plaintext", "decrypted")], self.tls.decrypted as f64),
                (vec![("plaintext", "opaque")], self.tls.opaque as f64),
            ],
        ));
        out.push(family(
            "observer_db_encrypted_connections_total",
            "Database connections that switched to TLS or GSS encryption (TLS ones are parsed from the app's OpenSSL plaintext when it is probed; GSS ones are counted as connections, not parsed).",
            MetricType::COUNTER,
            vec![(vec![("vendor", "postgresql")], self.db_encrypted as f64)],
        ));
        out.push(counter(
            "observer_db_held_failures_released_total",
            "Failed PostgreSQL connects released before libpq's encryption retry could follow (--max-held-connect-failures held at once): a retry of one counts as a second attempt.",
            self.held_failures_released,
        ));
        let lite = &self.sqlite;
        out.push(counter(
            "observer_sqlite_calls_total",
            "Calls into the apps' SQLite libraries followed (uprobes: open, prepare, bind, changes, last_insert_rowid, errcode, finalize, close).",
            lite.calls,
        ));
        out.push(family(
            "observer_sqlite_executes_total",
            "SQLite executes that needed a guess or were left out: unknown_statement (prepared before tracing: counted, no shape), connect_statement (Django's own connect-time PRAGMAs: not counted, as by django-prometheus), unmatched_end (its start was lost: not counted), abandoned (Python raised before its step: counted as ProgrammingError), other_file (a file that is none of the app's DATABASES: not counted).",
            MetricType::COUNTER,
            vec![
                (vec![("kind", "unknown_statement")], lite.unknown_statements as f64),
                (vec![("kind", "connect_statement")], lite.connect_statements as f64),
                (vec![("kind", "unmatched_end")], lite.unmatched_ends as f64),
                (vec![("kind", "abandoned")], lite.abandoned as f64),
                (vec![("kind", "other_file")], self.sqlite_other_files as f64),
            ],
        ));
        out.push(counter(
            "observer_not_db_connections_total",
            "Client connections recognised as no database or cache protocol and ignored.",
            self.not_db_connections,
        ));
        out.push(counter(
            "observer_cache_gets_total",
            "Cache lookups (a Redis GET, a memcached get of one key) turned into django_cache_get_* metrics.",
            self.cache_gets,
        ));
        out.push(counter(
            "observer_cache_gets_ignored_total",
            "One-key lookups that are not of the app's caches (another server or key shape) and were not counted.",
            self.cache_gets_ignored,
        ));
        out.push(family(
            "observer_migrations_checks_total",
            "Migration counts read from running apps (per app and database alias), by result.",
            MetricType::COUNTER,
            vec![
                (vec![("result", "success")], self.migrations_ok as f64),
                (vec![("result", "failure")], self.migrations_failed as f64),
            ],
        ));
        out.push(counter(
            "observer_registration_errors_total",
            "Apps whose metric families could not be registered: their events are dropped (observer_unregistered_events_total).",
            self.registration_errors,
        ));
        out.push(counter(
            "observer_unregistered_events_total",
            "Exchanges, database and cache events dropped because their app's families could not be registered.",
            self.unregistered_events,
        ));
        out.push(counter(
            "observer_unattributed_records_total",
            "Data records of processes that belong to no traced app.",
            self.unattributed_records,
        ));
        out.push(family(
            "observer_route_discovery_total",
            "Route discoveries from running apps, by result.",
            MetricType::COUNTER,
            vec![
                (vec![("result", "success")], self.route_discovery_ok as f64),
                (vec![("result", "failure")], self.route_discovery_failed as f64),
            ],
        ));
        out.push(family(
            "observer_label_overflow_total",
            "Label values replaced by <other> (or series not created) because a cardinality bound was reached, by label.",
            MetricType::COUNTER,
            self.label_overflow.iter().map(|(l, v)| (vec![("label", *l)], *v as f64)).collect(),
        ));
        out.push(gauge("observer_connections", "Connections traced now.", self.connections as f64));
        out.push(gauge(
            "observer_parser_states",
            "Connections with protocol parser state now.",
            self.parser_states as f64,
        ));
        out.push(gauge("observer_processes", "Processes traced now.", self.processes as f64));
        out.push(gauge("observer_targets", "Django apps (targets) traced now.", self.targets as f64));
        out.push(gauge(
            "observer_kubernetes_pods",
            "Pods of this node known from the Kubernetes API (--kubernetes; 0 otherwise).",
            self.kubernetes_pods as f64,
        ));
        let (cpu, rss) = own_usage();
        out.push(family(
            "observer_process_cpu_seconds_total",
            "CPU time the observer itself used (user and system).",
            MetricType::COUNTER,
            vec![(vec![], cpu)],
        ));
        out.push(gauge("observer_process_resident_memory_bytes", "The observer's resident memory.", rss));
        out.push(family(
            "observer_build_info",
            "The observer's version.",
            MetricType::GAUGE,
            vec![(vec![("version", env!("CARGO_PKG_VERSION"))], 1.0)],
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{django::expo, ebpf::ProgramStats, loss::UserCounters};

    #[test]
    fn every_family_is_exposed_with_its_labels() {
        let mut s = SelfStats {
            loss: LossReport::from_parts(&[0; 11], 0, &UserCounters::default()),
            ..Default::default()
        };
        s.parse_errors.insert(("http", "invalid_head"), 2);
        s.loss.programs.insert(
            "sys_exit_read".into(),
            ProgramStats { run_cnt: 4, run_time_ns: 2_000, recursion_misses: 0 },
        );
        s.loss.programs.insert("sys_enter_read".into(), ProgramStats::default());
        s.label_overflow.insert("view", 5);
        s.stream_gaps.insert("out_of_order", 3);
        let t = expo::encode_text(&s.families());
        let v: BTreeMap<String, f64> =
            expo::parse_text(&t).into_iter().map(|x| (x.series(), x.value)).collect();
        assert_eq!(v[r#"observer_parse_errors_total{protocol="http",reason="invalid_head"}"#], 2.0);
        assert_eq!(v[r#"observer_label_overflow_total{label="view"}"#], 5.0);
        assert_eq!(v[r#"observer_stream_gaps_total{reason="out_of_order"}"#], 3.0);
        assert_eq!(v[r#"observer_records_lost_total{reason="ring_buffer_full"}"#], 0.0);
        assert!(v["observer_process_resident_memory_bytes"] > 0.0);
        assert!(t.contains("# TYPE observer_table_full_total counter"));
        assert_eq!(v[r#"observer_bpf_program_runs_total{program="sys_exit_read"}"#], 4.0);
        assert_eq!(v[r#"observer_bpf_program_run_seconds_total{program="sys_exit_read"}"#], 2e-6);
        // A program that never ran with statistics on is not listed.
        assert!(!t.contains(r#"program="sys_enter_read""#));
    }
}
