//! The mail corpus (`tests/corpus/*.eml`, expectations in `tests/corpus/expected.toml`),
//! walked in order into one store: every case must end with its expected outcome, lines,
//! reason and subject. The same walk runs against SQLite and against a private PostgreSQL.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use mail_order_bot::domain::clients::load_clients_file;
use mail_order_bot::domain::message::{read_mail, MailFacts};
use mail_order_bot::domain::store::{OrderStore, Recorded};
use mail_order_bot::domain::{OutcomeKind, MAX_STORED_REASON, MAX_STORED_SUBJECT};
use mail_order_bot::helper::{HelperSettings, ParserPool};
use mail_order_bot::module::{outcome_of, BotConfig, OrderHandler};
use plba_testkit::PostgresServer;
use serde::Deserialize;

#[derive(Deserialize)]
struct Expected {
    case: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    file: String,
    outcome: String,
    lines: Vec<String>,
    reason: Option<String>,
    subject: Option<String>,
    /// Where every line of the order was found (`body`, `body table 1`, a file name).
    origin: Option<String>,
    #[serde(default)]
    limits: BTreeMap<String, u64>,
}

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(corpus().join("expected.toml")).expect("expected.toml");
    toml::from_str::<Expected>(&text)
        .expect("expected.toml parses")
        .case
}

