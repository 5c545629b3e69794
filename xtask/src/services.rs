//! Services the demo and the benchmark start and stop by PID: a throwaway PostgreSQL
//! cluster, Redis, and a guard that ends a child process; plus small HTTP and /metrics
//! helpers.

use std::{
    collections::BTreeMap,
    ffi::CString,
    fs,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// Stops a child we started (SIGTERM, then SIGKILL) when dropped.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        // A child already reaped is left alone: its PID may be someone else's now.
        if !matches!(self.0.try_wait(), Ok(None)) {
            return;
        }
        // SAFETY: signalling our own child, not reaped yet.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn wait_port(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {port}");
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A throwaway PostgreSQL cluster (initdb as the `postgres` system user) on a free
/// loopback port; its directory goes with it.
pub struct Postgres {
    server: Option<Guard>,
    pub dir: PathBuf,
    pub port: u16,
    /// Serving TLS (`ssl=on`): the app connects with `sslmode=require`.
    pub tls: bool,
}

const PG_USER: &str = "observer";
const PG_PASSWORD: &str = "observer-demo";

/// A self-signed certificate and its key in `dir` (`name.crt`, `name.key`).
pub fn self_signed(dir: &Path, name: &str) -> Result<(PathBuf, PathBuf)> {
    let (crt, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    let out = Command::new("openssl")
        .args(["req", "-new", "-x509", "-days", "1", "-nodes", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-newkey", "rsa:2048", "-out"])
        .arg(&crt)
        .arg("-keyout")
        .arg(&key)
        .output()
        .context("openssl (cargo xtask setup installs it)")?;
    if !out.status.success() {
        bail!("openssl: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((crt, key))
}

impl Postgres {
    pub fn start() -> Result<Self> {
        Self::start_with(false)
    }

    /// With `ssl=on` and a certificate made here.
    pub fn start_tls() -> Result<Self> {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Result<Self> {
        let bin = fs::read_dir("/usr/lib/postgresql")
            .context("PostgreSQL is not installed (cargo xtask setup)")?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .max()
            .map(|v| PathBuf::from(format!("/usr/lib/postgresql/{v}/bin")))
            .context("no PostgreSQL version")?;
        let name = CString::new("postgres")?;
        // SAFETY: getpwnam returns static storage or null; read at once.
        let pw = unsafe { libc::getpwnam(name.as_ptr()) };
        if pw.is_null() {
            bail!("no postgres system user");
        }
        // SAFETY: non-null.
        let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
        let dir = std::env::temp_dir().join(format!("observer-demo-pg-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let chown = |p: &Path| -> Result<()> {
            let c = CString::new(p.as_os_str().as_encoded_bytes())?;
            // SAFETY: a valid path.
            if unsafe { libc::chown(c.as_ptr(), uid, gid) } != 0 {
                bail!("chown {}", p.display());
            }
            Ok(())
        };
        chown(&dir)?;
        let pwfile = dir.join("pw");
        fs::write(&pwfile, PG_PASSWORD)?;
        chown(&pwfile)?;
        let mut pg = Self { server: None, dir: dir.clone(), port: free_port()?, tls };
        let mut tls_args = Vec::new();
        if tls {
            let (crt, key) = self_signed(&dir, "server")?;
            chown(&crt)?;
            chown(&key)?;
            fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            tls_args = vec![
                "-c".to_string(),
                "ssl=on".into(),
                "-c".into(),
                format!("ssl_cert_file={}", crt.display()),
                "-c".into(),
                format!("ssl_key_file={}", key.display()),
            ];
        }
        let as_postgres = |c: &mut Command| {
            c.uid(uid).gid(gid).env_clear().env("PATH", "/usr/bin:/bin").env("LC_ALL", "C.UTF-8");
        };
        let data = dir.join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        as_postgres(&mut initdb);
        let out = initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", PG_USER, "--auth=scram-sha-256", "--no-sync", "-E", "UTF8"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()?;
        if !out.status.success() {
            bail!("initdb: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mut server = Command::new(bin.join("postgres"));
        as_postgres(&mut server);
        server
            .arg("-D")
            .arg(&data)
            .args(["-p", &pg.port.to_string(), "-k"])
            .arg(&dir)
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(&tls_args)
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("postgres.log"))?);
        pg.server = Some(Guard(server.spawn().context("starting postgres")?));
        wait_port(pg.port)?;
        let out = Command::new(bin.join("createdb"))
            .args(["-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", PG_USER, "app"])
            .env("PGPASSWORD", PG_PASSWORD)
            .output()?;
        if !out.status.success() {
            bail!("createdb: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(pg)
    }

    /// OBSERVER_TEST_PG for the test app.
    pub fn settings(&self) -> String {
        let sslmode = if self.tls { r#", "sslmode": "require""# } else { "" };
        format!(
            r#"{{"host": "127.0.0.1", "port": {}, "name": "app", "user": "{PG_USER}", "password": "{PG_PASSWORD}", "conn_max_age": 60{sslmode}}}"#,
            self.port
        )
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGTERM is a smart shutdown: stops once the app's connections are gone.
        drop(self.server.take());
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// One request on its own connection (`headers` end with CRLF each); returns (status, body).
pub fn request(port: u16, method: &str, path: &str, headers: &str, body: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n{headers}\r\n{body}")?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out);
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
}

/// `name{a="x",b="y"} v` lines of one family, as (labels, value).
pub fn family(metrics: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix('{')?;
            let (labels, value) = rest.rsplit_once("} ")?;
            let map = labels
                .split("\",")
                .filter_map(|kv| {
                    kv.split_once("=\"").map(|(k, v)| (k.to_string(), v.trim_end_matches('"').to_string()))
                })
                .collect();
            Some((map, value.parse().ok()?))
        })
        .collect()
}

pub fn scalar(metrics: &str, name: &str) -> f64 {
    // + 0.0: an empty f64 sum is -0.0
    metrics
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>()
        + 0.0
}

/// A throwaway Redis (nothing persisted) on a free loopback port.
pub fn start_redis(dir: &Path) -> Result<(Guard, u16)> {
    start_redis_with(dir, false)
}

/// The same, serving TLS only (`rediss://`; clients are not asked for a certificate).
pub fn start_redis_tls(dir: &Path) -> Result<(Guard, u16)> {
    start_redis_with(dir, true)
}

fn start_redis_with(dir: &Path, tls: bool) -> Result<(Guard, u16)> {
    let port = free_port()?;
    let listen: Vec<String> = if tls {
        let (crt, key) = self_signed(dir, "redis")?;
        let (crt, key) = (crt.display().to_string(), key.display().to_string());
        ["--port", "0", "--tls-port", &port.to_string(), "--tls-cert-file", &crt, "--tls-key-file", &key]
            .into_iter()
            .chain(["--tls-auth-clients", "no"])
            .map(String::from)
            .collect()
    } else {
        vec!["--port".into(), port.to_string()]
    };
    let server = Command::new("redis-server")
        .args(listen)
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--dir", dir.to_str().context("path")?, "--daemonize", "no", "--loglevel", "warning"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting redis-server (cargo xtask setup installs it)")?;
    let guard = Guard(server);
    wait_port(port)?;
    Ok((guard, port))
}
