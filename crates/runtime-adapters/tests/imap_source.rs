//! The IMAP source's worker side against a private Dovecot, without a runtime: what a
//! pointer loads, what completion flags, and pointers that no longer point at anything.

use plba_testkit::DovecotServer;
use runtime_adapters::sources::imap::{ImapConfig, ImapMode, ImapSource};
use runtime_contracts::{SourceError, Task, TaskSource};

fn source(server: &DovecotServer, dir: &std::path::Path, max_message_bytes: u64) -> ImapSource {
    let pw = dir.join("pw");
    std::fs::write(&pw, "pass\n").expect("pw");
    let config: ImapConfig = serde_json::from_value(serde_json::json!({
        "host": "127.0.0.1", "port": server.port(), "tls": "none", "user": "u",
        "password_file": pw, "pool": "orders", "max_message_bytes": max_message_bytes,
    }))
    .expect("config");
    assert!(config.problems("sources.inbox").is_empty());
    ImapSource::new("inbox", config, ImapMode::Poll)
}

fn pointer(uid_validity: u64, uid: u64, size: Option<u64>) -> Task {
    let mut payload = serde_json::json!({
        "account": "u@127.0.0.1", "mailbox": "INBOX", "uid_validity": uid_validity, "uid": uid,
    });
    if let Some(size) = size {
        payload["size"] = serde_json::json!(size);
    }
    Task::new(
        format!("imap:inbox:INBOX:{uid_validity}:{uid}"),
        "mail.message",
        "inbox",
        payload,
    )
    .expect("task")
}

#[tokio::test]
async fn pointers_load_complete_and_go_stale_safely() {
    let server = DovecotServer::start(&[("u", "pass")]);
    let message = b"Subject: hi\r\nMessage-ID: <a@b>\r\n\r\nSKU-1 x 1\r\n".to_vec();
    let mut client = server.client("u", "pass");
    let uid = u64::from(client.append_one("INBOX", &message).expect("APPENDUID"));
    let dir = tempfile::tempdir().expect("tempdir");
    let imap = source(&server, dir.path(), 1024);
    // The UIDVALIDITY of the mailbox, learnt the way the watcher does.
    let validity = {
        let flags = server.flags("u", "pass", "INBOX");
        assert_eq!(flags.len(), 1);
        let probe = pointer(0, uid, None);
        assert_eq!(
            imap.load_content(&probe).await.expect("stale"),
            None,
            "wrong UIDVALIDITY loads as gone"
        );
        server.uid_validity("u", "pass", "INBOX")
    };

    let task = pointer(validity, uid, None);
    let loaded = imap.load_content(&task).await.expect("load");
    assert_eq!(loaded.as_deref(), Some(&message[..]));
    assert!(
        server.flags("u", "pass", "INBOX")[&(uid as u32)].is_empty(),
        "BODY.PEEK[] leaves \\Seen unset"
    );

    let gone = pointer(validity, uid + 100, None);
    assert_eq!(
        imap.load_content(&gone).await.expect("gone"),
        None,
        "a deleted message loads as gone"
    );
    imap.complete(&gone)
        .await
        .expect("completing a gone message is a no-op");

    let big = pointer(validity, uid, Some(4096));
    assert!(matches!(
        imap.load_content(&big).await,
        Err(SourceError::TooLarge {
            size: 4096,
            limit: 1024,
            ..
        })
    ));

    imap.complete(&task).await.expect("complete");
    assert!(server.flags("u", "pass", "INBOX")[&(uid as u32)]
        .iter()
        .any(|f| f == "\\Seen"));

    let foreign = Task::new(
        "x",
        "mail.message",
        "inbox",
        serde_json::json!({"mailbox": "Other", "uid_validity": 1, "uid": 1}),
    )
    .expect("task");
    assert!(matches!(
        imap.load_content(&foreign).await,
        Err(SourceError::InvalidPointer { .. })
    ));
}
