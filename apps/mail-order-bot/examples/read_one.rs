//! Reads one mail file and prints what the bot makes of it: `cargo run --example read_one -- FILE`.
fn main() -> anyhow::Result<()> {
    use mail_order_bot::domain::message::{read_mail, MailLimits};
    for path in std::env::args().skip(1) {
        let raw = std::fs::read(&path)?;
        let start = std::time::Instant::now();
        let facts = read_mail(&raw, &MailLimits::default());
        println!(
            "{path}: {:?} rejected={:?} auto_reply={:?} unsupported={:?} lines={} ({} ms)",
            facts.identity,
            facts.rejected,
            facts.auto_reply,
            facts.unsupported,
            facts.extraction(|_| true).lines.len(),
            start.elapsed().as_millis()
        );
    }
    Ok(())
}
