//! Writer tests against a real `durable-streams-server`, directly or through the fault proxy.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use url::Url;

use super::fault_proxy::{Action, FaultProxy};
use super::part::{Part, StreamSeq, TxToken};
use super::test_server::{TestServer, eventually, read_stream};
use super::{PathTemplate, Writer, WriterError, WriterSettings};

fn settings(base: Url) -> WriterSettings {
    WriterSettings {
        request_timeout: Duration::from_secs(5),
        max_backoff: Duration::from_millis(300),
        ..WriterSettings::new(base)
    }
}

/// Part `n` of a stream: two events naming the part, tx `n` (unique per test stream).
fn part(stream: &str, n: u64) -> Part {
    part_tx(stream, n, n)
}

fn part_tx(stream: &str, n: u64, tx: u64) -> Part {
    let event = |i: u32| {
        Bytes::from(format!(
            r#"{{"type":"t","key":"{n}-{i}","value":{{"n":{n}}}}}"#
        ))
    };
    Part {
        stream: stream.into(),
        tx: TxToken(tx),
        seq: StreamSeq {
            commit_lsn: n,
            chunk: 0,
        },
        events: vec![event(0), event(1)],
    }
}

/// The keys a stream holds, in order.
async fn keys(url: &str) -> Vec<String> {
    read_stream(url)
        .await
        .iter()
        .map(|m| m["key"].as_str().expect("a key").to_owned())
        .collect()
}

fn expected_keys(parts: impl IntoIterator<Item = u64>) -> Vec<String> {
    parts
        .into_iter()
        .flat_map(|n| [format!("{n}-0"), format!("{n}-1")])
        .collect()
}

struct Running {
    input: mpsc::Sender<Part>,
    acks: mpsc::UnboundedReceiver<TxToken>,
    task: JoinHandle<Result<(), WriterError>>,
}

fn spawn_writer(settings: WriterSettings, capacity: usize) -> Running {
    let writer = Writer::new(settings).expect("valid settings");
    let (input, rx) = mpsc::channel(capacity);
    let (ack_tx, acks) = mpsc::unbounded_channel();
    let task = tokio::spawn(writer.run(rx, ack_tx));
    Running { input, acks, task }
}

impl Running {
    async fn send(&self, part: Part) {
        self.input.send(part).await.expect("the writer is running");
    }

