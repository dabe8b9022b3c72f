//! Benchmarks of the plba runtime against baselines measured in the same run. Run them with
//! `cargo bench -p plba-bench` (or `just bench`); see `benches/`.
