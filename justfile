# The same commands as README.md, for those who `cargo install just`.

# Run the bot on the embedded default config (bundled sample mail, no server).
run:
    cargo run -p mail-order-bot -- run --once

# Run the whole test suite (installs and starts what it needs).
test:
    bash scripts/test.sh

# Formatting and lints, as CI runs them.
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets --locked -- -D warnings

# Benchmarks against baselines measured in the same run: queues (plba-bench) and the bot's
# parse + extract throughput on the mail corpus.
bench:
    cargo bench -p plba-bench
    cargo bench -p mail-order-bot --bench parse
    cargo bench -p mail-order-bot --bench imap
    cargo bench -p mail-order-bot --bench replicas

# Fuzz parse + extract for SECONDS (needs `cargo install cargo-fuzz`; stable Rust, so no
# sanitizer). New inputs go to fuzz/corpus-work (ignored by git); a crash lands in
# fuzz/artifacts: copy it into fuzz/corpus/parse_extract and the test suite replays it.
fuzz SECONDS="60":
    cd apps/mail-order-bot && mkdir -p fuzz/corpus-work && cargo fuzz run --sanitizer none parse_extract fuzz/corpus-work fuzz/corpus/parse_extract tests/corpus -- -max_total_time={{SECONDS}} -rss_limit_mb=4096 -max_len=2000000 -timeout=10
