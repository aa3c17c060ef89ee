//! A fault-injecting HTTP/1.1 proxy on loopback, between pgds and a real streams server.
//!
//! Every request is read whole and forwarded on a fresh upstream connection (`connection:
//! close` both ways keeps the parsing trivial), unless the proxy's settings say otherwise:
//! - [`Faults`]: random faults per request, from a seeded generator: answer 500, 503 or 429
//!   (both with `Retry-After: 1`) without forwarding; close the connection mid-request; forward
//!   and lose the answer; forward and answer 500 although the server applied the append; delay
//!   the answer; hold the request longer than the client's timeout before forwarding it.
//! - [`Block`]: the server is unreachable: connections refused, a black hole (requests read,
//!   never answered), or one status for everything.
//! - a latency added to every append (a slow sink).
//!
//! The proxy runs on its own thread and runtime, so a test that blocks its own threads (process
//! restarts, `psql`) never stalls it. Each request is recorded (time, method, path, what was
//! injected, the status the client got) for the test's assertions.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use super::http1::{forward, read_body, read_head, status_of};

/// Probabilities (each in [0, 1], summing to at most 1) of the faults injected into a request.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// Answer 500 without forwarding.
    pub status_500: f64,
    /// Answer 503 with `Retry-After: 1` without forwarding.
    pub status_503: f64,
    /// Answer 429 with `Retry-After: 1` without forwarding.
    pub status_429: f64,
    /// Read the request head, then close the connection (reset) without forwarding.
    pub close_mid_request: f64,
    /// Forward, then close without answering: the server applied it, the client never hears.
    pub lost_response: f64,
    /// Forward, then answer 500 instead of the server's answer.
    pub error_after_apply: f64,
    /// Forward, then hold the answer up to `max_delay`.
    pub delay: f64,
    /// Hold the request for `stall_for` (longer than the client's timeout), then forward it.
    pub stall: f64,
    pub max_delay: Duration,
    pub stall_for: Duration,
    /// Inject into every request; by default only appends (POST) get faults.
    pub all_methods: bool,
}

/// The server as seen through the proxy is unreachable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Block {
    /// Not listening: connections are refused.
    Refuse,
    /// Connections are accepted and requests read, never answered.
    Hang,
    /// Every request is answered with this status without being forwarded.
    Status(u16),
}

/// What the proxy did to a request beyond forwarding it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Injected {
    Status500,
    Status503,
    Status429,
    CloseMidRequest,
    LostResponse,
    ErrorAfterApply,
    Delay,
    Stall,
    /// Answered or dropped because of a [`Block`].
    Blocked,
    /// The upstream server could not be reached: answered 502.
    UpstreamDown,
}

/// One request the proxy saw.
#[derive(Clone, Debug)]
pub struct Record {
    /// When the request was read.
    pub at: Instant,
    pub method: String,
    pub path: String,
    /// Request body bytes.
    pub body_len: usize,
    pub injected: Option<Injected>,
    /// The request reached the server.
    pub forwarded: bool,
    /// The status the client got (`None`: no answer).
    pub status: Option<u16>,
}

struct State {
    faults: Faults,
    latency: Duration,
    block: Option<Block>,
    rng: u64,
    records: Vec<Record>,
}

impl State {
    fn unit(&mut self) -> f64 {
        // SplitMix64: good enough, and the same sequence for the same seed.
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    fn draw(&mut self, method: &str) -> Option<Injected> {
        let f = self.faults;
        if method != "POST" && !f.all_methods {
            return None;
        }
        let mut u = self.unit();
        for (p, kind) in [
            (f.status_500, Injected::Status500),
            (f.status_503, Injected::Status503),
            (f.status_429, Injected::Status429),
            (f.close_mid_request, Injected::CloseMidRequest),
            (f.lost_response, Injected::LostResponse),
            (f.error_after_apply, Injected::ErrorAfterApply),
            (f.delay, Injected::Delay),
            (f.stall, Injected::Stall),
        ] {
            if u < p {
                return Some(kind);
            }
            u -= p;
        }
        None
    }
}

struct Shared {
    state: Mutex<State>,
    stop: AtomicBool,
    /// Connections being served (requests read or being read, not yet answered or dropped).
    active: AtomicUsize,
}

/// Counts a connection as active while it lives.
struct Active<'a>(&'a AtomicUsize);

