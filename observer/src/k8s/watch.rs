//! The in-cluster part, kept small: a watch of this node's pods (kube's watcher, with
//! its backoff) feeding the [`PodStore`].

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};

use super::PodStore;

/// Starts watching the pods of `node` (on the current tokio runtime). Fails when the
/// in-cluster configuration (service account token, API address) is missing.
pub async fn spawn(node: &str) -> anyhow::Result<PodStore> {
    // The TLS to the API server: one provider for the process (a second call is a no-op).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = Client::try_default().await?;
    let store = PodStore::default();
    let pods: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let s = store.clone();
    let node = node.to_string();
    tokio::spawn(async move {
        let mut buffered = Vec::new();
        let mut events = watcher(pods, config).default_backoff().boxed();
        while let Some(ev) = events.next().await {
            match ev {
                Ok(watcher::Event::Init) => buffered.clear(),
                Ok(watcher::Event::InitApply(p)) => buffered.push(p),
                Ok(watcher::Event::InitDone) => {
                    s.replace(&buffered);
                    buffered.clear();
                    tracing::info!(node, pods = s.len(), "pods of this node listed");
                }
                Ok(watcher::Event::Apply(p)) => s.apply(&p),
                Ok(watcher::Event::Delete(p)) => s.delete(&p),
                Err(e) => tracing::warn!(error = %e, "watching this node's pods (retrying)"),
            }
        }
    });
    Ok(store)
}
