//! `check-config --explain KEY`: what a configuration key does and its default, read from
//! the README's configuration table, which is compiled in (one text for both, so they
//! cannot disagree).
//!
//! A row of the table documents one section (`[pools.NAME]`, `[sources.ID]` `type =
//! "imap_poll"`); its cell lists the keys, each as `` `key` (default; what it does) ``,
//! separated by commas at the top level. `NAME` and `ID` stand for any one segment, and a
//! `` `[pools.NAME.retry]`: `` inside a cell starts the keys of a sub-table.

use runtime_contracts::config::KeyChange;

const README: &str = include_str!("../../../README.md");

/// One documented key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyDoc {
    /// The key's pattern, `*` for any one segment (`pools.*.retry.jitter`).
    pub pattern: String,
    /// The section as the table names it (`[sources.ID]` `type = "maildir"`).
    pub section: String,
    /// The `type` values of the row, when the section is typed.
    pub types: Vec<String>,
    /// The table's text for the key.
    pub text: String,
}

/// Every key the README documents: the configuration table, and the `| key | what |`
/// tables of one section (the `` `[sources.ID.oauth2]` `` named just above them).
pub fn documented() -> Vec<KeyDoc> {
    let mut out = section_tables();
    out.extend(configuration_table());
    out
}

/// The `| key | what |` tables, each of the section the prose above it names last.
fn section_tables() -> Vec<KeyDoc> {
    let mut out = Vec::new();
    let (mut section, mut in_table) = (None::<String>, false);
    for line in README.lines() {
        if line.starts_with("| key | what |") {
            in_table = true;
            continue;
        }
        if !line.starts_with('|') {
            in_table = false;
            for span in line.split('`').skip(1).step_by(2) {
                if let Some(Table::Sub(named)) = sub_table(&format!("`{span}`"), "") {
                    section = Some(named);
                }
            }
            continue;
        }
        let (Some(section), true) = (&section, in_table) else {
            continue;
        };
        let Some((keys, _)) = line.trim_start_matches("| ").split_once(" | ") else {
            continue;
        };
        for key in item_keys(keys, 0) {
            out.push(KeyDoc {
                pattern: format!("{section}.{key}"),
                section: format!("`[{section}]`"),
                types: Vec::new(),
                text: line.trim_matches(|c| c == '|' || c == ' ').to_owned(),
            });
        }
    }
    out
}

/// The keys of the README's configuration table.
fn configuration_table() -> Vec<KeyDoc> {
    let mut out = Vec::new();
    let Some(start) = README.find("### Configuration\n") else {
        return out;
    };
    for line in README[start..].lines().skip(1) {
        if line.starts_with("#") {
            break;
        }
        let Some(row) = line.strip_prefix("| ") else {
            continue;
        };
        let Some((section, keys)) = row.split_once(" | ") else {
            continue;
        };
        let keys = keys.trim_end_matches(" |");
        let Some(base) = section_pattern(section) else {
            continue;
        };
        let types = quoted(section);
        if !types.is_empty() {
            // A typed section's `type` is documented by the row's section cell.
            out.push(KeyDoc {
                pattern: format!("{base}.type"),
                section: section.to_owned(),
                types: types.clone(),
                text: section.to_owned(),
            });
        }
        let mut table = base.clone();
        for item in items(keys) {
            let mut keys = item_keys(&item, 0);
            match sub_table(&item, &base) {
                Some(Table::Array(array)) => {
                    out.push(KeyDoc {
                        pattern: array,
                        section: section.to_owned(),
                        types: types.clone(),
                        text: item.trim().to_owned(),
                    });
                    continue;
                }
                Some(Table::Sub(sub)) => {
                    table = sub;
                    if keys.is_empty() {
                        // `[…reply.templates]` (`confirmation_subject`, ...)
                        keys = item_keys(&item, 1);
                    }
                }
                None => {}
            }
            if table != base && item.contains("`type = ") {
                // A sub-table's kinds (`[sources.ID.auth]` `type = "standard"`).
                keys.push("type".to_owned());
            }
            for key in keys {
                let pattern = if table.is_empty() {
                    key
                } else {
                    format!("{table}.{key}")
                };
                out.push(KeyDoc {
                    pattern,
                    section: section.to_owned(),
                    types: types.clone(),
                    text: item.trim().to_owned(),
                });
            }
        }
    }
    out
}

/// The dotted pattern of a row's section (`[sources.ID]` → `sources.*`; `(root)` → ``).
fn section_pattern(cell: &str) -> Option<String> {
    if cell.starts_with("(root)") {
        return Some(String::new());
    }
    let inner = cell.strip_prefix("`[")?.split(']').next()?;
    Some(placeholders(inner))
}

