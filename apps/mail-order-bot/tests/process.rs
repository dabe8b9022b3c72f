//! The bot as a process: killed with SIGKILL mid-run, stopped with SIGTERM mid-run.

mod common;

use std::collections::{HashMap, HashSet};
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

/// `runtime.log_format = "json"`: every line on stderr is one JSON object, and every event
/// of a task's attempt carries the task's trace: W3C ids, one trace per message.
#[test]
fn json_logs_are_one_object_a_line_with_each_tasks_trace() {
    let ws = Workspace::new();
    fill_mailbox(&ws, 20);
    let text = ws
        .config_text(2, 3, "")
        .replace("log = \"info\"", "log = \"info\"\nlog_format = \"json\"");
    assert!(text.contains("log_format = \"json\""));
    let config = ws.dir.path().join("bot-json.toml");
    std::fs::write(&config, text).expect("write config");
    let (code, _, stderr) = BotProcess::spawn(&ws, &config, true).finish();
    assert_eq!(code, 0, "{stderr}");
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            && s.bytes().any(|b| b != b'0')
    };
    let mut traces: HashMap<String, String> = HashMap::new();
    let mut spans = HashSet::new();
    for line in stderr.lines() {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for key in ["timestamp", "level", "target", "message"] {
            assert!(event[key].is_string(), "no {key}: {line}");
        }
        assert!(event["fields"].is_object(), "no fields: {line}");
        if event["message"] != "task completed" {
            continue;
        }
        let task = event["fields"]["task"].as_str().expect("task field");
        assert_eq!(event["spans"][0]["name"], "task", "{line}");
        assert_eq!(event["spans"][0]["task"], task, "{line}");
        let trace = event["trace_id"].as_str().expect("trace_id");
        let span = event["span_id"].as_str().expect("span_id");
        assert!(hex(trace, 32) && hex(span, 16), "{line}");
        assert!(
            spans.insert(span.to_owned()),
            "one span per attempt: {line}"
        );
        assert!(
            traces.insert(task.to_owned(), trace.to_owned()).is_none(),
            "completed once: {line}"
        );
    }
    assert_eq!(
        traces.len(),
        20,
        "one completion per message (resends included)"
    );
    let distinct: HashSet<&String> = traces.values().collect();
    assert_eq!(distinct.len(), traces.len(), "one trace per message");
}

/// Every hostile input of the fuzz corpus (nestings of each kind the parser reads, plain and
/// inside base64 message parts, zip bombs, an XLSX lying about its sizes) delivered beside an
/// order: `run --once` ends normally, each is `rejected` with the limit it hit and marked
/// seen, and the order is made. Before the structure was bounded, one of them aborted the
/// process (exit 134) and left the mail unread, so every start crashed again.
/// Delivers the fuzz seeds whose names start with `prefix`; their names.
fn deliver_seeds(ws: &Workspace, prefix: &str) -> Vec<String> {
    let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/parse_extract");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&seeds).expect("fuzz corpus").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix) {
            ws.deliver_bytes(&name, &std::fs::read(entry.path()).expect("seed"));
            names.push(name);
        }
    }
    names
}

#[test]
fn hostile_mail_is_rejected_and_the_process_lives_on() {
    let ws = Workspace::new();
    let hostile = deliver_seeds(&ws, "rejected-");
    assert!(hostile.len() >= 10, "{hostile:?}");
    ws.deliver(
        "good",
        &common::order_mail("good", "buyer@acme.example", &[("SKU-1", 2)]),
    );
    let config = ws.config(2, 3);
    let (code, stdout, stderr) = BotProcess::spawn(&ws, &config, true).finish();
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(unseen(&ws), 0, "every message is marked seen");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let outcomes = rt.block_on(async { ws.store().await.outcomes().await.expect("outcomes") });
    let rejected = outcomes.iter().filter(|o| o.outcome == "rejected").count();
    assert_eq!(rejected, hostile.len(), "{outcomes:#?}");
    assert!(outcomes
        .iter()
        .filter(|o| o.outcome == "rejected")
        .all(|o| o.reason.as_deref().is_some_and(|r| r.contains("max_")
            || r.contains("zip_max_ratio")
            || r.contains("sheet_max_cells")
            || r.contains("declares"))));
    assert_eq!(
        outcomes.iter().filter(|o| o.outcome == "created").count(),
        1,
        "{outcomes:#?}"
    );
}

