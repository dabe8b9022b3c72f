//! The last 15 minutes of work, sampled every 10 seconds: what the operator console charts.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::metrics::Histogram;
use crate::supervisor::PoolCounters;

/// How often a sample is taken.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// How much history is kept.
pub const HISTORY: Duration = Duration::from_secs(15 * 60);

/// The work of one interval, over every pool.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActivitySample {
    /// When the interval ended, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// Its length in seconds.
    pub seconds: f64,
    /// Tasks that ended with an outcome.
    pub processed: u64,
    /// Failed attempts.
    pub failed: u64,
    /// Tasks given up.
    pub dead_lettered: u64,
    /// Mean time from a source's publish to the outcome, of the tasks that ended in it.
    pub mean_latency_ms: Option<f64>,
}

impl ActivitySample {
    /// Tasks ended per second.
    pub fn throughput(&self) -> f64 {
        if self.seconds > 0.0 {
            self.processed as f64 / self.seconds
        } else {
            0.0
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Totals {
    at: Instant,
    processed: u64,
    failed: u64,
    dead_lettered: u64,
    latency_count: u64,
    latency_sum_nanos: u64,
}

#[derive(Default)]
struct Inner {
    pools: Vec<Arc<PoolCounters>>,
    latency: Option<Histogram>,
    last: Option<Totals>,
    samples: VecDeque<ActivitySample>,
}

/// The sampled history.
#[derive(Default)]
pub(crate) struct Activity {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Activity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activity").finish_non_exhaustive()
    }
}

fn totals(inner: &Inner) -> Totals {
    let sum = |f: fn(&PoolCounters) -> u64| inner.pools.iter().map(|p| f(p)).sum::<u64>();
    let (latency_count, latency_sum_nanos) = inner
        .latency
        .as_ref()
        .map(Histogram::totals)
        .unwrap_or_default();
    Totals {
        at: Instant::now(),
        processed: sum(|p| p.processed.load(Ordering::Relaxed)),
        failed: sum(|p| p.failed.load(Ordering::Relaxed)),
        dead_lettered: sum(|p| p.dead_lettered.load(Ordering::Relaxed)),
        latency_count,
        latency_sum_nanos,
    }
}

fn between(from: Totals, to: Totals) -> ActivitySample {
    let count = to.latency_count.saturating_sub(from.latency_count);
    let nanos = to.latency_sum_nanos.saturating_sub(from.latency_sum_nanos);
    ActivitySample {
        at_unix_ms: crate::now_unix_ms(),
        seconds: to.at.duration_since(from.at).as_secs_f64(),
        processed: to.processed.saturating_sub(from.processed),
        failed: to.failed.saturating_sub(from.failed),
        dead_lettered: to.dead_lettered.saturating_sub(from.dead_lettered),
        mean_latency_ms: (count > 0).then(|| nanos as f64 / count as f64 / 1e6),
    }
}

impl Activity {
    /// Starts counting from what the pools have done so far.
    pub(crate) fn watch(&self, pools: Vec<Arc<PoolCounters>>, latency: Histogram) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.pools = pools;
        inner.latency = Some(latency);
        inner.last = Some(totals(&inner));
    }

    /// Closes the current interval.
    pub(crate) fn sample(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Some(last) = inner.last else { return };
        let now = totals(&inner);
        let sample = between(last, now);
        inner.samples.push_back(sample);
        let keep = (HISTORY.as_secs() / SAMPLE_EVERY.as_secs()) as usize;
        while inner.samples.len() > keep {
            inner.samples.pop_front();
        }
        inner.last = Some(now);
    }

    /// The closed intervals, oldest first, then the one still open.
    pub(crate) fn history(&self) -> Vec<ActivitySample> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = inner.samples.iter().cloned().collect();
        if let Some(last) = inner.last {
            out.push(between(last, totals(&inner)));
        }
        out
    }
}
