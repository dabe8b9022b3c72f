//! The console's HTML, as maud templates compiled into the binary. maud escapes every
//! value it is given, so nothing from a task, a module or a configuration can become markup.

use std::collections::BTreeMap;

use maud::{html, Markup, DOCTYPE};
use runtime_contracts::console::{ConsoleBlock, ConsoleView, FilterInput};
use runtime_contracts::{DeadLetter, HealthStatus};
use runtime_core::activity::ActivitySample;
use runtime_core::{
    ConfigReport, ConfigStatus, HealthReport, ReloadReport, RuntimeManager, RuntimeStatus,
};
use serde_json::Value;

use super::{DeadFilter, Who};

/// Percent-encodes everything but unreserved characters (for a path segment or a query).
pub(crate) fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A serde enum's word (`running`).
fn word<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".to_owned(),
    }
}

fn utc(unix_ms: u64) -> String {
    i64::try_from(unix_ms)
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| unix_ms.to_string())
}

fn age(ms: Option<u64>) -> String {
    match ms {
        None => "—".to_owned(),
        Some(ms) if ms < 1_000 => format!("{ms} ms"),
        Some(ms) if ms < 120_000 => format!("{:.1} s", ms as f64 / 1000.0),
        Some(ms) if ms < 7_200_000 => format!("{} min", ms / 60_000),
        Some(ms) => format!("{:.1} h", ms as f64 / 3_600_000.0),
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "—".to_owned(), |v| v.to_string())
}

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · plba console" }
            link rel="stylesheet" href="/ui/static/app.css";
            script src="/ui/static/app.js" defer {}
        }
    }
}

