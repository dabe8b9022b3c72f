//! Any bytes, read as a mail: parse, classify and extract with the default limits. The bot
//! must never panic, abort or run away on them. Run with `just fuzz SECONDS`; the inputs
//! in `corpus/parse_extract` are replayed by the normal test suite (`tests/fuzz_corpus.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mail_order_bot::domain::message::{read_mail, MailLimits};

fuzz_target!(|data: &[u8]| {
    // libfuzzer-sys makes every panic abort, even one the bot catches on purpose (a
    // spreadsheet reader's). A panic that escapes read_mail is still a crash: libfuzzer-sys
    // catches it at the boundary of this closure and aborts.
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    let _ = read_mail(data, &MailLimits::default());
});
