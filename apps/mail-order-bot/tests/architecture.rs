//! Invariant from docs/architecture.md: the bot's domain code (`src/domain/`, `src/module.rs`, `src/pages.rs`)
//! uses no runtime crate but `runtime-contracts`. Only `compose.rs` and `cli.rs` may see the
//! runtime core and the adapters.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

const FORBIDDEN: &[&str] = &[
    "runtime_core",
    "runtime_adapters",
    "runtime-core",
    "runtime-adapters",
];

fn offenders(files: &[PathBuf]) -> Vec<String> {
    let mut found = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).expect("read");
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if FORBIDDEN.iter().any(|f| code.contains(f)) {
                found.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
            }
        }
    }
    found
}

#[test]
fn domain_code_imports_only_runtime_contracts() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![src.join("module.rs"), src.join("pages.rs")];
    rust_files(&src.join("domain"), &mut files);
    assert!(files.len() >= 5, "the domain files were found: {files:?}");
    let found = offenders(&files);
    assert!(
        found.is_empty(),
        "domain code reaches past the contracts:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_check_catches_a_violation() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bad = tmp.path().join("bad.rs");
    std::fs::write(&bad, "use runtime_core::RuntimeManager; // composes\n").expect("write");
    let ok = tmp.path().join("ok.rs");
    std::fs::write(&ok, "// runtime_core is mentioned only in a comment\n").expect("write");
    assert_eq!(offenders(&[bad]).len(), 1);
    assert!(offenders(&[ok]).is_empty());
}
