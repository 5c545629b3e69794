//! Which pod and container a process runs in, from its `/proc/PID/cgroup`: the kubelet
//! puts every container in a cgroup whose path names the pod's UID and the container's
//! runtime ID, whatever the cgroup driver (cgroupfs or systemd), version (v1 or v2) and
//! runtime (containerd, CRI-O, Docker).

/// The pod UID (with dashes) and the container ID (64 hex digits) of a cgroup file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodContainer {
    pub pod_uid: String,
    pub container_id: Option<String>,
}

fn is_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A pod UID in a path segment: `pod<uid>` with `-` (cgroupfs) or `_` (systemd slices).
fn pod_uid(segment: &str) -> Option<String> {
    // "kubepods-burstable-pod<uid>.slice": the UID follows the last "pod" that one does.
    segment.match_indices("pod").find_map(|(at, _)| {
        let uid: String =
            segment[at + 3..].chars().take(36).map(|c| if c == '_' { '-' } else { c }).collect();
        let parts: Vec<&str> = uid.split('-').collect();
        let shape = [8, 4, 4, 4, 12];
        (parts.len() == 5 && parts.iter().zip(shape).all(|(p, n)| p.len() == n && is_hex(p))).then_some(uid)
    })
}

/// A container ID in the last path segment: bare, or `cri-containerd-<id>.scope`,
/// `crio-<id>.scope`, `docker-<id>.scope`.
fn container_id(segment: &str) -> Option<String> {
    let s = segment.strip_suffix(".scope").unwrap_or(segment);
    let id = s.rsplit('-').next().unwrap_or(s);
    (id.len() == 64 && is_hex(id)).then(|| id.to_ascii_lowercase())
}

/// Parses the content of `/proc/PID/cgroup` (None: not in a pod).
pub fn parse(text: &str) -> Option<PodContainer> {
    for line in text.lines() {
        // hierarchy-ID:controllers:path
        let Some(path) = line.splitn(3, ':').nth(2) else { continue };
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let Some(pod) = segments.iter().rev().find_map(|s| pod_uid(s)) else { continue };
        let container = segments.last().and_then(|s| container_id(s));
        return Some(PodContainer { pod_uid: pod, container_id: container });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "6f8e2f3c-1c2d-4e5f-8a9b-0c1d2e3f4a5b";
    const CID: &str = "4b2f1c9e8d7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c";

    #[test]
    fn systemd_driver_cgroup_v2_containerd() {
        let t = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CID}.scope\n",
            UID.replace('-', "_")
        );
        assert_eq!(parse(&t), Some(PodContainer { pod_uid: UID.into(), container_id: Some(CID.into()) }));
    }

    #[test]
    fn cgroupfs_driver_v1_and_other_runtimes() {
        let t = format!(
            "12:pids:/kubepods/besteffort/pod{UID}/{CID}\n11:memory:/kubepods/besteffort/pod{UID}/{CID}\n0::/\n"
        );
        assert_eq!(parse(&t).unwrap().container_id.as_deref(), Some(CID));
        let t = format!("0::/kubepods.slice/kubepods-pod{}.slice/crio-{CID}.scope", UID.replace('-', "_"));
        assert_eq!(parse(&t).unwrap().pod_uid, UID);
        let t = format!("0::/kubepods/pod{UID}/docker-{CID}.scope");
        assert_eq!(parse(&t).unwrap().container_id.as_deref(), Some(CID));
        // kind: the node itself runs in a container.
        let t = format!(
            "0::/system.slice/docker-{CID}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{}.slice/cri-containerd-{CID}.scope",
            UID.replace('-', "_")
        );
        assert_eq!(parse(&t).unwrap().pod_uid, UID);
    }

    #[test]
    fn not_in_a_pod() {
        assert_eq!(parse("0::/user.slice/user-0.slice/session-3.scope\n"), None);
        assert_eq!(parse("0::/system.slice/gunicorn.service\n"), None);
        assert_eq!(parse(""), None);
        assert_eq!(parse("0::/kubepods.slice/kubepods-podnot_a_uid.slice\n"), None);
        // The pod's own cgroup (its sandbox), no container.
        let t = format!("0::/kubepods/pod{UID}\n");
        assert_eq!(parse(&t), Some(PodContainer { pod_uid: UID.into(), container_id: None }));
    }
}
