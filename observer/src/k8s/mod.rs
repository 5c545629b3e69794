//! Kubernetes metadata (`--kubernetes`): the pods of this node, watched through the API
//! (a field selector on spec.nodeName, RBAC pods get/list/watch), and the pod and
//! container each traced process runs in (its cgroup). Each app's series get the pod's
//! `namespace`, `pod` and `container`, and a `job` from the pod's `observer/job`
//! annotation or label (the `--job` default otherwise).

pub mod cgroup;
mod watch;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use k8s_openapi::api::core::v1::Pod;

use crate::fault::lock;

pub use watch::spawn;

/// The annotation (or label) that names a pod's `job`.
pub const JOB_KEY: &str = "observer/job";

/// What the agent keeps of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMeta {
    pub namespace: String,
    pub name: String,
    pub job: Option<String>,
    /// Runtime container ID (64 hex digits) -> container name.
    pub containers: BTreeMap<String, String>,
}

impl PodMeta {
    /// From an API object; None without the metadata that names it.
    pub fn from_pod(pod: &Pod) -> Option<(String, Self)> {
        let m = &pod.metadata;
        let uid = m.uid.clone()?;
        let job = m
            .annotations
            .as_ref()
            .and_then(|a| a.get(JOB_KEY))
            .or_else(|| m.labels.as_ref().and_then(|l| l.get(JOB_KEY)))
            .filter(|j| !j.is_empty())
            .cloned();
        let mut containers = BTreeMap::new();
        if let Some(st) = &pod.status {
            let all = [&st.container_statuses, &st.init_container_statuses, &st.ephemeral_container_statuses];
            for s in all.into_iter().flatten().flatten() {
                // "containerd://<id>", "cri-o://<id>", "docker://<id>".
                if let Some(id) =
                    s.container_id.as_deref().and_then(|c| c.rsplit_once("://")).map(|(_, id)| id)
                {
                    containers.insert(id.to_ascii_lowercase(), s.name.clone());
                }
            }
        }
        Some((uid, Self { namespace: m.namespace.clone()?, name: m.name.clone()?, job, containers }))
    }
}

/// The labels a traced process gets from its pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodLabels {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub job: Option<String>,
}

/// The pods of this node by UID, shared between the watch and the pipeline.
/// Shared by the watch thread and the pipeline. A panic in either while holding the lock
/// (contained by crate::fault) leaves the map whole (every change is one insert, remove
/// or swap), so a poisoned lock is used as it is instead of blinding the labels for good.
#[derive(Debug, Clone, Default)]
pub struct PodStore {
    pods: Arc<Mutex<HashMap<String, PodMeta>>>,
}

impl PodStore {
    pub fn apply(&self, pod: &Pod) {
        if let Some((uid, meta)) = PodMeta::from_pod(pod) {
            lock(&self.pods).insert(uid, meta);
        }
    }

    pub fn delete(&self, pod: &Pod) {
        if let Some(uid) = &pod.metadata.uid {
            lock(&self.pods).remove(uid);
        }
    }

    /// A fresh list replaces what was known (the watch restarted).
    pub fn replace(&self, pods: &[Pod]) {
        let fresh: HashMap<String, PodMeta> = pods.iter().filter_map(PodMeta::from_pod).collect();
        *lock(&self.pods) = fresh;
    }

    pub fn len(&self) -> usize {
        lock(&self.pods).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The labels of a process with this cgroup file content.
    pub fn labels_for_cgroup(&self, cgroup_text: &str) -> Option<PodLabels> {
        let pc = cgroup::parse(cgroup_text)?;
        let pods = lock(&self.pods);
        let meta = pods.get(&pc.pod_uid)?;
        let container = pc.container_id.and_then(|id| meta.containers.get(&id).cloned()).unwrap_or_default();
        Some(PodLabels {
            namespace: meta.namespace.clone(),
            pod: meta.name.clone(),
            container,
            job: meta.job.clone(),
        })
    }

    /// The labels of a running process (its `/proc/PID/cgroup`).
    pub fn labels_for_pid(&self, pid: u32) -> Option<PodLabels> {
        let text = crate::targets::read_proc_text(format!("/proc/{pid}/cgroup"))?;
        self.labels_for_cgroup(&text)
    }
}

#[cfg(test)]
mod tests;
