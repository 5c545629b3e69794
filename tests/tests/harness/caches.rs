//! A private Redis or memcached for a test: Debian's server on a free loopback port (and
//! a Unix socket in a temp dir for Redis), nothing persisted; stopped (exactly the PID we
//! started) on drop or when the test says so.

use std::process::{Child, Command, Stdio};

use super::{
    TempDir,
    django::{free_port, wait_for_port},
};

pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    /// Its Unix socket.
    pub socket: String,
    _dir: TempDir,
    /// Serves TLS (not plaintext) on `port`.
    tls: bool,
}

fn redis_server(port: u16, dir: &TempDir, socket: &str, tls: bool) -> Child {
    let listen = if tls {
        // A self-signed certificate made here; clients are not asked for one.
        let (crt, key) = (format!("{}/redis.crt", dir.path()), format!("{}/redis.key", dir.path()));
        if !std::path::Path::new(&crt).exists() {
            let out = Command::new("openssl")
                .args(["req", "-new", "-x509", "-days", "1", "-nodes", "-subj", "/CN=localhost"])
                .args(["-newkey", "rsa:2048", "-out", &crt, "-keyout", &key])
                .output()
                .expect("run openssl");
            assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
        }
        vec![
            "--port".to_string(),
            "0".into(),
            "--tls-port".into(),
            port.to_string(),
            "--tls-cert-file".into(),
            crt,
        ]
        .into_iter()
        .chain(["--tls-key-file".to_string(), key, "--tls-auth-clients".into(), "no".into()])
        .collect()
    } else {
        vec!["--port".to_string(), port.to_string()]
    };
    let mut child = Command::new("redis-server")
        .args(listen)
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--dir", dir.path(), "--unixsocket", socket, "--unixsocketperm", "700"])
        .args(["--daemonize", "no", "--loglevel", "warning"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server (cargo xtask setup installs it)");
    wait_for_port(port, &mut child, "redis-server");
    child
}

impl Redis {
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// Serving TLS on its TCP port (`rediss://`, what managed Redis offers).
    pub fn start_tls() -> Self {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Self {
        let dir = TempDir::new("redis");
        let port = free_port();
        let socket = format!("{}/redis.sock", dir.path());
        let child = redis_server(port, &dir, &socket, tls);
        Self { child: Some(child), port, socket, _dir: dir, tls }
    }

    /// Kills the server and starts an empty one on the same port and socket.
    pub fn restart(&mut self, down_for: std::time::Duration) {
        self.stop();
        std::thread::sleep(down_for);
        self.child = Some(redis_server(self.port, &self._dir, &self.socket, self.tls));
    }

    /// `redis://127.0.0.1:<port>/0`, or `rediss://...` (its certificate not checked).
    pub fn url(&self) -> String {
        if self.tls {
            format!("rediss://127.0.0.1:{}/0?ssl_cert_reqs=none", self.port)
        } else {
            format!("redis://127.0.0.1:{}/0", self.port)
        }
    }

    /// `unix://<socket>?db=0`.
    pub fn unix_url(&self) -> String {
        format!("unix://{}?db=0", self.socket)
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing answers.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// Stops the server now (its clients see their connections end).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            super::stop(&mut c, libc::SIGKILL);
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

pub struct Memcached {
    child: Child,
    pub port: u16,
}

impl Memcached {
    pub fn start() -> Self {
        let port = free_port();
        let mut child = Command::new("memcached")
            .args(["-l", "127.0.0.1", "-p", &port.to_string(), "-U", "0", "-m", "64", "-u", "root"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start memcached (cargo xtask setup installs it)");
        wait_for_port(port, &mut child, "memcached");
        Self { child, port }
    }

    /// `127.0.0.1:<port>`.
    pub fn location(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Memcached {
    fn drop(&mut self) {
        super::stop(&mut self.child, libc::SIGTERM);
    }
}
