//! A task whose handler aborts the process is dead-lettered as `worker_lost` after
//! `max_deliveries`, and the other tasks are handled. Worker processes are copies of this
//! test binary (started with `PLBA_POISON_WORKER`), running the real runtime on the Redis
//! queue; the handler calls `std::process::abort()` on the poison.

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use plba_testkit::{OneHandler, RedisServer, StaticSource};
use runtime_adapters::queue::redis::{RedisQueue, RedisQueueConfig};
use runtime_contracts::*;
use runtime_core::config::ConfigOrigin;
use runtime_core::{ConfigurationManager, RuntimeBuilder};

const WORKER_ENV: &str = "PLBA_POISON_WORKER";

fn queue_config(url: &str, consumer: &str) -> RedisQueueConfig {
    RedisQueueConfig {
        url: url.to_owned(),
        consumer: consumer.to_owned(),
        claim_min_idle_ms: 1500,
        reclaim_interval_ms: 50,
        max_deliveries: 2,
        ..RedisQueueConfig::default()
    }
}

struct AbortOnPoison;
impl TaskHandler for AbortOnPoison {
    fn handle<'a>(
        &'a self,
        task: &'a Task,
        _ctx: &'a HandlerContext,
    ) -> BoxFuture<'a, Result<Outcome, HandlerError>> {
        Box::pin(async move {
            if task.payload["poison"] == true {
                std::process::abort();
            }
            Ok(Outcome::new("done"))
        })
    }
}

/// A worker process: runs the runtime until the queue is drained (or it aborts).
fn worker(url: &str, consumer: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let text = "[pools.jobs]\nworkers = 2\nhandler_timeout_ms = 1000\n";
        let config = ConfigurationManager::builder()
            .env(HashMap::new())
            .load(ConfigOrigin::Embedded {
                name: "worker".into(),
                text: text.into(),
            })
            .expect("config");
        let queue = Arc::new(RedisQueue::new("jobs", queue_config(url, consumer)).expect("queue"));
        let mut runtime = RuntimeBuilder::new(Arc::new(config))
            .queue("jobs", queue)
            .source(Arc::new(StaticSource::empty("test")), "jobs")
            .module(Arc::new(OneHandler {
                pool: "jobs",
                kind: "job",
                handler: Arc::new(AbortOnPoison),
                source: None,
            }))
            .build()
            .await
            .expect("build");
        runtime.start().expect("start");
        runtime.wait_until_idle(Duration::from_millis(50)).await;
        runtime.shutdown().await;
    });
}

fn scenario() {
    let redis = RedisServer::start(false);
    let url = redis.url();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let publisher = RedisQueue::new("jobs", queue_config(&url, "publisher")).expect("queue");
    rt.block_on(async {
        for (id, poison) in [
            ("ok-1", false),
            ("poison", true),
            ("ok-2", false),
            ("ok-3", false),
        ] {
            let t = Task::new(id, "job", "test", serde_json::json!({ "poison": poison }))
                .expect("task");
            publisher.publish(t).await.expect("publish");
        }
    });
    let me = std::env::current_exe().expect("current exe");
    let mut aborted = 0;
    let start = Instant::now();
    for n in 0..6 {
        let status = Command::new(&me)
            .env(WORKER_ENV, &url)
            .env("PLBA_POISON_CONSUMER", format!("worker-{n}"))
            .env("RUST_LOG", "off")
            .status()
            .expect("spawn a worker process");
        if status.success() {
            break;
        }
        aborted += 1;
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the poison was never given up"
        );
    }
    assert_eq!(
        aborted, 2,
        "the poison killed max_deliveries (2) workers, then was dead-lettered"
    );
    let (stats, dead) = rt.block_on(async {
        let stats = publisher.stats().await.expect("stats");
        let dead = publisher
            .dead_letters()
            .expect("dlq")
            .get("poison")
            .await
            .expect("get");
        (stats, dead)
    });
    let dead = dead.expect("the poison is in the dead letters");
    assert!(dead.reason.starts_with("worker_lost"), "{}", dead.reason);
    assert_eq!(
        (stats.depth, stats.in_flight, stats.scheduled, stats.dead),
        (0, 0, 0, 1),
        "{stats:?}"
    );
}

fn main() {
    if let Ok(url) = std::env::var(WORKER_ENV) {
        let consumer = std::env::var("PLBA_POISON_CONSUMER").unwrap_or_else(|_| "worker".into());
        worker(&url, &consumer);
        return;
    }
    println!("running 1 test");
    match std::panic::catch_unwind(scenario) {
        Ok(()) => {
            println!(
                "test a_handler_that_aborts_the_process_is_dead_lettered_as_worker_lost ... ok"
            );
            println!(
                "\ntest result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out"
            );
        }
        Err(_) => {
            println!(
                "test a_handler_that_aborts_the_process_is_dead_lettered_as_worker_lost ... FAILED"
            );
            println!(
                "\ntest result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out"
            );
            std::process::exit(101);
        }
    }
}
