//! deploy/: the Kubernetes manifests validate against the Kubernetes schemas offline
//! (kubernetes-validate, in the test venv), the privileged overlay's result too; the
//! systemd unit verifies; and the capability set both declare is enough for the agent,
//! proven by running it with exactly those capabilities on an app that runs as another
//! user in its own mount namespace, while dropping BPF or SYS_ADMIN visibly breaks it.

mod harness;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use harness::{
    TempDir,
    django::{Gunicorn, ObserverRun, http_status, root, venv_bin},
    ebpf_available, observer_bin,
};
use serde_json::Value;

fn k8s(file: &str) -> PathBuf {
    root().join("deploy/kubernetes").join(file)
}

/// The YAML documents of a file, as JSON (PyYAML in the test venv).
fn yaml(path: &Path) -> Vec<Value> {
    let out = Command::new(venv_bin("python"))
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        ])
        .arg(path)
        .output()
        .expect("run python");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn validate(files: &[PathBuf]) {
    let out = Command::new(venv_bin("kubernetes-validate"))
        .arg("--strict")
        .args(files)
        .output()
        .expect("run kubernetes-validate (cargo xtask setup puts it in the venv)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && !text.contains("ERROR"), "{text}");
    eprint!("{text}");
}

fn daemonset() -> Value {
    yaml(&k8s("daemonset.yaml")).remove(0)
}

/// The capabilities the DaemonSet adds, as setpriv and /proc name them.
fn capabilities() -> Vec<String> {
    let ds = daemonset();
    let c = &ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"];
    assert_eq!(c["drop"], serde_json::json!(["ALL"]));
    c["add"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_ascii_lowercase()).collect()
}

#[test]
fn kubernetes_manifests_validate_offline() {
    let base = yaml(&k8s("kustomization.yaml")).remove(0);
    let resources: Vec<PathBuf> =
        base["resources"].as_array().unwrap().iter().map(|r| k8s(r.as_str().unwrap())).collect();
    // Every manifest of the directory is in the kustomization.
    let listed: BTreeSet<PathBuf> = resources.iter().cloned().collect();
    for e in std::fs::read_dir(root().join("deploy/kubernetes")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml") && !p.ends_with("kustomization.yaml") {
            assert!(listed.contains(&p), "{} is not in the kustomization", p.display());
        }
    }
    validate(&resources);

    // The privileged overlay: its patch applied to the base DaemonSet, validated.
    let overlay = yaml(&k8s("privileged/kustomization.yaml")).remove(0);
    let patch: Value = {
        let text = overlay["patches"][0]["patch"].as_str().unwrap();
        let tmp = TempDir::new("patch");
        let p = Path::new(tmp.path()).join("patch.yaml");
        std::fs::write(&p, text).unwrap();
        yaml(&p).remove(0)
    };
    let op = &patch[0];
    assert_eq!(op["op"], "replace");
    assert_eq!(op["path"], "/spec/template/spec/containers/0/securityContext");
    assert_eq!(op["value"]["privileged"], true);
    let mut ds = daemonset();
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"] = op["value"].clone();
    let tmp = TempDir::new("privileged");
    let out = Path::new(tmp.path()).join("daemonset.json");
    std::fs::write(&out, serde_json::to_string(&ds).unwrap()).unwrap();
    validate(&[out]);

    // The PodMonitor (a prometheus-operator CRD, no schema here): it selects the agent
    // pods, on the port the DaemonSet names, keeping the apps' labels.
    let pm = yaml(&k8s("prometheus-operator/podmonitor.yaml")).remove(0);
    assert_eq!(pm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(pm["kind"], "PodMonitor");
    let ds = daemonset();
    let pod_labels = &ds["spec"]["template"]["metadata"]["labels"];
    for (k, v) in pm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&pod_labels[k], v);
    }
    let ep = &pm["spec"]["podMetricsEndpoints"][0];
    assert_eq!(ep["honorLabels"], true);
    assert_eq!(ep["port"], ds["spec"]["template"]["spec"]["containers"][0]["ports"][0]["name"]);
    assert_eq!(ds["spec"]["template"]["spec"]["hostPID"], true);
}

#[test]
fn the_systemd_unit_verifies_and_grants_what_the_daemonset_grants() {
    let unit = std::fs::read_to_string(root().join("deploy/systemd/observer.service")).unwrap();
    let tmp = TempDir::new("systemd");
    let path = Path::new(tmp.path()).join("observer.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/observer", observer_bin())).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().expect("run systemd-analyze");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.trim().is_empty(), "systemd-analyze verify: {text}");
    let bounding: BTreeSet<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .unwrap()
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_ascii_lowercase())
        .collect();
    assert_eq!(bounding, capabilities().into_iter().collect());
    assert!(unit.contains("\nNoNewPrivileges=yes\n"));
}

