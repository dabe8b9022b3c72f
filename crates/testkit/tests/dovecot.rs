//! The private Dovecot starts, takes appended mail and reports flags.

use plba_testkit::DovecotServer;

#[test]
fn dovecot_starts_takes_mail_and_restarts() {
    let mut server = DovecotServer::start(&[("orders", "secret")]);
    server.append(
        "orders",
        "secret",
        "INBOX",
        &[
            b"Subject: a\r\n\r\nhi\r\n".to_vec(),
            b"Subject: b\r\n\r\nho\r\n".to_vec(),
        ],
    );
    let flags = server.flags("orders", "secret", "INBOX");
    assert_eq!(flags.len(), 2, "{flags:?}\n{}", server.log());
    assert!(flags.values().all(|f| !f.iter().any(|x| x == "\\Seen")));
    server.restart();
    assert_eq!(server.flags("orders", "secret", "INBOX").len(), 2);
}