/// Walks the corpus into one store, recording `batch` messages a transaction (1: each alone
/// with `record`; more: `record_batch`, as a worker's batch is).
async fn walk(store_url: &str, batch: usize) {
    let store = OrderStore::open(store_url).await.expect("open store");
    let clients = load_clients_file(&corpus().join("clients.toml")).expect("clients.toml");
    let cfg: BotConfig = serde_json::from_value(
        serde_json::json!({ "store_url": store_url, "sender_auth": { "mode": "off" } }),
    )
    .expect("config");
    let handler = OrderHandler::new(store.clone(), &cfg, &clients);
    let cases = cases();
    let mut failures = Vec::new();
    let mut seen_outcomes = BTreeSet::new();
    let files: BTreeSet<String> = std::fs::read_dir(corpus())
        .expect("corpus dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".eml"))
        .collect();
    let listed: BTreeSet<String> = cases.iter().map(|c| c.file.clone()).collect();
    assert_eq!(
        files, listed,
        "every .eml has an expectation and every expectation a file"
    );
    assert!(cases.len() >= 60, "the corpus has {} cases", cases.len());

    let mut read = Vec::with_capacity(cases.len());
    for case in &cases {
        let raw = std::fs::read(corpus().join(&case.file)).expect("read case");
        let mut limits = cfg.limits();
        let mut timeout = None;
        for (key, value) in &case.limits {
            match key.as_str() {
                // Read in a helper process, as the bot reads, stopped after this long.
                "parse_timeout_ms" => timeout = Some(std::time::Duration::from_millis(*value)),
                "max_message_bytes" => limits.max_message_bytes = *value as usize,
                "csv_max_rows" => {
                    limits.csv.max_rows = *value as usize;
                    limits.sheets.max_rows = *value as usize;
                }
                other => panic!("{}: unknown limit {other}", case.file),
            }
        }
        let facts = match timeout {
            None => read_mail(&raw, &limits),
            Some(timeout) => {
                let pool = ParserPool::new(HelperSettings {
                    program: PathBuf::from(env!("CARGO_BIN_EXE_mail-order-bot")),
                    limits,
                    timeout,
                    memory_bytes: 1 << 30,
                });
                match pool.read(&raw, &mut |_| {}).await {
                    Ok(facts) => facts,
                    Err(failure) => MailFacts::rejected_unread(
                        &raw,
                        failure
                            .rejection()
                            .unwrap_or_else(|| panic!("{}: {failure}", case.file)),
                    ),
                }
            }
        };
        let rec = handler.decide(&facts, &case.file);
        read.push((facts, rec));
    }
    let mut all_recorded = Vec::with_capacity(cases.len());
    for chunk in read.chunks(batch) {
        if batch == 1 {
            all_recorded.push(store.record(&chunk[0].1).await.expect("record"));
        } else {
            let recs: Vec<_> = chunk.iter().map(|(_, rec)| rec).collect();
            for recorded in store.record_batch(&recs).await {
                all_recorded.push(recorded.expect("record"));
            }
        }
    }
    for ((case, (facts, rec)), recorded) in cases.iter().zip(&read).zip(all_recorded) {
        let outcome = outcome_of(rec, &recorded);
        seen_outcomes.insert(outcome.kind.to_string());
        let mut problems = Vec::new();
        if outcome.kind != case.outcome {
            problems.push(format!(
                "outcome {} ({}), expected {}",
                outcome.kind,
                outcome.detail.clone().unwrap_or_default(),
                case.outcome
            ));
        }
        let stored = match &recorded {
            Recorded::New { order_id: Some(id) } => store
                .orders_after(id - 1)
                .await
                .expect("orders")
                .first()
                .map(|o| o.lines.clone())
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        let lines: Vec<String> = stored
            .iter()
            .map(|l| format!("{}:{}", l.sku, l.quantity))
            .collect();
        if let Some(want) = &case.origin {
            if let Some(other) = stored.iter().find(|l| &l.origin != want) {
                problems.push(format!("a line from {:?}, expected {want:?}", other.origin));
            }
        }
        if lines != case.lines {
            problems.push(format!("lines {lines:?}, expected {:?}", case.lines));
        }
        if let Some(want) = &case.reason {
            let have = format!(
                "{} {}",
                rec.reason.clone().unwrap_or_default(),
                outcome.detail.clone().unwrap_or_default()
            );
            if !have.contains(want.as_str()) {
                problems.push(format!("reason {have:?} does not contain {want:?}"));
            }
        }
        // What is kept of any mail is bounded, however large the mail.
        let reason_chars = rec.reason.as_deref().map_or(0, |r| r.chars().count());
        if reason_chars > MAX_STORED_REASON {
            problems.push(format!("a reason of {reason_chars} characters is stored"));
        }
        let subject_chars = rec.subject.as_deref().map_or(0, |s| s.chars().count());
        if subject_chars > MAX_STORED_SUBJECT {
            problems.push(format!("a subject of {subject_chars} characters is stored"));
        }
        if let Some(want) = &case.subject {
            if facts.subject.as_deref() != Some(want.as_str()) {
                problems.push(format!("subject {:?}, expected {want:?}", facts.subject));
            }
        }
        if !problems.is_empty() {
            failures.push(format!("{}: {}", case.file, problems.join("; ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    for kind in [
        OutcomeKind::Created,
        OutcomeKind::Duplicate,
        OutcomeKind::ConflictingDuplicate,
        OutcomeKind::UnknownClient,
        OutcomeKind::NoLines,
        OutcomeKind::AutoReply,
        OutcomeKind::UnsupportedContent,
        OutcomeKind::Rejected,
    ] {
        assert!(
            seen_outcomes.contains(kind.as_str()),
            "the corpus has no {kind} case"
        );
    }
    // One outcome row per case, plus none for the duplicate (it counts a delivery).
    let outcomes = store.outcomes().await.expect("outcomes");
    assert_eq!(outcomes.len(), cases.len() - 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    walk(
        &format!("sqlite://{}", dir.path().join("orders.db").display()),
        1,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_on_postgres() {
    let server = PostgresServer::start();
    walk(&server.create_database(), 1).await;
}

/// The same corpus recorded as workers record batches: group commits of 48 (the
/// resend and the conflicting Message-ID share the first batch with their original),
/// every case with the outcome it gets alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_in_batches_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    walk(
        &format!("sqlite://{}", dir.path().join("orders.db").display()),
        48,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_in_batches_on_postgres() {
    let server = PostgresServer::start();
    walk(&server.create_database(), 48).await;
}
