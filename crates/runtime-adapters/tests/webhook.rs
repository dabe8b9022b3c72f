//! The webhook source over a real port, on a real Redis queue: 2xx only after the enqueue,
//! the same delivery once, every bad request refused with nothing enqueued, and a queue
//! that is down or full answered with 503 and `Retry-After`.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use plba_testkit::{source_context, RedisServer};
use runtime_adapters::queue::redis::{RedisQueue, RedisQueueConfig};
use runtime_adapters::sources::webhook::{WebhookAuth, WebhookConfig, WebhookSource};
use runtime_contracts::{Backpressure, BoxFuture, TaskQueue, TaskSource};

const SECRET: &[u8] = b"a test secret of some length";

fn config(auth: WebhookAuth) -> WebhookConfig {
    WebhookConfig {
        bind: "127.0.0.1:0".into(),
        path: "/hooks/mail".into(),
        pool: "orders".into(),
        kind: "mail.notification".into(),
        task_source: None,
        id_header: "webhook-id".into(),
        id_pointer: None,
        max_body_bytes: 1024,
        capacity_wait_ms: 200,
        retry_after_secs: 7,
        allow_volatile_queue: false,
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
    std::env::set_var("PLBA_TEST_WEBHOOK_OLD_SECRET", "whsec_b2xkIHNlY3JldA==");
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
    let source = Arc::new(WebhookSource::new("hook", config(auth)));
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
    std::env::set_var("PLBA_TEST_WEBHOOK_TOKEN", "s3cret-token");
    let auth = WebhookAuth::SharedSecret {
        header: "x-webhook-token".into(),
        secret_env: "PLBA_TEST_WEBHOOK_TOKEN".into(),
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
    let ok = send("s3cret-token").await.expect("request");
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