    async fn acks(&mut self, n: usize) -> Vec<u64> {
        let mut got = Vec::new();
        while got.len() < n {
            let ack = tokio::time::timeout(Duration::from_secs(20), self.acks.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out after {} of {n} acks", got.len()))
                .expect("ack channel open");
            got.push(ack.0);
        }
        got
    }

    /// Closes the input and returns the writer's result and the remaining acks.
    async fn finish(self) -> (Result<(), WriterError>, Vec<u64>) {
        let Running {
            input,
            mut acks,
            task,
        } = self;
        drop(input);
        let result = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("the writer finished in time")
            .expect("the writer task did not panic");
        let mut rest = Vec::new();
        while let Ok(ack) = acks.try_recv() {
            rest.push(ack.0);
        }
        (result, rest)
    }
}

#[tokio::test]
async fn several_streams_arrive_in_order_with_one_ack_per_part() {
    let server = TestServer::start();
    let template = PathTemplate::parse("/v1/stream/user/{user_id}/data", 64).unwrap();
    let paths: Vec<_> = ["alice", "bob", "john doé 100%?#"]
        .iter()
        .map(|id| template.path_for(id).unwrap())
        .collect();
    let writer = spawn_writer(settings(server.base_url()), 8);
    for n in 1..=30u64 {
        for (i, path) in paths.iter().enumerate() {
            writer.send(part_tx(path, n, n * 10 + i as u64)).await;
        }
    }
    let (result, acks) = writer.finish().await;
    result.unwrap();
    assert_eq!(acks.len(), 90);
    for (i, path) in paths.iter().enumerate() {
        let per_stream: Vec<u64> = acks
            .iter()
            .copied()
            .filter(|tx| tx % 10 == i as u64)
            .collect();
        let in_order: Vec<u64> = (1..=30).map(|n| n * 10 + i as u64).collect();
        assert_eq!(per_stream, in_order, "acks of {path}");
        assert_eq!(
            keys(&server.url(path)).await,
            expected_keys(1..=30),
            "{path}"
        );
    }
}

#[tokio::test]
async fn linger_combines_queued_parts_into_one_post() {
    let server = TestServer::start();
    let proxy = FaultProxy::start(server.addr()).await;
    let mut s = settings(proxy.base_url());
    s.linger = Duration::from_millis(200);
    let writer = spawn_writer(s, 64);
    for n in 1..=20 {
        writer.send(part("/s/linger", n)).await;
    }
    let (result, acks) = writer.finish().await;
    result.unwrap();
    assert_eq!(acks, (1..=20).collect::<Vec<_>>());
    assert_eq!(keys(&server.url("/s/linger")).await, expected_keys(1..=20));
    // The first part goes alone (a new stream recovers one part at a time), the rest together.
    assert_eq!(proxy.delivered_posts().len(), 2, "{:?}", proxy.seen());
}

#[tokio::test]
async fn a_restarted_writer_skips_what_the_server_already_holds() {
    let server = TestServer::start();
    let path = "/s/restart";
    let first = spawn_writer(settings(server.base_url()), 16);
    for n in 1..=10 {
        first.send(part(path, n)).await;
    }
    let (result, acks) = first.finish().await;
    result.unwrap();
    assert_eq!(acks.len(), 10);
    // Postgres replays from a lagging checkpoint: parts 1..=10 again (same seqs), then new ones.
    let second = spawn_writer(settings(server.base_url()), 16);
    for n in 1..=15 {
        second.send(part(path, n)).await;
    }
    let (result, acks) = second.finish().await;
    result.unwrap();
    assert_eq!(acks, (1..=15).collect::<Vec<_>>());
    assert_eq!(keys(&server.url(path)).await, expected_keys(1..=15));
}

#[tokio::test]
async fn a_deleted_stream_is_created_again() {
    let server = TestServer::start();
    let path = "/s/deleted";
    let mut writer = spawn_writer(settings(server.base_url()), 16);
    for n in 1..=3 {
        writer.send(part(path, n)).await;
    }
    assert_eq!(writer.acks(3).await, [1, 2, 3]);
    let deleted = reqwest::Client::new()
        .delete(server.url(path))
        .send()
        .await
        .unwrap();
    assert!(deleted.status().is_success(), "{}", deleted.status());
    for n in 4..=6 {
        writer.send(part(path, n)).await;
    }
    let (result, acks) = writer.finish().await;
    result.unwrap();
    assert_eq!(acks, [4, 5, 6]);
    assert_eq!(keys(&server.url(path)).await, expected_keys(4..=6));
}

#[tokio::test]
async fn unavailable_is_retried_honouring_retry_after() {
    let server = TestServer::start();
    let proxy = FaultProxy::start(server.addr()).await;
    for _ in 0..2 {
        proxy.push(Action::Respond {
            status: 503,
            retry_after: Some("1"),
        });
    }
    let mut s = settings(proxy.base_url());
    s.max_backoff = Duration::from_secs(5);
    let started = Instant::now();
    let writer = spawn_writer(s, 16);
    writer.send(part("/s/503", 1)).await;
    let (result, acks) = writer.finish().await;
    result.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(acks, [1]);
    let statuses: Vec<_> = proxy
        .seen()
        .iter()
        .filter(|s| s.method == "POST")
        .map(|s| s.status)
        .collect();
    assert_eq!(statuses, [Some(503), Some(503), Some(204)]);
    assert_eq!(keys(&server.url("/s/503")).await, expected_keys([1]));
}

#[tokio::test]
async fn a_lost_response_is_found_by_the_tail_check() {
    let server = TestServer::start();
    let proxy = FaultProxy::start(server.addr()).await;
    proxy.push(Action::ForwardAndDrop);
    let writer = spawn_writer(settings(proxy.base_url()), 16);
    for n in 1..=3 {
        writer.send(part("/s/lost-tail", n)).await;
    }
    let (result, acks) = writer.finish().await;
    result.unwrap();
    assert_eq!(acks, [1, 2, 3]);
    assert_eq!(
        keys(&server.url("/s/lost-tail")).await,
        expected_keys(1..=3)
    );
    let seen = proxy.seen();
    // The PUT's answer gave the tail before the append; the HEAD found it moved.
    assert!(
        seen.iter()
            .any(|s| s.method == "HEAD" && s.status == Some(200)),
        "{seen:?}"
    );
    assert!(!seen.iter().any(|s| s.status == Some(409)), "{seen:?}");
}

#[tokio::test]
async fn a_lost_response_is_refused_as_a_sequence_conflict() {
    let server = TestServer::start();
    let proxy = FaultProxy::start(server.addr()).await;
    // Without tail checks, the server's Stream-Seq memory alone must stop the duplicate.
    proxy.set_head_status(405);
    proxy.push(Action::ForwardAndDrop);
    let writer = spawn_writer(settings(proxy.base_url()), 16);
    for n in 1..=3 {
        writer.send(part("/s/lost-seq", n)).await;
    }
    let (result, acks) = writer.finish().await;
    result.unwrap();
    assert_eq!(acks, [1, 2, 3]);
    assert_eq!(keys(&server.url("/s/lost-seq")).await, expected_keys(1..=3));
    let seen = proxy.seen();
    assert!(
        seen.iter()
            .any(|s| s.method == "HEAD" && s.status == Some(405)),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|s| s.method == "POST" && s.status == Some(409)),
        "{seen:?}"
    );
}

