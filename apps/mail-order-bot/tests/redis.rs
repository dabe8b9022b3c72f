//! The bot on the Redis Streams queue, as processes: crash, Redis restart, two processes.

mod common;

use common::{
    assert_exactly_once, fill_mailbox, killed_process_then_another, server_restarted_mid_run,
    unseen, BotProcess, Workspace,
};
use plba_testkit::RedisServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_process_work_is_reclaimed_by_another_none_lost_none_doubled() {
    let redis = RedisServer::start(true);
    let ws = Workspace::new();
    // The next process takes over what the dead one held once it has been idle for
    // claim_min_idle.
    killed_process_then_another(&ws, &ws.config_redis(&redis.url(), 4, 3000, "")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_group_split_the_backlog_and_handle_each_message_once() {
    let redis = RedisServer::start(false);
    let ws = Workspace::new();
    let expected = fill_mailbox(&ws, 10_000);
    let config = ws.config_redis(&redis.url(), 4, 5000, "");
    let a = BotProcess::spawn(&ws, &config, true);
    let b = BotProcess::spawn(&ws, &config, true);
    for bot in [a, b] {
        let (code, _, stderr) = bot.finish();
        assert_eq!(code, 0, "a bot failed: {stderr}");
    }
    assert_exactly_once(&ws, &expected).await;
    assert_eq!(unseen(&ws), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_mid_run_loses_nothing_and_the_bot_recovers_by_itself() {
    let mut redis = RedisServer::start(true);
    let ws = Workspace::new();
    let config = ws.config_redis(&redis.url(), 4, 3000, "");
    server_restarted_mid_run(&ws, &config, || redis.restart()).await;
}

/// A stepped retry schedule (`["2s", "3s"]`) on Redis, across a restart: the first attempt
/// fails and the process stops before the retry is due; the next process (which finds the
/// unread mail again, and Redis refuses the second pointer) runs the retry no earlier than
/// the due time the queue kept, then the third attempt a step later, then dead-letters it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stepped_retry_schedule_is_kept_by_redis_across_a_restart() {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::time::Duration;

    use mail_order_bot::compose::{build_runtime, load_config};

    let redis = RedisServer::start(false);
    let ws = Workspace::new();
    let path = ws.config_redis(&redis.url(), 2, 5000, "");
    let text = std::fs::read_to_string(&path).expect("config");
    let text = text.replace("max_attempts = 3\n", "").replace(
        "[pools.orders.retry]\ninitial_backoff_ms = 10\nmax_backoff_ms = 50\njitter = 0.1",
        "[pools.orders.retry]\nschedule = [\"2s\", \"3s\"]",
    );
    assert!(
        text.contains("schedule = ") && !text.contains("max_attempts"),
        "{text}"
    );
    std::fs::write(&path, text).expect("config");
    ws.deliver(
        "fails.1",
        &common::order_mail("fails-1", "purchasing@acme.example", &[("SKU-1", 1)]).replacen(
            "MIME-Version",
            "X-Test-Fault: error\r\nMIME-Version",
            1,
        ),
    );
    let start = || async {
        let config = Arc::new(load_config(Some(&path), Some(HashMap::new())).expect("config"));
        let mut runtime = build_runtime(config, common::FaultyBot::module(), None)
            .await
            .expect("runtime");
        runtime.start().expect("start");
        runtime
    };

    let first = start().await;
    common::wait_for(
        Duration::from_secs(30),
        "the first failed attempt",
        || async { first.status().await.pools[0].retried >= 1 },
    )
    .await;
    first.shutdown().await;
    let stats = first
        .queue("orders")
        .expect("queue")
        .stats()
        .await
        .expect("stats");
    assert_eq!(stats.scheduled, 1, "the retry waits in Redis: {stats:?}");

    let second = start().await;
    common::wait_for(Duration::from_secs(60), "the dead letter", || async {
        second.status().await.pools[0].dead_lettered >= 1
    })
    .await;
    let page = second
        .queue("orders")
        .expect("queue")
        .dead_letters()
        .expect("dead letters")
        .list(None, 10)
        .await
        .expect("list");
    second.shutdown().await;
    assert_eq!(page.items.len(), 1, "{:?}", page.items);
    let dead = &page.items[0];
    assert!(dead.reason.contains("(attempt 3 of 3)"), "{}", dead.reason);
    let history = &dead.task.history;
    assert_eq!(history.len(), 3, "{history:?}");
    for (i, step) in [(0, 2000), (1, 3000)] {
        let due = history[i].next_attempt_at_unix_ms.expect("due time");
        assert_eq!(due - history[i].at_unix_ms, step, "{history:?}");
        assert!(
            history[i + 1].at_unix_ms >= due,
            "attempt {} ran before its due time: {history:?}",
            i + 2
        );
    }
    assert_eq!(history[2].next_attempt_at_unix_ms, None);
}
