//! The configuration manager: platform validation, environment overrides, reload.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use runtime_contracts::ConfigProvider;
use runtime_core::config::{ConfigOrigin, ConfigurationManager};

fn write(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("c.toml");
    std::fs::write(&path, text).expect("write");
    path
}

#[test]
fn defaults_apply_and_unclaimed_sections_are_errors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = write(tmp.path(), "[pools.a]\n[apps.x]\ny = 1\n[extra]\n");
    let report = ConfigurationManager::builder()
        .env(HashMap::new())
        .load(ConfigOrigin::File(path.clone()))
        .expect_err("apps.x and extra are claimed by nobody");
    let keys: Vec<&str> = report.problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["apps.x", "extra"]);

    let manager = ConfigurationManager::builder()
        .env(HashMap::new())
        .claim("apps.x", |_| Vec::new())
        .claim("extra", |_| Vec::new())
        .load(ConfigOrigin::File(path))
        .expect("valid");
    let pool = &manager.platform().pools["a"];
    assert_eq!(pool.workers, 4, "default concurrency");
    assert_eq!(manager.platform().runtime.shutdown_deadline_ms, 10_000);
    let provider: &dyn ConfigProvider = &manager;
    let y: i64 = provider.typed("apps.x.y").expect("typed access");
    assert_eq!(y, 1);
}

#[test]
fn a_missing_file_is_a_clear_problem() {
    let report = ConfigurationManager::builder()
        .load(ConfigOrigin::File("/nonexistent/plba.toml".into()))
        .expect_err("missing");
    assert!(
        report
            .to_string()
            .contains("/nonexistent/plba.toml not found"),
        "{report}"
    );
}

#[test]
fn reload_applies_a_valid_edit_notifies_subscribers_and_rejects_a_bad_one_whole() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = write(
        tmp.path(),
        "[pools.a]\nworkers = 2\n[pools.b]\nworkers = 1\n",
    );
    let manager = ConfigurationManager::builder()
        .env(HashMap::new())
        .load(ConfigOrigin::File(path.clone()))
        .expect("valid");
    let seen: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let sink = Arc::clone(&seen);
    manager.subscribe(
        "pools.a",
        Box::new(move |v| sink.lock().expect("lock").push(v.clone())),
    );

    write(
        tmp.path(),
        "[pools.a]\nworkers = 2000\n[pools.b]\nworkers = 3\n",
    );
    let report = manager.reload().expect_err("2000 workers");
    assert_eq!(report.problems[0].key, "pools.a.workers");
    assert_eq!(manager.platform().pools["b"].workers, 1, "nothing changed");
    assert!(seen.lock().expect("lock").is_empty());

    write(
        tmp.path(),
        "[pools.a]\nworkers = 6\n[pools.b]\nworkers = 1\n",
    );
    let changed = manager.reload().expect("valid edit");
    assert_eq!(changed, ["pools.a.workers"]);
    assert_eq!(manager.platform().pools["a"].workers, 6);
    let seen = seen.lock().expect("lock");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["workers"], 6);
}
