//! The Redis Streams queue under the runtime's worker pool, beside a raw batched
//! `XREADGROUP`/`XACK` loop on the same private redis-server in the same run.
//!
//! Modes: a backlog drained by 1 and by 4 consumers, and produce+consume at once with 4
//! consumers (both producers send 1,000 tasks per round trip: pipelined `XADD`s, and
//! `publish_batch`); each with AOF off and with AOF `everysec`. Prints tasks/s, plba's ratio to the
//! raw loop (target: at least 0.5) and the process's peak RSS. `PLBA_BENCH_REDIS_TASKS`
//! sets the task count (default 100000).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use plba_bench::{drain_with_pool, envelope, peak_rss_mib};
use plba_testkit::RedisServer;
use runtime_adapters::queue::redis::{RedisQueue, RedisQueueConfig};
use runtime_contracts::TaskQueue;

async fn conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

/// Appends `n` envelopes to `stream`, pipelined.
async fn fill(url: &str, stream: &str, n: u64) {
    let mut c = conn(url).await;
    let mut i = 0;
    while i < n {
        let mut pipe = redis::pipe();
        for j in i..(i + 1000).min(n) {
            pipe.cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg("env")
                .arg(envelope(j))
                .ignore();
        }
        let _: () = pipe.query_async(&mut c).await.expect("xadd");
        i += 1000;
    }
}

async fn flush(url: &str) {
    let mut c = conn(url).await;
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut c)
        .await
        .expect("flush");
}

/// The raw loop: `consumers` tasks, each `XREADGROUP COUNT 100` then one pipelined `XACK`.
async fn raw(url: &str, n: u64, consumers: usize, produce: bool) -> Duration {
    flush(url).await;
    let stream = "raw:stream";
    let mut c = conn(url).await;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg("g")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut c)
        .await
        .expect("group");
    if !produce {
        fill(url, stream, n).await;
    }
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let producer = produce.then(|| {
        let url = url.to_owned();
        tokio::spawn(async move { fill(&url, stream, n).await })
    });
    let mut handles = Vec::new();
    for k in 0..consumers {
        let (url, done) = (url.to_owned(), Arc::clone(&done));
        handles.push(tokio::spawn(async move {
            let mut c = conn(&url).await;
            while done.load(Ordering::Relaxed) < n {
                let reply: redis::Value = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg("g")
                    .arg(format!("c{k}"))
                    .arg("COUNT")
                    .arg(100)
                    .arg("BLOCK")
                    .arg(50)
                    .arg("STREAMS")
                    .arg(stream)
                    .arg(">")
                    .query_async(&mut c)
                    .await
                    .expect("xreadgroup");
                let ids = entry_ids(&reply);
                if ids.is_empty() {
                    continue;
                }
                let mut pipe = redis::pipe();
                pipe.cmd("XACK").arg(stream).arg("g");
                for id in &ids {
                    pipe.arg(id);
                }
                let _: () = pipe.ignore().query_async(&mut c).await.expect("xack");
                done.fetch_add(ids.len() as u64, Ordering::Relaxed);
            }
        }));
    }
    for h in handles {
        h.await.expect("consumer");
    }
    if let Some(p) = producer {
        p.await.expect("producer");
    }
    start.elapsed()
}

fn entry_ids(v: &redis::Value) -> Vec<Vec<u8>> {
    let redis::Value::Array(streams) = v else {
        return Vec::new();
    };
    let mut ids = Vec::new();
    for s in streams {
        if let redis::Value::Array(pair) = s {
            if let Some(redis::Value::Array(entries)) = pair.get(1) {
                for e in entries {
                    if let redis::Value::Array(kv) = e {
                        if let Some(redis::Value::BulkString(id)) = kv.first() {
                            ids.push(id.clone());
                        }
                    }
                }
            }
        }
    }
    ids
}

/// plba: the Redis queue under a worker pool of `consumers` workers (prefetch 100).
async fn plba(url: &str, n: u64, consumers: usize, produce: bool) -> Duration {
    flush(url).await;
    // The same batch as the raw loop: 100 entries per read.
    let config = RedisQueueConfig {
        url: url.to_owned(),
        consumer: "bench".into(),
        pool_size: 16,
        batch_size: 100,
        ..RedisQueueConfig::default()
    };
    let queue = Arc::new(RedisQueue::new("bench", config).expect("queue"));
    queue.stats().await.expect("creates the group");
    if !produce {
        fill(url, "plba:bench:stream", n).await;
    }
    drain_with_pool(queue, n, consumers, 100, produce).await
}

fn main() {
    let n = plba_testkit::env_number("PLBA_BENCH_REDIS_TASKS", 100_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!("redis queue: {n} no-op tasks per run, private redis-server, same run for both");
    for aof in [false, true] {
        let server = RedisServer::start_with(aof.then_some("everysec"));
        let url = server.url();
        println!("AOF {}", if aof { "everysec" } else { "off" });
        for (label, consumers, produce) in [
            ("backlog, 1 consumer ", 1, false),
            ("backlog, 4 consumers", 4, false),
            ("produce+consume, 4  ", 4, true),
        ] {
            let raw_t = rt.block_on(raw(&url, n, consumers, produce));
            let plba_t = rt.block_on(plba(&url, n, consumers, produce));
            let (r, p) = (
                n as f64 / raw_t.as_secs_f64(),
                n as f64 / plba_t.as_secs_f64(),
            );
            println!("  {label}  raw XREADGROUP/XACK {r:>9.0} tasks/s   plba {p:>9.0} tasks/s   ratio {:.2}", p / r);
        }
    }
    println!(
        "peak RSS of this process (both systems, all runs): {:.1} MiB",
        peak_rss_mib()
    );
}
