//! TLS for the tests: a certificate made by `openssl` for 127.0.0.1 (what the servers
//! under test present), and clients that trust exactly it.

use std::{
    io::{self, Read, Write},
    net::TcpStream,
    process::Command,
    sync::Arc,
};

use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned, pki_types::CertificateDer};

use super::TempDir;

/// A self-signed certificate and its key, as PEM files, for `localhost` and 127.0.0.1.
pub struct Cert {
    pub crt: String,
    pub key: String,
    der: Vec<u8>,
    _dir: TempDir,
}

impl Cert {
    pub fn new() -> Self {
        let dir = TempDir::new("tls");
        let (crt, key, der) = (
            format!("{}/cert.pem", dir.path()),
            format!("{}/key.pem", dir.path()),
            format!("{}/cert.der", dir.path()),
        );
        let out = Command::new("openssl")
            .args(["req", "-new", "-x509", "-days", "1", "-nodes", "-subj", "/CN=localhost"])
            .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-newkey", "rsa:2048"])
            // A server certificate, not a CA (what webpki accepts as the end entity).
            .args(["-addext", "basicConstraints=critical,CA:FALSE", "-addext", "extendedKeyUsage=serverAuth"])
            .args(["-out", &crt, "-keyout", &key])
            .output()
            .expect("run openssl");
        assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
        let out = Command::new("openssl")
            .args(["x509", "-in", &crt, "-outform", "DER", "-out", &der])
            .output()
            .unwrap();
        assert!(out.status.success(), "openssl x509: {}", String::from_utf8_lossy(&out.stderr));
        let der = std::fs::read(der).unwrap();
        Self { crt, key, der, _dir: dir }
    }

    /// A client configuration that trusts this certificate only.
    pub fn client(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from(self.der.clone())).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Arc::new(
            ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}

/// How a test client reaches a server: plain TCP, or TLS over it.
#[derive(Clone)]
pub enum Transport {
    Plain,
    Tls(Arc<ClientConfig>),
}

/// A connected client stream.
pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

impl Transport {
    pub fn connect(&self, port: u16) -> Box<dyn Stream> {
        let tcp = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        tcp.set_read_timeout(Some(super::patience(20))).unwrap();
        match self {
            Self::Plain => Box::new(tcp),
            Self::Tls(cfg) => {
                let name = "127.0.0.1".try_into().unwrap();
                let conn = ClientConnection::new(cfg.clone(), name).expect("TLS client");
                Box::new(Lenient(StreamOwned::new(conn, tcp)))
            }
        }
    }
}

impl Transport {
    /// A TLS handshake with the server on `port`, then a close: a session that never
    /// carries a byte of plaintext.
    #[allow(dead_code)]
    pub fn handshake_only(&self, port: u16) {
        let Self::Tls(cfg) = self else { panic!("a handshake needs TLS") };
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        tcp.set_read_timeout(Some(super::patience(20))).unwrap();
        let mut conn =
            ClientConnection::new(cfg.clone(), "127.0.0.1".try_into().unwrap()).expect("TLS client");
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp).expect("TLS handshake");
        }
    }
}

/// A server that closes without a TLS close_notify (Python's `ssl` sockets do) ends the
/// stream like a TCP close does: the response was delimited by the close.
struct Lenient<S>(S);

impl<S: Read> Read for Lenient<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.0.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
            r => r,
        }
    }
}

impl<S: Write> Write for Lenient<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}
