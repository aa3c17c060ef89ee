//! The operations endpoint: `/metrics` (Prometheus text), `/healthz` (the process is alive) and
//! `/readyz` (streaming, and not lagging past the configured bound). A deliberately tiny
//! HTTP/1.1 responder: one GET per connection, bounded request size and time.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

use crate::metrics::METRICS;

const MAX_REQUEST: usize = 8192;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Bind `addr` (errors surface at start-up) and serve until the task is dropped.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr).await?;
    info!(addr = %listener.local_addr()?, "metrics and health endpoint listening");
    Ok(listener)
}

pub async fn serve(listener: TcpListener, ready_max_lag: Duration) {
    loop {
        let Ok((conn, peer)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            if let Err(e) = tokio::time::timeout(REQUEST_TIMEOUT, answer(conn, ready_max_lag)).await
            {
                debug!(%peer, error = %e, "ops request timed out");
            }
        });
    }
}

async fn answer(mut conn: TcpStream, ready_max_lag: Duration) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let request = String::from_utf8_lossy(&buf);
    let mut words = request.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = route(method, path, ready_max_lag);
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    if method != "HEAD" {
        conn.write_all(body.as_bytes()).await?;
    }
    conn.shutdown().await
}

/// Pure: what to answer for a request.
fn route(
    method: &str,
    path: &str,
    ready_max_lag: Duration,
) -> (&'static str, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    if method != "GET" && method != "HEAD" {
        return ("405 Method Not Allowed", TEXT, "only GET\n".into());
    }
    match path {
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            METRICS.render(),
        ),
        "/healthz" => ("200 OK", TEXT, "ok\n".into()),
        "/readyz" => {
            let lag = METRICS.lag_seconds();
            if !METRICS.streaming.load(Relaxed) {
                (
                    "503 Service Unavailable",
                    TEXT,
                    "not streaming: no replication session\n".into(),
                )
            } else if lag > ready_max_lag.as_secs_f64() {
                (
                    "503 Service Unavailable",
                    TEXT,
                    format!(
                        "lagging: {lag:.1} s behind (limit {} s)\n",
                        ready_max_lag.as_secs()
                    ),
                )
            } else {
                ("200 OK", TEXT, "ready\n".into())
            }
        }
        _ => (
            "404 Not Found",
            TEXT,
            "try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let lag = Duration::from_secs(60);
        assert_eq!(route("GET", "/healthz", lag).0, "200 OK");
        assert_eq!(route("POST", "/healthz", lag).0, "405 Method Not Allowed");
        assert_eq!(route("GET", "/nope", lag).0, "404 Not Found");
        assert!(
            route("GET", "/metrics", lag)
                .2
                .contains("pgds_replication_lag_bytes")
        );
    }

    #[tokio::test]
    async fn serves_over_tcp() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, Duration::from_secs(60)));
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        conn.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.ends_with("ok\n"));
        server.abort();
    }
}
