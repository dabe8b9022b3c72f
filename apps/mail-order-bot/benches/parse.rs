//! Parse + extract throughput on the mail corpus (`tests/corpus/*.eml`), on one core, beside
//! the baseline of mail-parser alone parsing the same messages in the same run.
//!
//! `cargo bench -p mail-order-bot --bench parse` (part of `just bench`). Prints messages/s
//! and MB/s for both, the ratio, and the corpus size. Rounds alternate between the two so
//! that machine noise hits both alike; the median round is reported.

use std::path::Path;
use std::time::{Duration, Instant};

use mail_order_bot::domain::message::{read_mail, MailLimits};
use mail_parser::MessageParser;

const ROUNDS: usize = 7;
const MIN_ROUND: Duration = Duration::from_millis(500);

fn corpus() -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("corpus")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "eml"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| std::fs::read(p).expect("read"))
        .collect()
}

/// Messages per second over repeated passes of at least `MIN_ROUND`.
fn round(mails: &[Vec<u8>], f: &dyn Fn(&[u8]) -> usize) -> f64 {
    let start = Instant::now();
    let mut messages = 0usize;
    let mut sink = 0usize;
    while start.elapsed() < MIN_ROUND {
        for mail in mails {
            sink = sink.wrapping_add(f(mail));
            messages += 1;
        }
    }
    std::hint::black_box(sink);
    messages as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mails = corpus();
    let bytes: usize = mails.iter().map(Vec::len).sum();
    let mean = bytes as f64 / mails.len() as f64;
    let limits = MailLimits::default();
    let full = |raw: &[u8]| {
        let facts = read_mail(raw, &limits);
        facts.parts.len() + usize::from(facts.rejected.is_some())
    };
    let parse_only = |raw: &[u8]| {
        MessageParser::default()
            .parse(raw)
            .map_or(0, |m| m.parts.len())
    };
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        base.push(round(&mails, &parse_only));
        ours.push(round(&mails, &full));
    }
    let (ours, base) = (median(ours), median(base));
    println!(
        "corpus: {} messages, {:.1} KiB ({:.1} KiB mean); one core, median of {ROUNDS} rounds",
        mails.len(),
        bytes as f64 / 1024.0,
        mean / 1024.0
    );
    println!(
        "mail-parser parse only:      {:>10.0} messages/s {:>8.1} MB/s",
        base,
        base * mean / 1e6
    );
    println!(
        "bot parse + extract:         {:>10.0} messages/s {:>8.1} MB/s",
        ours,
        ours * mean / 1e6
    );
    println!("ratio bot / parse only:      {:>10.2}", ours / base);
}
