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

/// Mail sent to the private Postfix reaches the private Dovecot over LMTP, also after the
/// relay was stopped and started again with the mail in its queue.
#[test]
fn postfix_delivers_into_dovecot_over_lmtp() {
    use std::io::{BufRead as _, BufReader, Write as _};
    let dovecot = DovecotServer::start_with(
        &[("buyer@nordic.example", "pw")],
        plba_testkit::DovecotOptions {
            lmtp: true,
            ..Default::default()
        },
    );
    let mut postfix = plba_testkit::PostfixServer::start(dovecot.lmtp_port(), &["nordic.example"]);
    let send = |port: u16, subject: &str| {
        let stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut writer = stream;
        let mut expect = |code: &str| loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("read");
            assert!(line.starts_with(code), "wanted {code}, got {line}");
            if line.as_bytes().get(3) == Some(&b' ') {
                break;
            }
        };
        expect("220");
        for (command, code) in [
            ("EHLO test.example\r\n", "250"),
            ("MAIL FROM:<bot@plba.test>\r\n", "250"),
            ("RCPT TO:<buyer@nordic.example>\r\n", "250"),
            ("DATA\r\n", "354"),
        ] {
            writer.write_all(command.as_bytes()).expect("write");
            expect(code);
        }
        writer
            .write_all(
                format!("Subject: {subject}\r\nFrom: bot@plba.test\r\n\r\nhello\r\n.\r\n")
                    .as_bytes(),
            )
            .expect("write");
        expect("250");
        writer.write_all(b"QUIT\r\n").expect("write");
    };
    let inbox = |n: usize, postfix: &plba_testkit::PostfixServer| {
        let start = std::time::Instant::now();
        loop {
            let got = dovecot
                .client("buyer@nordic.example", "pw")
                .messages("INBOX");
            if got.len() >= n {
                return got;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(30),
                "{} of {n} delivered; postfix: {}\ndovecot: {}",
                got.len(),
                postfix.log(),
                dovecot.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    send(postfix.port(), "first");
    let got = inbox(1, &postfix);
    assert!(String::from_utf8_lossy(&got[0]).contains("Subject: first"));
    postfix.stop();
    postfix.start_again();
    send(postfix.port(), "second");
    assert_eq!(inbox(2, &postfix).len(), 2);
    assert_eq!(postfix.queued(), 0);
}