/// Capability numbers (linux/capability.h) of the names the manifests use.
fn cap_bit(name: &str) -> u32 {
    match name {
        "dac_read_search" => 2,
        "setgid" => 6,
        "setuid" => 7,
        "sys_chroot" => 18,
        "sys_ptrace" => 19,
        "sys_admin" => 21,
        "sys_resource" => 24,
        "perfmon" => 38,
        "bpf" => 39,
        other => panic!("unknown capability {other}"),
    }
}

fn setpriv(caps: &[String]) -> Vec<String> {
    let set: Vec<String> = caps.iter().map(|c| format!("+{c}")).collect();
    vec!["setpriv".into(), format!("--bounding-set=-all,{}", set.join(",")), "--".into()]
}

#[test]
fn the_daemonsets_capabilities_are_enough_and_each_tested_one_is_needed() {
    if !ebpf_available() {
        return;
    }
    let caps = capabilities();
    // The app as in a container: its own mount namespace, another user.
    let app = Gunicorn::start_prefixed(
        &[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
        ],
        "sync",
        2,
        false,
        &[("HOME", "/tmp")],
    );
    let pid = app.pid().to_string();
    let ours = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    assert_ne!(
        std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap(),
        ours,
        "the app has its own mount namespace"
    );

    // With exactly the DaemonSet's capabilities: traced, counted, routes discovered.
    let wrapper = setpriv(&caps);
    let w: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let obs = ObserverRun::start_wrapped(&w, &["--pid", &pid], &[]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", obs.pid())).unwrap();
    let eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap().trim();
    // What this machine can grant at all (it may run the tests without some, e.g.
    // SYS_RESOURCE in a container): the agent then has those of the set it has.
    let ours = std::fs::read_to_string("/proc/self/status").unwrap();
    let bounding =
        u64::from_str_radix(ours.lines().find_map(|l| l.strip_prefix("CapBnd:")).unwrap().trim(), 16)
            .unwrap();
    let want: u64 = caps.iter().map(|c| 1u64 << cap_bit(c)).sum::<u64>() & bounding;
    assert_eq!(u64::from_str_radix(eff, 16).unwrap(), want, "the agent runs with exactly those capabilities");
    for _ in 0..5 {
        assert_eq!(http_status(app.port, "/"), Some(200));
    }
    // (The agent's own counters are published once a second.)
    let m = obs.wait_until("the requests, with their view", |m| {
        m.sum("django_http_responses_total_by_status_view_method_total", &[("view", "index")]) == 5.0
            && m.sum("observer_route_discovery_total", &[("result", "success")]) == 1.0
    });
    assert_eq!(m.sum("observer_records_lost_total", &[]), 0.0);
    // The uprobes too: gunicorn loads Python's ssl module, whose OpenSSL the agent finds
    // through /proc/PID/root in the app's mount namespace and probes (PERFMON for the
    // uprobe events, BPF for the programs, SYS_PTRACE to follow another user's root).
    assert!(
        m.sum("observer_uprobe_libraries_attached_total", &[]) >= 1.0,
        "the app's OpenSSL got its probes"
    );
    assert_eq!(m.sum("observer_uprobe_attach_errors_total", &[]), 0.0);
    drop(obs);

    // Without SYS_ADMIN it cannot enter the app's mount namespace: discovery fails (and
    // says so), views fall back to templated paths.
    let without: Vec<String> = caps.iter().filter(|c| *c != "sys_admin").cloned().collect();
    let wrapper = setpriv(&without);
    let w: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let obs = ObserverRun::start_wrapped(&w, &["--pid", &pid], &[]);
    assert_eq!(http_status(app.port, "/"), Some(200));
    obs.wait_until("a failed discovery", |m| {
        m.sum("observer_route_discovery_total", &[("result", "failure")]) == 1.0
    });
    drop(obs);

    // Without BPF (nor SYS_ADMIN, which also allows bpf()) it cannot load its programs,
    // and says why.
    let without: Vec<String> = caps.iter().filter(|c| *c != "bpf" && *c != "sys_admin").cloned().collect();
    let out = Command::new("timeout")
        .arg("30")
        .args(setpriv(&without))
        .args([observer_bin(), "run", "--listen", "127.0.0.1:0", "--pid", &pid])
        .output()
        .expect("run observer without CAP_BPF");
    assert!(!out.status.success());
    assert_ne!(out.status.code(), Some(124), "it must fail, not run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.to_lowercase().contains("permission") || err.contains("CAP_BPF") || err.contains("root"),
        "{err}"
    );
}
