//! The schedule source: slots fire on tokio's paused clock with their ids, misfires after
//! downtime are skipped or caught up within the bound, a slot fires once across a restart,
//! and, in real time on a real Redis, once across two sources sharing the queue.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use plba_testkit::{source_context, RedisServer, StopSignal};
use runtime_adapters::queue::memory::{MemoryQueue, MemoryQueueConfig};
use runtime_adapters::queue::redis::{RedisQueue, RedisQueueConfig};
use runtime_adapters::sources::schedule::{Clock, Misfire, ScheduleConfig, ScheduleSource};
use runtime_contracts::{SourceState, TaskQueue, TaskSource};

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .expect("time")
        .with_timezone(&Utc)
}

fn config(cron: &str, misfire: Misfire) -> ScheduleConfig {
    ScheduleConfig {
        cron: cron.into(),
        time_zone: "Europe/Berlin".into(),
        pool: "sweeps".into(),
        kind: "sweep".into(),
        misfire,
        misfire_grace_ms: 1_000,
        catch_up_max: 3,
        catch_up_window_secs: 3_600,
    }
}

struct Running {
    source: Arc<ScheduleSource>,
    stop: Arc<StopSignal>,
    task: tokio::task::JoinHandle<()>,
}

fn start(queue: Arc<dyn TaskQueue>, config: ScheduleConfig, clock: Option<Clock>) -> Running {
    let source = Arc::new(match clock {
        Some(clock) => ScheduleSource::with_clock("sweep", config, clock),
        None => ScheduleSource::new("sweep", config),
    });
    let (ctx, stop) = source_context(queue);
    let running = Arc::clone(&source);
    let task = tokio::spawn(async move {
        running.start(ctx).await.expect("the schedule runs");
    });
    Running { source, stop, task }
}

impl Running {
    async fn stop(self) -> Arc<ScheduleSource> {
        self.stop.stop();
        self.task.await.expect("the source stops");
        assert_eq!(self.source.status().state, SourceState::Stopped);
        self.source
    }
}

/// Consumes and acknowledges every ready task; their slots, oldest first, with `misfired`.
async fn fired(queue: &dyn TaskQueue) -> Vec<(String, bool)> {
    let mut slots = Vec::new();
    while let Some(lease) = queue
        .consume(Duration::from_millis(1))
        .await
        .expect("consume")
    {
        let task = &lease.task;
        assert_eq!(task.kind.as_ref(), "sweep");
        let slot = task.payload["slot"].as_str().expect("slot").to_owned();
        assert_eq!(task.id.as_str(), format!("schedule:sweep:{slot}"));
        slots.push((slot, task.payload["misfired"] == true));
        queue.ack(&lease).await.expect("ack");
    }
    slots
}

fn memory() -> Arc<MemoryQueue> {
    Arc::new(MemoryQueue::new("sweeps", MemoryQueueConfig::default()))
}