/// `NAME`, `ID` and other upper-case segments are any one segment.
fn placeholders(path: &str) -> String {
    path.split('.')
        .map(|s| {
            if !s.is_empty() && s.chars().all(|c| c.is_ascii_uppercase()) {
                "*"
            } else {
                s
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// The quoted values of a section cell (its `type`s).
fn quoted(cell: &str) -> Vec<String> {
    cell.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// A cell's items: split at commas and semicolons outside parentheses and code spans.
fn items(cell: &str) -> Vec<String> {
    let mut out = Vec::new();
    let (mut depth, mut code, mut current) = (0usize, false, String::new());
    for c in cell.chars() {
        match c {
            '`' => code = !code,
            '(' if !code => depth += 1,
            ')' if !code => depth = depth.saturating_sub(1),
            ',' | ';' if !code && depth == 0 => {
                out.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    out.push(current);
    out.retain(|i| !i.trim().is_empty());
    out
}

/// What an item that begins with a table header opens.
enum Table {
    /// `` `[pools.NAME.retry]`: `` — the keys after it are of this sub-table.
    Sub(String),
    /// `` `[[apps.mail_order_bot.clients]]` `` — an array of tables, documented whole.
    Array(String),
}

/// The table an item opens when it begins with a header code span.
fn sub_table(item: &str, base: &str) -> Option<Table> {
    // After a label, if any (`clients: `[[apps.mail_order_bot.clients]]``).
    let item = item.trim_start();
    let label = &item[..item.find('`')?];
    if !(label.is_empty() || label.trim_end().ends_with(':')) {
        return None;
    }
    let span = item[label.len()..].strip_prefix('`')?;
    let span = &span[..span.find('`')?];
    let path_chars = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '…')
    };
    if let Some(inner) = span.strip_prefix("[[").and_then(|s| s.strip_suffix("]]")) {
        return path_chars(inner).then(|| Table::Array(placeholders(inner)));
    }
    let inner = span.strip_prefix('[')?.strip_suffix(']')?;
    if !path_chars(inner) {
        return None;
    }
    Some(Table::Sub(match inner.strip_prefix('…') {
        // `[…reply.templates]`: under the row's section, whose last segment it repeats.
        Some(rest) => match base.rsplit_once('.') {
            Some((parent, _)) => format!("{parent}.{rest}"),
            None => rest.to_owned(),
        },
        None => placeholders(inner),
    }))
}

/// The keys an item names: its code spans at parenthesis depth `at` that read as key
/// names.
fn item_keys(item: &str, at: usize) -> Vec<String> {
    let mut keys = Vec::new();
    let mut depth = 0usize;
    let mut rest = item;
    while let Some(c) = rest.chars().next() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            '`' => {
                let Some(end) = rest[1..].find('`') else {
                    break;
                };
                let span = &rest[1..=end];
                if depth == at
                    && !span.is_empty()
                    && span
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                {
                    keys.push(span.to_owned());
                }
                rest = &rest[end + 2..];
                continue;
            }
            _ => {}
        }
        rest = &rest[c.len_utf8()..];
    }
    keys
}

fn matches(pattern: &str, key: &str) -> bool {
    let (p, k): (Vec<&str>, Vec<&str>) = (pattern.split('.').collect(), key.split('.').collect());
    p.len() == k.len() && p.iter().zip(&k).all(|(p, k)| *p == "*" || p == k)
}

/// Whether the key `pattern` documents holds `key` (`reply.answer` holds
/// `reply.answer.created`).
fn covers(pattern: &str, key: &str) -> bool {
    let (p, k): (Vec<&str>, Vec<&str>) = (pattern.split('.').collect(), key.split('.').collect());
    p.len() < k.len() && p.iter().zip(&k).all(|(p, k)| *p == "*" || p == k)
}

/// What `--explain KEY` prints: the documentation of `key` (of the rows whose `type` is
/// `kind`, when it is known and one matches), or why there is none.
pub fn explain(key: &str, kind: Option<&str>, changes: &[KeyChange]) -> Result<String, String> {
    let mut out = String::new();
    let mut key = key.trim().to_owned();
    if let Some((change, new)) = changes
        .iter()
        .find_map(|c| c.applies_to(&key).map(|n| (c, n)))
    {
        out.push_str(&format!("{key}: {}\n", change.message(&key)));
        if new == key {
            return Ok(out);
        }
        key = new;
    }
    let docs = documented();
    let mut found: Vec<&KeyDoc> = docs.iter().filter(|d| matches(&d.pattern, &key)).collect();
    if found.is_empty() {
        found = docs.iter().filter(|d| covers(&d.pattern, &key)).collect();
    }
    let typed: Vec<&KeyDoc> = found
        .iter()
        .copied()
        .filter(|d| kind.is_some_and(|k| d.types.iter().any(|t| t == k)))
        .collect();
    let shown = if typed.is_empty() { found } else { typed };
    if shown.is_empty() {
        let last = key.rsplit('.').next().unwrap_or(&key);
        let mut near: Vec<&str> = docs
            .iter()
            .filter(|d| d.pattern.rsplit('.').next() == Some(last))
            .map(|d| d.pattern.as_str())
            .collect();
        near.sort_unstable();
        near.dedup();
        return Err(match near.is_empty() {
            true => format!("{key}: no such key is documented (README.md, Configuration)"),
            false => format!(
                "{key}: no such key is documented; keys of that name: {}",
                near.join(", ")
            ),
        });
    }
    for doc in shown {
        out.push_str(&format!(
            "{key}  (section {})\n  {}\n",
            doc.section, doc.text
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key set by a shipped configuration, dotted.
    fn leaves(value: &toml::Value, prefix: &str, out: &mut Vec<String>) {
        if let toml::Value::Table(table) = value {
            for (k, v) in table {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match v {
                    toml::Value::Table(_) => leaves(v, &path, out),
                    _ => out.push(path),
                }
            }
        }
    }

    #[test]
    fn every_key_of_the_shipped_configurations_is_documented() {
        let docs = documented();
        assert!(docs.len() > 100, "the table was read: {} keys", docs.len());
        for file in ["default.toml", "imap.toml", "replicas.toml"] {
            let path = format!("{}/../../config/{file}", env!("CARGO_MANIFEST_DIR"));
            let text = std::fs::read_to_string(&path).expect("config");
            let value: toml::Value = text.parse().expect("toml");
            let mut keys = Vec::new();
            leaves(&value, "", &mut keys);
            for key in keys {
                assert!(
                    docs.iter()
                        .any(|d| matches(&d.pattern, &key) || covers(&d.pattern, &key)),
                    "{file}: {key} is not in the README's configuration table"
                );
            }
        }
    }

    #[test]
    fn every_key_of_the_readmes_toml_examples_is_documented() {
        let docs = documented();
        let mut blocks = README.split("```toml\n").skip(1);
        let mut checked = 0;
        for block in blocks.by_ref() {
            let text = block.split("```").next().unwrap_or_default();
            let Ok(value) = text.parse::<toml::Value>() else {
                continue;
            };
            if value.get("dependencies").is_some() || value.get("package").is_some() {
                continue; // a Cargo manifest
            }
            let mut keys = Vec::new();
            leaves(&value, "", &mut keys);
            for key in keys {
                checked += 1;
                assert!(
                    docs.iter()
                        .any(|d| matches(&d.pattern, &key) || covers(&d.pattern, &key)),
                    "README example: {key} is not in the configuration table"
                );
            }
        }
        assert!(checked > 20, "{checked} keys checked");
    }

    #[test]
    fn a_key_is_explained_with_its_default_and_its_section() {
        let text = explain("pools.orders.max_attempts", None, &[]).expect("documented");
        assert!(text.contains("`max_attempts` (5)"), "{text}");
        assert!(text.contains("[pools.NAME]"), "{text}");
        let retry = explain("pools.orders.retry.jitter", None, &[]).expect("sub-table");
        assert!(retry.contains("`jitter`"), "{retry}");
        let version = explain("config_version", None, &[]).expect("root key");
        assert!(version.contains("config_version"), "{version}");
    }

    #[test]
    fn a_key_of_several_source_types_is_narrowed_by_the_type() {
        let all = explain("sources.inbox.poll_interval_ms", None, &[]).expect("documented");
        assert!(
            all.contains("maildir") && all.contains("imap_poll"),
            "{all}"
        );
        let imap = explain("sources.inbox.poll_interval_ms", Some("imap_idle"), &[]).expect("imap");
        assert!(
            imap.contains("(5000)") && !imap.contains("maildir"),
            "{imap}"
        );
    }

    #[test]
    fn an_old_key_names_its_new_one_and_an_unknown_key_is_refused() {
        let renamed = explain(
            "queue.max_message_bytes",
            Some("amqp"),
            runtime_adapters::KEY_CHANGES,
        )
        .expect("renamed");
        assert!(
            renamed.contains("renamed to queue.max_entry_bytes in config_version 1"),
            "{renamed}"
        );
        assert!(renamed.contains("`max_entry_bytes` (65536;"), "{renamed}");
        let unknown = explain("pools.orders.wrokers", None, &[]).expect_err("a typo");
        assert!(unknown.contains("no such key"), "{unknown}");
        let near = explain("pools.orders.poll_interval_ms", None, &[]).expect_err("elsewhere");
        assert!(
            near.contains("keys of that name: ") && near.contains("sources.*.poll_interval_ms"),
            "{near}"
        );
    }
}
