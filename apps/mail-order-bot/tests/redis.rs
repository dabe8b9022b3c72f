//! The bot on the Redis Streams queue, as processes: crash, Redis restart, two processes.

mod common;

use std::time::Duration;

use common::{
    assert_exactly_once, fill_mailbox, orders_so_far, unseen, wait_for, BotProcess, Workspace,
};
use nix::sys::signal::Signal;
use plba_testkit::RedisServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_process_work_is_reclaimed_by_another_none_lost_none_doubled() {
    let redis = RedisServer::start(true);
    let ws = Workspace::new();
    let expected = fill_mailbox(&ws, 1000);
    let config = ws.config_redis(&redis.url(), 4, 3000, "");

    let first = BotProcess::spawn(&ws, &config, false);
    wait_for(Duration::from_secs(120), "the first orders", || async {
        orders_so_far(&ws).await >= 30
    })
    .await;
    first.signal(Signal::SIGKILL);
    first.finish();
    assert!(unseen(&ws) > 0, "the kill came mid-run");

    // Another process: it finds the backlog, and takes over what the dead one held once it
    // has been idle for claim_min_idle.
    let (code, _, stderr) = BotProcess::spawn(&ws, &config, true).finish();
    assert_eq!(code, 0, "{stderr}");
    assert_exactly_once(&ws, &expected).await;
    assert_eq!(unseen(&ws), 0, "every message is seen");
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
    let expected = fill_mailbox(&ws, 1000);
    let config = ws.config_redis(&redis.url(), 4, 3000, "");
    let bot = BotProcess::spawn(&ws, &config, false);
    wait_for(Duration::from_secs(120), "the first orders", || async {
        orders_so_far(&ws).await >= 30
    })
    .await;
    redis.restart();
    wait_for(
        Duration::from_secs(180),
        "every message to be handled",
        || async { unseen(&ws) == 0 },
    )
    .await;
    bot.signal(Signal::SIGTERM);
    let (code, _, stderr) = bot.finish();
    assert_eq!(code, 0, "{stderr}");
    assert_exactly_once(&ws, &expected).await;
}
