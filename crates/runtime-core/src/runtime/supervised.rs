//! Supervised sources: a source whose start fails or whose task panics is started again
//! with backoff, as workers are; a source that took a changed configuration is started
//! again at once. Both go through [`run_supervised`], the one path that starts sources.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use runtime_contracts::{SourceContext, TaskSource};
use tokio_util::sync::CancellationToken;

use super::parts::SourceControl;
use crate::metrics::{Metrics, NameLabel};
use crate::retry::RetryPolicy;
use crate::shutdown::TokenSignal;

/// The backoff between failed starts: 1 s, doubling to a minute.
fn restart_policy() -> RetryPolicy {
    RetryPolicy {
        initial_backoff_ms: 1_000,
        max_backoff_ms: 60_000,
        multiplier: 2.0,
        jitter: 0.2,
        schedule: Vec::new(),
    }
}

/// A run that lasted this long was healthy: the next failure backs off from the start.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// What one source needs to be run and run again.
pub(crate) struct Supervised {
    pub(crate) source: Arc<dyn TaskSource>,
    /// The context of every run; its `shutdown` is replaced by each run's own signal.
    pub(crate) ctx: SourceContext,
    pub(crate) control: Arc<SourceControl>,
    pub(crate) metrics: Arc<Metrics>,
    /// Where a run that ended records its error (`None`: it ended cleanly), for
    /// `run --once`'s idle check.
    pub(crate) ended: Arc<Mutex<HashMap<String, Option<String>>>>,
    /// The runtime's stop for sources.
    pub(crate) stop: CancellationToken,
}

/// Runs the source until the runtime stops it: each start under its own stop signal (a
/// child of the runtime's), a failed or panicking start again after a backoff, a start
/// stopped for a restart again at once, a start that returned cleanly on its own not again.
pub(crate) async fn run_supervised(s: Supervised) {
    let id = s.source.id().to_owned();
    let label = NameLabel { name: id.clone() };
    let policy = restart_policy();
    let mut failures = 0u32;
    loop {
        let run = s.stop.child_token();
        *s.control.run.lock().unwrap_or_else(|e| e.into_inner()) = Some(run.clone());
        let ctx = SourceContext {
            shutdown: Arc::new(TokenSignal(run.clone())),
            ..s.ctx.clone()
        };
        // Running again: it has not ended (until this run does).
        s.ended
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        let began = Instant::now();
        let outcome = AssertUnwindSafe(s.source.start(ctx)).catch_unwind().await;
        *s.control.run.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if s.stop.is_cancelled() {
            let error = match outcome {
                Ok(Err(e)) => Some(e.to_string()),
                Err(panic) => Some(format!(
                    "panicked: {}",
                    crate::supervisor::panic_message(&*panic)
                )),
                Ok(Ok(())) => None,
            };
            s.ended
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id.clone(), error);
            return;
        }
        let requested = s.control.restart_requested.swap(false, Ordering::SeqCst);
        let why = match outcome {
            Ok(Ok(())) if requested => {
                s.control.restarts.fetch_add(1, Ordering::Relaxed);
                s.metrics.source_restarts.get_or_create(&label).inc();
                tracing::info!(source = %id, "source restarted with its changed configuration");
                continue;
            }
            Ok(Ok(())) => {
                tracing::info!(source = %id, "source ended");
                s.ended
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id.clone(), None);
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(panic) => format!("panicked: {}", crate::supervisor::panic_message(&*panic)),
        };
        if began.elapsed() >= HEALTHY_RUN {
            failures = 0;
        }
        failures = failures.saturating_add(1);
        let backoff = if requested {
            Duration::ZERO
        } else {
            policy.backoff(failures)
        };
        tracing::error!(source = %id, error = %why, ?backoff, "source stopped; starting it again");
        s.ended
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), Some(why.clone()));
        *s.control.down.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!(
            "source {id} stopped ({why}); starting again in {} ms",
            backoff.as_millis()
        ));
        let restart_now = async {
            // A reload's restart request cuts the wait short.
            loop {
                let woken = s.control.restart_wake.notified();
                if s.control.restart_requested.load(Ordering::SeqCst) {
                    return;
                }
                woken.await;
            }
        };
        tokio::select! {
            _ = s.stop.cancelled() => {
                *s.control.down.lock().unwrap_or_else(|e| e.into_inner()) = None;
                return;
            }
            _ = tokio::time::sleep(backoff) => {}
            _ = restart_now => {
                s.control.restart_requested.store(false, Ordering::SeqCst);
            }
        }
        *s.control.down.lock().unwrap_or_else(|e| e.into_inner()) = None;
        s.control.restarts.fetch_add(1, Ordering::Relaxed);
        s.metrics.source_restarts.get_or_create(&label).inc();
    }
}
