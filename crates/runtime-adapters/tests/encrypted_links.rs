//! Encrypted queue links: `rediss://` to redis-server's own TLS port and `amqps://` to a
//! RabbitMQ TLS listener, both with rustls and a private test CA (`ca_file`). A server whose
//! certificate the client does not trust is refused, never used.

use std::path::{Path, PathBuf};
use std::time::Duration;

use plba_testkit::{make_certificates, RabbitServer, RedisServer};
use runtime_adapters::queue::amqp::{AmqpQueue, AmqpQueueConfig};
use runtime_adapters::queue::redis::{RedisQueue, RedisQueueConfig};
use runtime_contracts::{QueueError, Task, TaskQueue};

fn task(id: &str) -> Task {
    Task::new(id, "job", "test", serde_json::json!({ "n": id })).expect("task")
}

/// Publishes a task, leases it and acknowledges it: the link carries work both ways.
async fn round_trip(queue: &dyn TaskQueue, id: &str) {
    queue.publish(task(id)).await.expect("publish over TLS");
    let mut lease = None;
    for _ in 0..50 {
        lease = queue
            .consume(Duration::from_millis(100))
            .await
            .expect("consume over TLS");
        if lease.is_some() {
            break;
        }
    }
    let lease = lease.expect("the published task is delivered");
    assert_eq!(lease.task.id.as_str(), id);
    queue.ack(&lease).await.expect("ack over TLS");
}

/// The reason a publish over an untrusted or plain link failed; it must fail as unavailable.
async fn refused(queue: &dyn TaskQueue) -> String {
    match queue.publish(task("never")).await {
        Err(QueueError::Unavailable(why)) => why,
        other => panic!("a link to a server that is not trusted was used: {other:?}"),
    }
}

/// Another CA than the server's: its certificate must not be trusted.
fn other_ca() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certificates(dir.path());
    let ca = dir.path().join("ca.pem");
    (dir, ca)
}

fn problem_keys(problems: &[runtime_contracts::ConfigProblem]) -> Vec<String> {
    problems.iter().map(|p| p.key.clone()).collect()
}

fn redis(url: String, ca_file: Option<&Path>) -> RedisQueue {
    let config = RedisQueueConfig {
        url,
        ca_file: ca_file.map(Path::to_path_buf),
        ..RedisQueueConfig::default()
    };
    assert!(
        config.problems("queue", &[]).is_empty(),
        "{:?}",
        config.problems("queue", &[])
    );
    RedisQueue::new("tls", config).expect("queue")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca_carries_tasks_and_an_untrusted_certificate_is_refused() {
    let server = RedisServer::start_tls();
    let trusted = redis(server.tls_url(), Some(&server.ca_file()));
    round_trip(&trusted, "over-rediss").await;

    // The public roots do not know the test CA; nor does another CA.
    let public = refused(&redis(server.tls_url(), None)).await;
    assert!(public.contains("certificate"), "{public}");
    let (_dir, other) = other_ca();
    let wrong = refused(&redis(server.tls_url(), Some(&other))).await;
    assert!(wrong.contains("certificate"), "{wrong}");
    // A plain client on the TLS port gets no answer it can use.
    let plain_url = server.tls_url().replace("rediss://", "redis://");
    let plain = RedisQueue::new(
        "tls",
        RedisQueueConfig {
            url: plain_url,
            ..RedisQueueConfig::default()
        },
    )
    .expect("queue");
    let answer = tokio::time::timeout(Duration::from_secs(20), plain.publish(task("plain")))
        .await
        .expect("a plain client on a TLS port fails, never hangs");
    assert!(answer.is_err(), "{answer:?}");

    // What cannot be meant is refused by check-config.
    let on_plain = RedisQueueConfig {
        url: server.url(),
        ca_file: Some(server.ca_file()),
        ..RedisQueueConfig::default()
    };
    assert_eq!(
        problem_keys(&on_plain.problems("queue", &[])),
        ["queue.ca_file"]
    );
    let insecure = RedisQueueConfig {
        url: format!("{}/#insecure", server.tls_url()),
        ..RedisQueueConfig::default()
    };
    assert_eq!(
        problem_keys(&insecure.problems("queue", &[])),
        ["queue.url"]
    );
    let missing = RedisQueueConfig {
        url: server.tls_url(),
        ca_file: Some(server.dir().join("no-such-ca.pem")),
        ..RedisQueueConfig::default()
    };
    assert_eq!(
        problem_keys(&missing.problems("queue", &[])),
        ["queue.ca_file"]
    );
    let not_pem = RedisQueueConfig {
        url: server.tls_url(),
        ca_file: Some(server.dir().join("redis.log")),
        ..RedisQueueConfig::default()
    };
    let why = not_pem.problems("queue", &[]);
    assert_eq!(problem_keys(&why), ["queue.ca_file"]);
    assert!(why[0].message.contains("no PEM certificate"), "{why:?}");
}

fn amqp(url: String, ca_file: Option<&Path>) -> AmqpQueue {
    let config = AmqpQueueConfig {
        url,
        ca_file: ca_file.map(Path::to_path_buf),
        connect_timeout_ms: 10_000,
        ..AmqpQueueConfig::default()
    };
    assert!(
        config.problems("queue").is_empty(),
        "{:?}",
        config.problems("queue")
    );
    AmqpQueue::new("tls", config, 4).expect("queue")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_private_ca_carries_tasks_and_an_untrusted_certificate_is_refused() {
    let server = RabbitServer::start_tls();
    let trusted = amqp(server.tls_url(), Some(&server.ca_file()));
    round_trip(&trusted, "over-amqps").await;
    trusted.close().await;

    let public = refused(&amqp(server.tls_url(), None)).await;
    assert!(public.to_lowercase().contains("certificate"), "{public}");
    let (_dir, other) = other_ca();
    let wrong = refused(&amqp(server.tls_url(), Some(&other))).await;
    assert!(wrong.to_lowercase().contains("certificate"), "{wrong}");

    let on_plain = AmqpQueueConfig {
        url: server.url(),
        ca_file: Some(server.ca_file()),
        ..AmqpQueueConfig::default()
    };
    assert_eq!(problem_keys(&on_plain.problems("queue")), ["queue.ca_file"]);
}
