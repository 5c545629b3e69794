use k8s_openapi::{List, api::core::v1::Pod};

use super::*;

fn pods() -> Vec<Pod> {
    let text = include_str!("testdata/pods-node-a.json");
    let list: List<Pod> = serde_json::from_str(text).expect("a PodList as the API serves it");
    list.items
}

fn cgroup_v2(uid: &str, runtime: &str, cid: &str) -> String {
    format!(
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/{runtime}-{cid}.scope\n",
        uid.replace('-', "_")
    )
}

#[test]
fn pods_of_the_node_name_their_containers() {
    let pods = pods();
    let (uid, web) = PodMeta::from_pod(&pods[0]).unwrap();
    assert_eq!(uid, "6f8e2f3c-1c2d-4e5f-8a9b-0c1d2e3f4a5b");
    assert_eq!(web.namespace, "shop");
    assert_eq!(web.name, "shop-web-7d9c6b5f4-x2k8q");
    assert_eq!(web.job.as_deref(), Some("shop"), "from the annotation");
    // Running containers and the init container, by runtime ID.
    assert_eq!(web.containers.len(), 3);
    assert_eq!(web.containers["4b2f1c9e8d7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c"], "web");
    let (_, blog) = PodMeta::from_pod(&pods[1]).unwrap();
    assert_eq!(blog.job.as_deref(), Some("blog"), "from the label");
    // A pod whose container is not created yet: no IDs, no job.
    let (_, cron) = PodMeta::from_pod(&pods[2]).unwrap();
    assert!(cron.containers.is_empty() && cron.job.is_none());
}

#[test]
fn a_process_gets_its_pod_and_container() {
    let store = PodStore::default();
    store.replace(&pods());
    assert_eq!(store.len(), 3);
    let web = cgroup_v2(
        "6f8e2f3c-1c2d-4e5f-8a9b-0c1d2e3f4a5b",
        "cri-containerd",
        "4b2f1c9e8d7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c",
    );
    assert_eq!(
        store.labels_for_cgroup(&web),
        Some(PodLabels {
            namespace: "shop".into(),
            pod: "shop-web-7d9c6b5f4-x2k8q".into(),
            container: "web".into(),
            job: Some("shop".into()),
        })
    );
    let blog = cgroup_v2(
        "a1b2c3d4-e5f6-4789-8abc-def012345678",
        "crio",
        "7f6e5d4c3b2a19080f7e6d5c4b3a29180f7e6d5c4b3a29180f7e6d5c4b3a2918",
    );
    let l = store.labels_for_cgroup(&blog).unwrap();
    assert_eq!((l.namespace.as_str(), l.container.as_str()), ("content", "app"));
    // A container the pod's status does not list yet: the pod is known, the container not.
    let unknown = cgroup_v2("6f8e2f3c-1c2d-4e5f-8a9b-0c1d2e3f4a5b", "cri-containerd", &"e".repeat(64));
    assert_eq!(store.labels_for_cgroup(&unknown).unwrap().container, "");
    // A process of the host, or of a pod of another node.
    assert_eq!(store.labels_for_cgroup("0::/system.slice/gunicorn.service\n"), None);
    assert_eq!(
        store.labels_for_cgroup(&cgroup_v2("ffffffff-ffff-4fff-8fff-ffffffffffff", "crio", &"a".repeat(64))),
        None
    );
}

#[test]
fn watch_events_keep_the_store_current() {
    let store = PodStore::default();
    let pods = pods();
    store.apply(&pods[0]);
    store.apply(&pods[1]);
    assert_eq!(store.len(), 2);
    store.delete(&pods[0]);
    assert_eq!(store.len(), 1);
    // A relist replaces everything (pods deleted while the watch was down are gone).
    store.replace(&pods[2..]);
    assert_eq!(store.len(), 1);
    assert!(
        store
            .labels_for_cgroup(&cgroup_v2("a1b2c3d4-e5f6-4789-8abc-def012345678", "crio", &"7".repeat(64)))
            .is_none()
    );
}