#[tokio::test]
async fn a_lost_response_across_a_server_crash_is_not_duplicated() {
    let mut server = TestServer::start();
    let proxy = FaultProxy::start(server.addr()).await;
    let path = "/s/crash";
    let mut writer = spawn_writer(settings(proxy.base_url()), 16);
    writer.send(part(path, 1)).await;
    assert_eq!(writer.acks(1).await, [1]);
    // The next append is applied, its answer lost, and the server crashes before it persists
    // its Stream-Seq memory: only the tail check can tell that the append is there.
    proxy.push(Action::ForwardDropAndBlock);
    for n in 2..=4 {
        writer.send(part(path, n)).await;
    }
    eventually("the append whose answer is dropped", || {
        proxy
            .seen()
            .iter()
            .any(|s| s.method == "POST" && s.forwarded && s.status.is_none())
    })
    .await;
    server.crash_and_restart();
    proxy.unblock();
    let (result, acks) = writer.finish().await;
    result.unwrap();
    assert_eq!(acks, [2, 3, 4]);
    assert_eq!(keys(&server.url(path)).await, expected_keys(1..=4));
    assert!(
        proxy
            .seen()
            .iter()
            .any(|s| s.method == "HEAD" && s.status == Some(200))
    );
}

#[tokio::test]
async fn a_batch_refused_as_too_large_is_split() {
    let server = TestServer::start();
    let proxy = FaultProxy::start(server.addr()).await;
    let max_body = 300;
    proxy.set_max_body(max_body);
    let mut s = settings(proxy.base_url());
    s.linger = Duration::from_millis(200);
    let writer = spawn_writer(s, 64);
    for n in 1..=20 {
        writer.send(part("/s/split", n)).await;
    }
    let (result, acks) = writer.finish().await;
    result.unwrap();
    assert_eq!(acks, (1..=20).collect::<Vec<_>>());
    assert_eq!(keys(&server.url("/s/split")).await, expected_keys(1..=20));
    let seen = proxy.seen();
    assert!(seen.iter().any(|s| s.status == Some(413)), "{seen:?}");
    let delivered = proxy.delivered_posts();
    assert!(
        delivered.iter().all(|s| s.body_len <= max_body),
        "{delivered:?}"
    );
    assert!(
        delivered.len() < 20,
        "some parts were still combined: {delivered:?}"
    );
}

