//! A real `durable-streams-server` per test, on a free loopback port with its own data dir
//! (`--durability wal`), killed on drop, plus a small reader for the JSON streams pgds writes.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use super::{free_port, log_tail, percent_encode, summarize};

/// One read of a JSON stream: its messages, `Stream-Next-Offset`, and whether it is up to date.
pub struct Page {
    pub events: Vec<Value>,
    pub next: Option<String>,
    pub up_to_date: bool,
}

/// GET the JSON stream at `path` from `offset`; `None` when the stream does not exist (404).
/// Panics on any other failure, showing the answer.
pub async fn read_page(
    http: &reqwest::Client,
    base_url: &str,
    path: &str,
    offset: &str,
) -> Option<Page> {
    let url = format!("{base_url}{path}?offset={}", percent_encode(offset));
    let resp = http
        .get(&url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    if status == 404 {
        return None;
    }
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let up_to_date = header("stream-up-to-date").is_some_and(|v| v == "true");
    let next = header("stream-next-offset");
    let body = resp
        .bytes()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: reading the body: {e}"));
    assert!(
        status == 200 || status == 204,
        "GET {url}: status {status}: {}",
        String::from_utf8_lossy(&body)
    );
    let events = if body.is_empty() {
        Vec::new()
    } else {
        serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!(
                "GET {url}: the body is not a JSON array ({e}): {}",
                String::from_utf8_lossy(&body)
            )
        })
    };
    Some(Page {
        events,
        next,
        up_to_date,
    })
}

const START_TIMEOUT: Duration = Duration::from_secs(30);
const PORT_ATTEMPTS: usize = 5;

/// A running streams server owned by one test.
pub struct StreamsServer {
    port: u16,
    child: Option<Child>,
    /// Holds `data/` (the server's data dir) and `server.log`.
    dir: TempDir,
    http: reqwest::Client,
}

impl StreamsServer {
    /// The server binary: `PGDS_STREAMS_SERVER`, else `.tools/bin/durable-streams-server` in the
    /// crate (installed by `scripts/test`).
    pub fn binary() -> PathBuf {
        let path = std::env::var_os("PGDS_STREAMS_SERVER")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/durable-streams-server")
            });
        assert!(
            path.is_file(),
            "durable-streams-server not found at {}: run the tests with scripts/test, which \
             installs it (cargo install durable-streams --version 0.1.5 --locked --root .tools), \
             or point PGDS_STREAMS_SERVER at the binary",
            path.display()
        );
        path
    }

    /// Start a server on a free port with a fresh data dir.
    pub fn start() -> StreamsServer {
        let dir = tempfile::Builder::new()
            .prefix("pgds-streams-")
            .tempdir()
            .expect("create a temp dir for the streams server");
        let mut server = StreamsServer {
            port: 0,
            child: None,
            dir,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("build an HTTP client"),
        };
        for attempt in 1..=PORT_ATTEMPTS {
            server.port = free_port();
            if server.spawn() {
                return server;
            }
            let log = std::fs::read_to_string(server.log_path()).unwrap_or_default();
            if attempt == PORT_ATTEMPTS || !log.to_lowercase().contains("in use") {
                panic!(
                    "durable-streams-server exited during start-up on port {}; its log ends with:\n{}",
                    server.port,
                    log_tail(&server.log_path(), 30)
                );
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Spawn the server on `self.port` and wait until it accepts connections; `false` when it
    /// exited first.
    fn spawn(&mut self) -> bool {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the streams server log");
        let err = log.try_clone().expect("clone the log file handle");
        let mut child = Command::new(Self::binary())
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--durability", "wal", "--long-poll-timeout-ms", "1000"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn durable-streams-server: {e}"));
        let deadline = Instant::now() + START_TIMEOUT;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                self.child = Some(child);
                return true;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "durable-streams-server on port {} did not accept connections within {START_TIMEOUT:?}; its log ends with:\n{}",
                    self.port,
                    log_tail(&self.log_path(), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// SIGKILL the server; its data dir stays for [`StreamsServer::restart`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kill the server (if running) and start it again on the same port and data dir.
    pub fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn(),
            "durable-streams-server did not restart on port {}; its log ends with:\n{}",
            self.port,
            log_tail(&self.log_path(), 30)
        );
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// Whether the server's `Stream-Seq` memory on disk is up to date: every stream's metadata
    /// sidecar (`data/streams/NAME.meta`, which holds `last_seq_header`) was written after its
    /// data file last changed. The server writes sidecars at its WAL checkpoint (every ~3 s,
    /// plus the checkpoint's own duration), so a crash before that forgets the seqs of the
    /// latest appends while keeping their data.
    pub fn seq_state_persisted(&self) -> bool {
        let dir = self.dir.path().join("data/streams");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return true;
        };
        let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        entries.filter_map(Result::ok).all(|entry| {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "meta") {
                return true;
            }
            let meta = PathBuf::from(format!("{}.meta", path.display()));
            match (modified(&path), modified(&meta)) {
                (Some(data), Some(meta)) => meta >= data,
                // Not a stream data file (lane markers), or no sidecar yet.
                (_, None) => !path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().contains('~')),
                (None, Some(_)) => true,
            }
        })
    }

    /// Poll [`StreamsServer::seq_state_persisted`] until it holds; panic after `timeout`.
    pub fn wait_seq_state_persisted(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.seq_state_persisted() {
            assert!(
                Instant::now() < deadline,
                "the streams server did not persist its Stream-Seq state within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every message of the JSON stream at `path` (e.g. `/v1/stream/user/alice/data`), from the
    /// beginning, following `Stream-Next-Offset` until `Stream-Up-To-Date`. A stream that does
    /// not exist (404) reads as empty.
    pub async fn read(&self, path: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut offset = "-1".to_owned();
        loop {
            let Some(page) = read_page(&self.http, &self.base_url(), path, &offset).await else {
                return out;
            };
            out.extend(page.events);
            match page.next {
                Some(next) if !page.up_to_date && next != offset => offset = next,
                _ => return out,
            }
        }
    }

    /// Poll [`StreamsServer::read`] until `pred` holds for the stream's messages, and return
    /// them; panic after `timeout` showing what the stream held.
    pub async fn read_until(
        &self,
        path: &str,
        mut pred: impl FnMut(&[Value]) -> bool,
        timeout: Duration,
    ) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.read(path).await;
            if pred(&events) {
                return events;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting on stream {path}; it holds {} messages:\n{}",
                    events.len(),
                    summarize(&events)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for StreamsServer {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- durable-streams-server log (port {}), last lines ---\n{}",
                self.port,
                log_tail(&self.log_path(), 10)
            );
        }
    }
}
