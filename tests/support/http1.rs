//! HTTP/1.1 framing for the fault-injecting proxies (this crate's `support::proxy` and the
//! writer's unit-test proxy, which includes this file): read a request head and body, forward
//! a request with `connection: close`, read a header, a status. Enough for one request per
//! connection, nothing more.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A request head, with the body bytes read along with it.
pub struct Head {
    pub text: String,
    /// Body bytes read along with the head.
    rest: Vec<u8>,
    pub content_length: usize,
}

pub async fn read_head(client: &mut TcpStream) -> Option<Head> {
    let mut buf = Vec::new();
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 16384];
        let n = client.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() > 1 << 20 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let text = String::from_utf8(buf[..end].to_vec()).ok()?;
    let content_length = header(&text, "content-length").map_or(Some(0), |v| v.parse().ok())?;
    Some(Head {
        text,
        rest: buf[end..].to_vec(),
        content_length,
    })
}

pub async fn read_body(client: &mut TcpStream, head: &Head) -> Option<Vec<u8>> {
    let mut body = head.rest.clone();
    while body.len() < head.content_length {
        let mut chunk = vec![0u8; (head.content_length - body.len()).min(1 << 16)];
        let n = client.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(body)
}

/// Send the request upstream with `connection: close` and read the whole answer.
pub async fn forward(upstream: SocketAddr, head: &str, body: &[u8]) -> Option<Vec<u8>> {
    let mut request = String::new();
    for line in head.trim_end().split("\r\n") {
        if !line.to_ascii_lowercase().starts_with("connection:") {
            request.push_str(line);
            request.push_str("\r\n");
        }
    }
    request.push_str("connection: close\r\n\r\n");
    let mut server = TcpStream::connect(upstream).await.ok()?;
    server.write_all(request.as_bytes()).await.ok()?;
    server.write_all(body).await.ok()?;
    let mut answer = Vec::new();
    server.read_to_end(&mut answer).await.ok()?;
    (!answer.is_empty()).then_some(answer)
}

pub fn header(head: &str, name: &str) -> Option<String> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then(|| value.trim().to_owned())
    })
}

pub fn status_of(answer: &[u8]) -> Option<u16> {
    let line = answer.split(|b| *b == b'\r').next()?;
    std::str::from_utf8(line)
        .ok()?
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}
