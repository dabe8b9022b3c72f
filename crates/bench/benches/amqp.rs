//! The AMQP (RabbitMQ) queue under the runtime's worker pool, beside a raw lapin loop on
//! the same private broker in the same run.
//!
//! The raw loop: publisher confirms (1,000 publishes in flight, then their confirms), and
//! `consumers` channels each consuming with `basic.qos` 100 and one `basic.ack` per
//! delivery. plba: `AmqpQueue` (quorum queue, confirms, manual acks) under a worker pool
//! of `consumers` workers leasing up to 100 each, publishing with `publish_batch` in
//! chunks of 1,000. Modes: a backlog drained by 1 and by 4 consumers, and produce+consume
//! at once with 1 and with 4 consumers. Prints tasks/s and plba's ratio to the raw loop
//! (target: at least 0.5). `PLBA_BENCH_AMQP_TASKS` sets the task count (default 100000).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use plba_bench::{drain_with_pool, envelope, peak_rss_mib};
use plba_testkit::RabbitServer;
use runtime_adapters::queue::amqp::{AmqpQueue, AmqpQueueConfig};

async fn connect(url: &str) -> Connection {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("connect")
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

/// Publishes `n` envelopes to `queue` with confirms, 1,000 in flight at a time.
async fn fill(url: &str, queue: &str, n: u64) {
    let conn = connect(url).await;
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        quorum(),
    )
    .await
    .expect("declare");
    let mut i = 0;
    while i < n {
        let mut confirms = Vec::new();
        for j in i..(i + 1000).min(n) {
            let body = envelope(j);
            confirms.push(
                ch.basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .expect("publish"),
            );
        }
        for c in futures::future::join_all(confirms).await {
            assert!(c.expect("confirm").is_ack(), "the broker confirmed");
        }
        i += 1000;
    }
    let _ = conn.close(200, "filled".into()).await;
}

/// The raw loop; returns the time to consume and acknowledge `n`.
async fn raw(url: &str, queue: &str, n: u64, consumers: usize, produce: bool) -> Duration {
    if !produce {
        fill(url, queue, n).await;
    } else {
        // Declared before consumers subscribe.
        fill(url, queue, 0).await;
    }
    let done = Arc::new(AtomicU64::new(0));
    let conn = Arc::new(connect(url).await);
    let start = Instant::now();
    let producer = produce.then(|| {
        let (url, queue) = (url.to_owned(), queue.to_owned());
        tokio::spawn(async move { fill(&url, &queue, n).await })
    });
    let mut handles = Vec::new();
    for _ in 0..consumers {
        let (conn, done, queue) = (Arc::clone(&conn), Arc::clone(&done), queue.to_owned());
        handles.push(tokio::spawn(async move {
            let ch = conn.create_channel().await.expect("channel");
            ch.basic_qos(100, BasicQosOptions::default())
                .await
                .expect("qos");
            let mut consumer = ch
                .basic_consume(
                    queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .expect("consume");
            while done.load(Ordering::Relaxed) < n {
                let Ok(Some(delivery)) =
                    tokio::time::timeout(Duration::from_millis(50), consumer.next()).await
                else {
                    continue;
                };
                let delivery = delivery.expect("delivery");
                delivery.ack(BasicAckOptions::default()).await.expect("ack");
                done.fetch_add(1, Ordering::Relaxed);
            }
            let _ = ch.close(200, "done".into()).await;
        }));
    }
    for h in handles {
        h.await.expect("consumer");
    }
    let elapsed = start.elapsed();
    if let Some(p) = producer {
        p.await.expect("producer");
    }
    let _ = conn.close(200, "done".into()).await;
    elapsed
}

/// plba: the AMQP queue under a worker pool of `consumers` workers (prefetch 100 each).
async fn plba(url: &str, pool: &str, n: u64, consumers: usize, produce: bool) -> Duration {
    let config = AmqpQueueConfig {
        url: url.to_owned(),
        ..AmqpQueueConfig::default()
    };
    let queue = Arc::new(AmqpQueue::new(pool, config, consumers * 100).expect("queue"));
    if produce {
        use runtime_contracts::TaskQueue;
        queue.stats().await.expect("declares the queues");
    } else {
        fill(url, queue.queue_name(), n).await;
    }
    let elapsed = drain_with_pool(Arc::clone(&queue) as _, n, consumers, 100, produce).await;
    queue.close().await;
    elapsed
}

fn main() {
    let n = plba_testkit::env_number("PLBA_BENCH_AMQP_TASKS", 100_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let server = RabbitServer::start();
    let url = server.url();
    println!(
        "amqp queue: {n} no-op tasks per run, private RabbitMQ (quorum queues, confirms, manual acks), same run for both"
    );
    for (k, (label, consumers, produce)) in [
        ("backlog, 1 consumer ", 1, false),
        ("backlog, 4 consumers", 4, false),
        ("produce+consume, 1  ", 1, true),
        ("produce+consume, 4  ", 4, true),
    ]
    .into_iter()
    .enumerate()
    {
        let raw_t = rt.block_on(raw(&url, &format!("raw{k}"), n, consumers, produce));
        let plba_t = rt.block_on(plba(&url, &format!("bench{k}"), n, consumers, produce));
        let (r, p) = (
            n as f64 / raw_t.as_secs_f64(),
            n as f64 / plba_t.as_secs_f64(),
        );
        println!(
            "  {label}  raw lapin confirm/consume/ack {r:>8.0} tasks/s   plba {p:>8.0} tasks/s   ratio {:.2}",
            p / r
        );
    }
    drop(server);
    println!(
        "peak RSS of this process (both systems, all runs): {:.1} MiB",
        peak_rss_mib()
    );
}
