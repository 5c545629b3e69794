//! Beyond django-prometheus: which view issued which queries and cache lookups. The agent
//! sees a worker's HTTP exchange and its database and cache exchanges, so it can tie them
//! together with no code in the app.
//!
//! `attribution` decides which request a database statement or a cache lookup belongs to
//! (the request in flight on the same thread; for a thread that never serves requests,
//! such as an ASGI worker's executor threads, the process's only request in flight);
//! `metrics` holds the per-view families it feeds.

pub mod attribution;
pub mod metrics;

pub use attribution::{Attribution, CacheWork, Profile, Work};
pub use metrics::ViewProfileMetrics;