#[tokio::test(start_paused = true)]
async fn slots_fire_on_time_in_their_zone_and_status_shows_the_next() {
    let queue = memory();
    let clock = ScheduleSource::tokio_clock(at("2026-12-03T10:00:30Z"));
    let run = start(
        queue.clone(),
        config("0 * * * * *", Misfire::Skip),
        Some(clock),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(fired(&*queue).await.is_empty(), "no slot before the first");
    assert_eq!(
        run.source.status().next_due.as_deref(),
        Some("2026-12-03T11:01:00+01:00"),
        "the next slot, in the schedule's zone"
    );
    tokio::time::sleep(Duration::from_secs(150)).await;
    let slots: Vec<String> = fired(&*queue).await.into_iter().map(|(s, _)| s).collect();
    assert_eq!(
        slots,
        [
            "2026-12-03T10:01:00Z",
            "2026-12-03T10:02:00Z",
            "2026-12-03T10:03:00Z"
        ]
    );
    let source = run.stop().await;
    assert_eq!(source.status().published, 3);
}

#[tokio::test(start_paused = true)]
async fn after_downtime_skip_drops_the_missed_slots_and_catch_up_fires_the_newest_within_the_bound()
{
    // Before the downtime: 10:01 and 10:02 fire.
    let queue = memory();
    let before = start(
        queue.clone(),
        config("0 * * * * *", Misfire::Skip),
        Some(ScheduleSource::tokio_clock(at("2026-12-03T10:00:30Z"))),
    );
    tokio::time::sleep(Duration::from_secs(100)).await;
    before.stop().await;
    assert_eq!(fired(&*queue).await.len(), 2);

    // Back at 10:10:30 with skip: the missed slots stay missed, 10:11 fires on time.
    let skip = start(
        queue.clone(),
        config("0 * * * * *", Misfire::Skip),
        Some(ScheduleSource::tokio_clock(at("2026-12-03T10:10:30Z"))),
    );
    tokio::time::sleep(Duration::from_secs(40)).await;
    skip.stop().await;
    assert_eq!(
        fired(&*queue).await,
        [("2026-12-03T10:11:00Z".to_owned(), false)]
    );

    // Back at 10:20:30 with catch_up (at most 3): 10:18, 10:19 and 10:20 come late,
    // marked misfired, and the rest of the downtime is dropped and counted.
    let catch_up = start(
        queue.clone(),
        config("0 * * * * *", Misfire::CatchUp),
        Some(ScheduleSource::tokio_clock(at("2026-12-03T10:20:30Z"))),
    );
    tokio::time::sleep(Duration::from_secs(40)).await;
    let source = catch_up.stop().await;
    assert_eq!(
        fired(&*queue).await,
        [
            ("2026-12-03T10:18:00Z".to_owned(), true),
            ("2026-12-03T10:19:00Z".to_owned(), true),
            ("2026-12-03T10:20:00Z".to_owned(), true),
            ("2026-12-03T10:21:00Z".to_owned(), false),
        ]
    );
    assert!(source.misfired() > 0);
}

#[tokio::test(start_paused = true)]
async fn a_slot_fires_once_across_a_restart_and_catch_up_does_not_repeat_done_slots() {
    let queue = memory();
    // The first process fires 10:01 and stops at 10:01:00.5; the second starts at once.
    let first = start(
        queue.clone(),
        config("0 * * * * *", Misfire::Skip),
        Some(ScheduleSource::tokio_clock(at("2026-12-03T10:00:30Z"))),
    );
    tokio::time::sleep(Duration::from_millis(30_500)).await;
    first.stop().await;
    let second = start(
        queue.clone(),
        config("0 * * * * *", Misfire::Skip),
        Some(ScheduleSource::tokio_clock(at("2026-12-03T10:01:00.500Z"))),
    );
    tokio::time::sleep(Duration::from_secs(60)).await;
    second.stop().await;
    let slots: Vec<String> = fired(&*queue).await.into_iter().map(|(s, _)| s).collect();
    assert_eq!(
        slots,
        ["2026-12-03T10:01:00Z", "2026-12-03T10:02:00Z"],
        "the slot at the restart is looked at twice and fired once"
    );
    // A catch-up over the same hour finds both done (their ids are still known).
    let mut cfg = config("0 * * * * *", Misfire::CatchUp);
    cfg.catch_up_max = 100;
    let again = start(
        queue.clone(),
        cfg,
        Some(ScheduleSource::tokio_clock(at("2026-12-03T10:02:30Z"))),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let source = again.stop().await;
    let late: Vec<String> = fired(&*queue).await.into_iter().map(|(s, _)| s).collect();
    assert!(
        !late.contains(&"2026-12-03T10:01:00Z".to_owned())
            && !late.contains(&"2026-12-03T10:02:00Z".to_owned()),
        "{late:?}"
    );
    assert_eq!(source.status().published as usize, late.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_real_time_two_sources_on_one_redis_fire_each_slot_once() {
    let redis = RedisServer::start(false);
    let open = |consumer: &str| -> Arc<dyn TaskQueue> {
        Arc::new(
            RedisQueue::new(
                "sweeps",
                RedisQueueConfig {
                    url: redis.url(),
                    consumer: consumer.into(),
                    ..RedisQueueConfig::default()
                },
            )
            .expect("queue"),
        )
    };
    let (a, b) = (open("replica-a"), open("replica-b"));
    let every_second = config("* * * * * *", Misfire::Skip);
    let first = start(a.clone(), every_second.clone(), None);
    let second = start(b.clone(), every_second.clone(), None);
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    // One replica restarts while the other runs on.
    let before_restart = first.stop().await.status().published;
    let first = start(a.clone(), every_second, None);
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let (one, two) = (first.stop().await, second.stop().await);
    let slots = fired(&*a).await;
    let distinct: BTreeSet<&String> = slots.iter().map(|(s, _)| s).collect();
    assert_eq!(distinct.len(), slots.len(), "no slot twice: {slots:?}");
    assert!(
        (4..=8).contains(&slots.len()),
        "about one slot a second for 5.5 s: {slots:?}"
    );
    assert_eq!(
        (before_restart + one.status().published + two.status().published) as usize,
        slots.len(),
        "every slot was enqueued by exactly one of them"
    );
}
