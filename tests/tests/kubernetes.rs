//! Kubernetes metadata without a cluster: a stand-in API server (plain HTTP on loopback,
//! reached through a kubeconfig) serves the pods of node "node-a" from a PodList in the
//! API's own shape (observer/src/k8s/testdata), and the test app runs in a cgroup laid
//! out as the kubelet lays out a container's (cgroupfs driver). `observer run
//! --kubernetes` must list only its node's pods and label the app's series with the
//! pod's namespace, pod, container and job.

mod harness;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpListener,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use harness::{
    TempDir,
    django::{Gunicorn, ObserverRun, http_status, root},
    ebpf_available,
};

const POD_UID: &str = "6f8e2f3c-1c2d-4e5f-8a9b-0c1d2e3f4a5b";
const WEB_CONTAINER: &str = "4b2f1c9e8d7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c";

/// Answers list requests with the fixture and watch requests with an empty stream (the
/// client watches again later); records every request path.
fn api_server() -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let list = std::fs::read_to_string(root().join("observer/src/k8s/testdata/pods-node-a.json")).unwrap();
    let s = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(1000) {
            let Ok(mut conn) = conn else { continue };
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            if r.read_line(&mut line).is_err() {
                continue;
            }
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
            }
            let path = line.split_whitespace().nth(1).unwrap_or_default().to_string();
            s.lock().unwrap().push(path.clone());
            let body = if path.contains("watch=true") { String::new() } else { list.clone() };
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (port, seen)
}

/// A cgroup (v1 pids controller) named as the kubelet names a container's, removed on
/// drop once its processes are gone.
struct PodCgroup(PathBuf);

impl PodCgroup {
    fn new() -> Option<Self> {
        let base = Path::new("/sys/fs/cgroup/pids");
        if !base.join("cgroup.procs").exists() {
            return None;
        }
        let dir = base.join(format!("kubepods/besteffort/pod{POD_UID}/{WEB_CONTAINER}"));
        std::fs::create_dir_all(&dir).ok()?;
        Some(Self(dir))
    }

    fn enter(&self, pid: u32) {
        std::fs::write(self.0.join("cgroup.procs"), pid.to_string()).expect("move into the cgroup");
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        // Whatever is still inside goes back to the root cgroup, then the tree goes.
        if let Ok(procs) = std::fs::read_to_string(self.0.join("cgroup.procs")) {
            for p in procs.lines() {
                let _ = std::fs::write("/sys/fs/cgroup/pids/cgroup.procs", p);
            }
        }
        let mut d = self.0.clone();
        for _ in 0..4 {
            let _ = std::fs::remove_dir(&d);
            d.pop();
        }
    }
}

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .collect()
}

#[test]
fn apps_in_pods_get_their_pod_labels_from_the_api() {
    if !ebpf_available() {
        return;
    }
    let Some(cgroup) = PodCgroup::new() else {
        harness::skip("no cgroup v1 pids hierarchy to lay out a pod's cgroup");
        return;
    };
    let (api_port, seen) = api_server();
    let dir = TempDir::new("kubeconfig");
    let kubeconfig = format!("{}/config", dir.path());
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: http://127.0.0.1:{api_port}\n\
             contexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: agent\ncurrent-context: stand-in\n\
             users:\n- name: agent\n  user:\n    token: not-a-secret\n"
        ),
    )
    .unwrap();

    let app = Gunicorn::start("sync", 2, false);
    cgroup.enter(app.pid());
    for c in children(app.pid()) {
        cgroup.enter(c);
    }
    let cg = std::fs::read_to_string(format!("/proc/{}/cgroup", app.pid())).unwrap();
    assert!(cg.contains(&format!("pod{POD_UID}/{WEB_CONTAINER}")), "{cg}");

    let obs = ObserverRun::start_with_env(
        &["--pid", &app.pid().to_string(), "--kubernetes", "--node-name", "node-a"],
        &[("KUBECONFIG", &kubeconfig)],
    );
    obs.wait_until("the node's pods", |m| m.sum("observer_kubernetes_pods", &[]) == 3.0);
    for _ in 0..5 {
        assert_eq!(http_status(app.port, "/"), Some(200));
    }
    let m = obs.wait_until("the app's requests", |m| {
        m.sum("django_http_requests_before_middlewares_total", &[]) == 5.0
    });
    let s = m.samples.iter().find(|s| s.name == "django_http_requests_before_middlewares_total").unwrap();
    let label = |k: &str| s.labels.get(k).map(String::as_str).unwrap_or_default();
    assert_eq!(label("namespace"), "shop");
    assert_eq!(label("pod"), "shop-web-7d9c6b5f4-x2k8q");
    assert_eq!(label("container"), "web");
    assert_eq!(label("job"), "shop", "the pod's observer/job annotation");
    assert_eq!(label("instance"), format!("shop-web-7d9c6b5f4-x2k8q:{}", app.port));
    // Only this node's pods were asked for.
    let paths = seen.lock().unwrap().clone();
    assert!(!paths.is_empty());
    for p in &paths {
        assert!(p.starts_with("/api/v1/pods?"), "{p}");
        assert!(p.contains("fieldSelector=spec.nodeName%3Dnode-a"), "{p}");
    }
    drop(obs);
    drop(app);
    drop(cgroup);
}
