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
