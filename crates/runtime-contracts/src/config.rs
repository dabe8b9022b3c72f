//! Configuration access for modules and adapters.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// One problem found in the configuration, with the key path it concerns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigProblem {
    /// Dotted key path, e.g. `pools.orders.workers`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl ConfigProblem {
    /// A problem at `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// A key of an earlier configuration format: renamed or retired from a `config_version`
/// on. A configuration that declares an older version (or none, which is version 1) is
/// read with the key moved to its new name, and a warning; one of that version or later
/// that still uses the old key gets a problem naming the new one.
///
/// ```
/// use runtime_contracts::config::{KeyChange, KeyFate};
/// let change = KeyChange { old: "pools.*.concurrency", fate: KeyFate::Renamed("pools.*.workers"), version: 2 };
/// assert_eq!(change.applies_to("pools.orders.concurrency").as_deref(), Some("pools.orders.workers"));
/// assert_eq!(change.applies_to("pools.orders.workers"), None);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyChange {
    /// The old dotted key; `*` stands for one segment (`pools.*.concurrency`).
    pub old: &'static str,
    /// What became of it.
    pub fate: KeyFate,
    /// The `config_version` from which the old key is no longer read.
    pub version: u32,
}

/// What became of an old key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyFate {
    /// Renamed to this key (its `*` segments are the old key's, in order).
    Renamed(&'static str),
    /// Retired: nothing reads it any more; the text says what to do instead.
    Retired(&'static str),
}

impl KeyChange {
    /// Whether `key` is this change's old key: then the key it has become (for a retired
    /// key, the key itself).
    pub fn applies_to(&self, key: &str) -> Option<String> {
        let pattern: Vec<&str> = self.old.split('.').collect();
        let parts: Vec<&str> = key.split('.').collect();
        if pattern.len() != parts.len() {
            return None;
        }
        let mut stars = Vec::new();
        for (p, k) in pattern.iter().zip(&parts) {
            match *p {
                "*" => stars.push(*k),
                p if p == *k => {}
                _ => return None,
            }
        }
        let KeyFate::Renamed(new) = self.fate else {
            return Some(key.to_owned());
        };
        let mut stars = stars.into_iter();
        Some(
            new.split('.')
                .map(|segment| match segment {
                    "*" => stars.next().unwrap_or("*"),
                    s => s,
                })
                .collect::<Vec<_>>()
                .join("."),
        )
    }

    /// What a configuration of `config_version` `version` or later that uses the old key
    /// is told: `renamed to X in config_version N`, or `retired in config_version N: ...`.
    pub fn message(&self, key: &str) -> String {
        match self.fate {
            KeyFate::Renamed(_) => format!(
                "renamed to {} in config_version {}",
                self.applies_to(key).unwrap_or_default(),
                self.version
            ),
            KeyFate::Retired(why) => format!("retired in config_version {}: {why}", self.version),
        }
    }
}

/// One problem per key whose value is zero: `must be at least 1`. The one check every
/// section has (counts, sizes, durations), written once.
///
/// ```
/// let p = runtime_contracts::config::require_positive("pools.a", &[("workers", 0), ("prefetch", 4)]);
/// assert_eq!(p, [runtime_contracts::ConfigProblem::new("pools.a.workers", "must be at least 1")]);
/// ```
pub fn require_positive(prefix: &str, values: &[(&str, u64)]) -> Vec<ConfigProblem> {
    values
        .iter()
        .filter(|(_, v)| *v == 0)
        .map(|(key, _)| ConfigProblem::new(format!("{prefix}.{key}"), "must be at least 1"))
        .collect()
}

/// A secret named by configuration: the value of the environment variable `env`, or the
/// first line of `file` (trimmed); `Ok(None)` when neither is named. The error names the
/// variable or the file and what it is for (`what`), never the secret.
///
/// ```
/// use runtime_contracts::config::secret_from;
/// assert_eq!(secret_from(None, None, "token"), Ok(None));
/// let missing = secret_from(Some("PLBA_DOC_NO_SUCH_VAR"), None, "token").unwrap_err();
/// assert_eq!(missing, "environment variable PLBA_DOC_NO_SUCH_VAR (the token) is not set");
/// ```
pub fn secret_from(
    env: Option<&str>,
    file: Option<&std::path::Path>,
    what: &str,
) -> Result<Option<String>, String> {
    if let Some(var) = env {
        return std::env::var(var)
            .ok()
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .map(Some)
            .ok_or_else(|| format!("environment variable {var} (the {what}) is not set"));
    }
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading the {what} file {}: {e}", path.display()))?;
        let line = text.lines().next().unwrap_or("").trim().to_owned();
        if line.is_empty() {
            return Err(format!("the {what} file {} is empty", path.display()));
        }
        return Ok(Some(line));
    }
    Ok(None)
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Errors of typed section access.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The section does not exist.
    #[error("config section {0} is missing")]
    Missing(String),
    /// The section does not have the expected shape.
    #[error("config section {section}: {message}")]
    Invalid {
        /// The section's key path.
        section: String,
        /// What is wrong.
        message: String,
    },
}

