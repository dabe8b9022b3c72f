//! Versioned configuration: `config_version` at the root, and the keys renamed or retired
//! by a version ([`KeyChange`]).
//!
//! A file without `config_version` predates versioning: it is read as the first version,
//! with every old key it still uses moved to its new name (or dropped when retired) and a
//! warning for each. A file that declares a version is read strictly for the changes up to
//! it (the old key is a problem naming its new one) and migrated for the changes after it.
//! A version newer than the release knows is refused.

use runtime_contracts::config::{KeyChange, KeyFate};
use runtime_contracts::ConfigProblem;

/// The root key that holds the configuration's format version.
pub const VERSION_KEY: &str = "config_version";

/// The configuration format this release writes and reads up to.
pub const CONFIG_VERSION: u32 = 1;

/// What reading a configuration's versions found.
#[derive(Debug, Default)]
pub(crate) struct Versioned {
    /// Old keys a configuration of this version may not use; `unknown key` problems at
    /// them are replaced by these.
    pub problems: Vec<ConfigProblem>,
    /// Old keys read under their new names, and retired keys dropped.
    pub warnings: Vec<ConfigProblem>,
}

/// The version a layer declares: `None` when it declares none (it predates versioning).
fn declared(root: &serde_json::Value, current: u32, out: &mut Versioned) -> Option<u32> {
    let value = root.get(VERSION_KEY)?;
    match value.as_u64().and_then(|v| u32::try_from(v).ok()) {
        Some(v) if (1..=current).contains(&v) => Some(v),
        Some(v) if v > current => {
            out.problems.push(ConfigProblem::new(
                VERSION_KEY,
                format!("{v} is newer than this release reads (up to {current}); upgrade the bot or write the file for version {current}"),
            ));
            Some(current)
        }
        _ => {
            out.problems.push(ConfigProblem::new(
                VERSION_KEY,
                format!("must be a whole number from 1 to {current}"),
            ));
            Some(current)
        }
    }
}

/// Applies `changes` to `root` as a configuration of the version it declares.
pub(crate) fn apply(
    root: &mut serde_json::Value,
    changes: &[KeyChange],
    current: u32,
) -> Versioned {
    let mut out = Versioned::default();
    let version = declared(root, current, &mut out);
    let mut keys = Vec::new();
    dotted_keys(root, "", &mut keys);
    for key in keys {
        for change in changes {
            let Some(new_key) = change.applies_to(&key) else {
                continue;
            };
            if version.is_some_and(|v| v >= change.version) {
                out.problems
                    .push(ConfigProblem::new(key.clone(), change.message(&key)));
                continue;
            }
            let Some(value) = take(root, &key) else {
                continue;
            };
            match change.fate {
                KeyFate::Renamed(_) => {
                    if crate::config::lookup(root, &new_key).is_some() {
                        out.problems.push(ConfigProblem::new(
                            key.clone(),
                            format!("{}; {new_key} is set too: keep one", change.message(&key)),
                        ));
                    } else if put(root, &new_key, value) {
                        out.warnings.push(ConfigProblem::new(
                            key.clone(),
                            format!(
                                "{}; read as {new_key} (rename it and set {VERSION_KEY} = {current})",
                                change.message(&key)
                            ),
                        ));
                    }
                }
                KeyFate::Retired(_) => out.warnings.push(ConfigProblem::new(
                    key.clone(),
                    format!("{}; ignored", change.message(&key)),
                )),
            }
        }
    }
    out
}

/// Every dotted key of the tables under `value` (tables and values, not array items).
fn dotted_keys(value: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
    let Some(map) = value.as_object() else {
        return;
    };
    for (key, inner) in map {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        out.push(path.clone());
        dotted_keys(inner, &path, out);
    }
}

fn take(root: &mut serde_json::Value, key: &str) -> Option<serde_json::Value> {
    let (parent, last) = match key.rsplit_once('.') {
        Some((parent, last)) => (
            parent
                .split('.')
                .try_fold(&mut *root, |v, k| v.get_mut(k))?,
            last,
        ),
        None => (root, key),
    };
    parent.as_object_mut()?.remove(last)
}

