//! `cargo xtask demo`: a small HTTP server (Python's http.server on loopback) traced with
//! `observer trace --port`, driven by a few requests, with the captured records and a
//! short summary printed. Every process started here is stopped by its PID.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    net::{TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{root, run};

/// Kills and reaps a child we started when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn demo() -> Result<()> {
    run(Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())).args([
        "build",
        "--quiet",
        "--package",
        "observer",
    ]))?;
    let observer = root().join("target/debug/observer");

    let dir = std::env::temp_dir().join(format!("observer-demo-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    fs::write(dir.join("index.html"), "<h1>hello from the observer demo</h1>\n")?;
    fs::write(dir.join("big.txt"), "x".repeat(20_000))?;
    let port = free_port()?;
    let server = Guard(
        Command::new("/usr/bin/python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1", &port.to_string()])
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting python3 -m http.server")?,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("the demo HTTP server did not start");
        }
        thread::sleep(Duration::from_millis(50));
    }
    println!("demo: HTTP server pid {} on 127.0.0.1:{port}; tracing it with:", server.0.id());
    println!("demo:   observer trace --port {port}\n");

    let mut tracer = Guard(
        Command::new(&observer)
            .args(["trace", "--port", &port.to_string(), "--duration", "4", "--preview-bytes", "72"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting observer trace")?,
    );
    // Wait until the programs are attached (its "tracing" line on stderr).
    let stderr = tracer.0.stderr.take().context("observer stderr")?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut counters = Vec::new();
    loop {
        let line = rx.recv_timeout(Duration::from_secs(30)).context("observer did not start")?;
        if line.starts_with("observer: tracing") {
            println!("{line}");
            break;
        }
        if line.starts_with("observer: ") {
            bail!("{line}");
        }
    }

    // A few requests, from a client that is not traced (only the server is selected).
    let client = format!(
        "import urllib.request as u\n\
         for path in ['/', '/big.txt', '/missing']:\n\
         \x20   try: print(path, u.urlopen('http://127.0.0.1:{port}' + path).status)\n\
         \x20   except Exception as e: print(path, e)\n"
    );
    let out = Command::new("/usr/bin/python3").args(["-c", &client]).output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    println!();

    let stdout = tracer.0.stdout.take().context("observer stdout")?;
    let records: Vec<String> = BufReader::new(stdout).lines().map_while(Result::ok).collect();
    let status = tracer.0.wait()?;
    counters.extend(rx.try_iter().filter(|l| l.starts_with("observer_")));
    for r in &records {
        println!("{r}");
    }
    if !status.success() {
        bail!("observer trace exited with {status}");
    }
    let data = records.iter().filter(|r| r.contains(" recv ") || r.contains(" send ")).count();
    let conns = records.iter().filter(|r| r.contains("] open fd=")).count();
    println!("\ndemo: {data} data records on {conns} connections; loss counters:");
    for c in &counters {
        println!("demo:   {c}");
    }
    println!("\ndemo: from the HTTP issue on, this demo runs a Django app and serves /metrics.");
    drop(server);
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}
