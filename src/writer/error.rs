//! Definite writer failures: retrying cannot help, so the pipeline stops and says what to fix.
//! Transient failures never appear here; they are retried. Messages name the stream path (never
//! the token, a request body or an event).

use std::sync::Arc;

use super::part::StreamSeq;

#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error("invalid writer setting {field}: {reason}")]
    InvalidSettings { field: &'static str, reason: String },

    #[error("cannot build the HTTP client for the streams server")]
    HttpClient(#[source] reqwest::Error),

    #[error(
        "stream path {stream:?} does not make a valid URL with the base URL: a path must start \
         with '/', be percent-encoded and have no '?' or '#' (build it with PathTemplate)"
    )]
    InvalidStreamPath { stream: Arc<str> },

    #[error(
        "the streams server refused the {op} of {stream} with status {status}: the token is \
         missing, wrong or lacks the permission; check streams.token"
    )]
    Unauthorized {
        stream: Arc<str>,
        op: &'static str,
        status: u16,
    },

    #[error(
        "the streams server rejected the {op} of {stream} as a bad request (400): the stream \
         must be an application/json stream and every event a JSON value"
    )]
    BadRequest { stream: Arc<str>, op: &'static str },

    #[error(
        "the streams server refused the {op} of {stream} with 409 conflict (not a sequence \
         conflict): the stream is closed or exists with another content type or configuration; \
         delete it or recreate it as an open application/json stream"
    )]
    Conflict { stream: Arc<str>, op: &'static str },

    #[error(
        "the streams server has no route for {stream} (404 on create): check streams.base_url \
         and streams.path"
    )]
    NoRoute { stream: Arc<str> },

    #[error(
        "the streams server redirected the {op} of {stream} (status {status}): redirects are not \
         followed; set streams.base_url to the final address"
    )]
    Redirected {
        stream: Arc<str>,
        op: &'static str,
        status: u16,
    },

    #[error(
        "the part with Stream-Seq {seq} for {stream} is {size} bytes and the server refused it \
         (413): a single transaction chunk exceeds the server's body limit; lower batch.max_bytes"
    )]
    PartTooLarge {
        stream: Arc<str>,
        seq: StreamSeq,
        size: usize,
    },

    #[error(
        "the streams server refused the {op} of {stream} with status {status}, which a retry \
         cannot fix; check the server's logs"
    )]
    Rejected {
        stream: Arc<str>,
        op: &'static str,
        status: u16,
    },

    #[error("the acknowledgement receiver is gone: the writer cannot report progress")]
    AcksClosed,

    #[error("a writer request task failed")]
    Task(#[source] tokio::task::JoinError),

    #[error("writer bug: {0}")]
    Internal(&'static str),
}

impl WriterError {
    /// The stream path the error is about, when it is about one.
    pub fn stream(&self) -> Option<&str> {
        match self {
            Self::InvalidStreamPath { stream }
            | Self::Unauthorized { stream, .. }
            | Self::BadRequest { stream, .. }
            | Self::Conflict { stream, .. }
            | Self::NoRoute { stream }
            | Self::Redirected { stream, .. }
            | Self::PartTooLarge { stream, .. }
            | Self::Rejected { stream, .. } => Some(stream),
            Self::InvalidSettings { .. }
            | Self::HttpClient(_)
            | Self::AcksClosed
            | Self::Task(_)
            | Self::Internal(_) => None,
        }
    }
}
