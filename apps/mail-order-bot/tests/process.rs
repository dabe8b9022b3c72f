//! The bot as a process: killed with SIGKILL mid-run, stopped with SIGTERM mid-run.

mod common;

use std::time::Duration;

use common::{
    assert_exactly_once, fill_mailbox, orders_so_far, unseen, wait_for, BotProcess, Workspace,
};
use nix::sys::signal::Signal;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_run_then_restart_loses_nothing_and_duplicates_nothing() {
    let ws = Workspace::new();
    let expected = fill_mailbox(&ws, 1500);
    let config = ws.config(4, 3);

    let bot = BotProcess::spawn(&ws, &config, false);
    wait_for(Duration::from_secs(120), "the first orders", || async {
        orders_so_far(&ws).await >= 25
    })
    .await;
    bot.signal(Signal::SIGKILL);
    let (code, _, _) = bot.finish();
    assert_eq!(code, -1, "killed by a signal");
    let left = unseen(&ws);
    assert!(
        left > 0,
        "the kill came mid-run ({left} messages left unread)"
    );
    // Whatever the kill interrupted, nothing seen lacks its outcome.
    let outcomes = ws
        .store()
        .await
        .outcomes()
        .await
        .expect("outcomes")
        .into_iter()
        .map(|o| (o.message_identity, o.outcome))
        .collect();
    common::assert_seen_only_with_outcome(&ws, &outcomes);

    let before_restart = orders_so_far(&ws).await;
    let restart = BotProcess::spawn(&ws, &config, true);
    let (code, stdout, stderr) = restart.finish();
    assert_eq!(code, 0, "{stderr}");
    // Counted in the database; listed one by one only when at most 50 (the kill comes
    // after the first 25 of about 1,500, so usually far more are left for the restart).
    let total = orders_so_far(&ws).await;
    let created = total - before_restart;
    let tail = if created > 50 {
        "; `orders list` shows them)\n"
    } else {
        "):\n"
    };
    assert!(
        stdout.contains(&format!(
            "created {created} new orders ({total} in the store{tail}"
        )),
        "{stdout}"
    );
    assert_exactly_once(&ws, &expected).await;
    assert_eq!(unseen(&ws), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_run_finishes_or_returns_in_flight_work() {
    let ws = Workspace::new();
    let expected = fill_mailbox(&ws, 1500);
    let config = ws.config(4, 3);

    let bot = BotProcess::spawn(&ws, &config, false);
    wait_for(Duration::from_secs(120), "the first orders", || async {
        orders_so_far(&ws).await >= 25
    })
    .await;
    bot.signal(Signal::SIGTERM);
    let (code, stdout, stderr) = bot.finish();
    assert_eq!(code, 0, "a graceful stop: {stderr}");
    assert!(stderr.contains("SIGTERM received"), "{stderr}");
    assert!(stderr.contains("shutdown: stopping sources"), "{stderr}");
    assert!(
        stderr.contains("shutdown: draining in-flight tasks"),
        "{stderr}"
    );
    assert!(stdout.contains("pool orders:"), "{stdout}");
    assert!(unseen(&ws) > 0, "the stop came mid-run");
    let outcomes = ws
        .store()
        .await
        .outcomes()
        .await
        .expect("outcomes")
        .into_iter()
        .map(|o| (o.message_identity, o.outcome))
        .collect();
    common::assert_seen_only_with_outcome(&ws, &outcomes);

    let (code, _, stderr) = BotProcess::spawn(&ws, &config, true).finish();
    assert_eq!(code, 0, "{stderr}");
    assert_exactly_once(&ws, &expected).await;
    assert_eq!(unseen(&ws), 0);
}
