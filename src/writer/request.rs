//! One send of one batch, as a future that owns the batch and hands it back with the outcome.
//!
//! Steps: (1) if an earlier attempt may have been applied and the stream's tail before the batch
//! is known, HEAD the stream: a moved tail means the append was applied (we are the only
//! writer); (2) PUT the stream if it is not known to exist; (3) POST the batch; on 404 PUT and
//! POST once more.

use std::sync::Arc;
use std::time::SystemTime;

use reqwest::StatusCode;
use tracing::warn;
use url::Url;

use super::batch::Batch;
use super::client::{Answer, HttpClient};
use super::retry::{Op, Outcome, Refusal, classify, transport_failure};

/// A finished send, returned to the dispatcher.
pub(crate) struct Completion {
    pub path: Arc<str>,
    pub batch: Batch,
    /// Whether the stream is known to exist after this send.
    pub created: bool,
    /// PUTs of this send answered 201 (a new stream).
    pub new_streams: u32,
    /// The request that produced `outcome`.
    pub op: Op,
    /// Its status, when there was an answer.
    pub status: Option<StatusCode>,
    pub outcome: Outcome,
    /// The transport error, when there was no answer (for the log; it names no secret).
    pub error: Option<reqwest::Error>,
}

pub(crate) async fn send(
    client: HttpClient,
    path: Arc<str>,
    url: Url,
    batch: Batch,
    created: bool,
) -> Completion {
    let mut done = Completion {
        path,
        batch,
        created,
        new_streams: 0,
        op: Op::Append,
        status: None,
        outcome: Outcome::Retry {
            after: None,
            ambiguous: false,
        },
        error: None,
    };
    done.outcome = attempt(&client, url, &mut done).await;
    done
}

async fn attempt(client: &HttpClient, url: Url, c: &mut Completion) -> Outcome {
    let prior_tail = c.batch.prior_tail.clone().filter(|_| c.batch.verify_tail);
    if let Some(prior) = prior_tail {
        match note(c, Op::Inspect, client.inspect(url.clone()).await) {
            Outcome::Done {
                next_offset: Some(tail),
            } if tail != prior => {
                return Outcome::TailMoved {
                    next_offset: Some(tail),
                };
            }
            // Unchanged (or not reported): the earlier append was not applied; send it again.
            Outcome::Done { .. } => {}
            Outcome::StreamMissing => c.created = false,
            // The server cannot answer a tail check: rely on the sequence check alone.
            Outcome::Refused(refusal) if refusal != Refusal::Unauthorized => {
                c.batch.verify_tail = false;
                warn!(stream = %c.path, status = c.status.map(|s| s.as_u16()), "tail check refused, resending without it");
            }
            other => return other,
        }
    }
    if !c.created {
        if let Some(failed) = create(client, &url, c).await {
            return failed;
        }
    }
    let seq = c.batch.seq.to_string();
    let body = c.batch.body.clone();
    let first = client.append(url.clone(), seq.clone(), body.clone()).await;
    match note(c, Op::Append, first) {
        Outcome::StreamMissing => {}
        other => return other,
    }
    // The stream was deleted since we created it: create it again and resend once.
    c.created = false;
    if let Some(failed) = create(client, &url, c).await {
        return failed;
    }
    match note(c, Op::Append, client.append(url, seq, body).await) {
        Outcome::StreamMissing => {
            c.created = false;
            Outcome::Retry {
                after: None,
                ambiguous: false,
            }
        }
        other => other,
    }
}

/// PUTs the stream; `None` when it exists now. Its answer carries the stream's tail just before
/// our append, which becomes the batch's reference for a later tail check.
async fn create(client: &HttpClient, url: &Url, c: &mut Completion) -> Option<Outcome> {
    match note(c, Op::Create, client.create(url.clone()).await) {
        Outcome::Done { next_offset } => {
            c.created = true;
            c.new_streams += u32::from(c.status == Some(StatusCode::CREATED));
            c.batch.prior_tail = next_offset;
            None
        }
        other => Some(other),
    }
}

/// Classifies one request's result and records which request it was.
fn note(c: &mut Completion, op: Op, result: Result<Answer, reqwest::Error>) -> Outcome {
    c.op = op;
    match result {
        Ok(answer) => {
            c.status = Some(answer.status);
            c.error = None;
            classify(
                op,
                answer.status,
                &answer.headers,
                &answer.body,
                SystemTime::now(),
            )
        }
        Err(error) => {
            c.status = None;
            let outcome = transport_failure(error.is_connect());
            c.error = Some(error);
            outcome
        }
    }
}
