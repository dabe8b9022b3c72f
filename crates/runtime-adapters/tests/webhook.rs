//! The webhook source over a real port, on a real Redis queue: 2xx only after the enqueue,
//! the same delivery once, every bad request refused with nothing enqueued, and a queue
//! that is down or full answered with 503 and `Retry-After`.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use plba_testkit::{source_context, RedisServer};
use runtime_adapters::queue::redis::{RedisQueue, RedisQueueConfig};
use runtime_adapters::sources::webhook::{
    WebhookAuth, WebhookConfig, WebhookFormat, WebhookSource,
};
use runtime_contracts::{Backpressure, BoxFuture, TaskQueue, TaskSource};

const SECRET: &[u8] = b"a test secret of some length";

fn config(auth: WebhookAuth) -> WebhookConfig {
    config_as(WebhookFormat::Json, auth)
}

fn config_as(format: WebhookFormat, auth: WebhookAuth) -> WebhookConfig {
    WebhookConfig {
        bind: "127.0.0.1:0".into(),
        path: "/hooks/mail".into(),
        pool: "orders".into(),
        kind: "mail.notification".into(),
        task_source: None,
        id_header: "webhook-id".into(),
        id_pointer: None,
        max_body_bytes: 1024,
        max_connections: 256,
        header_timeout_ms: 10_000,
        request_timeout_ms: 10_000,
        max_concurrent_requests: 64,
        capacity_wait_ms: 200,
        retry_after_secs: 7,
        allow_volatile_queue: false,
        format,
        dovecot_user: None,
        auth,
    }
}

fn standard() -> WebhookAuth {
    // Every test sets the same values.
    std::env::set_var(
        "PLBA_TEST_WEBHOOK_SECRET",
        format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(SECRET)
        ),
    );
    std::env::set_var(
        "PLBA_TEST_WEBHOOK_OLD_SECRET",
        "whsec_YW4gb2xkIHNlY3JldCBvZiB0aGUgcm90YXRpb24=",
    );
    WebhookAuth::Standard {
        secrets_env: vec![
            "PLBA_TEST_WEBHOOK_OLD_SECRET".into(),
            "PLBA_TEST_WEBHOOK_SECRET".into(),
        ],
        secrets_file: None,
        tolerance_secs: 300,
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// The Standard Webhooks signature header of a delivery.
fn sign(id: &str, timestamp: u64, body: &str) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET).expect("key");
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

struct Hook {
    url: String,
    queue: Arc<RedisQueue>,
    client: reqwest::Client,
    _stop: Arc<plba_testkit::StopSignal>,
}

async fn start(redis: &RedisServer, name: &str, auth: WebhookAuth, full: bool) -> Hook {
    start_with(redis, name, config(auth), full).await
}

async fn start_with(redis: &RedisServer, name: &str, config: WebhookConfig, full: bool) -> Hook {
    let queue = Arc::new(
        RedisQueue::new(
            name,
            RedisQueueConfig {
                url: redis.url(),
                consumer: "test".into(),
                ..RedisQueueConfig::default()
            },
        )
        .expect("queue"),
    );
    let (mut ctx, stop) = source_context(queue.clone());
    if full {
        ctx.backpressure = Arc::new(Full);
    }
    let source = Arc::new(WebhookSource::new("hook", config));
    let running = Arc::clone(&source);
    tokio::spawn(async move { running.start(ctx).await });
    let addr = tokio::time::timeout(Duration::from_secs(10), source.local_addr())
        .await
        .expect("the webhook listens");
    Hook {
        url: format!("http://{addr}"),
        queue,
        client: reqwest::Client::new(),
        _stop: stop,
    }
}

/// A pool that never has room.
struct Full;
impl Backpressure for Full {
    fn wait_for_capacity(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::pending())
    }
}

impl Hook {
    async fn post(
        &self,
        id: &str,
        timestamp: u64,
        body: &str,
        signature: Option<String>,
    ) -> reqwest::Response {
        let mut request = self
            .client
            .post(format!("{}/hooks/mail", self.url))
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .body(body.to_owned());
        if let Some(signature) = signature {
            request = request.header("webhook-signature", signature);
        }
        request.send().await.expect("request")
    }

