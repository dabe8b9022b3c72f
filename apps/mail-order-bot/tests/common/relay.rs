//! The mail relay of the reply tests: a private Dovecot holding every party's mailbox and
//! taking mail over LMTP, and a private Postfix in front of it; the replies as read back
//! over IMAP.

use std::time::Duration;

use mail_parser::MessageParser;
use plba_testkit::{DovecotOptions, DovecotServer, PostfixServer};

use super::wait_for;

/// Every mailbox's password.
pub const PASSWORD: &str = "pw-7";
/// The bot's own address: the replies' sender and, in the loop test, its mailbox.
pub const BOT: &str = "orders@plba.test";

/// The private Dovecot (every user's mailbox, LMTP) and the Postfix in front of it.
pub struct Relay {
    pub dovecot: DovecotServer,
    pub postfix: PostfixServer,
}

impl Relay {
    /// Mailboxes for `users` (each `PASSWORD`), mail accepted for `domains`.
    pub fn start(users: &[&str], domains: &[&str]) -> Self {
        let users: Vec<(&str, &str)> = users.iter().map(|u| (*u, PASSWORD)).collect();
        let dovecot = DovecotServer::start_with(
            &users,
            DovecotOptions {
                lmtp: true,
                ..DovecotOptions::default()
            },
        );
        let postfix = PostfixServer::start(dovecot.lmtp_port(), domains);
        Self { dovecot, postfix }
    }

    /// `user`'s INBOX, read over IMAP.
    pub fn inbox(&self, user: &str) -> Vec<Reply> {
        self.dovecot
            .client(user, PASSWORD)
            .messages("INBOX")
            .iter()
            .map(|raw| Reply::parse(raw))
            .collect()
    }

    /// Waits until `user` has `n` messages; fails if it has more.
    pub async fn expect(&self, user: &str, n: usize) -> Vec<Reply> {
        wait_for(
            Duration::from_secs(60),
            &format!("{n} in {user}"),
            || async { self.inbox(user).len() >= n },
        )
        .await;
        let got = self.inbox(user);
        assert_eq!(
            got.len(),
            n,
            "{user}: {got:#?}\npostfix: {}",
            self.postfix.log()
        );
        got
    }

    /// The `[apps.mail_order_bot.reply]` section and a quick `replies` pool.
    pub fn section(&self, per_sender_max: u32) -> String {
        format!(
            r#"
[apps.mail_order_bot.reply]
from = "Order desk <{BOT}>"
host = "127.0.0.1"
port = {port}
tls = "none"
timeout_ms = 5000
per_sender_max = {per_sender_max}

[pools.replies.retry]
initial_backoff_ms = 100
max_backoff_ms = 1000
jitter = 0.1
"#,
            port = self.postfix.port()
        )
    }

    /// The Message-IDs of every message in `users`' INBOXes, repeats included.
    pub fn message_ids(&self, users: &[&str]) -> Vec<String> {
        users
            .iter()
            .flat_map(|u| self.inbox(u))
            .map(|r| r.message_id)
            .collect()
    }

    /// Clears `users`' INBOXes once the relay's queue is empty (between runs).
    pub async fn clear(&self, users: &[&str]) {
        wait_for(
            Duration::from_secs(60),
            "the relay's queue empty",
            || async { self.postfix.queued() == 0 },
        )
        .await;
        for user in users {
            let mut imap = self.dovecot.client(user, PASSWORD);
            imap.run("SELECT INBOX");
            if !imap.messages("INBOX").is_empty() {
                imap.run("SELECT INBOX");
                imap.run("STORE 1:* +FLAGS.SILENT (\\Deleted)");
                imap.run("EXPUNGE");
            }
        }
    }
}

/// A reply as read back: its addresses, threading headers and text.
#[derive(Debug)]
#[allow(missing_docs)]
pub struct Reply {
    pub from: String,
    pub to: String,
    pub subject: String,
    pub message_id: String,
    pub in_reply_to: Option<String>,
    pub references: Vec<String>,
    pub auto_submitted: Option<String>,
    pub body: String,
}

impl Reply {
    /// Reads one message.
    pub fn parse(raw: &[u8]) -> Self {
        let m = MessageParser::default().parse(raw).expect("a message");
        let address = |a: Option<&mail_parser::Address<'_>>| {
            a.and_then(|a| a.first())
                .and_then(|a| a.address())
                .unwrap_or_default()
                .to_owned()
        };
        let texts = |v: &mail_parser::HeaderValue<'_>| -> Vec<String> {
            match v {
                mail_parser::HeaderValue::Text(t) => vec![t.to_string()],
                mail_parser::HeaderValue::TextList(l) => l.iter().map(|t| t.to_string()).collect(),
                _ => Vec::new(),
            }
        };
        Self {
            from: address(m.from()),
            to: address(m.to()),
            subject: m.subject().unwrap_or_default().to_owned(),
            message_id: m.message_id().unwrap_or_default().to_owned(),
            in_reply_to: texts(m.in_reply_to()).into_iter().next(),
            references: texts(m.references()),
            auto_submitted: m.header_raw("Auto-Submitted").map(|v| v.trim().to_owned()),
            body: m.body_text(0).map(|b| b.into_owned()).unwrap_or_default(),
        }
    }
}