fn put(root: &mut serde_json::Value, key: &str, value: serde_json::Value) -> bool {
    let mut at = root;
    let parts: Vec<&str> = key.split('.').collect();
    for part in &parts[..parts.len() - 1] {
        let Some(map) = at.as_object_mut() else {
            return false;
        };
        at = map
            .entry((*part).to_owned())
            .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
    }
    match at.as_object_mut() {
        Some(map) => {
            map.insert(parts[parts.len() - 1].to_owned(), value);
            true
        }
        None => false,
    }
}

/// Keeps one problem per old key: the version's message replaces what a section's parser
/// said of the same key (`unknown key`).
pub(crate) fn replace_unknown(problems: &mut Vec<ConfigProblem>, versioned: &Versioned) {
    problems.retain(|p| !versioned.problems.iter().any(|v| v.key == p.key));
    problems.splice(0..0, versioned.problems.iter().cloned());
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CHANGES: &[KeyChange] = &[
        KeyChange {
            old: "pools.*.concurrency",
            fate: KeyFate::Renamed("pools.*.workers"),
            version: 2,
        },
        KeyChange {
            old: "runtime.color",
            fate: KeyFate::Retired("the log format decides"),
            version: 2,
        },
    ];

    #[test]
    fn an_older_file_is_read_under_the_new_names_with_a_warning() {
        let mut root = json!({"config_version": 1, "pools": {"orders": {"concurrency": 8}}, "runtime": {"color": true}});
        let v = apply(&mut root, CHANGES, 2);
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        assert_eq!(root["pools"]["orders"], json!({"workers": 8}));
        assert_eq!(root["runtime"], json!({}));
        let warnings: Vec<String> = v.warnings.iter().map(ToString::to_string).collect();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].contains("renamed to pools.orders.workers in config_version 2"),
            "{warnings:?}"
        );
        assert!(
            warnings[1].contains("retired in config_version 2: the log format decides"),
            "{warnings:?}"
        );
    }

    #[test]
    fn a_file_of_the_version_names_the_new_key() {
        let mut root = json!({"config_version": 2, "pools": {"orders": {"concurrency": 8}}});
        let v = apply(&mut root, CHANGES, 2);
        assert_eq!(
            v.problems,
            [ConfigProblem::new(
                "pools.orders.concurrency",
                "renamed to pools.orders.workers in config_version 2"
            )]
        );
        assert_eq!(root["pools"]["orders"]["concurrency"], 8, "nothing moved");
    }

    #[test]
    fn both_names_set_and_bad_versions_are_problems() {
        let mut both = json!({"pools": {"orders": {"concurrency": 8, "workers": 2}}});
        let v = apply(&mut both, CHANGES, 2);
        assert_eq!(v.problems.len(), 1);
        assert!(
            v.problems[0]
                .message
                .contains("pools.orders.workers is set too"),
            "{:?}",
            v.problems
        );
        for bad in [json!(3), json!(0), json!("1"), json!(1.5)] {
            let mut root = json!({"config_version": bad});
            let v = apply(&mut root, CHANGES, 2);
            assert_eq!(v.problems.len(), 1, "{bad}: {:?}", v.problems);
            assert_eq!(v.problems[0].key, "config_version");
        }
    }

    #[test]
    fn the_version_message_replaces_unknown_key() {
        let versioned = Versioned {
            problems: vec![ConfigProblem::new(
                "queue.max_message_bytes",
                "renamed to queue.max_entry_bytes in config_version 1",
            )],
            warnings: Vec::new(),
        };
        let mut problems = vec![
            ConfigProblem::new("queue.max_message_bytes", "unknown key"),
            ConfigProblem::new("pools.orders.workers", "must be at most 1024"),
        ];
        replace_unknown(&mut problems, &versioned);
        assert_eq!(problems.len(), 2);
        assert!(problems[0].message.starts_with("renamed to"));
    }
}