    /// An unsigned request with the sample body.
    async fn plain(
        &self,
        method: reqwest::Method,
        path: &str,
        content_type: Option<&str>,
    ) -> reqwest::Response {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.url))
            .body(BODY);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        request.send().await.expect("request")
    }

    async fn signed(&self, id: &str, body: &str) -> reqwest::Response {
        let t = now();
        self.post(id, t, body, Some(sign(id, t, body))).await
    }

    async fn published(&self) -> u64 {
        let stats = self.queue.stats().await.expect("stats");
        stats.depth + stats.in_flight + stats.scheduled
    }
}

const BODY: &str = r#"{"account":"orders","mailbox":"INBOX","uid_validity":7,"uid":42}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_delivery_is_one_task_and_its_retry_none_more() {
    let redis = RedisServer::start(false);
    let hook = start(&redis, "once", standard(), false).await;
    let first = hook.signed("msg_1", BODY).await;
    assert_eq!(first.status(), 202);
    let answer: serde_json::Value = first.json().await.expect("json");
    assert_eq!(answer["status"], "enqueued");
    assert_eq!(answer["task"], "webhook:hook:msg_1");
    let again = hook.signed("msg_1", BODY).await;
    assert_eq!(again.status(), 202, "a retried delivery is accepted");
    let answer: serde_json::Value = again.json().await.expect("json");
    assert_eq!(answer["status"], "already_known");
    assert_eq!(hook.published().await, 1, "and creates no second task");
    let lease = hook
        .queue
        .consume(Duration::from_secs(1))
        .await
        .expect("consume")
        .expect("the task");
    assert_eq!(lease.task.kind.as_ref(), "mail.notification");
    assert_eq!(lease.task.source.as_ref(), "hook");
    assert_eq!(lease.task.payload["uid"], 42);
    hook.queue.ack(&lease).await.expect("ack");
    let late = hook.signed("msg_1", BODY).await;
    assert_eq!(late.status(), 202, "a retry after the task was done");
    let answer: serde_json::Value = late.json().await.expect("json");
    assert_eq!(
        answer["status"], "already_known",
        "is still known after the ack"
    );
    assert_eq!(hook.published().await, 0, "and makes no task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_is_refused_and_enqueues_nothing() {
    let redis = RedisServer::start(false);
    let hook = start(&redis, "bad", standard(), false).await;
    let t = now();
    let cases: Vec<(&str, reqwest::Response, u16, &str)> = vec![
        (
            "no signature",
            hook.post("m1", t, BODY, None).await,
            401,
            "missing_signature",
        ),
        (
            "wrong signature",
            hook.post("m1", t, BODY, Some(sign("m1", t, "{}"))).await,
            401,
            "bad_signature",
        ),
        (
            "stale timestamp",
            hook.post("m1", t - 3600, BODY, Some(sign("m1", t - 3600, BODY)))
                .await,
            401,
            "stale_timestamp",
        ),
        (
            "invalid JSON",
            hook.post("m1", t, "{not json", Some(sign("m1", t, "{not json")))
                .await,
            400,
            "invalid_json",
        ),
        (
            "oversized body",
            {
                let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(4096));
                hook.post("m1", t, &big, Some(sign("m1", t, &big))).await
            },
            413,
            "",
        ),
        (
            "wrong content type",
            hook.plain(reqwest::Method::POST, "/hooks/mail", Some("text/plain"))
                .await,
            415,
            "unsupported_media_type",
        ),
        (
            "wrong method",
            hook.plain(reqwest::Method::GET, "/hooks/mail", None).await,
            405,
            "method_not_allowed",
        ),
        (
            "wrong path",
            hook.plain(reqwest::Method::POST, "/hooks/other", None)
                .await,
            404,
            "not_found",
        ),
    ];
    for (case, answer, status, code) in cases {
        assert_eq!(answer.status(), status, "{case}");
        if !code.is_empty() {
            let body: serde_json::Value = answer.json().await.expect("JSON error");
            assert_eq!(body["error"]["code"], code, "{case}");
        }
    }
    // A delivery without its id: the signature is right, the pointer to the work is not.
    let no_id = hook
        .client
        .post(format!("{}/hooks/mail", hook.url))
        .header("content-type", "application/json")
        .header("webhook-id", "")
        .header("webhook-timestamp", t.to_string())
        .header("webhook-signature", sign("", t, BODY))
        .body(BODY)
        .send()
        .await
        .expect("request");
    assert_eq!(no_id.status(), 400);
    assert_eq!(hook.published().await, 0, "nothing was enqueued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_secret_is_checked_and_the_id_can_come_from_the_body() {
    let redis = RedisServer::start(false);
    std::env::set_var("PLBA_TEST_WEBHOOK_TOKEN", "s3cret-token-0f8a2c6e91d4");
    let auth = WebhookAuth::SharedSecret {
        header: Some("x-webhook-token".into()),
        query: None,
        secret_env: Some("PLBA_TEST_WEBHOOK_TOKEN".into()),
        secret_file: None,
    };
    let queue = Arc::new(
        RedisQueue::new(
            "shared",
            RedisQueueConfig {
                url: redis.url(),
                ..RedisQueueConfig::default()
            },
        )
        .expect("queue"),
    );
    let (ctx, _stop) = source_context(queue.clone());
    let mut cfg = config(auth);
    cfg.id_pointer = Some("/message/messageId".into());
    let source = Arc::new(WebhookSource::new("pubsub", cfg));
    let running = Arc::clone(&source);
    tokio::spawn(async move { running.start(ctx).await });
    let addr = source.local_addr().await;
    let client = reqwest::Client::new();
    let body = r#"{"message":{"messageId":"136969346945","data":"e30="},"subscription":"s"}"#;
    let send = |token: &'static str| {
        client
            .post(format!("http://{addr}/hooks/mail"))
            .header("content-type", "application/json; charset=utf-8")
            .header("x-webhook-token", token)
            .body(body)
            .send()
    };
    assert_eq!(send("wrong").await.expect("request").status(), 401);
    let ok = send("s3cret-token-0f8a2c6e91d4").await.expect("request");
    assert_eq!(ok.status(), 202);
    let answer: serde_json::Value = ok.json().await.expect("json");
    assert_eq!(answer["task"], "webhook:pubsub:136969346945");
    assert_eq!(queue.stats().await.expect("stats").depth, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_that_is_down_or_full_gets_503_with_retry_after_then_2xx() {
    let mut redis = RedisServer::start(true);
    let hook = start(&redis, "down", standard(), false).await;
    redis.stop();
    let refused = hook.signed("msg_down", BODY).await;
    assert_eq!(refused.status(), 503);
    assert_eq!(
        refused
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("7")
    );
    redis.restart();
    let mut accepted = None;
    for _ in 0..100 {
        let answer = hook.signed("msg_down", BODY).await;
        if answer.status() == 202 {
            accepted = Some(answer);
            break;
        }
        assert_eq!(answer.status(), 503, "only 503 while the queue comes back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let accepted = accepted.expect("accepted once the queue is back");
    let answer: serde_json::Value = accepted.json().await.expect("json");
    assert_eq!(
        answer["status"], "enqueued",
        "the refused delivery was not enqueued"
    );
    assert_eq!(hook.published().await, 1);

    let full = start(&redis, "full", standard(), true).await;
    let refused = full.signed("msg_full", BODY).await;
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(full.published().await, 0);
}

/// Drains what `hook` enqueued, acknowledging each task; their payloads by task id.
async fn drain(hook: &Hook) -> std::collections::BTreeMap<String, serde_json::Value> {
    let mut tasks = std::collections::BTreeMap::new();
    while let Some(lease) = hook
        .queue
        .consume(Duration::from_millis(300))
        .await
        .expect("consume")
    {
        hook.queue.ack(&lease).await.expect("ack");
        tasks.insert(lease.task.id.to_string(), lease.task.payload.clone());
    }
    tasks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pubsub_push_envelope_is_decoded_and_its_token_checked_in_the_query() {
    let redis = RedisServer::start(false);
    std::env::set_var("PLBA_TEST_PUBSUB_TOKEN", "push-token-1-5d2e8a7c3b91");
    let auth = WebhookAuth::SharedSecret {
        header: None,
        query: Some("token".into()),
        secret_env: Some("PLBA_TEST_PUBSUB_TOKEN".into()),
        secret_file: None,
    };
    let hook = start_with(
        &redis,
        "pubsub",
        config_as(WebhookFormat::Pubsub, auth),
        false,
    )
    .await;
    let data = base64::engine::general_purpose::STANDARD
        .encode(r#"{"emailAddress":"orders@example.com","historyId":9876}"#);
    let envelope = |id: &str, data: &str| {
        format!(
            r#"{{"message":{{"data":"{data}","attributes":{{"kind":"mail"}},"messageId":"{id}","publishTime":"2026-12-03T10:00:00Z"}},"subscription":"projects/p/subscriptions/orders"}}"#
        )
    };
    let push = |token: &str, body: String| {
        hook.client
            .post(format!("{}/hooks/mail?token={token}", hook.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let wrong = push("nope", envelope("1", &data)).await.expect("request");
    assert_eq!(wrong.status(), 401);
    let missing = hook
        .client
        .post(format!("{}/hooks/mail", hook.url))
        .header("content-type", "application/json")
        .body(envelope("1", &data))
        .send()
        .await
        .expect("request");
    assert_eq!(missing.status(), 401, "no token at all");
    for (case, body) in [
        ("no message", r#"{"subscription":"s"}"#.to_owned()),
        ("no messageId", r#"{"message":{"data":"e30="}}"#.to_owned()),
        ("data not base64", envelope("2", "%%%")),
    ] {
        let answer = push("push-token-1-5d2e8a7c3b91", body)
            .await
            .expect("request");
        assert_eq!(answer.status(), 400, "{case}");
    }
    assert_eq!(hook.published().await, 0, "nothing enqueued by a refusal");
    let ok = push("push-token-1-5d2e8a7c3b91", envelope("136969346945", &data))
        .await
        .expect("request");
    assert_eq!(ok.status(), 202);
    let answer: serde_json::Value = ok.json().await.expect("json");
    assert_eq!(answer["task"], "webhook:hook:136969346945");
    let again = push("push-token-1-5d2e8a7c3b91", envelope("136969346945", &data))
        .await
        .expect("request");
    assert_eq!(again.status(), 202, "Pub/Sub's redelivery is acknowledged");
    let tasks = drain(&hook).await;
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    let payload = &tasks["webhook:hook:136969346945"];
    assert_eq!(payload["data"]["historyId"], 9876, "data decoded as JSON");
    assert_eq!(payload["attributes"]["kind"], "mail");
    assert_eq!(payload["subscription"], "projects/p/subscriptions/orders");
    assert_eq!(payload["publish_time"], "2026-12-03T10:00:00Z");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graph_notifications_are_validated_checked_and_split_into_tasks() {
    let redis = RedisServer::start(false);
    // The client state from a file (a mounted secret), its first non-empty line.
    let dir = tempfile::tempdir().expect("tempdir");
    let state_file = dir.path().join("client-state");
    std::fs::write(&state_file, "\ngraph-client-state-7\n").expect("write");
    let auth = WebhookAuth::GraphClientState {
        client_state_env: None,
        client_state_file: Some(state_file),
    };
    let hook = start_with(
        &redis,
        "graph",
        config_as(WebhookFormat::Graph, auth),
        false,
    )
    .await;
    // The subscription handshake: the token comes back as plain text.
    let token = "Validation: Testing client application reachability <&>";
    let handshake = hook
        .client
        .post(format!("{}/hooks/mail", hook.url))
        .query(&[("validationToken", token)])
        .header("content-type", "text/plain")
        .send()
        .await
        .expect("request");
    assert_eq!(handshake.status(), 200);
    assert_eq!(
        handshake
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(handshake.text().await.expect("text"), token);

    let notification = |state: &str, message: &str| {
        serde_json::json!({
            "subscriptionId": "sub-1",
            "clientState": state,
            "changeType": "created",
            "resource": format!("Users/u-1/Messages/{message}"),
            "resourceData": {"@odata.type": "#Microsoft.Graph.Message", "id": message},
            "tenantId": "t-1",
        })
    };
    let send = |value: Vec<serde_json::Value>| {
        hook.client
            .post(format!("{}/hooks/mail", hook.url))
            .header("content-type", "application/json")
            .body(serde_json::json!({ "value": value }).to_string())
            .send()
    };
    let forged = send(vec![
        notification("graph-client-state-7", "AAMk1"),
        notification("guess", "AAMk2"),
    ])
    .await
    .expect("request");
    assert_eq!(
        forged.status(),
        401,
        "one wrong clientState refuses the batch"
    );
    let body: serde_json::Value = forged.json().await.expect("json");
    assert_eq!(body["error"]["code"], "bad_client_state");
    assert_eq!(hook.published().await, 0);
    let no_value = hook
        .client
        .post(format!("{}/hooks/mail", hook.url))
        .header("content-type", "application/json")
        .body(r#"{"notifications":[]}"#)
        .send()
        .await
        .expect("request");
    assert_eq!(no_value.status(), 400);

    let batch = vec![
        notification("graph-client-state-7", "AAMk1"),
        notification("graph-client-state-7", "AAMk2"),
    ];
    let ok = send(batch.clone()).await.expect("request");
    assert_eq!(ok.status(), 202);
    let answer: serde_json::Value = ok.json().await.expect("json");
    assert_eq!(
        answer["tasks"].as_array().map(Vec::len),
        Some(2),
        "{answer}"
    );
    let tasks = drain(&hook).await;
    assert_eq!(
        tasks.keys().cloned().collect::<Vec<_>>(),
        [
            "webhook:hook:sub-1:created:Users/u-1/Messages/AAMk1",
            "webhook:hook:sub-1:created:Users/u-1/Messages/AAMk2",
        ]
    );
    for payload in tasks.values() {
        assert!(
            payload.get("clientState").is_none(),
            "the secret is not carried into the queue: {payload}"
        );
        assert_eq!(payload["changeType"], "created");
    }
    // Graph retries a batch it did not see answered: nothing new, although both are done.
    let retry = send(batch).await.expect("request");
    assert_eq!(retry.status(), 202);
    let answer: serde_json::Value = retry.json().await.expect("json");
    assert!(
        answer["tasks"]
            .as_array()
            .is_some_and(|t| t.iter().all(|t| t["status"] == "already_known")),
        "{answer}"
    );
    assert_eq!(hook.published().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dovecot_push_is_an_imap_pointer_and_other_events_are_ignored() {
    let redis = RedisServer::start(false);
    std::env::set_var("PLBA_TEST_DOVECOT_TOKEN", "dc-token-7e3a9c1f5b2d4e6a");
    let auth = WebhookAuth::SharedSecret {
        header: None,
        query: Some("token".into()),
        secret_env: Some("PLBA_TEST_DOVECOT_TOKEN".into()),
        secret_file: None,
    };
    let mut cfg = config_as(WebhookFormat::Dovecot, auth);
    cfg.task_source = Some("inbox".into());
    cfg.dovecot_user = Some("u".into());
    assert!(cfg.problems("sources.push").is_empty());
    let hook = start_with(&redis, "dovecot", cfg, false).await;
    let put = |body: &'static str| {
        hook.client
            .put(format!(
                "{}/hooks/mail?token=dc-token-7e3a9c1f5b2d4e6a",
                hook.url
            ))
            .header("content-type", "application/json; charset=utf-8")
            .body(body)
            .send()
    };
    let other = put(r#"{"user":"u","event":"messageRead","folder":"INBOX"}"#)
        .await
        .expect("request");
    assert_eq!(other.status(), 202);
    let answer: serde_json::Value = other.json().await.expect("json");
    assert_eq!(answer["status"], "ignored");
    // No UID yet (Dovecot sends `imap-uid: 0` before it assigned one): accepted, no task;
    // the mailbox's own source is woken to search.
    let no_uid = put(r#"{"user":"u","event":"messageNew","folder":"INBOX","imap-uidvalidity":1796353437,"imap-uid":0}"#)
        .await
        .expect("request");
    assert_eq!(no_uid.status(), 202);
    let answer: serde_json::Value = no_uid.json().await.expect("json");
    assert_eq!(answer["tasks"], serde_json::json!([]));
    // Without its folder it points nowhere.
    let incomplete = put(r#"{"user":"u","event":"messageNew","imap-uid":7}"#)
        .await
        .expect("request");
    assert_eq!(incomplete.status(), 400);
    // Another user's UID 7 is another message: never loaded from this mailbox.
    let stranger = put(r#"{"user":"someone-else","event":"messageNew","folder":"INBOX","imap-uidvalidity":1796353437,"imap-uid":7}"#)
        .await
        .expect("request");
    assert_eq!(stranger.status(), 202);
    let answer: serde_json::Value = stranger.json().await.expect("json");
    assert_eq!(answer["status"], "ignored");
    assert_eq!(hook.published().await, 0);
    let new = put(r#"{"user":"u","event":"messageNew","folder":"INBOX","imap-uidvalidity":1796353437,"imap-uid":7,"from":"a@acme.example","subject":"PO","snippet":"SKU-1 x 2","unseen":1}"#)
        .await
        .expect("request");
    assert_eq!(new.status(), 202);
    let tasks = drain(&hook).await;
    // The IMAP source's own id for that message: its search and the notification make
    // one task between them.
    let payload = &tasks["imap:inbox:INBOX:1796353437:7"];
    assert_eq!(
        payload,
        &serde_json::json!({"account": "u", "mailbox": "INBOX", "uid_validity": 1796353437u64, "uid": 7}),
        "exactly the IMAP source's pointer: nothing of the mail's content"
    );
    // Without a task_source and a user it is refused by the configuration check.
    let lone = config_as(
        WebhookFormat::Dovecot,
        WebhookAuth::SharedSecret {
            header: None,
            query: Some("token".into()),
            secret_env: Some("PLBA_TEST_DOVECOT_TOKEN".into()),
            secret_file: None,
        },
    );
    assert_eq!(
        lone.problems("sources.push")
            .iter()
            .map(|p| p.key.as_str())
            .collect::<Vec<_>>(),
        ["sources.push.task_source", "sources.push.dovecot_user"]
    );
}

/// Facing the internet: a client that trickles its headers is cut off after
/// `header_timeout_ms`, one that sends half a body gets `408` after `request_timeout_ms`,
/// and connections beyond `max_connections` are closed at once, while a normal delivery
/// is still answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_and_too_many_connections_are_cut_off() {
    use std::io::{Read, Write};
    let redis = RedisServer::start(false);
    let mut config = config(standard());
    config.max_connections = 4;
    config.header_timeout_ms = 500;
    config.request_timeout_ms = 500;
    let hook = start_with(&redis, "limits", config, false).await;
    let addr = hook.url.trim_start_matches("http://").to_owned();
    let read_all = |mut stream: std::net::TcpStream| {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let started = std::time::Instant::now();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        (
            String::from_utf8_lossy(&answer).into_owned(),
            started.elapsed(),
        )
    };
    let answers = tokio::task::spawn_blocking(move || {
        // Headers trickled, never finished: closed within the header timeout.
        let mut slow = std::net::TcpStream::connect(&addr).expect("connect");
        slow.write_all(b"POST /hooks/mail HTTP/1.1\r\nHost: x\r\n").expect("write");
        let slow = read_all(slow);
        // Half a body: 408.
        let mut half = std::net::TcpStream::connect(&addr).expect("connect");
        half.write_all(
            b"POST /hooks/mail HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"a\":",
        )
        .expect("write");
        let half = read_all(half);
        // Four idle connections hold every slot; a fifth is closed at once.
        let held: Vec<_> = (0..4)
            .map(|_| std::net::TcpStream::connect(&addr).expect("connect"))
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        let extra = read_all(std::net::TcpStream::connect(&addr).expect("connect"));
        drop(held);
        (slow, half, extra)
    })
    .await
    .expect("join");
    let (slow, half, extra) = answers;
    assert!(
        slow.1 < Duration::from_secs(5),
        "the slow client was cut off: {slow:?}"
    );
    assert!(!slow.0.contains("202"), "{slow:?}");
    assert!(half.0.starts_with("HTTP/1.1 408"), "{half:?}");
    assert!(
        extra.0.is_empty() && extra.1 < Duration::from_secs(2),
        "{extra:?}"
    );
    // The slots free again: a normal delivery is taken.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let body = r#"{"unique":"limits-1"}"#;
    let answer = hook
        .client
        .post(format!("{}/hooks/mail", hook.url))
        .header("content-type", "application/json")
        .header("webhook-id", "limits-1")
        .header("webhook-timestamp", now().to_string())
        .header("webhook-signature", sign("limits-1", now(), body))
        .body(body)
        .send()
        .await
        .expect("request");
    assert!(answer.status().is_success(), "{}", answer.status());
}