/// A page without navigation (login, errors before login).
pub(crate) fn bare(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                header { span class="brand" { "plba console" } }
                main id="main" {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// A page of a logged-in session.
pub(crate) fn page(
    title: &str,
    current: &str,
    who: &Who,
    runtime: &RuntimeManager,
    body: Markup,
) -> Markup {
    let mut nav: Vec<(String, String)> = vec![
        ("/ui".to_owned(), "Overview".to_owned()),
        ("/ui/dead-letters".to_owned(), "Dead letters".to_owned()),
        ("/ui/retries".to_owned(), "Retries".to_owned()),
    ];
    for module in runtime.console_pages() {
        for p in module.pages() {
            nav.push((format!("/ui/app/{}", url_encode(&p.id)), p.title));
        }
    }
    if runtime
        .operator_actions()
        .iter()
        .any(|a| !a.actions().is_empty())
    {
        nav.push(("/ui/actions".to_owned(), "Actions".to_owned()));
    }
    nav.push(("/ui/loggers".to_owned(), "Loggers".to_owned()));
    nav.push(("/ui/config".to_owned(), "Configuration".to_owned()));
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                a class="skip" href="#main" { "Skip to content" }
                header {
                    span class="brand" { "plba console" }
                    nav aria-label="Console" {
                        ul {
                            @for (href, label) in &nav {
                                li {
                                    @if href == current {
                                        a href=(href) aria-current="page" { (label) }
                                    } @else {
                                        a href=(href) { (label) }
                                    }
                                }
                            }
                        }
                    }
                    div class="who" {
                        span id="role" { "Signed in: " (word(&who.role)) }
                        form method="post" action="/ui/logout" {
                            input type="hidden" name="csrf" value=(who.csrf);
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main id="main" {
                    h1 { (title) }
                    @if let Some(flash) = &who.flash {
                        p class="notice" role="status" { (flash) }
                    }
                    (body)
                }
            }
        }
    }
}

pub(crate) fn problem(message: &str) -> Markup {
    html! { p class="error" role="alert" { (message) } }
}

pub(crate) fn login(open: bool, nonce: &str, notice: Option<&str>, error: Option<&str>) -> Markup {
    bare(
        "Log in",
        html! {
            @if let Some(n) = notice { p class="notice" role="status" { (n) } }
            @if let Some(e) = error { p class="error" role="alert" { (e) } }
            @if open {
                form class="stack" method="post" action="/ui/login" {
                    input type="hidden" name="csrf" value=(nonce);
                    label for="token" { "Access token (read or admin)" }
                    input id="token" name="token" type="password" autocomplete="current-password" required autofocus;
                    button type="submit" { "Log in" }
                }
                p { "The token is exchanged for a session; it is not kept in the browser." }
            } @else {
                p class="error" role="alert" {
                    "The console is closed: no token is configured. Set "
                    code { "control.admin_tokens" } " or " code { "control.read_tokens" }
                    " (or PLBA_CONTROL_ADMIN_TOKENS) and restart."
                }
            }
        },
    )
}

/// A form that posts to `action` with the CSRF token, `hidden` fields and `confirm=yes`.
fn action_button(
    who: &Who,
    action: &str,
    hidden: &[(&str, &str)],
    label: &str,
    class: &str,
) -> Markup {
    html! {
        form method="post" action=(action) {
            input type="hidden" name="csrf" value=(who.csrf);
            @for (k, v) in hidden { input type="hidden" name=(k) value=(v); }
            button type="submit" class=(class) { (label) }
        }
    }
}

pub(crate) fn confirm(
    who: &Who,
    what: &str,
    action: &str,
    hidden: &[(&str, &str)],
    verb: &str,
    cancel: &str,
    danger: bool,
) -> Markup {
    let mut fields: Vec<(&str, &str)> = hidden.to_vec();
    fields.push(("confirm", "yes"));
    html! {
        p { (what) }
        div class="actions" {
            (action_button(who, action, &fields, verb, if danger { "danger" } else { "" }))
            a class="button secondary" href=(cancel) { "Cancel" }
        }
    }
}

pub(crate) fn overview(live: Markup) -> Markup {
    html! {
        div id="live" data-src="/ui/live" aria-live="polite" {
            (live)
        }
    }
}

fn state_class(state: &str) -> String {
    format!("state-{state}")
}

pub(crate) fn live(
    who: &Who,
    status: &RuntimeStatus,
    ready: &HealthReport,
    activity: &[ActivitySample],
) -> Markup {
    let failing: Vec<_> = ready
        .checks
        .iter()
        .filter_map(|c| match &c.status {
            HealthStatus::Down { reason } => Some((c.name.as_str(), reason.as_str())),
            HealthStatus::Up => None,
        })
        .collect();
    html! {
        section aria-labelledby="h-runtime" {
            h2 id="h-runtime" { "Runtime" }
            dl class="fields" {
                dt { "State" } dd id="runtime-state" class=(state_class(&word(&status.state))) { (word(&status.state)) }
                dt { "Readiness" }
                dd id="readiness" {
                    @if ready.healthy { span class="state-up" { "ready" } }
                    @else { span class="state-down" { "not ready" } }
                }
                dt { "Modules" } dd { (status.modules.join(", ")) }
            }
            @if !failing.is_empty() {
                div class="scroll" {
                    table id="failing" {
                        caption { "Why it is not ready" }
                        thead { tr { th scope="col" { "Contributor" } th scope="col" { "Reason" } } }
                        tbody {
                            @for (name, reason) in &failing {
                                tr { td { (name) } td { (reason) } }
                            }
                        }
                    }
                }
            }
        }
        (chart(activity))
        section aria-labelledby="h-sources" {
            h2 id="h-sources" { "Sources" }
            div class="scroll" {
                table id="sources" {
                    caption { "Sources and what they did since start" }
                    thead { tr {
                        th scope="col" { "Source" } th scope="col" { "Pool" } th scope="col" { "State" }
                        th scope="col" class="num" { "Published" } th scope="col" class="num" { "Completed" }
                        th scope="col" class="num" { "Pending" } th scope="col" class="num" { "Restarts" }
                        th scope="col" { "Last event" }
                        th scope="col" { "Next slot" } th scope="col" { "Lease (owner, token, age)" }
                        th scope="col" { "Last error" }
                        @if who.admin() { th scope="col" { "Action" } }
                    } }
                    tbody {
                        @for (id, s) in &status.sources {
                            tr data-source=(id) {
                                th scope="row" { (id) }
                                td { (s.pool) }
                                td {
                                    @if s.paused { span class="state-paused" { "paused" } " (" }
                                    span class=(state_class(&word(&s.state))) { (word(&s.state)) }
                                    @if s.paused { ")" }
                                }
                                td class="num" { (s.published) }
                                td class="num" { (s.completed) }
                                td class="num" { (s.pending) }
                                td class="num" { (s.restarts) }
                                td { (age(s.last_event_age_ms)) " ago" }
                                td { (s.next_due.as_deref().unwrap_or("—")) }
                                td class="lease" {
                                    @if let Some(l) = &s.lease {
                                        @if l.held { strong { "this replica" } } @else { (l.holder.as_deref().unwrap_or("nobody")) }
                                        ", token " (opt(l.token))
                                        @if let Some(held) = l.held_for_ms { ", held " (age(Some(held))) }
                                        @if l.fenced_publishes > 0 { ", " (l.fenced_publishes) " fenced publishes" }
                                    } @else { "—" }
                                }
                                td { (s.last_error.as_deref().unwrap_or("—")) }
                                @if who.admin() {
                                    td {
                                        @if s.paused {
                                            (action_button(who, &format!("/ui/sources/{}/resume", url_encode(id)), &[], "Resume", ""))
                                        } @else {
                                            (action_button(who, &format!("/ui/sources/{}/pause", url_encode(id)), &[], "Pause", "secondary"))
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        section aria-labelledby="h-pools" {
            h2 id="h-pools" { "Worker pools" }
            div class="scroll" {
                table id="pools" {
                    caption { "Pools, counted since start" }
                    thead { tr {
                        th scope="col" { "Pool" } th scope="col" class="num" { "Workers" }
                        th scope="col" class="num" { "Busy" } th scope="col" class="num" { "Idle" }
                        th scope="col" class="num" { "Processed" } th scope="col" class="num" { "Failed" }
                        th scope="col" class="num" { "Retried" } th scope="col" class="num" { "Dead-lettered" }
                    } }
                    tbody {
                        @for p in &status.pools {
                            tr {
                                th scope="row" {
                                    (p.name)
                                    @if let Some(why) = &p.waiting_for {
                                        br;
                                        span class="state-paused" { "waiting for " (why) }
                                    }
                                }
                                td class="num" { (p.workers) } td class="num" { (p.busy) }
                                td class="num" { (p.idle) } td class="num" { (p.processed) }
                                td class="num" { (p.failed) } td class="num" { (p.retried) }
                                td class="num" { (p.dead_lettered) }
                            }
                        }
                    }
                }
            }
        }
        section aria-labelledby="h-queues" {
            h2 id="h-queues" { "Queues" }
            div class="scroll" {
                table id="queues" {
                    caption { "Queues now" }
                    thead { tr {
                        th scope="col" { "Queue" } th scope="col" class="num" { "Depth" }
                        th scope="col" class="num" { "Scheduled" } th scope="col" class="num" { "In flight" }
                        th scope="col" class="num" { "Lag" } th scope="col" { "Oldest pending" }
                        th scope="col" class="num" { "Dead letters" }
                    } }
                    tbody {
                        @for (name, q) in &status.queues {
                            tr {
                                th scope="row" { (name) }
                                td class="num" { (q.depth) } td class="num" { (q.scheduled) }
                                td class="num" { (q.in_flight) } td class="num" { (opt(q.lag)) }
                                td { (age(q.oldest_pending_age_ms)) }
                                td class="num" {
                                    @if q.dead > 0 {
                                        a href={ "/ui/dead-letters?queue=" (url_encode(name)) } { (q.dead) }
                                    } @else { "0" }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Two small line charts of the last 15 minutes: throughput and mean latency.
fn chart(activity: &[ActivitySample]) -> Markup {
    let throughput: Vec<f64> = activity.iter().map(ActivitySample::throughput).collect();
    let latency: Vec<Option<f64>> = activity.iter().map(|a| a.mean_latency_ms).collect();
    let last_rate = throughput.last().copied().unwrap_or(0.0);
    let last_latency = latency.iter().rev().flatten().next().copied();
    let total: u64 = activity.iter().map(|a| a.processed).sum();
    let failed: u64 = activity.iter().map(|a| a.failed).sum();
    html! {
        section aria-labelledby="h-activity" {
            h2 id="h-activity" { "Last 15 minutes" }
            p id="activity-summary" {
                "Tasks ended: " (total) "; failed attempts: " (failed) "; now "
                (format!("{last_rate:.1}")) " tasks/s"
                @if let Some(l) = last_latency { ", mean latency " (format!("{l:.0}")) " ms" }
                "."
            }
            div class="charts" {
                div class="chart" {
                    (line_chart("Throughput, tasks per second", &throughput.iter().map(|v| Some(*v)).collect::<Vec<_>>(), "#0b5cad"))
                }
                div class="chart" {
                    (line_chart("Mean latency from publish to outcome, ms", &latency, "#a4161a"))
                }
            }
        }
    }
}

fn line_chart(label: &str, values: &[Option<f64>], color: &str) -> Markup {
    const W: f64 = 300.0;
    const H: f64 = 70.0;
    const TOP: f64 = 4.0;
    let max = values.iter().flatten().copied().fold(0.0_f64, f64::max);
    let scale = if max > 0.0 { max } else { 1.0 };
    // 15 minutes of 10-second samples, the newest at the right edge.
    let slots = 90.0;
    let offset = slots - values.len() as f64;
    let points: Vec<(f64, f64)> = values
        .iter()
        .enumerate()
        .filter_map(|(i, v)| v.map(|v| (i, v)))
        .map(|(i, v)| {
            let x = (offset + i as f64) / (slots - 1.0) * W;
            let y = TOP + (H - TOP) * (1.0 - v / scale);
            (x.clamp(0.0, W), y)
        })
        .collect();
    let line: String = points
        .iter()
        .map(|(x, y)| format!("{x:.1},{y:.1}"))
        .collect::<Vec<_>>()
        .join(" ");
    html! {
        p { (label) ", highest " (format!("{max:.1}")) }
        svg viewBox="0 0 300 84" role="img" aria-label=(format!("{label}: {} samples, highest {max:.1}", values.len())) {
            title { (label) }
            rect x="0" y="0" width="300" height="70" fill="#f4f6f8" {}
            line x1="0" y1="70" x2="300" y2="70" stroke="#7a8694" stroke-width="1" {}
            polyline points=(line) fill="none" stroke=(color) stroke-width="2" {}
            @for (x, y) in &points {
                circle cx=(format!("{x:.1}")) cy=(format!("{y:.1}")) r="2.5" fill=(color) {}
            }
            text x="0" y="82" font-size="9" fill="#4a5360" { "15 min ago" }
            text x="300" y="82" font-size="9" fill="#4a5360" text-anchor="end" { "now" }
        }
    }
}

pub(crate) fn dead_letters(
    who: &Who,
    queues: &[String],
    filter: &DeadFilter,
    found: &[(String, DeadLetter)],
    rows: usize,
    truncated: bool,
) -> Markup {
    html! {
        form class="filters" method="get" action="/ui/dead-letters" role="search" {
            label { "Queue"
                select name="queue" {
                    option value="" selected[filter.queue.is_empty()] { "all" }
                    @for q in queues { option value=(q) selected[&filter.queue == q] { (q) } }
                }
            }
            label { "Kind" input name="kind" value=(filter.kind); }
            label { "Reason contains" input name="reason" value=(filter.reason); }
            label { "Search (id, payload, reasons)" input type="search" name="q" value=(filter.search); }
            button type="submit" { "Filter" }
        }
        p id="dead-count" { (found.len()) " matching dead letter(s)"
            @if found.len() > rows { ", the first " (rows) " shown" }
            @if truncated { " (the scan stopped at the first 5,000 of a queue)" } "." }
        @if who.admin() && !found.is_empty() {
            @let keep: Vec<(&str, &str)> = [("queue", filter.queue.as_str()), ("kind", filter.kind.as_str()), ("reason", filter.reason.as_str()), ("q", filter.search.as_str())].into_iter().filter(|(_, v)| !v.is_empty()).collect();
            div class="actions" { (action_button(who, "/ui/dead-letters/replay", &keep, &format!("Replay all {} matching", found.len()), "")) }
        }
        div class="scroll" {
            table id="dead-letters" {
                caption { "Dead letters, oldest first" }
                thead { tr {
                    th scope="col" { "Id" } th scope="col" { "Queue" } th scope="col" { "Kind" }
                    th scope="col" { "Reason" } th scope="col" class="num" { "Attempts" } th scope="col" { "Dead since" }
                } }
                tbody {
                    @for (queue, d) in found.iter().take(rows) {
                        tr {
                            td { a href={ "/ui/dead-letters/" (url_encode(queue)) "/" (url_encode(&d.id)) } { (d.id) } }
                            td { (queue) } td { (d.task.kind.as_ref()) } td { (d.reason) }
                            td class="num" { (d.task.history.len()) } td { (utc(d.dead_at_unix_ms)) }
                        }
                    }
                }
            }
        }
    }
}

pub(crate) fn retries(retries: &[runtime_core::PendingRetry], not_inspected: &[String]) -> Markup {
    html! {
        p id="retry-count" { (retries.len()) " task(s) waiting for their next attempt." }
        @if !not_inspected.is_empty() {
            p { "Not listed (the queue cannot show what it holds): " (not_inspected.join(", ")) "." }
        }
        div class="scroll" {
            table id="retries" {
                caption { "Pending retries, soonest first" }
                thead { tr {
                    th scope="col" { "Task" } th scope="col" { "Queue" } th scope="col" { "Kind" }
                    th scope="col" class="num" { "Attempts" } th scope="col" { "Last failure" }
                    th scope="col" { "Next attempt at" }
                } }
                tbody {
                    @for r in retries {
                        tr {
                            td { (r.task) } td { (r.queue) } td { (r.kind) }
                            td class="num" { (r.attempts) } td { (r.last_reason) }
                            td { @match r.next_attempt_at_unix_ms { Some(at) => (utc(at)), None => "not recorded" } }
                        }
                    }
                }
            }
        }
    }
}

pub(crate) fn dead_letter(who: &Who, queue: &str, d: &DeadLetter) -> Markup {
    let base = format!(
        "/ui/dead-letters/{}/{}",
        url_encode(queue),
        url_encode(&d.id)
    );
    let payload = serde_json::to_string_pretty(&d.task.payload).unwrap_or_default();
    html! {
        dl class="fields" id="dead-letter" {
            dt { "Id" } dd { (d.id) }
            dt { "Queue" } dd { (queue) }
            dt { "Kind" } dd { (d.task.kind.as_ref()) }
            dt { "Source" } dd { (d.task.source.as_ref()) }
            dt { "Reason" } dd { (d.reason) }
            dt { "Dead since" } dd { (utc(d.dead_at_unix_ms)) }
            dt { "Correlation" } dd { (d.task.correlation_id.as_ref()) }
            dt { "Caused by" } dd { (d.task.causation_id.as_deref().unwrap_or("nothing: a first delivery")) }
        }
        @if who.admin() {
            div class="actions" {
                (action_button(who, &format!("{base}/replay"), &[], "Replay", ""))
                (action_button(who, &format!("{base}/delete"), &[], "Delete", "danger"))
            }
        }
        h2 { "Attempts" }
        div class="scroll" {
            table id="attempts" {
                caption { "Every failed attempt, oldest first" }
                thead { tr { th scope="col" class="num" { "Attempt" } th scope="col" { "When" } th scope="col" { "Why" } th scope="col" { "Next attempt at" } } }
                tbody {
                    @for (i, h) in d.task.history.iter().enumerate() {
                        tr {
                            td class="num" { (h.attempt) } td { (utc(h.at_unix_ms)) } td { (h.reason) }
                            td {
                                @match (h.next_attempt_at_unix_ms, i + 1 == d.task.history.len()) {
                                    (Some(next), _) => (utc(next)),
                                    (None, true) => "none: dead-lettered",
                                    (None, false) => "not recorded",
                                }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Payload" }
        pre { code { (payload) } }
        h2 { "Headers" }
        div class="scroll" {
            table {
                caption { "Headers the task carries" }
                thead { tr { th scope="col" { "Name" } th scope="col" { "Value" } } }
                tbody { @for (k, v) in &d.task.headers { tr { td { (k) } td { (v) } } } }
            }
        }
        p { a href="/ui/dead-letters" { "Back to the dead letters" } }
    }
}

/// The application's operator actions, each a form whose first submission is a dry run.
pub(crate) fn actions(who: &Who, specs: &[runtime_contracts::ActionSpec]) -> Markup {
    html! {
        @if !who.admin() {
            p { "Running an action needs an admin token; this session was opened with a read token." }
        }
        @for spec in specs {
            section aria-labelledby=(format!("action-{}", spec.name)) {
                h2 id=(format!("action-{}", spec.name)) { code { (spec.name) } }
                p { (spec.summary) }
                @if who.admin() {
                    form class="stack" method="post" action=(format!("/ui/actions/{}", url_encode(&spec.name))) {
                        input type="hidden" name="csrf" value=(who.csrf);
                        @for param in &spec.params {
                            label for=(format!("{}-{}", spec.name, param.name)) {
                                code { (param.name) } ": " (param.help)
                            }
                            input id=(format!("{}-{}", spec.name, param.name)) name=(param.name) required[param.required];
                        }
                        button type="submit" { "Preview" }
                    }
                }
            }
        }
    }
}

/// A dry run's answer, with the button that runs the action for real.
pub(crate) fn action_preview(
    who: &Who,
    name: &str,
    message: &str,
    items: &[Value],
    params: &[(&str, &str)],
) -> Markup {
    let columns: Vec<String> = items
        .first()
        .and_then(Value::as_object)
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    html! {
        @if !items.is_empty() {
            table {
                thead { tr { @for c in &columns { th scope="col" { (c) } } } }
                tbody {
                    @for item in items {
                        tr { @for c in &columns { td { (word(&item[c.as_str()])) } } }
                    }
                }
            }
        }
        (confirm(
            who,
            &format!("{message}. Run it?"),
            &format!("/ui/actions/{}", url_encode(name)),
            params,
            "Run",
            "/ui/actions",
            false,
        ))
    }
}

pub(crate) fn loggers(who: &Who, current: Option<&str>, error: Option<&str>) -> Markup {
    html! {
        @if let Some(e) = error { (problem(e)) }
        @match current {
            None => p { "This process does not own its log subscriber; its filter cannot be changed here." },
            Some(filter) => {
                p { "The log filter in force: " code id="log-filter" { (filter) } }
                @if who.admin() {
                    form class="stack" method="post" action="/ui/loggers" {
                        input type="hidden" name="csrf" value=(who.csrf);
                        label for="filter" { "New filter (for example " code { "info,mail_order_bot=debug" } ")" }
                        input id="filter" name="filter" value=(filter) required;
                        button type="submit" { "Change" }
                    }
                }
            }
        }
    }
}

pub(crate) fn config(who: &Who, redacted: &Value, status: &ConfigStatus) -> Markup {
    html! {
        dl class="fields" {
            dt { "Read from" } dd { (status.origin) }
            @if let Some(o) = &status.overrides { dt { "Overrides" } dd { (o) } }
        }
        @if let Some(r) = &status.rejected {
            div class="error" role="alert" {
                p { "The last change (" (r.origin) ", " (utc(r.at_unix_ms)) ") was refused; the configuration before it stays in force:" }
                ul { @for p in &r.problems { li { (p) } } }
            }
        }
        @if who.admin() {
            div class="actions" { (action_button(who, "/ui/config/reload", &[], "Reload", "")) }
        }
        h2 { "In force (secrets redacted)" }
        pre id="config" { code { (serde_json::to_string_pretty(redacted).unwrap_or_default()) } }
    }
}

/// Every leaf of a JSON value by dotted key.
fn flatten(prefix: &str, value: &Value, out: &mut BTreeMap<String, String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_owned(), other.to_string());
        }
    }
}

pub(crate) fn reload_result(
    result: &Result<ReloadReport, ConfigReport>,
    before: &Value,
    after: &Value,
) -> Markup {
    let (mut old, mut new) = (BTreeMap::new(), BTreeMap::new());
    flatten("", before, &mut old);
    flatten("", after, &mut new);
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    let diff: Vec<(&String, Option<&String>, Option<&String>)> = keys
        .into_iter()
        .filter(|k| old.get(*k) != new.get(*k))
        .map(|k| (k, old.get(k), new.get(k)))
        .collect();
    html! {
        @match result {
            Ok(report) if report.changed.is_empty() => {
                p class="notice" role="status" id="reload-result" { "Nothing changed: the file says what is in force." }
            }
            Ok(report) => {
                div class="notice" role="status" id="reload-result" {
                    @if report.needs_restart.is_empty() { p { "Applied live." } }
                    @else if report.applied.is_empty() { p { "Needs a restart: nothing of this change could be applied live." } }
                    @else { p { "Applied live in part; the rest needs a restart." } }
                    @if !report.applied.is_empty() {
                        p { "Applied live: " } ul { @for k in &report.applied { li { code { (k) } } } }
                    }
                    @if !report.restarted.is_empty() {
                        p { "Sources started again to apply them: " } ul { @for id in &report.restarted { li { code { (id) } } } }
                    }
                    @if !report.needs_restart.is_empty() {
                        p { "Needs a restart: " } ul { @for k in &report.needs_restart {
                            li { code { (k) } @if let Some(why) = report.reasons.get(k) { " — " (why) } }
                        } }
                    }
                }
            }
            Err(report) => {
                div class="error" role="alert" id="reload-result" {
                    p { "Rejected: the configuration has " (report.problems.len()) " problem(s); nothing changed." }
                    ul { @for p in &report.problems { li { (p.to_string()) } } }
                }
            }
        }
        @if !diff.is_empty() {
            div class="scroll" {
                table id="diff" {
                    caption { "What changed (secrets redacted)" }
                    thead { tr { th scope="col" { "Key" } th scope="col" { "Before" } th scope="col" { "After" } } }
                    tbody {
                        @for (k, a, b) in &diff {
                            tr { td { code { (k) } } td { (a.map_or("—", |s| s.as_str())) } td { (b.map_or("—", |s| s.as_str())) } }
                        }
                    }
                }
            }
        }
        p { a href="/ui/config" { "Back to the configuration" } }
    }
}

pub(crate) fn app_view(page: &str, view: &ConsoleView) -> Markup {
    let action = format!("/ui/app/{}", url_encode(page));
    html! {
        @for block in &view.blocks {
            @match block {
                ConsoleBlock::Filters(filters) => {
                    form class="filters" method="get" action=(action) role="search" {
                        @for f in filters {
                            label {
                                (f.label)
                                @match &f.input {
                                    FilterInput::Date => input type="date" name=(f.name) value=(f.value);,
                                    FilterInput::Choice(options) => {
                                        select name=(f.name) {
                                            option value="" selected[f.value.is_empty()] { "any" }
                                            @for o in options { option value=(o) selected[&f.value == o] { (o) } }
                                        }
                                    },
                                    _ => input name=(f.name) value=(f.value);,
                                }
                            }
                        }
                        button type="submit" { "Filter" }
                    }
                },
                ConsoleBlock::Table(t) => {
                    div class="scroll" {
                        table class="app" {
                            caption { (t.caption) }
                            thead { tr { @for c in &t.columns { th scope="col" { (c) } } } }
                            tbody {
                                @for row in &t.rows {
                                    tr {
                                        @for (i, cell) in row.cells.iter().enumerate() {
                                            td {
                                                @match (&row.link, i) {
                                                    (Some((p, item)), 0) => a href={ "/ui/app/" (url_encode(p)) "?item=" (url_encode(item)) } { (cell) },
                                                    _ => (cell),
                                                }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                },
                ConsoleBlock::Fields(fields) => {
                    dl class="fields" { @for f in fields { dt { (f.label) } dd { (f.value) } } }
                },
                ConsoleBlock::Note(text) => p { (text) },
                _ => {},
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use runtime_contracts::{Probe, SourceState};
    use runtime_core::{LeaseReport, RuntimeState, SourceReport};

    use super::*;
    use crate::control::auth::Role;

    fn source(lease: Option<LeaseReport>) -> SourceReport {
        SourceReport {
            pool: "orders".into(),
            state: SourceState::Running,
            paused: false,
            published: 7,
            completed: 5,
            pending: 2,
            last_event_age_ms: Some(1_500),
            last_error: None,
            next_due: None,
            lease,
            restarts: 3,
        }
    }

    fn status(sources: BTreeMap<String, SourceReport>) -> RuntimeStatus {
        RuntimeStatus {
            state: RuntimeState::Running,
            modules: vec!["bot".into()],
            sources,
            pools: Vec::new(),
            queues: BTreeMap::new(),
            config: ConfigStatus::default(),
        }
    }

    fn who(role: Role) -> Who {
        Who {
            id: "s".into(),
            role,
            csrf: "c".into(),
            flash: None,
        }
    }

    /// Which replica owns a mailbox, its fencing token and the lease's age (#15), and the
    /// fenced publishes of a replica that lost it.
    #[test]
    fn the_sources_table_shows_who_owns_each_lease() {
        let owner = LeaseReport {
            resource: "imap/orders@mail:993/inbox".into(),
            held: true,
            holder: Some("replica-a".into()),
            token: Some(1_733_300_000_123),
            held_for_ms: Some(95_000),
            acquired: 1,
            fenced_publishes: 0,
        };
        let standby = LeaseReport {
            held: false,
            holder: Some("replica-b".into()),
            held_for_ms: None,
            fenced_publishes: 2,
            ..owner.clone()
        };
        let ready = HealthReport {
            probe: Probe::Readiness,
            healthy: true,
            checks: Vec::new(),
        };
        let sources = BTreeMap::from([
            ("inbox".to_owned(), source(Some(owner))),
            ("other".to_owned(), source(Some(standby))),
            ("plain".to_owned(), source(None)),
        ]);
        let html = live(&who(Role::Read), &status(sources), &ready, &[]).into_string();
        assert!(
            html.contains("<strong>this replica</strong>, token 1733300000123, held 95.0 s"),
            "{html}"
        );
        assert!(
            html.contains("replica-b, token 1733300000123, 2 fenced publishes"),
            "{html}"
        );
        assert!(!html.contains("/pause"), "a reader gets no action");
        assert!(
            html.contains("<td class=\"num\">2</td><td class=\"num\">3</td>"),
            "pending, then restarts: {html}"
        );
        let admin = live(
            &who(Role::Admin),
            &status(BTreeMap::from([("inbox".to_owned(), source(None))])),
            &ready,
            &[],
        )
        .into_string();
        assert!(
            admin.contains("action=\"/ui/sources/inbox/pause\""),
            "{admin}"
        );
    }

    /// A pool that waits for a dependency says which and why.
    #[test]
    fn the_pools_table_says_what_a_pool_waits_for() {
        let pool = |name: &str, waiting_for: Option<&str>| runtime_core::PoolStatus {
            name: name.into(),
            workers: 4,
            busy: 0,
            idle: 4,
            processed: 9,
            failed: 2,
            retried: 2,
            dead_lettered: 0,
            returned: 0,
            restarts: 0,
            ms_since_progress: 0,
            waiting_for: waiting_for.map(str::to_owned),
        };
        let mut status = status(BTreeMap::new());
        status.pools = vec![
            pool("orders", Some("order-store: connection refused")),
            pool("other", None),
        ];
        let ready = HealthReport {
            probe: Probe::Readiness,
            healthy: false,
            checks: Vec::new(),
        };
        let html = live(&who(Role::Read), &status, &ready, &[]).into_string();
        assert!(
            html.contains("waiting for order-store: connection refused"),
            "{html}"
        );
        assert_eq!(html.matches("waiting for").count(), 1, "{html}");
    }

    #[test]
    fn values_are_escaped_and_addresses_encoded() {
        assert_eq!(
            url_encode("maildir:inbox:1 a/b"),
            "maildir%3Ainbox%3A1%20a%2Fb"
        );
        let view = ConsoleView {
            title: "t".into(),
            blocks: vec![ConsoleBlock::Note("<script>alert(1)</script>".into())],
        };
        let html = app_view("p", &view).into_string();
        assert!(html.contains("&lt;script&gt;"), "{html}");
        assert!(!html.contains("<script>"));
    }

    #[test]
    fn the_chart_places_the_newest_sample_at_the_right_edge() {
        let sample = |processed| ActivitySample {
            at_unix_ms: 0,
            seconds: 10.0,
            processed,
            failed: 0,
            dead_lettered: 0,
            mean_latency_ms: Some(5.0),
        };
        let html = chart(&[sample(10), sample(40)]).into_string();
        assert!(html.contains("Tasks ended: 50"), "{html}");
        assert!(
            html.contains("cx=\"300.0\" cy=\"4.0\""),
            "the highest, newest point: {html}"
        );
        assert!(html.contains("highest 4.0"), "{html}");
    }
}
