//! Every way a record can be lost or cut short, kernel and userspace, under the
//! `observer_*` names the agent exports (DESIGN.md, decision 3: nothing is lost silently).

use std::collections::BTreeMap;

use observer_ebpf::counter;

use crate::ebpf::{Probe, ProgramStats};

/// Counters kept by userspace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserCounters {
    /// Ring-buffer items that did not decode.
    pub decode_errors: u64,
    /// Data records whose connection userspace does not know (its open record was lost,
    /// or the connection table was full).
    pub unknown_connection_records: u64,
    /// Connections not entered in the userspace table because it was full.
    pub connection_table_full: u64,
    /// Kernel socket entries userspace could not write (table full).
    pub socket_table_full: u64,
    /// Processes userspace could not track (table full).
    pub process_table_full: u64,
    /// Kernel socket entries userspace could not write for another reason than a full
    /// table (the map refused the update).
    pub socket_table_errors: u64,
    /// Processes userspace could not track for another reason than a full table.
    pub process_table_errors: u64,
    /// Bytes moved by the data records received (their true lengths).
    pub data_bytes: u64,
    /// Connections seen being opened (accept/connect).
    pub connections_opened: u64,
    /// The uprobes' libraries (`crate::libs`).
    pub libs: crate::libs::LibStats,
}

/// One counter: metric name, labels, value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counter {
    pub name: &'static str,
    pub labels: Vec<(&'static str, &'static str)>,
    pub value: u64,
}

impl Counter {
    fn new(name: &'static str, labels: &[(&'static str, &'static str)], value: u64) -> Self {
        Self { name, labels: labels.to_vec(), value }
    }

    /// `name{a="b"}` as Prometheus writes it.
    pub fn series(&self) -> String {
        if self.labels.is_empty() {
            return self.name.to_string();
        }
        let labels: Vec<String> = self.labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        format!("{}{{{}}}", self.name, labels.join(","))
    }
}

/// A snapshot of every loss and activity counter.
#[derive(Debug, Clone, Default)]
pub struct LossReport {
    pub counters: Vec<Counter>,
    /// Each kernel program's run count and run time, by name (they move only while the
    /// kernel's BPF statistics are on: `--bpf-stats` or kernel.bpf_stats_enabled=1).
    pub programs: BTreeMap<String, ProgramStats>,
}

impl LossReport {
    pub fn collect(probe: &Probe, user: UserCounters) -> Self {
        let k = probe.counters();
        let programs = probe.program_stats();
        let misses: u64 = programs.values().map(|s| s.recursion_misses).sum();
        Self { programs, ..Self::from_parts(&k, misses, &user) }
    }

