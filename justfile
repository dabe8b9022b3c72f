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

# Benchmarks against baselines measured in the same run.
bench:
    cargo bench -p plba-bench
