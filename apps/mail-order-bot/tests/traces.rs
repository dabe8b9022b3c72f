//! Traces exported over OTLP to a real gRPC receiver: one trace per email with the whole
//! tree, across processes on Redis, and a collector that is down never stops the work.
//!
//! The first test installs this process's subscriber (one per process); the others run
//! the bot as processes.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use common::{order_mail, orders_so_far, unseen, wait_for, BotProcess, FaultyBot, Workspace};
use mail_order_bot::compose::{build_traced_runtime, load_config};
use plba_testkit::{free_port, OtlpReceiver, ReceivedSpan, RedisServer};

const CONSUMER: i32 = 5;
const PRODUCER: i32 = 4;
const ERROR: i32 = 2;

fn telemetry(endpoint: &str, service: &str) -> String {
    format!(
        "[telemetry]\nendpoint = \"{endpoint}\"\nservice_name = \"{service}\"\nbatch_delay_ms = 50\n"
    )
}

/// The spans of each trace, by trace id.
fn traces(spans: &[ReceivedSpan]) -> BTreeMap<String, Vec<ReceivedSpan>> {
    let mut by_trace: BTreeMap<String, Vec<ReceivedSpan>> = BTreeMap::new();
    for span in spans {
        by_trace
            .entry(span.trace_id.clone())
            .or_default()
            .push(span.clone());
    }
    by_trace
}

fn children<'a>(trace: &'a [ReceivedSpan], parent: &ReceivedSpan) -> Vec<&'a ReceivedSpan> {
    trace
        .iter()
        .filter(|s| s.parent_span_id == parent.span_id)
        .collect()
}

fn names(spans: &[&ReceivedSpan]) -> BTreeSet<String> {
    spans.iter().map(|s| s.name.clone()).collect()
}

/// The root, the publish span and the attempts of one email's trace, checked against the
/// messaging conventions.
fn shape(trace: &[ReceivedSpan]) -> (&ReceivedSpan, &ReceivedSpan, Vec<&ReceivedSpan>) {
    let roots: Vec<&ReceivedSpan> = trace
        .iter()
        .filter(|s| s.parent_span_id.is_empty())
        .collect();
    assert_eq!(roots.len(), 1, "one root per trace: {trace:#?}");
    let root = roots[0];
    assert_eq!(root.name, "scan inbox");
    assert_eq!(root.kind, CONSUMER);
    assert_eq!(root.attr("messaging.operation.type"), Some("receive"));
    let sends = children(trace, root);
    assert_eq!(sends.len(), 1, "one publish under the root: {trace:#?}");
    let send = sends[0];
    assert_eq!(send.name, "send orders");
    assert_eq!(send.kind, PRODUCER);
    assert_eq!(send.attr("messaging.operation.type"), Some("send"));
    assert_eq!(send.attr("messaging.destination.name"), Some("orders"));
    let id = root.attr("messaging.message.id").expect("message id");
    assert_eq!(send.attr("messaging.message.id"), Some(id));
    let mut attempts = children(trace, send);
    attempts.sort_by_key(|s| s.attr("attempt").map(str::to_owned));
    for attempt in &attempts {
        assert_eq!(attempt.name, "process orders");
        assert_eq!(attempt.kind, CONSUMER);
        assert_eq!(attempt.attr("messaging.operation.type"), Some("process"));
        assert_eq!(attempt.attr("messaging.destination.name"), Some("orders"));
        assert_eq!(attempt.attr("messaging.message.id"), Some(id));
    }
    assert_eq!(
        trace.len(),
        2 + attempts.len()
            + attempts
                .iter()
                .map(|a| children(trace, a).len())
                .sum::<usize>(),
        "every span of the trace hangs from its attempts: {trace:#?}"
    );
    (root, send, attempts)
}

/// Delivers `n` order mails whose ids start with `prefix`.
fn deliver_orders(ws: &Workspace, prefix: &str, n: u32) {
    for i in 0..n {
        ws.deliver(
            &format!("m{i}"),
            &order_mail(
                &format!("{prefix}-{i}"),
                "purchasing@acme.example",
                &[("SKU-3", i + 1)],
            ),
        );
    }
}

