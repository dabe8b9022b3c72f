//! The bot on the Redis Streams queue, as processes: crash, Redis restart, two processes.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{assert_exactly_once, fill_mailbox, wait_for, Workspace};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use plba_testkit::RedisServer;

/// Starts the bot; its log goes to `log-N.txt` in the workspace (a pipe nobody reads would
/// fill up and stall it).
fn spawn(ws: &Workspace, config: &std::path::Path, once: bool) -> Child {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let log = std::fs::File::create(ws.dir.path().join(format!("log-{n}.txt"))).expect("log file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mail-order-bot"));
    cmd.arg("run").arg("--config").arg(config);
    if once {
        cmd.arg("--once");
    }
    cmd.current_dir(ws.dir.path())
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn the bot")
}

/// The end of every bot log in the workspace, for failure messages.
fn logs(ws: &Workspace) -> String {
    let mut out = String::new();
    for n in 0..16 {
        if let Ok(text) = std::fs::read_to_string(ws.dir.path().join(format!("log-{n}.txt"))) {
            let tail: Vec<&str> = text.lines().rev().take(8).collect();
            out.push_str(&format!(
                "--- log-{n}\n{}\n",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
    }
    out
}

fn signal(child: &Child, sig: Signal) {
    kill(Pid::from_raw(i32::try_from(child.id()).expect("pid")), sig).expect("signal");
}

async fn orders(ws: &Workspace) -> usize {
    if !ws.dir.path().join("orders.db").exists() {
        return 0;
    }
    ws.store()
        .await
        .orders_after(0)
        .await
        .map(|o| o.len())
        .unwrap_or(0)
}

fn unseen(ws: &Workspace) -> usize {
    ws.seen_flags().values().filter(|s| !**s).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_process_work_is_reclaimed_by_another_none_lost_none_doubled() {
    let redis = RedisServer::start(true);
    let ws = Workspace::new();
    let expected = fill_mailbox(&ws, 1000);
    let config = ws.config_redis(&redis.url(), 4, 3000, "");

    let mut first = spawn(&ws, &config, false);
    wait_for(Duration::from_secs(120), "the first orders", || async {
        orders(&ws).await >= 30
    })
    .await;
    signal(&first, Signal::SIGKILL);
    first.wait().expect("reap");
    assert!(unseen(&ws) > 0, "the kill came mid-run");

    // Another process: it finds the backlog, and takes over what the dead one held once it
    // has been idle for claim_min_idle.
    let mut second = spawn(&ws, &config, true);
    assert!(second.wait().expect("wait").success());
    assert_exactly_once(&ws, &expected).await;
    assert_eq!(unseen(&ws), 0, "every message is seen");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_group_split_the_backlog_and_handle_each_message_once() {
    let redis = RedisServer::start(false);
    let ws = Workspace::new();
    let expected = fill_mailbox(&ws, 10_000);
    let config = ws.config_redis(&redis.url(), 4, 5000, "");
    let a = spawn(&ws, &config, true);
    let b = spawn(&ws, &config, true);
    for mut bot in [a, b] {
        let ok = bot.wait().expect("wait").success();
        assert!(ok, "a bot failed:\n{}", logs(&ws));
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
    let bot = spawn(&ws, &config, false);
    wait_for(Duration::from_secs(120), "the first orders", || async {
        orders(&ws).await >= 30
    })
    .await;
    redis.restart();
    wait_for(
        Duration::from_secs(180),
        "every message to be handled",
        || async { unseen(&ws) == 0 },
    )
    .await;
    signal(&bot, Signal::SIGTERM);
    let mut bot = bot;
    assert!(bot.wait().expect("wait").success());
    assert_exactly_once(&ws, &expected).await;
}
