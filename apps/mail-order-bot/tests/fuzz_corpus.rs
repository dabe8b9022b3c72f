//! Replays the fuzz target's corpus (`fuzz/corpus/parse_extract`, where `just fuzz` adds what
//! it finds) through the same function the target calls, on a thread with the 2 MiB stack
//! that worker threads have: nothing may panic or abort, and each input named `rejected-*`
//! (nested forwards, zip bombs, huge sheets) must hit a limit.

use std::path::Path;

use mail_order_bot::domain::message::{read_mail, MailLimits};

#[test]
fn the_fuzz_corpus_reads_without_panics_and_hostile_inputs_are_rejected() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/parse_extract");
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .expect("fuzz corpus folder")
        .flatten()
        .map(|e| e.path())
        .collect();
    inputs.sort();
    assert!(
        inputs.len() >= 10,
        "the fuzz corpus has {} inputs",
        inputs.len()
    );
    let mut rejected = 0;
    for path in inputs {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bytes = std::fs::read(&path).expect("read input");
        let facts = std::thread::Builder::new()
            .stack_size(2 * 1024 * 1024)
            .spawn(move || read_mail(&bytes, &MailLimits::default()))
            .expect("spawn")
            .join()
            .unwrap_or_else(|_| panic!("{name}: read_mail panicked"));
        if name.starts_with("rejected-") {
            assert!(facts.rejected.is_some(), "{name}: no limit was hit");
            rejected += 1;
        }
    }
    assert!(rejected >= 6, "{rejected} hostile inputs");
}
