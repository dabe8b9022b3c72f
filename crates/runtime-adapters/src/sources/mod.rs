//! Task source adapters.

#[cfg(feature = "source-maildir")]
pub mod maildir;

#[cfg(feature = "source-imap")]
pub mod imap;

#[cfg(feature = "source-webhook")]
pub mod webhook;

#[cfg(feature = "source-schedule")]
pub mod schedule;

/// The content of a task that carries its content in the payload (a webhook delivery, a
/// schedule slot): the payload as JSON.
#[cfg(any(feature = "source-webhook", feature = "source-schedule"))]
fn payload_content(
    source_id: &str,
    task: &runtime_contracts::Task,
) -> Result<Option<Vec<u8>>, runtime_contracts::SourceError> {
    serde_json::to_vec(&task.payload)
        .map(Some)
        .map_err(|e| runtime_contracts::SourceError::Io {
            source_id: source_id.to_owned(),
            message: e.to_string(),
        })
}

/// A source's section as [`runtime_contracts::TaskSource::reconfigure`] gets it, read as
/// its settings: the `type` and the rest as `T`, or why it cannot be read.
#[cfg(any(feature = "source-maildir", feature = "source-imap"))]
pub(crate) fn typed_section<T: serde::de::DeserializeOwned>(
    section: &serde_json::Value,
) -> Result<(String, T), String> {
    let mut map = section
        .as_object()
        .cloned()
        .ok_or_else(|| "the section is not a table".to_owned())?;
    let kind = match map.remove("type") {
        Some(serde_json::Value::String(kind)) => kind,
        _ => return Err("the section has no type".to_owned()),
    };
    let settings = serde_json::from_value(serde_json::Value::Object(map))
        .map_err(|e| format!("the section cannot be read: {e}"))?;
    Ok((kind, settings))
}

/// [`publish_chunk`] with the source's bookkeeping: the keys are reserved as pending in
/// `progress` before publishing (a worker may complete a task before the publish returns),
/// counted when enqueued, and released again when publishing failed or shutdown came first.
/// `progress` runs its argument on the source's [`Progress`] under the source's lock.
/// `Ok(false)` when shutdown came first.
#[cfg(any(feature = "source-maildir", feature = "source-imap"))]
pub(crate) async fn publish_reserved(
    ctx: &runtime_contracts::SourceContext,
    chunk: &mut Vec<(String, runtime_contracts::Task)>,
    progress: impl Fn(&mut dyn FnMut(&mut Progress)),
) -> Result<bool, runtime_contracts::QueueError> {
    let keys: Vec<String> = chunk.iter().map(|(key, _)| key.clone()).collect();
    progress(&mut |p| p.reserve(chunk));
    match publish_chunk(ctx, chunk).await {
        Ok(Some(published)) => {
            progress(&mut |p| p.published(&published));
            Ok(true)
        }
        Ok(None) => {
            progress(&mut |p| p.unreserve(&keys));
            Ok(false)
        }
        Err(e) => {
            progress(&mut |p| p.unreserve(&keys));
            Err(e)
        }
    }
}

/// Publishes a chunk of `(key, pointer task)` in one call once the pool has capacity; each
/// key with whether its task was enqueued (false: the queue already knew it). `Ok(None)`
/// when shutdown came first: nothing of the chunk was published, and the chunk is kept.
#[cfg(any(feature = "source-maildir", feature = "source-imap"))]
async fn publish_chunk(
    ctx: &runtime_contracts::SourceContext,
    chunk: &mut Vec<(String, runtime_contracts::Task)>,
) -> Result<Option<Vec<(String, bool)>>, runtime_contracts::QueueError> {
    if chunk.is_empty() {
        return Ok(Some(Vec::new()));
    }
    tokio::select! {
        _ = ctx.shutdown.cancelled() => return Ok(None),
        _ = ctx.backpressure.wait_for_capacity() => {}
    }
    let (keys, tasks): (Vec<String>, Vec<runtime_contracts::Task>) =
        std::mem::take(chunk).into_iter().unzip();
    let results = ctx.queue.publish_batch(tasks).await?;
    Ok(Some(
        keys.into_iter()
            .zip(results)
            .map(|(key, r)| (key, r == runtime_contracts::PublishResult::Enqueued))
            .collect(),
    ))
}

/// What a source knows of the work it published, and how it is doing: the part of
/// [`runtime_contracts::SourceStatus`] every source keeps the same way.
#[cfg(any(feature = "source-maildir", feature = "source-imap"))]
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// Keys published and not completed (dead-lettered ones stay, so they are not published
    /// again).
    pub(crate) pending: std::collections::HashSet<String>,
    state: Option<runtime_contracts::SourceState>,
    published: u64,
    completed: u64,
    last_event: Option<std::time::Instant>,
    last_error: Option<String>,
    /// The watcher's lease, when replicas share what the source watches.
    pub(crate) lease: Option<runtime_contracts::SourceLease>,
    /// Since when this process holds that lease.
    pub(crate) lease_since: Option<std::time::Instant>,
}

#[cfg(any(feature = "source-maildir", feature = "source-imap"))]
impl Progress {
    /// Marks a chunk's keys pending *before* it is published: a worker may complete a
    /// task before [`publish_chunk`] returns, and its completion must find the key to
    /// remove (else the key would stay pending for ever).
    pub(crate) fn reserve(&mut self, chunk: &[(String, runtime_contracts::Task)]) {
        self.pending
            .extend(chunk.iter().map(|(key, _)| key.clone()));
    }

    /// Forgets reserved keys whose publishing failed or was cut short by shutdown: they
    /// stay where they are (unread) and are found again by the next scan.
    pub(crate) fn unreserve<'k>(&mut self, keys: impl IntoIterator<Item = &'k String>) {
        for key in keys {
            self.pending.remove(key);
        }
    }

    /// Counts what [`publish_chunk`] enqueued (its keys were reserved before).
    pub(crate) fn published(&mut self, published: &[(String, bool)]) {
        self.published += published.iter().filter(|(_, e)| *e).count() as u64;
    }

    /// Records a completion.
    pub(crate) fn completed(&mut self, key: &str) {
        self.pending.remove(key);
        self.completed += 1;
    }

    /// Reaching what the source reads works again.
    pub(crate) fn running(&mut self) {
        self.state = Some(runtime_contracts::SourceState::Running);
        self.last_error = None;
    }

    /// A scan, poll or search succeeded now.
    pub(crate) fn progressed(&mut self) {
        self.running();
        self.last_event = Some(std::time::Instant::now());
    }

    /// Reaching what the source reads fails; it retries.
    pub(crate) fn degraded(&mut self, error: String) {
        self.state = Some(runtime_contracts::SourceState::Degraded);
        self.last_error = Some(error);
    }

    /// The source stopped.
    pub(crate) fn stopped(&mut self) {
        self.state = Some(runtime_contracts::SourceState::Stopped);
    }

    /// The snapshot for [`runtime_contracts::TaskSource::status`].
    pub(crate) fn status(&self) -> runtime_contracts::SourceStatus {
        runtime_contracts::SourceStatus {
            state: self.state.unwrap_or(runtime_contracts::SourceState::Idle),
            published: self.published,
            completed: self.completed,
            pending: self.pending.len() as u64,
            last_event_age: self.last_event.map(|t| t.elapsed()),
            last_error: self.last_error.clone(),
            next_due: None,
            lease: self.lease.clone().map(|mut lease| {
                lease.held_for = self.lease_since.map(|t| t.elapsed());
                lease
            }),
        }
    }
}