/// A message within every limit that takes seconds of CPU to read (the `slow-*` fuzz seeds,
/// corpus case 084), and one whose reading needs more memory than a helper may have: each is
/// `rejected` with its reason and marked seen, its helper killed or dead; the order beside
/// them is made by the same process, which exits cleanly.
#[test]
fn a_message_too_slow_or_too_big_to_read_is_rejected_and_the_process_lives_on() {
    let ws = Workspace::new();
    let slow = deliver_seeds(&ws, "slow-");
    assert!(!slow.is_empty(), "a slow-* fuzz seed");
    // 80 MiB of body for a helper limited to 64 MiB (the limit on messages raised to match).
    let mut big = common::order_mail("big", "buyer@acme.example", &[("SKU-9", 1)]);
    big.push_str(&"padding line of an oversized mail\r\n".repeat(80 << 20 >> 5));
    ws.deliver("big", &big);
    ws.deliver(
        "good",
        &common::order_mail("good", "buyer@acme.example", &[("SKU-1", 2)]),
    );
    let text = std::fs::read_to_string(ws.config(2, 3)).expect("config");
    let limited = text.replace(
        "sender_auth = { mode = \"off\" }",
        "sender_auth = { mode = \"off\" }\nparse_timeout_ms = 200\nparse_memory_mb = 64\nmax_message_bytes = 134217728",
    );
    let limited = limited.replace(
        "poll_interval_ms = 50",
        "poll_interval_ms = 50\nmax_message_bytes = 134217728",
    );
    assert_ne!(text, limited);
    let config = ws.dir.path().join("limited.toml");
    std::fs::write(&config, limited).expect("write config");
    let (code, stdout, stderr) = BotProcess::spawn(&ws, &config, true).finish();
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(unseen(&ws), 0, "every message is marked seen");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let outcomes = rt.block_on(async { ws.store().await.outcomes().await.expect("outcomes") });
    let reasons = |prefix: &str| {
        outcomes
            .iter()
            .filter(|o| o.outcome == "rejected")
            .filter(|o| o.reason.as_deref().is_some_and(|r| r.starts_with(prefix)))
            .count()
    };
    assert_eq!(
        reasons("parse_timeout_ms: reading the message took longer than 200 ms"),
        slow.len(),
        "{outcomes:#?}"
    );
    assert_eq!(
        reasons("parse_memory_mb: reading the message ended its helper process"),
        1,
        "{outcomes:#?}"
    );
    assert_eq!(
        outcomes.iter().filter(|o| o.outcome == "created").count(),
        1,
        "{outcomes:#?}"
    );
}

/// A `parse_helper` that is not the bot's binary is refused when the bot starts, with the key
/// named: never at the first message, never by reading mail in the bot's own process.
#[test]
fn a_helper_program_that_is_not_one_is_refused_at_start() {
    let ws = Workspace::new();
    ws.deliver(
        "good",
        &common::order_mail("good", "buyer@acme.example", &[("SKU-1", 2)]),
    );
    let text = std::fs::read_to_string(ws.config(1, 3)).expect("config");
    let wrong = text.replace(
        "sender_auth = { mode = \"off\" }",
        "sender_auth = { mode = \"off\" }\nparse_helper = \"/bin/echo\"",
    );
    assert_ne!(text, wrong);
    let config = ws.dir.path().join("wrong-helper.toml");
    std::fs::write(&config, wrong).expect("write config");
    let (code, stdout, stderr) = BotProcess::spawn(&ws, &config, true).finish();
    assert_ne!(code, 0, "{stdout}\n{stderr}");
    assert!(
        stderr.contains("apps.mail_order_bot.parse_helper")
            && stderr.contains("/bin/echo is not a mail-order-bot parse helper"),
        "{stderr}"
    );
    assert_eq!(unseen(&ws), 1, "the mail stays unread");
}