/// Called with the new value of a section after a reload changed it.
pub type ConfigSubscriber = Box<dyn Fn(&serde_json::Value) + Send + Sync>;

/// Read access to the validated configuration.
///
/// Implemented by the runtime core's configuration manager. Sections are addressed by
/// dotted key path (`apps.mail_order_bot`). Values are already validated when a module sees
/// them: start-up and reload validate everything before anything is applied.
///
/// ```
/// use runtime_contracts::{ConfigProvider, ConfigSubscriber};
/// struct Fixed(serde_json::Value);
/// impl ConfigProvider for Fixed {
///     fn section(&self, path: &str) -> Option<serde_json::Value> { self.0.get(path).cloned() }
///     fn subscribe(&self, _path: &str, _s: ConfigSubscriber) {}
/// }
/// let cfg = Fixed(serde_json::json!({"workers": 4}));
/// let provider: &dyn ConfigProvider = &cfg;
/// let workers: u32 = provider.typed("workers").unwrap();
/// assert_eq!(workers, 4);
/// ```
pub trait ConfigProvider: Send + Sync {
    /// The current value of a section, if present.
    fn section(&self, path: &str) -> Option<serde_json::Value>;
    /// Registers `subscriber` to be called after each reload that changed `path`.
    fn subscribe(&self, path: &str, subscriber: ConfigSubscriber);
}

impl dyn ConfigProvider + '_ {
    /// The section deserialised into `T`.
    pub fn typed<T: DeserializeOwned>(&self, path: &str) -> Result<T, ConfigError> {
        let value = self
            .section(path)
            .ok_or_else(|| ConfigError::Missing(path.to_owned()))?;
        serde_json::from_value(value).map_err(|e| ConfigError::Invalid {
            section: path.to_owned(),
            message: e.to_string(),
        })
    }
}

/// Deserialises one configuration section into `T`, collecting every unknown key and the
/// first type error with its full key path (`prefix` is the section's own path). Used by the
/// runtime, its adapters and modules alike, so that every problem reads the same way.
///
/// ```
/// #[derive(serde::Deserialize)]
/// struct Pool { workers: u32 }
/// let value = serde_json::json!({"workers": "four", "wokers": 4});
/// let problems = runtime_contracts::config::parse_section::<Pool>(&value, "pools.orders")
///     .err().unwrap();
/// let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
/// assert_eq!(keys, ["pools.orders.wokers", "pools.orders.workers"]);
/// ```
pub fn parse_section<T: DeserializeOwned>(
    value: &serde_json::Value,
    prefix: &str,
) -> Result<T, Vec<ConfigProblem>> {
    match parse_section_with_unknown(value, prefix) {
        (Some(parsed), problems) if problems.is_empty() => Ok(parsed),
        (_, problems) => Err(problems),
    }
}

/// Like [`parse_section`], but also returns the parsed value when the only problems are
/// unknown keys, so that callers can go on to check its values and report everything.
pub fn parse_section_with_unknown<T: DeserializeOwned>(
    value: &serde_json::Value,
    prefix: &str,
) -> (Option<T>, Vec<ConfigProblem>) {
    let join = |path: String| match (prefix.is_empty(), path.is_empty() || path == ".") {
        (_, true) => prefix.to_owned(),
        (true, false) => path,
        (false, false) => format!("{prefix}.{path}"),
    };
    let mut problems = Vec::new();
    let mut unknown = Vec::new();
    let result: Result<T, _> = {
        let mut record = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
        let track = serde_ignored::Deserializer::new(value, &mut record);
        serde_path_to_error::deserialize(track)
    };
    for path in unknown {
        problems.push(ConfigProblem::new(join(path), "unknown key"));
    }
    match result {
        Ok(parsed) => (Some(parsed), problems),
        Err(err) => {
            let key = join(err.path().to_string());
            problems.push(ConfigProblem::new(key, err.into_inner().to_string()));
            (None, problems)
        }
    }
}
