//! The bot as a process: killed with SIGKILL mid-run, stopped with SIGTERM mid-run.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{assert_exactly_once, fill_mailbox, wait_for, Workspace};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn spawn_bot(ws: &Workspace, config: &std::path::Path, once: bool) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mail-order-bot"));
    cmd.arg("run").arg("--config").arg(config);
    if once {
        cmd.arg("--once");
    }
    cmd.current_dir(ws.dir.path())
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the bot")
}

async fn orders_so_far(ws: &Workspace) -> usize {
    // The bot creates the database; until then there is nothing to count.
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

fn signal(child: &Child, sig: Signal) {
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    kill(pid, sig).expect("send signal");
}

fn finish(child: Child) -> (i32, String, String) {
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn unseen(ws: &Workspace) -> usize {
    ws.seen_flags().values().filter(|s| !**s).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_run_then_restart_loses_nothing_and_duplicates_nothing() {
    let ws = Workspace::new();
    let expected = fill_mailbox(&ws, 1500);
    let config = ws.config(4, 3);

    let bot = spawn_bot(&ws, &config, false);
    wait_for(Duration::from_secs(120), "the first orders", || async {
        orders_so_far(&ws).await >= 25
    })
    .await;
    signal(&bot, Signal::SIGKILL);
    let (code, _, _) = finish(bot);
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

    let restart = spawn_bot(&ws, &config, true);
    let (code, stdout, stderr) = finish(restart);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("new orders"), "{stdout}");
    assert_exactly_once(&ws, &expected).await;
    assert_eq!(unseen(&ws), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_run_finishes_or_returns_in_flight_work() {
    let ws = Workspace::new();
    let expected = fill_mailbox(&ws, 1500);
    let config = ws.config(4, 3);

    let bot = spawn_bot(&ws, &config, false);
    wait_for(Duration::from_secs(120), "the first orders", || async {
        orders_so_far(&ws).await >= 25
    })
    .await;
    signal(&bot, Signal::SIGTERM);
    let (code, stdout, stderr) = finish(bot);
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

    let (code, _, stderr) = finish(spawn_bot(&ws, &config, true));
    assert_eq!(code, 0, "{stderr}");
    assert_exactly_once(&ws, &expected).await;
    assert_eq!(unseen(&ws), 0);
}
