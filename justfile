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
    cargo clippy --workspace --all-targets --locked --features mail-order-bot/failpoints -- -D warnings

# Benchmarks against baselines measured in the same run: queues (plba-bench) and the bot's
# parse + extract throughput on the mail corpus.
bench:
    cargo bench -p plba-bench
    cargo bench -p mail-order-bot --bench parse
    cargo bench -p mail-order-bot --bench imap
    cargo bench -p mail-order-bot --bench replicas
    cargo bench -p mail-order-bot --bench outbox

# Fuzz parse + extract for SECONDS (needs `cargo install cargo-fuzz`; stable Rust, so no
# sanitizer). New inputs go to fuzz/corpus-work (ignored by git); a crash lands in
# fuzz/artifacts: copy it into fuzz/corpus/parse_extract and the test suite replays it.
fuzz SECONDS="60":
    cd apps/mail-order-bot && mkdir -p fuzz/corpus-work && cargo fuzz run --sanitizer none parse_extract fuzz/corpus-work fuzz/corpus/parse_extract tests/corpus -- -max_total_time={{SECONDS}} -rss_limit_mb=4096 -max_len=2000000 -timeout=10

# Random faults (the bot aborted at fault points, kill -9, Redis, Dovecot and PostgreSQL
# stopped and started) for MINUTES under a continuous stream of mail, then the ledger over
# everything that arrived. Starts its own Dovecot, Redis and PostgreSQL.
soak MINUTES="30":
    PLBA_SOAK_MINUTES={{MINUTES}} cargo test -p mail-order-bot --features failpoints --test faults soak -- --nocapture
