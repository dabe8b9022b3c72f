//! Invariant from docs/architecture.md: runtime-contracts depends on no async runtime and no
//! I/O crate, so that anything may depend on it.

#[test]
fn contracts_depend_on_no_runtime_and_no_io_crate() {
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .expect("read Cargo.toml");
    let deps: Vec<&str> = manifest
        .split("[dependencies]")
        .nth(1)
        .expect("a [dependencies] table")
        .split("\n[")
        .next()
        .unwrap_or("")
        .lines()
        .filter_map(|l| l.split(['.', '=']).next())
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let allowed = [
        "serde",
        "serde_json",
        "serde_ignored",
        "serde_path_to_error",
        "thiserror",
    ];
    for dep in &deps {
        assert!(
            allowed.contains(dep),
            "runtime-contracts must not depend on {dep}"
        );
    }
    assert!(
        deps.contains(&"serde"),
        "the parse found the dependencies: {deps:?}"
    );
}
