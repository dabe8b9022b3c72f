//! What only the in-memory queue has (its capacity); the semantics every queue shares are in
//! `queue_contract.rs`.

use runtime_adapters::queue::memory::{MemoryQueue, MemoryQueueConfig};
use runtime_contracts::{QueueError, Task, TaskQueue};

fn task(id: &str) -> Task {
    Task::new(id, "k", "s", serde_json::json!({ "n": id })).expect("task")
}

fn queue(capacity: usize) -> MemoryQueue {
    MemoryQueue::new(
        "q",
        MemoryQueueConfig {
            capacity,
            lease_timeout_ms: 60_000,
            ..MemoryQueueConfig::default()
        },
    )
}

#[tokio::test]
async fn it_is_bounded() {
    let q = queue(2);
    q.publish(task("a")).await.expect("a");
    q.publish(task("b")).await.expect("b");
    assert!(matches!(
        q.publish(task("c")).await,
        Err(QueueError::Full { capacity: 2, .. })
    ));
}