impl<'a> Active<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::SeqCst);
        Active(n)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Shared {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().expect("proxy state lock"))
    }
}

/// A running proxy; stops on drop.
pub struct FaultProxy {
    port: u16,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Start a transparent proxy to `127.0.0.1:upstream_port`; `seed` drives the fault choices.
    pub fn start(upstream_port: u16, seed: u64) -> FaultProxy {
        let std_listener =
            std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind the proxy");
        std_listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let port = std_listener.local_addr().expect("proxy address").port();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                faults: Faults::default(),
                latency: Duration::ZERO,
                block: None,
                rng: seed,
                records: Vec::new(),
            }),
            stop: AtomicBool::new(false),
            active: AtomicUsize::new(0),
        });
        let upstream = SocketAddr::from((Ipv4Addr::LOCALHOST, upstream_port));
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("the proxy runtime");
                rt.block_on(accept_loop(std_listener, port, upstream, thread_shared));
            })
            .expect("spawn the proxy thread");
        FaultProxy {
            port,
            shared,
            thread: Some(thread),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`, for `streams.base_url`.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Replace the random faults (`Faults::default()`: none).
    pub fn set_faults(&self, faults: Faults) {
        self.shared.with(|s| s.faults = faults);
    }

    /// Add `latency` before every append is forwarded (a slow sink); zero: none.
    pub fn set_latency(&self, latency: Duration) {
        self.shared.with(|s| s.latency = latency);
    }

    /// Make the server unreachable (`Some`) or reachable again (`None`).
    pub fn set_block(&self, block: Option<Block>) {
        self.shared.with(|s| s.block = block);
    }

    /// Requests the proxy holds now (being read, delayed, stalled or forwarded).
    pub fn in_flight(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    /// Wait until the proxy holds no request (a stalled one may still reach the server until
    /// then); panics after `timeout`.
    pub async fn wait_idle(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.in_flight() > 0 {
            assert!(
                Instant::now() < deadline,
                "the proxy still holds {} requests after {timeout:?}",
                self.in_flight()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The current fault settings.
    pub fn faults(&self) -> Faults {
        self.shared.with(|s| s.faults)
    }

    /// Every request seen so far.
    pub fn records(&self) -> Vec<Record> {
        self.shared.with(|s| s.records.clone())
    }

    /// How many requests got each kind of fault.
    pub fn injected_counts(&self) -> BTreeMap<Injected, usize> {
        let mut counts = BTreeMap::new();
        for r in self.records() {
            if let Some(kind) = r.injected {
                *counts.entry(kind).or_default() += 1;
            }
        }
        counts
    }

    /// Body bytes of the appends forwarded to the server.
    pub fn forwarded_append_bytes(&self) -> usize {
        self.shared.with(|s| {
            s.records
                .iter()
                .filter(|r| r.method == "POST" && r.forwarded)
                .map(|r| r.body_len)
                .sum()
        })
    }

    /// Appends that reached the server and whose answer reached the client.
    pub fn delivered_appends(&self) -> usize {
        self.records()
            .iter()
            .filter(|r| r.method == "POST" && r.forwarded && r.status.is_some())
            .count()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

const POLL: Duration = Duration::from_millis(20);

async fn accept_loop(
    std_listener: std::net::TcpListener,
    port: u16,
    upstream: SocketAddr,
    shared: Arc<Shared>,
) {
    let mut listener = Some(TcpListener::from_std(std_listener).expect("a tokio listener"));
    while !shared.stop.load(Ordering::SeqCst) {
        let refuse = shared.with(|s| s.block == Some(Block::Refuse));
        if refuse {
            // Not listening: the kernel refuses connections to the port.
            listener = None;
            tokio::time::sleep(POLL).await;
            continue;
        }
        let Some(l) = listener.as_ref() else {
            // Listen again on the same port (retry a while should the port be busy).
            match TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await {
                Ok(l) => listener = Some(l),
                Err(_) => tokio::time::sleep(POLL).await,
            }
            continue;
        };
        tokio::select! {
            accepted = l.accept() => {
                if let Ok((client, _)) = accepted {
                    tokio::spawn(serve(client, upstream, shared.clone()));
                }
            }
            () = tokio::time::sleep(POLL) => {}
        }
    }
}

/// Wait until `done` holds or the proxy stops.
async fn wait_while(shared: &Shared, mut busy: impl FnMut(&State) -> bool) {
    while !shared.stop.load(Ordering::SeqCst) && shared.with(|s| busy(s)) {
        tokio::time::sleep(POLL).await;
    }
}

async fn serve(mut client: TcpStream, upstream: SocketAddr, shared: Arc<Shared>) {
    let _active = Active::new(&shared.active);
    let Some(head) = read_head(&mut client).await else {
        return;
    };
    let mut words = head.text.split(' ');
    let method = words.next().unwrap_or_default().to_owned();
    let path = words.next().unwrap_or_default().to_owned();
    let (block, injected, latency, faults) = shared.with(|s| {
        let injected = if s.block.is_some() {
            None
        } else {
            s.draw(&method)
        };
        (s.block, injected, s.latency, s.faults)
    });
    let mut record = Record {
        at: Instant::now(),
        method,
        path,
        body_len: head.content_length,
        injected,
        forwarded: false,
        status: None,
    };
    let finish = |record: Record| shared.with(|s| s.records.push(record));

    if injected == Some(Injected::CloseMidRequest) {
        // Drop the connection with the body (partly) unread: the client sees a reset.
        drop(client);
        finish(record);
        return;
    }
    let Some(body) = read_body(&mut client, &head).await else {
        return;
    };
    if let Some(block) = block {
        record.injected = Some(Injected::Blocked);
        match block {
            Block::Status(status) => {
                respond(&mut client, status, None).await;
                record.status = Some(status);
            }
            // Refused connections never get here; one accepted just before counts as a hang.
            Block::Hang | Block::Refuse => {
                wait_while(&shared, |s| s.block.is_some()).await;
            }
        }
        finish(record);
        return;
    }
    let status_only = match injected {
        Some(Injected::Status500) => Some((500, None)),
        Some(Injected::Status503) => Some((503, Some("1"))),
        Some(Injected::Status429) => Some((429, Some("1"))),
        _ => None,
    };
    if let Some((status, retry_after)) = status_only {
        respond(&mut client, status, retry_after).await;
        record.status = Some(status);
        finish(record);
        return;
    }
    if record.method == "POST" && !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if injected == Some(Injected::Stall) {
        tokio::time::sleep(faults.stall_for).await;
    }
    let Some(answer) = forward(upstream, &head.text, &body).await else {
        record.injected = record.injected.or(Some(Injected::UpstreamDown));
        respond(&mut client, 502, None).await;
        record.status = Some(502);
        finish(record);
        return;
    };
    record.forwarded = true;
    match injected {
        Some(Injected::LostResponse) => {}
        Some(Injected::ErrorAfterApply) => {
            respond(&mut client, 500, None).await;
            record.status = Some(500);
        }
        _ => {
            if injected == Some(Injected::Delay) {
                let unit = shared.with(State::unit);
                tokio::time::sleep(faults.max_delay.mul_f64(unit)).await;
            }
            if client.write_all(&answer).await.is_ok() {
                record.status = status_of(&answer);
            }
        }
    }
    let _ = client.shutdown().await;
    finish(record);
}

async fn respond(client: &mut TcpStream, status: u16, retry_after: Option<&str>) {
    let extra = retry_after
        .map(|v| format!("retry-after: {v}\r\n"))
        .unwrap_or_default();
    let answer = format!(
        "HTTP/1.1 {status} Injected\r\ncontent-length: 0\r\nconnection: close\r\n{extra}\r\n"
    );
    let _ = client.write_all(answer.as_bytes()).await;
    let _ = client.shutdown().await;
}
