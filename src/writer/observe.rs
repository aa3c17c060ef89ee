//! What the writer publishes to the process metrics (`crate::metrics`): append outcomes, streams
//! created, held bytes, active streams, and the most lagging streams.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::time::Instant;

use super::batch::Batch;
use super::stream_state::StreamState;
use crate::metrics::{METRICS, WORST_STREAMS};

/// How often the list of most lagging streams is refreshed while streams are active.
pub(crate) const LAG_REFRESH: Duration = Duration::from_secs(1);

/// A POST that stored its batch (answered 2xx, or found applied by a tail check).
pub(crate) fn appended(batch: &Batch) {
    let events = batch
        .parts
        .iter()
        .map(|q| q.part.events.len())
        .sum::<usize>();
    METRICS.record_batch(events as u64, batch.body.len() as u64);
}

/// A POST refused because the server already holds its batch.
pub(crate) fn duplicate() {
    METRICS.appends_duplicate.fetch_add(1, Relaxed);
}

pub(crate) fn retried() {
    METRICS.appends_retried.fetch_add(1, Relaxed);
}

/// A definite failure that stops the writer.
pub(crate) fn failed() {
    METRICS.appends_failed.fetch_add(1, Relaxed);
}

/// PUTs answered 201 (a new stream).
pub(crate) fn created(streams: u32) {
    if streams > 0 {
        METRICS
            .streams_created
            .fetch_add(u64::from(streams), Relaxed);
    }
}

pub(crate) fn gauges(active_streams: usize, held_bytes: usize) {
    METRICS.streams_active.store(active_streams as u64, Relaxed);
    METRICS.writer_held_bytes.store(held_bytes as u64, Relaxed);
}

/// Publishes the streams whose oldest held part has waited longest (O(streams), once a second).
pub(crate) fn worst_streams(streams: &HashMap<Arc<str>, Box<StreamState>>, now: Instant) {
    let ages = streams
        .iter()
        .filter_map(|(path, s)| Some((path, now.saturating_duration_since(s.oldest()?))));
    let worst = most_lagging(ages, WORST_STREAMS);
    if let Ok(mut list) = METRICS.worst_streams.lock() {
        *list = worst;
    }
}

/// The `k` oldest ages, oldest first, as (path, seconds).
fn most_lagging<'a>(
    ages: impl Iterator<Item = (&'a Arc<str>, Duration)>,
    k: usize,
) -> Vec<(String, f64)> {
    let mut ages: Vec<(&Arc<str>, Duration)> = ages.collect();
    let oldest_first = |a: &(&Arc<str>, Duration), b: &(&Arc<str>, Duration)| b.1.cmp(&a.1);
    if ages.len() > k {
        ages.select_nth_unstable_by(k, oldest_first);
        ages.truncate(k);
    }
    ages.sort_unstable_by(oldest_first);
    ages.into_iter()
        .map(|(path, age)| (path.to_string(), age.as_secs_f64()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_lagging_keeps_the_k_oldest_oldest_first() {
        let paths: Vec<Arc<str>> = (0..20).map(|i| format!("/s/{i}").into()).collect();
        let ages = paths
            .iter()
            .enumerate()
            .map(|(i, p)| (p, Duration::from_millis((i as u64 * 7) % 20 * 100)));
        let worst = most_lagging(ages, 3);
        let secs: Vec<f64> = worst.iter().map(|(_, s)| *s).collect();
        assert_eq!(secs, [1.9, 1.8, 1.7]);
        assert_eq!(worst[0].0, "/s/17");
        let few = most_lagging(paths[..2].iter().map(|p| (p, Duration::from_secs(1))), 3);
        assert_eq!(few.len(), 2);
        assert!(most_lagging(std::iter::empty(), 3).is_empty());
    }
}
