//! Test harness: a real `durable-streams-server` on a free loopback port with its own data dir,
//! killed (and its dir removed) on drop, plus helpers to read a stream back.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use url::Url;

/// Override with `PGDS_STREAMS_SERVER=/path/to/durable-streams-server`.
const DEFAULT_BINARY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/.tools/bin/durable-streams-server"
);

pub(crate) struct TestServer {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl TestServer {
    pub fn start() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pgds-writer-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).expect("create the test server's data dir");
        let port = free_port();
        let child = spawn(&dir, port);
        Self { child, port, dir }
    }

    /// SIGKILL and start again on the same port and data dir (a crash of the server).
    pub fn crash_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(&self.dir, self.port);
    }

    pub fn base_url(&self) -> Url {
        Url::parse(&format!("http://127.0.0.1:{}", self.port)).expect("loopback url")
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn spawn(dir: &std::path::Path, port: u16) -> Child {
    let binary = std::env::var_os("PGDS_STREAMS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BINARY));
    assert!(
        binary.is_file(),
        "the Durable Streams server binary is missing at {}: install it with \
         `cargo install durable-streams --version 0.1.5 --locked --root .tools` \
         or set PGDS_STREAMS_SERVER to its path",
        binary.display()
    );
    let log = std::fs::File::create(dir.join("server.log")).expect("create the server log");
    let mut child = Command::new(&binary)
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--data-dir",
        ])
        .arg(dir.join("data"))
        .args(["--durability", "wal"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone the log handle"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
    let deadline = Instant::now() + Duration::from_secs(15);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the streams server exited at start ({status}); see {}",
                dir.join("server.log").display()
            );
        }
        assert!(
            Instant::now() < deadline,
            "the streams server did not listen on {addr} within 15 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free loopback port")
        .port()
}

/// Every message of a JSON-mode stream, from the beginning.
pub(crate) async fn read_stream(url: &str) -> Vec<serde_json::Value> {
    let http = reqwest::Client::new();
    let mut messages = Vec::new();
    let mut offset = "-1".to_owned();
    for _ in 0..1000 {
        let response = http
            .get(format!("{url}?offset={offset}"))
            .send()
            .await
            .expect("read the stream");
        assert_eq!(response.status(), 200, "GET {url}");
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let up_to_date = header("stream-up-to-date").as_deref() == Some("true");
        let next = header("stream-next-offset").expect("stream-next-offset");
        let body = response.bytes().await.expect("read the body");
        let page: Vec<serde_json::Value> = serde_json::from_slice(&body).expect("a JSON array");
        messages.extend(page);
        if up_to_date {
            return messages;
        }
        offset = next;
    }
    panic!("{url} did not reach up-to-date");
}

/// Waits for a condition with a deadline (never a fixed sleep).
pub(crate) async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
