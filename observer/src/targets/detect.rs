//! Finding Django processes without being told: Python processes running gunicorn, uwsgi,
//! uvicorn, daphne, hypercorn or `manage.py runserver`, or with DJANGO_SETTINGS_MODULE in
//! their environment.

use std::fs;

/// App servers whose name in a command line marks a Django (or at least WSGI/ASGI) app.
const SERVERS: [&str; 5] = ["gunicorn", "uwsgi", "uvicorn", "daphne", "hypercorn"];

/// Set in the environment of the observer's own helper processes (route discovery),
/// which must never be taken for an app.
pub const HELPER_ENV: &str = "OBSERVER_TARGET_ARGV";

/// What detection reads of a process.
#[derive(Debug, Clone, Default)]
pub struct Evidence {
    pub comm: String,
    pub argv: Vec<String>,
    /// Names of its environment variables.
    pub env_keys: Vec<String>,
}

fn basename(s: &str) -> &str {
    s.rsplit('/').next().unwrap_or(s)
}

/// Why a process is a Django app process, or `None`.
pub fn why_django(e: &Evidence) -> Option<String> {
    if e.env_keys.iter().any(|k| k == HELPER_ENV) {
        return None;
    }
    let python = e.comm.starts_with("python")
        || e.argv.first().is_some_and(|a| basename(a).starts_with("python"))
        || SERVERS.contains(&e.comm.as_str());
    if python {
        for a in &e.argv {
            let b = basename(a);
            if let Some(s) = SERVERS.iter().find(|s| b == **s || b.starts_with(&format!("{s}:"))) {
                return Some(format!("runs {s}"));
            }
        }
        if SERVERS.contains(&e.comm.as_str()) {
            return Some(format!("runs {}", e.comm));
        }
        let runserver =
            e.argv.iter().any(|a| basename(a) == "manage.py") && e.argv.iter().any(|a| a == "runserver");
        if runserver {
            return Some("runs manage.py runserver".into());
        }
    }
    if e.env_keys.iter().any(|k| k == "DJANGO_SETTINGS_MODULE") {
        return Some("has DJANGO_SETTINGS_MODULE".into());
    }
    None
}

fn nul_split(b: &[u8]) -> Vec<String> {
    b.split(|&c| c == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect()
}

/// Reads a process's evidence from /proc (`None` if it is gone or unreadable).
pub fn evidence(pid: u32) -> Option<Evidence> {
    let comm = super::read_proc_text(format!("/proc/{pid}/comm"))?.trim_end().to_string();
    let argv = nul_split(&fs::read(format!("/proc/{pid}/cmdline")).ok()?);
    let env_keys = nul_split(&fs::read(format!("/proc/{pid}/environ")).unwrap_or_default())
        .into_iter()
        .filter_map(|kv| kv.split_once('=').map(|(k, _)| k.to_string()))
        .collect();
    Some(Evidence { comm, argv, env_keys })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(comm: &str, argv: &[&str], env: &[&str]) -> Evidence {
        Evidence {
            comm: comm.into(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env_keys: env.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn app_servers_and_runserver() {
        let g =
            ev("gunicorn", &["/srv/venv/bin/python3", "/srv/venv/bin/gunicorn", "shop.wsgi", "-w", "4"], &[]);
        assert_eq!(why_django(&g).as_deref(), Some("runs gunicorn"));
        // gunicorn sets its worker's process title: argv is rewritten
        let w = ev("gunicorn", &["gunicorn: worker [shop.wsgi]"], &[]);
        assert!(why_django(&w).is_some());
        let u = ev("uwsgi", &["uwsgi", "--ini", "app.ini"], &[]);
        assert_eq!(why_django(&u).as_deref(), Some("runs uwsgi"));
        let r = ev("python3", &["python3", "manage.py", "runserver", "0.0.0.0:8000"], &[]);
        assert_eq!(why_django(&r).as_deref(), Some("runs manage.py runserver"));
        let c = ev("celery", &["/venv/bin/python", "-m", "celery", "worker"], &["DJANGO_SETTINGS_MODULE"]);
        assert_eq!(why_django(&c).as_deref(), Some("has DJANGO_SETTINGS_MODULE"));
    }

    #[test]
    fn other_processes_and_our_helpers_are_not_apps() {
        assert!(why_django(&ev("python3", &["python3", "-m", "http.server"], &[])).is_none());
        assert!(why_django(&ev("bash", &["bash", "-c", "gunicorn"], &[])).is_none());
        assert!(why_django(&ev("nginx", &["nginx: worker process"], &[])).is_none());
        let helper =
            ev("python3", &["/venv/bin/python", "-B", "-c", "..."], &["DJANGO_SETTINGS_MODULE", HELPER_ENV]);
        assert!(why_django(&helper).is_none());
    }
}