const STAGES: [&str; 6] = [
    "fetch",
    "parse",
    "extract",
    "decide",
    "store commit",
    "complete",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_then_succeeding_email_is_one_trace_with_the_whole_tree() {
    let receiver = OtlpReceiver::start();
    let ws = Workspace::new();
    ws.deliver(
        "once",
        &order_mail("fails-once", "purchasing@acme.example", &[("SKU-1", 2)]).replacen(
            "MIME-Version",
            "X-Test-Fault: once\r\nMIME-Version",
            1,
        ),
    );
    ws.deliver(
        "fine",
        &order_mail("fine", "purchasing@acme.example", &[("SKU-2", 1)]),
    );
    let config = ws.config_with(2, 3, &telemetry(receiver.endpoint(), "bot-under-test"));
    let manager = Arc::new(load_config(Some(&config), Some(HashMap::new())).expect("config"));
    let platform = manager.platform();
    let (logs, export) = runtime_core::install_subscriber_with(
        "warn",
        platform.runtime.log_format,
        &platform.telemetry,
        "mail-order-bot",
    )
    .expect("the OTLP exporter");
    assert!(export.is_exporting());
    let mut runtime = build_traced_runtime(manager, FaultyBot::module(), logs, Arc::new(export))
        .await
        .expect("runtime");
    runtime.start().expect("start");
    wait_for(
        Duration::from_secs(60),
        "both orders, both seen",
        || async { orders_so_far(&ws).await == 2 && unseen(&ws) == 0 },
    )
    .await;
    // Shutdown flushes what is buffered.
    runtime.shutdown().await;
    let spans = receiver.wait_for(Duration::from_secs(30), "both traces", |spans| {
        spans.iter().filter(|s| s.name == "complete").count() >= 2
    });
    assert!(spans.iter().all(|s| s.service == "bot-under-test"));
    let traces = traces(&spans);
    let emails: Vec<&Vec<ReceivedSpan>> = traces
        .values()
        .filter(|t| t.iter().any(|s| s.name == "scan inbox"))
        .collect();
    assert_eq!(emails.len(), 2, "one trace per email: {traces:#?}");
    for trace in emails {
        let (root, _, attempts) = shape(trace);
        let subject = root.attr("messaging.message.id").expect("id");
        let fails_once = trace.iter().any(|s| s.status_code == ERROR);
        let last = attempts.last().expect("an attempt");
        assert_ne!(
            last.status_code, ERROR,
            "the last attempt succeeded: {last:#?}"
        );
        assert_eq!(
            names(&children(trace, last)),
            STAGES.iter().map(|s| (*s).to_owned()).collect(),
            "the successful attempt of {subject} shows every stage"
        );
        if fails_once {
            // The retry joined the trace of the first attempt.
            assert_eq!(attempts.len(), 2, "{trace:#?}");
            let first = attempts[0];
            assert_eq!(first.attr("attempt"), Some("1"));
            assert_eq!(first.status_code, ERROR);
            assert_eq!(first.attr("error.type"), Some("error"));
            assert!(
                first.status_message.contains("injected fault"),
                "{first:#?}"
            );
            assert!(
                !children(trace, first).iter().any(|s| s.name == "complete"),
                "a failed attempt completes nothing at the source"
            );
            assert_eq!(last.attr("attempt"), Some("2"));
        } else {
            assert_eq!(attempts.len(), 1, "{trace:#?}");
        }
    }
    assert_eq!(
        traces
            .values()
            .filter(|t| t.iter().any(|s| s.status_code == ERROR))
            .count(),
        1,
        "only the faulty email failed once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_bot_processes_on_one_redis_yield_one_trace_per_email() {
    let receiver = OtlpReceiver::start();
    let redis = RedisServer::start(false);
    let ws = Workspace::new();
    // The publisher runs no workers: every email it publishes is handled by the other
    // process, so each trace crosses from one process to the other through Redis.
    let publisher = ws.config_redis(
        &redis.url(),
        4,
        5000,
        &telemetry(receiver.endpoint(), "bot-a"),
    );
    let text = std::fs::read_to_string(&publisher)
        .expect("config")
        .replacen("workers = 4", "workers = 0", 1);
    let publisher = ws.dir.path().join("publisher.toml");
    std::fs::write(&publisher, text).expect("write");
    let a = BotProcess::spawn(&ws, &publisher, false);
    deliver_orders(&ws, "cross", 10);
    receiver.wait_for(
        Duration::from_secs(60),
        "ten publish spans of bot-a",
        |spans| {
            spans
                .iter()
                .filter(|s| s.service == "bot-a" && s.name == "send orders")
                .count()
                >= 10
        },
    );
    assert_eq!(orders_so_far(&ws).await, 0, "the publisher handles nothing");
    let handler = ws.config_redis(
        &redis.url(),
        4,
        5000,
        &telemetry(receiver.endpoint(), "bot-b"),
    );
    let b = BotProcess::spawn(&ws, &handler, false);
    wait_for(Duration::from_secs(60), "ten orders, all seen", || async {
        orders_so_far(&ws).await == 10 && unseen(&ws) == 0
    })
    .await;
    for bot in [a, b] {
        bot.signal(nix::sys::signal::Signal::SIGTERM);
        let (code, _, stderr) = bot.finish();
        assert_eq!(code, 0, "{stderr}");
    }
    let spans = receiver.wait_for(Duration::from_secs(30), "ten completions", |spans| {
        spans.iter().filter(|s| s.name == "complete").count() >= 10
    });
    let handled: Vec<Vec<ReceivedSpan>> = traces(&spans)
        .into_values()
        .filter(|t| t.iter().any(|s| s.name == "process orders"))
        .collect();
    let (published_by_a, others): (Vec<&Vec<ReceivedSpan>>, Vec<&Vec<ReceivedSpan>>) =
        handled.iter().partition(|t| {
            t.iter()
                .any(|s| s.parent_span_id.is_empty() && s.service == "bot-a")
        });
    assert_eq!(published_by_a.len(), 10, "one trace per email");
    // The handler's own source may list a mail just before its worker marks it seen and
    // publish it just after the queue forgot the finished task: that is a trace of its
    // own, wholly in bot-b, which ends as a recorded second delivery (never an order; the
    // ten orders were counted above).
    for trace in others {
        let (root, _, _) = shape(trace);
        assert_eq!(root.service, "bot-b", "{trace:#?}");
    }
    for trace in published_by_a {
        let (root, send, attempts) = shape(trace);
        assert_eq!(
            (root.service.as_str(), send.service.as_str()),
            ("bot-a", "bot-a")
        );
        assert_eq!(attempts.len(), 1);
        assert_eq!(attempts[0].service, "bot-b");
        assert_eq!(attempts[0].attr("messaging.system"), Some("redis"));
        assert_eq!(
            names(&children(trace, attempts[0])),
            STAGES.iter().map(|s| (*s).to_owned()).collect()
        );
    }
}

/// `GET path` on the control plane at `port` with the read token; the body.
async fn get(port: u16, path: &str) -> String {
    reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .bearer_auth("read-token-1-7c1f0e9b2d4a6f835e21")
        .send()
        .await
        .expect("request")
        .text()
        .await
        .expect("answer")
}

fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_drops_counted_spans_and_stops_no_work() {
    let ws = Workspace::new();
    deliver_orders(&ws, "down", 40);
    let control = free_port();
    // Nothing listens on the collector's port; 16 spans fit the buffer.
    let extra = format!(
        "{}max_queue_spans = 16\nexport_timeout_ms = 300\n\n[control]\nenabled = true\nbind = \"127.0.0.1:{control}\"\nread_tokens = [\"read-token-1-7c1f0e9b2d4a6f835e21\"]\n",
        telemetry(&format!("http://127.0.0.1:{}", free_port()), "bot-down")
    );
    let bot = BotProcess::spawn(&ws, &ws.config_with(4, 3, &extra), false);
    wait_for(
        Duration::from_secs(60),
        "forty orders, all seen",
        || async { orders_so_far(&ws).await == 40 && unseen(&ws) == 0 },
    )
    .await;
    wait_for(Duration::from_secs(30), "dropped spans counted", || async {
        let metrics = get(control, "/metrics").await;
        let dropped = metric(&metrics, "plba_spans_dropped_total").unwrap_or(0);
        let exported = metric(&metrics, "plba_spans_exported_total");
        assert_eq!(
            exported,
            Some(0),
            "nothing reached a collector that is down"
        );
        // 40 emails make at least 40 x 9 spans; at most 16 wait in the buffer.
        dropped >= 40 * 9 - 16
    })
    .await;
    bot.signal(nix::sys::signal::Signal::SIGTERM);
    let (code, stdout, stderr) = bot.finish();
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("created 40 new orders"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http_protobuf_the_spans_buffered_at_exit_are_flushed() {
    let receiver = OtlpReceiver::start_http();
    let ws = Workspace::new();
    deliver_orders(&ws, "http", 3);
    // Batches wait a minute: only the flush at shutdown can send them within the test.
    let extra = format!(
        "[telemetry]\nendpoint = \"{}\"\nprotocol = \"http/protobuf\"\nbatch_delay_ms = 60000\nresource = {{ \"deployment.environment\" = \"test\" }}\n",
        receiver.endpoint()
    );
    let (code, _, stderr) = BotProcess::spawn(&ws, &ws.config_with(2, 3, &extra), true).finish();
    assert_eq!(code, 0, "{stderr}");
    let spans = receiver.wait_for(Duration::from_secs(10), "three completions", |spans| {
        spans.iter().filter(|s| s.name == "complete").count() >= 3
    });
    assert!(
        spans.iter().all(|s| s.service == "mail-order-bot"),
        "the default service name"
    );
    let handled: Vec<Vec<ReceivedSpan>> = traces(&spans)
        .into_values()
        .filter(|t| t.iter().any(|s| s.name == "process orders"))
        .collect();
    assert_eq!(handled.len(), 3);
    for trace in &handled {
        let (_, _, attempts) = shape(trace);
        assert_eq!(attempts.len(), 1);
        assert_eq!(attempts[0].attr("messaging.system"), Some("plba"));
    }
}
