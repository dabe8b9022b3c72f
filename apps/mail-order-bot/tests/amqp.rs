//! The bot on the AMQP (RabbitMQ) queue, as processes: Maildir -> AMQP -> orders, a
//! killed process, a broker restarted mid-run. Each test has its own private broker.

mod common;

use common::{killed_process_then_another, server_restarted_mid_run, Workspace};
use plba_testkit::RabbitServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_process_work_is_redelivered_to_another_none_lost_none_doubled() {
    let rabbit = RabbitServer::start();
    let ws = Workspace::new();
    // The broker hands the dead process's deliveries to the next consumer as soon as its
    // connection closes with it.
    killed_process_then_another(&ws, &ws.config_amqp(&rabbit.url(), 4, "kill")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_restarted_mid_run_loses_nothing_and_the_bot_recovers_by_itself() {
    let mut rabbit = RabbitServer::start();
    let ws = Workspace::new();
    let config = ws.config_amqp(&rabbit.url(), 4, "restart");
    server_restarted_mid_run(&ws, &config, || rabbit.restart()).await;
}