    /// Builds the report from the kernel counters (indexed by `observer_ebpf::counter`),
    /// the programs' recursion misses and the userspace counters.
    pub fn from_parts(k: &[u64], recursion_misses: u64, u: &UserCounters) -> Self {
        let kc = |i: u32| k.get(i as usize).copied().unwrap_or(0);
        let c = Counter::new;
        Self {
            counters: vec![
                c(
                    "observer_records_lost_total",
                    &[("reason", "ring_buffer_full")],
                    kc(counter::RING_FULL_DATA),
                ),
                c("observer_records_lost_total", &[("reason", "program_skipped")], recursion_misses),
                c("observer_records_lost_total", &[("reason", "undecodable")], u.decode_errors),
                c(
                    "observer_control_records_lost_total",
                    &[("reason", "ring_buffer_full")],
                    kc(counter::RING_FULL_CONTROL),
                ),
                c(
                    "observer_bytes_lost_total",
                    &[("reason", "ring_buffer_full")],
                    kc(counter::RING_FULL_DATA_BYTES),
                ),
                c("observer_capture_truncated_total", &[], kc(counter::CAPTURE_TRUNCATED)),
                c("observer_user_memory_faults_total", &[], kc(counter::READ_FAULT)),
                c(
                    "observer_table_full_total",
                    &[("table", "sockets")],
                    kc(counter::SOCK_TABLE_FULL) + u.socket_table_full,
                ),
                c(
                    "observer_table_full_total",
                    &[("table", "inflight_syscalls")],
                    kc(counter::INFLIGHT_TABLE_FULL),
                ),
                c(
                    "observer_table_full_total",
                    &[("table", "processes")],
                    kc(counter::PROC_TABLE_FULL) + u.process_table_full,
                ),
                c("observer_table_full_total", &[("table", "connections")], u.connection_table_full),
                c("observer_table_full_total", &[("table", "library_files")], u.libs.verdicts_full),
                c(
                    "observer_table_errors_total",
                    &[("table", "sockets")],
                    kc(counter::SOCK_TABLE_ERROR) + u.socket_table_errors,
                ),
                c(
                    "observer_table_errors_total",
                    &[("table", "inflight_syscalls")],
                    kc(counter::INFLIGHT_TABLE_ERROR),
                ),
                c(
                    "observer_table_errors_total",
                    &[("table", "processes")],
                    kc(counter::PROC_TABLE_ERROR) + u.process_table_errors,
                ),
                c("observer_unknown_connection_records_total", &[], u.unknown_connection_records),
                c("observer_records_total", &[], kc(counter::DATA_RECORDS)),
                c("observer_captured_bytes_total", &[], kc(counter::CAPTURED_BYTES)),
                c("observer_data_bytes_total", &[], u.data_bytes),
                c("observer_connections_opened_total", &[], u.connections_opened),
                c("observer_peek_skipped_total", &[], kc(counter::PEEK_SKIPPED)),
                c("observer_tls_records_total", &[], kc(counter::TLS_RECORDS)),
                c(
                    "observer_records_lost_total",
                    &[("reason", "tls_socket_unknown")],
                    kc(counter::TLS_UNTIED),
                ),
                c("observer_table_errors_total", &[("table", "tls")], kc(counter::TLS_TABLE_ERROR)),
                c("observer_sqlite_records_total", &[], kc(counter::SQLITE_RECORDS)),
                c("observer_uprobe_libraries_attached_total", &[], u.libs.attached),
                c("observer_uprobe_libraries_detached_total", &[], u.libs.detached),
                c("observer_uprobe_attach_errors_total", &[], u.libs.attach_errors),
                c("observer_uprobe_libraries_without_symbols_total", &[], u.libs.without_symbols),
            ],
            programs: BTreeMap::new(),
        }
    }

    /// The counters as `series -> value`.
    pub fn as_map(&self) -> BTreeMap<String, u64> {
        self.counters.iter().map(|c| (c.series(), c.value)).collect()
    }

    /// Value of one series, e.g. `observer_records_lost_total{reason="ring_buffer_full"}`.
    pub fn get(&self, series: &str) -> Option<u64> {
        self.counters.iter().find(|c| c.series() == series).map(|c| c.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_counter_is_reported_under_its_name() {
        let k: Vec<u64> = (0..u64::from(counter::COUNT)).map(|i| 100 + i).collect();
        let r = LossReport::from_parts(
            &k,
            7,
            &UserCounters { decode_errors: 3, socket_table_full: 1, ..Default::default() },
        );
        assert_eq!(r.get("observer_records_lost_total{reason=\"ring_buffer_full\"}"), Some(100));
        assert_eq!(r.get("observer_records_lost_total{reason=\"program_skipped\"}"), Some(7));
        assert_eq!(r.get("observer_records_lost_total{reason=\"undecodable\"}"), Some(3));
        assert_eq!(r.get("observer_table_full_total{table=\"sockets\"}"), Some(105));
        assert_eq!(r.get("observer_records_total"), Some(108));
        // every kernel counter index appears in some series
        let values: Vec<u64> = r.counters.iter().map(|c| c.value).collect();
        for v in &k {
            assert!(values.iter().any(|x| x == v || *x == v + 1), "counter {v} missing");
        }
    }
}
