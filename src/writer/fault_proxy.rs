//! Test-only HTTP/1.1 proxy in front of the real streams server, scripted to inject faults:
//! answer a status without forwarding, forward and then drop the answer (a lost response),
//! refuse bodies over a size (413), refuse HEAD, or answer 503 to everything while blocked.
//!
//! One request per connection (`connection: close` both ways) keeps the parsing trivial.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use url::Url;

use super::http1::{forward, header, read_body, read_head, status_of};

/// What to do with the next POST (appends); other requests are forwarded unless blocked.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Action {
    /// Answer with this status (and `Retry-After`) without forwarding.
    Respond {
        status: u16,
        retry_after: Option<&'static str>,
    },
    /// Forward, then close the connection without answering.
    ForwardAndDrop,
    /// Forward, close without answering, then block (503 to everything) until `unblock`.
    ForwardDropAndBlock,
}

/// One request the proxy saw.
#[derive(Clone, Debug)]
pub(crate) struct Seen {
    pub method: String,
    pub body_len: usize,
    /// The status the client got (`None` when the answer was dropped).
    pub status: Option<u16>,
    pub forwarded: bool,
    pub authorization: Option<String>,
}

#[derive(Default)]
struct Script {
    actions: VecDeque<Action>,
    max_body: Option<usize>,
    /// Answer every HEAD with this status (a server without tail checks).
    head_status: Option<u16>,
    blocked: bool,
    seen: Vec<Seen>,
    /// Requests being served now, per request path.
    active: HashMap<String, usize>,
    /// The most requests served at once: overall, and for any one path.
    max_active: usize,
    max_active_per_path: usize,
}

impl Script {
    fn enter(&mut self, path: &str) {
        let n = self.active.entry(path.to_owned()).or_default();
        *n += 1;
        self.max_active_per_path = self.max_active_per_path.max(*n);
        let total = self.active.values().sum::<usize>();
        self.max_active = self.max_active.max(total);
    }

    fn leave(&mut self, path: &str, seen: Seen) {
        if let Some(n) = self.active.get_mut(path) {
            *n -= 1;
            if *n == 0 {
                self.active.remove(path);
            }
        }
        self.seen.push(seen);
    }
}

pub(crate) struct FaultProxy {
    addr: SocketAddr,
    script: Arc<Mutex<Script>>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let script = Arc::new(Mutex::new(Script::default()));
        let shared = script.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(serve(client, upstream, shared.clone()));
            }
        });
        Self { addr, script, task }
    }

    pub fn base_url(&self) -> Url {
        Url::parse(&format!("http://{}", self.addr)).expect("proxy url")
    }

    fn with<T>(&self, f: impl FnOnce(&mut Script) -> T) -> T {
        f(&mut self.script.lock().expect("proxy script lock"))
    }

    pub fn push(&self, action: Action) {
        self.with(|s| s.actions.push_back(action));
    }

    pub fn set_max_body(&self, max: usize) {
        self.with(|s| s.max_body = Some(max));
    }

    pub fn set_head_status(&self, status: u16) {
        self.with(|s| s.head_status = Some(status));
    }

    pub fn block(&self) {
        self.with(|s| s.blocked = true);
    }

    pub fn unblock(&self) {
        self.with(|s| s.blocked = false);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.with(|s| s.seen.clone())
    }

    /// The most requests served at once, overall and for one stream.
    pub fn max_concurrency(&self) -> (usize, usize) {
        self.with(|s| (s.max_active, s.max_active_per_path))
    }

    /// POSTs that reached the server and whose answer the client received.
    pub fn delivered_posts(&self) -> Vec<Seen> {
        let seen = self.seen();
        seen.into_iter()
            .filter(|s| s.method == "POST" && s.forwarded && s.status.is_some())
            .collect()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

enum Plan {
    Respond(u16, Option<&'static str>),
    Forward { drop_answer: bool, then_block: bool },
}

async fn serve(mut client: TcpStream, upstream: SocketAddr, script: Arc<Mutex<Script>>) {
    let Some((head, body)) = read_request(&mut client).await else {
        return;
    };
    let mut words = head.split(' ');
    let method = words.next().unwrap_or_default().to_owned();
    let path = words.next().unwrap_or_default().to_owned();
    let authorization = header(&head, "authorization");
    let plan = {
        let mut s = script.lock().expect("proxy script lock");
        s.enter(&path);
        if s.blocked {
            Plan::Respond(503, None)
        } else if let (true, Some(status)) = (method == "HEAD", s.head_status) {
            Plan::Respond(status, None)
        } else if method == "POST" && s.max_body.is_some_and(|max| body.len() > max) {
            Plan::Respond(413, None)
        } else if method == "POST" {
            match s.actions.pop_front() {
                Some(Action::Respond {
                    status,
                    retry_after,
                }) => Plan::Respond(status, retry_after),
                Some(Action::ForwardAndDrop) => Plan::Forward {
                    drop_answer: true,
                    then_block: false,
                },
                Some(Action::ForwardDropAndBlock) => Plan::Forward {
                    drop_answer: true,
                    then_block: true,
                },
                None => Plan::Forward {
                    drop_answer: false,
                    then_block: false,
                },
            }
        } else {
            Plan::Forward {
                drop_answer: false,
                then_block: false,
            }
        }
    };
    let mut seen = Seen {
        method,
        body_len: body.len(),
        status: None,
        forwarded: false,
        authorization,
    };
    match plan {
        Plan::Respond(status, retry_after) => {
            let extra = retry_after
                .map(|v| format!("retry-after: {v}\r\n"))
                .unwrap_or_default();
            let answer = format!(
                "HTTP/1.1 {status} Injected\r\ncontent-length: 0\r\nconnection: close\r\n{extra}\r\n"
            );
            let _ = client.write_all(answer.as_bytes()).await;
            seen.status = Some(status);
        }
        Plan::Forward {
            drop_answer,
            then_block,
        } => {
            let Some(answer) = forward(upstream, &head, &body).await else {
                let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
                seen.status = Some(502);
                script.lock().expect("proxy script lock").leave(&path, seen);
                return;
            };
            seen.forwarded = true;
            if then_block {
                script.lock().expect("proxy script lock").blocked = true;
            }
            if !drop_answer {
                let _ = client.write_all(&answer).await;
                seen.status = status_of(&answer);
            }
        }
    }
    let _ = client.shutdown().await;
    script.lock().expect("proxy script lock").leave(&path, seen);
}

async fn read_request(client: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let head = read_head(client).await?;
    let body = read_body(client, &head).await?;
    Some((head.text, body))
}
