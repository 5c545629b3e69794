//! The HTTP endpoint: `/metrics` (Prometheus text, or OpenMetrics when the scraper asks
//! for it) and `/healthz` (the pump is reporting).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};

use crate::{django::expo, pipeline::Exposition};

/// The pump reports every second; this much silence means it is stuck.
const STALE: Duration = Duration::from_secs(15);

type Shared = Arc<Mutex<Exposition>>;

async fn metrics(State(shared): State<Shared>, headers: HeaderMap) -> Response {
    let (registries, stats) = {
        let Ok(e) = shared.lock() else { return StatusCode::INTERNAL_SERVER_ERROR.into_response() };
        (e.registries.values().cloned().collect::<Vec<_>>(), e.stats.clone())
    };
    let mut sets: Vec<_> = registries.iter().map(prometheus::Registry::gather).collect();
    sets.push(stats.families());
    let families = expo::merge(sets);
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
    if expo::wants_openmetrics(accept) {
        ([(header::CONTENT_TYPE, expo::OPENMETRICS_CONTENT_TYPE)], expo::encode_openmetrics(&families))
            .into_response()
    } else {
        ([(header::CONTENT_TYPE, expo::TEXT_CONTENT_TYPE)], expo::encode_text(&families)).into_response()
    }
}

async fn healthz(State(shared): State<Shared>) -> Response {
    let fresh = shared.lock().ok().and_then(|e| e.last_report).is_some_and(|t| t.elapsed() < STALE);
    if fresh {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "stale\n").into_response()
    }
}

/// Binds `addr` and serves until the runtime stops. Returns the bound address.
pub async fn serve(addr: SocketAddr, shared: Shared) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app =
        Router::new().route("/metrics", get(metrics)).route("/healthz", get(healthz)).with_state(shared);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(bound)
}