#[tokio::test]
async fn a_single_part_over_the_server_limit_is_a_definite_error() {
    let server = TestServer::start();
    let proxy = FaultProxy::start(server.addr()).await;
    proxy.set_max_body(50);
    let writer = spawn_writer(settings(proxy.base_url()), 16);
    writer.send(part("/s/huge", 7)).await;
    let (result, acks) = writer.finish().await;
    assert!(acks.is_empty());
    let error = result.unwrap_err();
    assert!(
        matches!(error, WriterError::PartTooLarge { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("/s/huge") && message.contains("0000000000000007-00000000"),
        "{message}"
    );
    assert!(message.contains("lower batch.max_bytes"), "{message}");
}

#[tokio::test]
async fn unauthorized_is_a_definite_error_that_never_shows_the_token() {
    let server = TestServer::start();
    let proxy = FaultProxy::start(server.addr()).await;
    proxy.push(Action::Respond {
        status: 401,
        retry_after: None,
    });
    let mut s = settings(proxy.base_url());
    s.token = Some("t0k3n-secret".to_owned().into());
    let writer = spawn_writer(s, 16);
    writer.send(part("/s/auth", 1)).await;
    let (result, _) = writer.finish().await;
    let error = result.unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(error, WriterError::Unauthorized { status: 401, .. }),
        "{error:?}"
    );
    assert!(
        message.contains("/s/auth") && message.contains("streams.token"),
        "{message}"
    );
    assert!(!format!("{message} {error:?}").contains("t0k3n"));
    let seen = proxy.seen();
    assert!(
        seen.iter()
            .all(|s| s.authorization.as_deref() == Some("Bearer t0k3n-secret"))
    );
}

#[tokio::test]
async fn a_stream_of_another_content_type_is_a_definite_error() {
    let server = TestServer::start();
    let path = "/s/text";
    let created = reqwest::Client::new()
        .put(server.url(path))
        .header("content-type", "text/plain")
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let writer = spawn_writer(settings(server.base_url()), 16);
    writer.send(part(path, 1)).await;
    let (result, acks) = writer.finish().await;
    assert!(acks.is_empty());
    let error = result.unwrap_err();
    assert!(
        matches!(error, WriterError::Conflict { op: "create", .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains(path));
}

#[tokio::test]
async fn input_is_not_read_while_the_buffer_is_full() {
    let server = TestServer::start();
    let proxy = FaultProxy::start(server.addr()).await;
    proxy.block();
    let mut s = settings(proxy.base_url());
    s.max_buffered_bytes = 1;
    let writer = spawn_writer(s, 1);
    let path = "/s/backpressure";
    writer.input.try_send(part(path, 1)).unwrap();
    eventually("the writer took the first part", || {
        writer.input.capacity() == 1
    })
    .await;
    writer.input.try_send(part(path, 2)).unwrap();
    // A negative check needs a pause: the writer must leave the second part in the channel.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        writer.input.capacity(),
        0,
        "the writer read input while over its buffer limit"
    );
    assert!(writer.input.try_send(part(path, 3)).is_err());
    proxy.unblock();
    writer.send(part(path, 3)).await;
    let (result, acks) = writer.finish().await;
    result.unwrap();
    assert_eq!(acks, [1, 2, 3]);
    assert_eq!(keys(&server.url(path)).await, expected_keys(1..=3));
}

#[tokio::test]
async fn a_part_without_events_is_acked_without_a_request() {
    let server = TestServer::start();
    let proxy = FaultProxy::start(server.addr()).await;
    let writer = spawn_writer(settings(proxy.base_url()), 16);
    let mut empty = part("/s/empty", 1);
    empty.events.clear();
    writer.send(empty).await;
    let (result, acks) = writer.finish().await;
    result.unwrap();
    assert_eq!(acks, [1]);
    assert!(proxy.seen().is_empty());
}

#[tokio::test]
async fn a_path_that_is_not_a_url_path_is_refused() {
    let writer = spawn_writer(settings(Url::parse("http://127.0.0.1:9").unwrap()), 16);
    writer.send(part("relative/path", 1)).await;
    let (result, _) = writer.finish().await;
    let error = result.unwrap_err();
    assert!(
        matches!(error, WriterError::InvalidStreamPath { .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn requests_respect_the_in_flight_limits() {
    let server = TestServer::start();
    let proxy = FaultProxy::start(server.addr()).await;
    let mut s = settings(proxy.base_url());
    s.max_in_flight = 3;
    let writer = spawn_writer(s, 8);
    let paths: Vec<String> = (0..10).map(|i| format!("/s/limit-{i}")).collect();
    for n in 1..=5u64 {
        for (i, path) in paths.iter().enumerate() {
            writer.send(part_tx(path, n, n * 100 + i as u64)).await;
        }
    }
    let (result, acks) = writer.finish().await;
    result.unwrap();
    assert_eq!(acks.len(), 50);
    for path in &paths {
        assert_eq!(
            keys(&server.url(path)).await,
            expected_keys(1..=5),
            "{path}"
        );
    }
    let (overall, per_stream) = proxy.max_concurrency();
    assert!(overall <= 3, "{overall} requests at once");
    assert_eq!(per_stream, 1, "one request per stream at a time");
}

#[tokio::test]
async fn an_in_process_replay_on_a_synced_stream_is_not_duplicated() {
    let server = TestServer::start();
    let path = "/s/replay";
    let mut s = settings(server.base_url());
    s.linger = Duration::from_millis(100);
    let writer = spawn_writer(s, 64);
    // The source reconnects after part 5 and replays from part 3; all of it is queued together
    // behind the first append, so one batch could otherwise span the replay.
    for n in (1..=5).chain(3..=8) {
        writer.send(part(path, n)).await;
    }
    let (result, acks) = writer.finish().await;
    result.unwrap();
    assert_eq!(acks, [1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8]);
    assert_eq!(keys(&server.url(path)).await, expected_keys(1..=8));
}
