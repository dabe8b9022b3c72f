//! Task source adapters.

#[cfg(feature = "source-maildir")]
pub mod maildir;

#[cfg(feature = "source-imap")]
pub mod imap;

/// Publishes a chunk of `(key, pointer task)` in one call once the pool has capacity; each
/// key with whether its task was enqueued (false: the queue already knew it). `Ok(None)`
/// when shutdown came first: nothing of the chunk was published, and the chunk is kept.
#[cfg(any(feature = "source-maildir", feature = "source-imap"))]
pub(crate) async fn publish_chunk(
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
