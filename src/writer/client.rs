//! The HTTP edge: one `reqwest::Client` (connection pool, keep-alive) for every request, and the
//! three requests the writer makes. Answers come back as plain values for `retry::classify`.

use bytes::{Bytes, BytesMut};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, redirect};
use secrecy::ExposeSecret;
use url::Url;

use super::{WriterError, WriterSettings};

/// Only the start of an answer's body is kept: enough for the word "sequence".
const MAX_ANSWER_BODY: usize = 4096;

const JSON: HeaderValue = HeaderValue::from_static("application/json");

/// A server answer, reduced to what classification needs.
#[derive(Debug)]
pub(crate) struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// At most `MAX_ANSWER_BODY` bytes of the body.
    pub body: Bytes,
}

/// Cheap to clone (the pool is shared).
#[derive(Clone)]
pub(crate) struct HttpClient {
    http: reqwest::Client,
    base: String,
}

impl HttpClient {
    pub fn new(settings: &WriterSettings) -> Result<Self, WriterError> {
        let mut headers = HeaderMap::new();
        if let Some(token) = &settings.token {
            let mut value = HeaderValue::try_from(format!("Bearer {}", token.expose_secret()))
                .map_err(|_| WriterError::InvalidSettings {
                    field: "token",
                    reason: "contains characters that are not allowed in an HTTP header".into(),
                })?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .user_agent(concat!("pgds/", env!("CARGO_PKG_VERSION")))
            .timeout(settings.request_timeout)
            .connect_timeout(settings.request_timeout)
            // A redirected POST would be replayed as a GET: treat redirects as configuration errors.
            .redirect(redirect::Policy::none())
            .pool_max_idle_per_host(settings.max_in_flight)
            .build()
            .map_err(WriterError::HttpClient)?;
        let base = settings.base_url.as_str().trim_end_matches('/').to_owned();
        Ok(Self { http, base })
    }

    /// The URL of a stream: the base URL followed by the (already percent-encoded) path.
    pub fn url_for(&self, path: &str) -> Option<Url> {
        if !path.starts_with('/') || path.contains(['?', '#']) {
            return None;
        }
        Url::parse(&format!("{}{path}", self.base)).ok()
    }

    /// `PUT`: create the stream in JSON mode (201 created, 200 exists).
    pub async fn create(&self, url: Url) -> Result<Answer, reqwest::Error> {
        let request = self
            .http
            .request(Method::PUT, url)
            .header(CONTENT_TYPE, JSON);
        read(request.send().await?).await
    }

    /// `POST`: append a JSON array body with the `Stream-Seq` of its last part.
    pub async fn append(
        &self,
        url: Url,
        seq: String,
        body: Bytes,
    ) -> Result<Answer, reqwest::Error> {
        let request = self
            .http
            .post(url)
            .header(CONTENT_TYPE, JSON)
            .header("stream-seq", seq)
            .body(body);
        read(request.send().await?).await
    }

    /// `HEAD`: the stream's metadata, including its tail (`Stream-Next-Offset`).
    pub async fn inspect(&self, url: Url) -> Result<Answer, reqwest::Error> {
        read(self.http.head(url).send().await?).await
    }
}

async fn read(mut response: reqwest::Response) -> Result<Answer, reqwest::Error> {
    let status = response.status();
    let headers = std::mem::take(response.headers_mut());
    let mut body = BytesMut::new();
    while body.len() < MAX_ANSWER_BODY {
        match response.chunk().await? {
            Some(chunk) => {
                body.extend_from_slice(&chunk[..chunk.len().min(MAX_ANSWER_BODY - body.len())])
            }
            None => break,
        }
    }
    Ok(Answer {
        status,
        headers,
        body: body.freeze(),
    })
}
