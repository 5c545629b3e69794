//! A private PostgreSQL for a test: a fresh cluster in a temp dir (initdb as the
//! `postgres` system user), listening on a free loopback port and on a Unix socket in
//! that dir, with a password user and an `app` database; stopped (exactly the PID we
//! started) and removed on drop.

use std::{
    ffi::CString,
    net::TcpStream,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use super::{TempDir, django::free_port};

pub const USER: &str = "observer";
pub const PASSWORD: &str = "observer-test-password";
pub const DATABASE: &str = "app";

pub struct Postgres {
    child: Child,
    pub port: u16,
    /// The directory of its Unix socket (`.s.PGSQL.<port>`).
    pub socket_dir: String,
    dir: TempDir,
    tls_args: Vec<String>,
}

/// Starts the postmaster on the cluster in `dir` and waits until it listens.
fn postmaster(dir: &TempDir, port: u16, tls_args: &[String]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(format!("{}/postgres.log", dir.path()))
        .unwrap();
    let mut child = as_postgres(&mut Command::new(bin_dir().join("postgres")))
        .args(["-D", &format!("{}/data", dir.path()), "-p", &port.to_string(), "-k", dir.path()])
        .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "full_page_writes=off"])
        .args(["-c", "synchronous_commit=off", "-c", "max_connections=50", "-c", "log_connections=on"])
        .args(tls_args)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start postgres");
    let deadline = Instant::now() + super::patience(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(s)) = child.try_wait() {
            panic!(
                "postgres exited with {s}: {}",
                std::fs::read_to_string(format!("{}/postgres.log", dir.path())).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "postgres did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// The newest installed PostgreSQL's binaries.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (cargo xtask setup)")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    versions.sort_unstable();
    let v = versions.last().expect("a PostgreSQL version");
    PathBuf::from(format!("/usr/lib/postgresql/{v}/bin"))
}

/// uid and gid of the `postgres` system user.
fn postgres_ids() -> (u32, u32) {
    let name = CString::new("postgres").unwrap();
    // SAFETY: getpwnam returns a pointer to static storage or null; read at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(!pw.is_null(), "no postgres system user (cargo xtask setup installs postgresql)");
    // SAFETY: non-null, valid until the next getpw* call.
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}

fn chown(path: &str, uid: u32, gid: u32) {
    let p = CString::new(path).unwrap();
    // SAFETY: a valid C string path.
    assert_eq!(unsafe { libc::chown(p.as_ptr(), uid, gid) }, 0, "chown {path}");
}

fn as_postgres(cmd: &mut Command) -> &mut Command {
    let (uid, gid) = postgres_ids();
    cmd.uid(uid).gid(gid).env_clear().env("PATH", "/usr/bin:/bin").env("LC_ALL", "C.UTF-8")
}

impl Postgres {
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// With TLS on (a self-signed certificate): libpq's default `sslmode=prefer` then
    /// encrypts every connection.
    pub fn start_tls() -> Self {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Self {
        let dir = TempDir::new("postgres");
        let (uid, gid) = postgres_ids();
        chown(dir.path(), uid, gid);
        let mut tls_args = Vec::new();
        if tls {
            let (crt, key) = (format!("{}/server.crt", dir.path()), format!("{}/server.key", dir.path()));
            let out = Command::new("openssl")
                .args(["req", "-new", "-x509", "-days", "1", "-nodes", "-subj", "/CN=localhost"])
                // What sslmode=verify-full checks against the host the app connects to.
                .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
                .args(["-newkey", "rsa:2048", "-out", &crt, "-keyout", &key])
                .output()
                .expect("run openssl");
            assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
            for f in [&crt, &key] {
                chown(f, uid, gid);
            }
            std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
            tls_args = vec!["-c".to_string(), "ssl=on".into(), "-c".into(), format!("ssl_cert_file={crt}")];
            tls_args.extend(["-c".to_string(), format!("ssl_key_file={key}")]);
        }
        let data = format!("{}/data", dir.path());
        let pwfile = format!("{}/pw", dir.path());
        std::fs::write(&pwfile, PASSWORD).unwrap();
        chown(&pwfile, uid, gid);
        let bin = bin_dir();
        let out = as_postgres(&mut Command::new(bin.join("initdb")))
            .args(["-D", &data, "-U", USER, "-E", "UTF8", "--no-sync", "--auth=scram-sha-256"])
            .arg(format!("--pwfile={pwfile}"))
            .output()
            .expect("run initdb");
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        let port = free_port();
        let child = postmaster(&dir, port, &tls_args);
        let pg = Self { child, port, socket_dir: dir.path().to_string(), dir, tls_args };
        let out = Command::new(bin.join("createdb"))
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", USER, DATABASE])
            .env("PGPASSWORD", PASSWORD)
            .output()
            .expect("run createdb");
        assert!(out.status.success(), "createdb: {}", String::from_utf8_lossy(&out.stderr));
        pg
    }

    /// Stops the server (fast shutdown: sessions are terminated) and starts it again on the
    /// same port; returns once it listens again.
    pub fn restart(&mut self, down_for: Duration) {
        super::stop(&mut self.child, libc::SIGINT);
        std::thread::sleep(down_for);
        self.child = postmaster(&self.dir, self.port, &self.tls_args);
    }

    /// OBSERVER_TEST_PG for the test app: over TCP, with `extra` settings merged in.
    pub fn settings(&self, extra: Value) -> String {
        let mut v = json!({
            "host": "127.0.0.1",
            "port": self.port,
            "name": DATABASE,
            "user": USER,
            "password": PASSWORD,
            "closed_port": free_port(),
        });
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            for (k, x) in e {
                o.insert(k.clone(), x.clone());
            }
        }
        v.to_string()
    }

    /// The server's certificate (a TLS server), for `sslrootcert`.
    pub fn certificate(&self) -> String {
        format!("{}/server.crt", self.dir.path())
    }

    /// OBSERVER_TEST_PG over the Unix socket.
    pub fn unix_settings(&self, extra: Value) -> String {
        let mut v: Value = serde_json::from_str(&self.settings(extra)).unwrap();
        v["host"] = json!(self.socket_dir);
        v.to_string()
    }

    /// Sessions the server authorized for `user` so far (its log says so, one line each).
    pub fn authorized(&self, user: &str) -> usize {
        let log = std::fs::read_to_string(format!("{}/postgres.log", self.dir.path())).unwrap_or_default();
        let needle = format!("connection authorized: user={user} ");
        log.lines().filter(|l| l.contains(&needle)).count()
    }

    /// Runs the test app's `manage.py migrate [args]` with these settings.
    pub fn migrate(&self, settings: &str, args: &[&str]) {
        super::django::migrate("OBSERVER_TEST_PG", settings, args);
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Fast shutdown of the postmaster we started; it stops its backends. Its
        // directory goes when `dir` drops, after this.
        super::stop(&mut self.child, libc::SIGINT);
    }
}
