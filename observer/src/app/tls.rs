//! The app's TLS connections the agent could not decrypt, and why: ours, not
//! django-prometheus's (it has no such family), so an operator sees which app, which of
//! its connections (served, to a database, to a cache) and what to change (a library
//! the agent probes, symbols kept) without reading the agent's log.

use prometheus::{IntCounterVec, Registry};

use crate::stream::tls::Opacity;

/// Which of the app's connections it was (the `connection` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connection {
    /// Accepted by the app (HTTPS it serves itself).
    Served,
    /// To one of its `DATABASES`.
    Database,
    /// To one of its `CACHES`.
    Cache,
    /// To anything else (an API, a broker).
    Other,
}

impl Connection {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Served => "served",
            Self::Database => "database",
            Self::Cache => "cache",
            Self::Other => "other",
        }
    }
}

pub struct TlsMetrics {
    opaque: IntCounterVec,
}

impl TlsMetrics {
    pub fn new(r: &Registry) -> prometheus::Result<Self> {
        Ok(Self {
            opaque: crate::django::counter_vec(
                r,
                "observer_tls_opaque_connections_total",
                "The app's TLS connections closed without their plaintext seen (their traffic is in no django_* family), by connection and reason.",
                &["connection", "reason"],
            )?,
        })
    }

    pub fn opaque(&self, connection: Connection, reason: Opacity) {
        self.opaque.with_label_values(&[connection.as_str(), reason.as_str()]).inc();
    }
}
