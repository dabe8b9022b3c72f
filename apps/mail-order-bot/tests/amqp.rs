//! The bot on the AMQP (RabbitMQ) queue, as processes: Maildir -> AMQP -> orders, a
//! killed process, a broker restarted mid-run. Each test has its own private broker.

mod common;

use std::time::Duration;

use common::{
    assert_exactly_once, fill_mailbox, orders_so_far, unseen, wait_for, BotProcess, Workspace,
};
use nix::sys::signal::Signal;
use plba_testkit::RabbitServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_process_work_is_redelivered_to_another_none_lost_none_doubled() {
    let rabbit = RabbitServer::start();
    let ws = Workspace::new();
    let expected = fill_mailbox(&ws, 1000);
    let config = ws.config_amqp(&rabbit.url(), 4, "kill");

    let first = BotProcess::spawn(&ws, &config, false);
    wait_for(Duration::from_secs(120), "the first orders", || async {
        orders_so_far(&ws).await >= 30
    })
    .await;
    first.signal(Signal::SIGKILL);
    first.finish();
    assert!(unseen(&ws) > 0, "the kill came mid-run");

    // Another process: the broker gives it what the dead one held (its connection closed
    // with the process), and it finds the rest of the backlog.
    let (code, _, stderr) = BotProcess::spawn(&ws, &config, true).finish();
    assert_eq!(code, 0, "{stderr}");
    assert_exactly_once(&ws, &expected).await;
    assert_eq!(unseen(&ws), 0, "every message is seen");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_restarted_mid_run_loses_nothing_and_the_bot_recovers_by_itself() {
    let mut rabbit = RabbitServer::start();
    let ws = Workspace::new();
    let expected = fill_mailbox(&ws, 1000);
    let config = ws.config_amqp(&rabbit.url(), 4, "restart");
    let bot = BotProcess::spawn(&ws, &config, false);
    wait_for(Duration::from_secs(120), "the first orders", || async {
        orders_so_far(&ws).await >= 30
    })
    .await;
    rabbit.restart();
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
