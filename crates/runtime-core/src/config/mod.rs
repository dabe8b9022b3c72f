//! Configuration: a TOML file (or embedded text), then overrides from a database table
//! (see [`ConfigBuilder::overrides`]), then `PLBA__SECTION__KEY` environment overrides,
//! validated as a whole before anything starts.
//!
//! Sections: `[runtime]`, `[pools.*]` and `[telemetry]` belong to the platform; every other top-level
//! section (`queue`, `sources`, `apps.<module>`) is claimed by a validator that the binary
//! registers for the adapter or module that reads it. A key nobody claims is an error.

mod platform;
mod versions;

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use runtime_contracts::config::{KeyChange, KeyFate};
use runtime_contracts::{ConfigProblem, ConfigProvider, ConfigSubscriber};

pub use platform::{LogFormat, PlatformConfig, PoolConfig, RuntimeConfig};
pub use versions::{CONFIG_VERSION, VERSION_KEY};

pub use runtime_contracts::config::{parse_section, parse_section_with_unknown};

/// Where the configuration text comes from.
#[derive(Clone, Debug)]
pub enum ConfigOrigin {
    /// A TOML file.
    File(PathBuf),
    /// TOML text compiled into the binary, with a name for messages.
    Embedded {
        /// Shown in messages, e.g. `embedded config/default.toml`.
        name: String,
        /// The TOML text.
        text: String,
    },
}

impl fmt::Display for ConfigOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Embedded { name, .. } => f.write_str(name),
        }
    }
}

/// Every problem found in a configuration. Nothing is started or changed when one exists.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub struct ConfigReport {
    /// Where the configuration came from.
    pub origin: String,
    /// The problems, each with its key path.
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "configuration {} has {n} problem{}:",
            self.origin,
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

/// Checks one claimed section; `None` when it is absent.
pub type SectionValidator =
    Arc<dyn Fn(Option<&serde_json::Value>) -> Vec<ConfigProblem> + Send + Sync>;

struct Loaded {
    root: Arc<serde_json::Value>,
    platform: PlatformConfig,
    /// Old keys read under their new names (see [`KeyChange`]).
    warnings: Vec<ConfigProblem>,
}

/// A layer of overrides between the file and the environment: dotted keys with their
/// values, from a database table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    /// Where they come from, for messages (`database sqlite://...`).
    pub name: String,
    /// Their version, as the store counts it.
    pub version: String,
    /// `(dotted key, TOML value text)`, e.g. `("pools.orders.workers", "8")`.
    pub entries: Vec<(String, String)>,
    /// The `config_version` each key was written for (a key not named: the current one).
    pub config_versions: std::collections::BTreeMap<String, u32>,
    /// Key patterns the file allows besides [`OVERRIDABLE`] (`[config_store] allow`).
    pub allowed: Vec<String>,
}

/// A parser's message without the excerpt of the source it quotes (`3 | admin_tokens =
/// ["…"`): the line may hold a token or a URL with its password, and the message goes to
/// logs, `/status`, the console and HTTP answers. The line and column stay.
pub fn without_source_lines(message: &str) -> String {
    let quoted = |line: &str| {
        let t = line.trim_start();
        let t = t
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .trim_start();
        t.starts_with('|')
    };
    message
        .lines()
        .filter(|line| !quoted(line))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The keys a database row may override: tuning, never where the bot connects, what it
/// logs in with, what it listens on or which files it reads and writes (a row that could
/// point an IMAP `host` elsewhere would hand the real password to another server). `*` is
/// one key segment.
pub const OVERRIDABLE: &[&str] = &[
    "runtime.log",
    "runtime.source_progress_bound_ms",
    "pools.*.workers",
    "pools.*.prefetch",
    "pools.*.handler_timeout_ms",
    "pools.*.high_watermark",
    "pools.*.low_watermark",
    "pools.*.retry.*",
    "sources.*.poll_interval_ms",
    "sources.*.batch_size",
    "sources.*.idle_reissue_secs",
    "sources.*.idle_check_secs",
    "sources.*.idle_dead_after_secs",
    "sources.*.max_backoff_ms",
    "reconcile.older_than_secs",
];

/// Key segments that no pattern may open to the database, whatever `allow` says: hosts,
/// credentials, tokens, listening addresses, URLs, files and paths.
pub const NEVER_OVERRIDABLE: &[&str] = &[
    "host",
    "port",
    "bind",
    "url",
    "user",
    "password",
    "token",
    "secret",
    "path",
    "file",
    "env",
    "tls",
    "ca_file",
    "seed_samples_into",
    "oauth2",
    "auth",
    "provider",
    "tenant",
];

fn segment_matches(pattern: &str, key: &str) -> bool {
    let (p, k): (Vec<&str>, Vec<&str>) = (pattern.split('.').collect(), key.split('.').collect());
    p.len() == k.len() && p.iter().zip(&k).all(|(p, k)| *p == "*" || p == k)
}

/// Whether `key` touches what is never overridable (a segment naming a host, a
/// credential, a file...).
pub fn never_overridable(key: &str) -> bool {
    key.split('.').any(|segment| {
        let segment = segment.to_ascii_lowercase();
        NEVER_OVERRIDABLE.iter().any(|n| {
            segment == *n
                || segment.ends_with(&format!("_{n}"))
                || segment.starts_with(&format!("{n}_"))
                || segment.contains("token")
                || segment.contains("password")
                || segment.contains("secret")
        })
    })
}

/// Whether a database row may set `key`: on [`OVERRIDABLE`] or `allowed`, and never on
/// [`NEVER_OVERRIDABLE`].
pub fn overridable(key: &str, allowed: &[String]) -> bool {
    !never_overridable(key)
        && (OVERRIDABLE.iter().any(|p| segment_matches(p, key))
            || allowed.iter().any(|p| segment_matches(p, key)))
}

impl Overrides {
    /// The entries as one TOML document; a value that is not TOML, or a key that is both a
    /// value and a table, is a problem with its key.
    pub fn to_toml(&self) -> Result<String, Vec<ConfigProblem>> {
        self.to_toml_versioned(&[], CONFIG_VERSION)
            .map(|(text, _)| text)
    }

    /// [`Overrides::to_toml`] with each key read as a key of the `config_version` it was
    /// written for: an old key of an older row under its new name (with a warning), an old
    /// key of a row of its version or later, or a row newer than `current`, a problem.
    pub fn to_toml_versioned(
        &self,
        changes: &[KeyChange],
        current: u32,
    ) -> Result<(String, Vec<ConfigProblem>), Vec<ConfigProblem>> {
        let mut root = toml::Table::new();
        let mut problems = Vec::new();
        let mut warnings = Vec::new();
        for (key, text) in &self.entries {
            let written_for = self.config_versions.get(key).copied().unwrap_or(current);
            if written_for > current {
                problems.push(ConfigProblem::new(
                    key.clone(),
                    format!("was written for config_version {written_for}; this release reads up to {current}"),
                ));
                continue;
            }
            let mut key = key.clone();
            if let Some((change, new_key)) = changes
                .iter()
                .find_map(|c| c.applies_to(&key).map(|new| (c, new)))
            {
                if written_for >= change.version {
                    problems.push(ConfigProblem::new(key.clone(), change.message(&key)));
                    continue;
                }
                let KeyFate::Renamed(_) = change.fate else {
                    warnings.push(ConfigProblem::new(
                        key.clone(),
                        format!(
                            "{} (a row of config_version {written_for}); ignored",
                            change.message(&key)
                        ),
                    ));
                    continue;
                };
                warnings.push(ConfigProblem::new(
                    key.clone(),
                    format!(
                        "{} (a row of config_version {written_for}); read as {new_key}",
                        change.message(&key)
                    ),
                ));
                key = new_key;
            }
            let key = &key;
            if !overridable(key, &self.allowed) {
                problems.push(ConfigProblem::new(
                    key.clone(),
                    "may not be set from the database: only tuning keys may (pools' workers, \
                     prefetch, timeouts and retry, sources' intervals, the log filter, and \
                     what [config_store] allow names); hosts, credentials, tokens, bind \
                     addresses and paths are set in the file",
                ));
                continue;
            }
            let parsed = format!("v = {text}").parse::<toml::Table>();
            let value = match parsed {
                Ok(mut t) if t.len() == 1 => match t.remove("v") {
                    Some(v) => v,
                    None => continue,
                },
                _ => {
                    problems.push(ConfigProblem::new(
                        key.clone(),
                        format!("{text:?} is not a TOML value (quote text: \"...\")"),
                    ));
                    continue;
                }
            };
            let parts: Vec<&str> = key.split('.').collect();
            if parts.iter().any(|p| p.is_empty()) {
                problems.push(ConfigProblem::new(key.clone(), "not a dotted key"));
                continue;
            }
            if !insert_dotted(&mut root, &parts, value) {
                problems.push(ConfigProblem::new(
                    key.clone(),
                    "a part of this key is set to a value elsewhere",
                ));
            }
        }
        if problems.is_empty() {
            Ok((toml::to_string(&root).unwrap_or_default(), warnings))
        } else {
            Err(problems)
        }
    }
}

/// Puts `value` at the path `parts` under `table`; false when a part is already a value.
fn insert_dotted(table: &mut toml::Table, parts: &[&str], value: toml::Value) -> bool {
    match parts {
        [] => false,
        [last] => {
            table.insert((*last).to_owned(), value);
            true
        }
        [first, rest @ ..] => match table
            .entry((*first).to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        {
            toml::Value::Table(inner) => insert_dotted(inner, rest, value),
            _ => false,
        },
    }
}

/// Loads, validates, serves and reloads the configuration.
pub struct ConfigurationManager {
    origin: ConfigOrigin,
    overrides: RwLock<Option<Overrides>>,
    env: Option<HashMap<String, String>>,
    validators: Vec<(String, SectionValidator)>,
    cross_checks: Vec<RootValidator>,
    key_changes: Vec<KeyChange>,
    format_version: u32,
    loaded: RwLock<Loaded>,
    subscribers: Mutex<Vec<(String, ConfigSubscriber)>>,
}

impl fmt::Debug for ConfigurationManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigurationManager")
            .field("origin", &self.origin.to_string())
            .field(
                "claimed",
                &self.validators.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// Checks relations between sections of the whole configuration.
pub type RootValidator = Arc<dyn Fn(&serde_json::Value) -> Vec<ConfigProblem> + Send + Sync>;

/// Builds a [`ConfigurationManager`].
pub struct ConfigBuilder {
    overrides: Option<Overrides>,
    env: Option<HashMap<String, String>>,
    validators: Vec<(String, SectionValidator)>,
    cross_checks: Vec<RootValidator>,
    key_changes: Vec<KeyChange>,
    format_version: u32,
}

impl Default for ConfigBuilder {
    fn default() -> Self {
        Self {
            overrides: None,
            env: None,
            validators: Vec::new(),
            cross_checks: Vec::new(),
            key_changes: Vec::new(),
            format_version: CONFIG_VERSION,
        }
    }
}

impl fmt::Debug for ConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigBuilder").finish_non_exhaustive()
    }
}

impl ConfigBuilder {
    /// Claims the section at dotted `key` (`queue`, `sources`, `apps.mail_order_bot`) and
    /// validates it with `validator`.
    pub fn claim(
        mut self,
        key: &str,
        validator: impl Fn(Option<&serde_json::Value>) -> Vec<ConfigProblem> + Send + Sync + 'static,
    ) -> Self {
        self.validators.push((key.to_owned(), Arc::new(validator)));
        self
    }

    /// Adds a check across sections (a source names a configured pool, ...).
    pub fn cross_check(
        mut self,
        check: impl Fn(&serde_json::Value) -> Vec<ConfigProblem> + Send + Sync + 'static,
    ) -> Self {
        self.cross_checks.push(Arc::new(check));
        self
    }

    /// Adds renamed and retired keys (see [`KeyChange`]): each layer (platform, adapters,
    /// application) names its own.
    pub fn key_changes(mut self, changes: &[KeyChange]) -> Self {
        self.key_changes.extend_from_slice(changes);
        self
    }

    /// The newest `config_version` this configuration may declare ([`CONFIG_VERSION`]
    /// unless set).
    pub fn format_version(mut self, version: u32) -> Self {
        self.format_version = version;
        self
    }

    /// Merges `overrides` (a database's) over the file and under the environment.
    pub fn overrides(mut self, overrides: Overrides) -> Self {
        self.overrides = Some(overrides);
        self
    }

    /// Uses `vars` instead of the process environment for `PLBA__...` overrides.
    pub fn env(mut self, vars: HashMap<String, String>) -> Self {
        self.env = Some(vars);
        self
    }

    /// Reads and validates the configuration.
    pub fn load(self, origin: ConfigOrigin) -> Result<ConfigurationManager, ConfigReport> {
        let mut manager = ConfigurationManager {
            origin,
            overrides: RwLock::new(self.overrides),
            env: self.env,
            validators: self.validators,
            cross_checks: self.cross_checks,
            key_changes: self.key_changes,
            format_version: self.format_version,
            loaded: RwLock::new(Loaded {
                root: Arc::new(serde_json::Value::Null),
                platform: PlatformConfig::default(),
                warnings: Vec::new(),
            }),
            subscribers: Mutex::new(Vec::new()),
        };
        let overrides = manager.overrides();
        let loaded = manager.read_and_validate(overrides.as_ref())?;
        manager.loaded = RwLock::new(loaded);
        Ok(manager)
    }
}

impl ConfigurationManager {
    /// A builder, to claim sections and set the environment.
    pub fn builder() -> ConfigBuilder {
        ConfigBuilder::default()
    }

    /// The platform sections as validated.
    pub fn platform(&self) -> PlatformConfig {
        self.read_lock().platform.clone()
    }

    /// What the configuration in force was warned of: old keys read under their new names,
    /// retired keys ignored.
    pub fn warnings(&self) -> Vec<ConfigProblem> {
        self.read_lock().warnings.clone()
    }

    /// The renamed and retired keys this configuration knows.
    pub fn key_changes(&self) -> &[KeyChange] {
        &self.key_changes
    }

    /// The whole configuration as validated.
    pub fn root(&self) -> Arc<serde_json::Value> {
        Arc::clone(&self.read_lock().root)
    }

    /// Where it came from.
    pub fn origin(&self) -> &ConfigOrigin {
        &self.origin
    }

    /// Reads the origin again and validates it; if valid, replaces the current configuration
    /// and notifies the subscribers of every changed section. Returns the changed dotted
    /// keys, leaf by leaf (`pools.orders.workers`). On any problem nothing changes.
    pub fn reload(&self) -> Result<Vec<String>, ConfigReport> {
        self.reload_with(self.overrides())
    }

    /// The database overrides in force, if any.
    pub fn overrides(&self) -> Option<Overrides> {
        self.overrides
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Checks the configuration with `overrides` in place of the current ones, changing
    /// nothing: every problem, or none.
    pub fn check_with(&self, overrides: Option<&Overrides>) -> Result<(), ConfigReport> {
        self.read_and_validate(overrides).map(|_| ())
    }

    /// [`ConfigurationManager::reload`] with `overrides` in place of the current ones: on any
    /// problem nothing changes, and the overrides in force stay.
    pub fn reload_with(&self, overrides: Option<Overrides>) -> Result<Vec<String>, ConfigReport> {
        let fresh = self.read_and_validate(overrides.as_ref())?;
        *self.overrides.write().unwrap_or_else(|e| e.into_inner()) = overrides;
        let old = self.root();
        let mut changed = Vec::new();
        diff_keys(&old, &fresh.root, "", usize::MAX, &mut changed);
        let new_root = Arc::clone(&fresh.root);
        *self.loaded.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        let subscribers = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        for (path, subscriber) in subscribers.iter() {
            let before = lookup(&old, path);
            let after = lookup(&new_root, path);
            if before != after {
                subscriber(after.unwrap_or(&serde_json::Value::Null));
            }
        }
        Ok(changed)
    }

    fn read_lock(&self) -> std::sync::RwLockReadGuard<'_, Loaded> {
        self.loaded.read().unwrap_or_else(|e| e.into_inner())
    }

    fn read_and_validate(&self, overrides: Option<&Overrides>) -> Result<Loaded, ConfigReport> {
        let origin = match overrides {
            Some(o) => format!("{} + {}", self.origin, o.name),
            None => self.origin.to_string(),
        };
        let report = |problems| ConfigReport {
            origin: origin.clone(),
            problems,
        };
        let layer = overrides
            .map(|o| o.to_toml_versioned(&self.key_changes, self.format_version))
            .transpose()
            .map_err(report)?;
        let (layer, warnings) = layer.unzip();
        let mut root = self
            .read_root(layer.as_deref())
            .map_err(|p| report(vec![p]))?;
        let versioned = versions::apply(&mut root, &self.key_changes, self.format_version);
        let mut problems = self.unclaimed_keys(&root);
        let (platform, platform_problems) = PlatformConfig::from_root(&root);
        problems.extend(platform_problems);
        for (key, validator) in &self.validators {
            problems.extend(validator(lookup(&root, key)));
        }
        for check in &self.cross_checks {
            problems.extend(check(&root));
        }
        versions::replace_unknown(&mut problems, &versioned);
        let mut warnings = warnings.unwrap_or_default();
        warnings.extend(versioned.warnings);
        match platform {
            Some(platform) if problems.is_empty() => Ok(Loaded {
                root: Arc::new(root),
                platform,
                warnings,
            }),
            _ => Err(report(problems)),
        }
    }

    fn read_root(&self, overrides: Option<&str>) -> Result<serde_json::Value, ConfigProblem> {
        use config::{Config, Environment, File, FileFormat};
        let mut builder = Config::builder();
        builder = match &self.origin {
            ConfigOrigin::File(path) => {
                if !path.is_file() {
                    return Err(ConfigProblem::new(
                        "(file)",
                        format!("configuration file {} not found", path.display()),
                    ));
                }
                builder.add_source(File::from(path.as_path()).format(FileFormat::Toml))
            }
            ConfigOrigin::Embedded { text, .. } => {
                builder.add_source(File::from_str(text, FileFormat::Toml))
            }
        };
        if let Some(text) = overrides {
            builder = builder.add_source(File::from_str(text, FileFormat::Toml));
        }
        let env = Environment::with_prefix("PLBA")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .source(self.env.clone());
        builder = builder.add_source(env);
        let built = builder
            .build()
            .map_err(|e| ConfigProblem::new("(syntax)", without_source_lines(&e.to_string())))?;
        built
            .try_deserialize::<serde_json::Value>()
            .map_err(|e| ConfigProblem::new("(syntax)", without_source_lines(&e.to_string())))
    }

    fn unclaimed_keys(&self, root: &serde_json::Value) -> Vec<ConfigProblem> {
        let mut known: BTreeSet<&str> = [
            VERSION_KEY,
            "runtime",
            "pools",
            "telemetry",
            "reconcile",
            "retention",
        ]
        .into_iter()
        .collect();
        let mut nested: BTreeSet<(&str, &str)> = BTreeSet::new();
        for (key, _) in &self.validators {
            match key.split_once('.') {
                Some((top, child)) => {
                    nested.insert((top, child));
                }
                None => {
                    known.insert(key);
                }
            }
        }
        let Some(map) = root.as_object() else {
            return vec![ConfigProblem::new("(root)", "must be a table")];
        };
        let mut problems = Vec::new();
        for (top, value) in map {
            if known.contains(top.as_str()) {
                continue;
            }
            let children: Vec<&str> = nested
                .iter()
                .filter(|(t, _)| *t == top)
                .map(|(_, c)| *c)
                .collect();
            // `apps` is the platform's home for application sections: report its children.
            if children.is_empty() && top != "apps" {
                problems.push(ConfigProblem::new(top.clone(), "unknown section"));
                continue;
            }
            if let Some(inner) = value.as_object() {
                for child in inner.keys() {
                    if !children.contains(&child.as_str()) {
                        problems.push(ConfigProblem::new(
                            format!("{top}.{child}"),
                            "unknown section",
                        ));
                    }
                }
            }
        }
        problems
    }
}

impl ConfigProvider for ConfigurationManager {
    fn section(&self, path: &str) -> Option<serde_json::Value> {
        lookup(&self.read_lock().root, path).cloned()
    }

    fn subscribe(&self, path: &str, subscriber: ConfigSubscriber) {
        self.subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((path.to_owned(), subscriber));
    }
}

/// The value at dotted `path`; the empty path is the root.
pub fn lookup<'a>(root: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    if path.is_empty() {
        return Some(root);
    }
    path.split('.').try_fold(root, |v, key| v.get(key))
}

fn diff_keys(
    old: &serde_json::Value,
    new: &serde_json::Value,
    prefix: &str,
    depth: usize,
    out: &mut Vec<String>,
) {
    if old == new {
        return;
    }
    let (Some(a), Some(b), true) = (old.as_object(), new.as_object(), depth > 0) else {
        out.push(prefix.to_owned());
        return;
    };
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for key in keys {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        let null = serde_json::Value::Null;
        diff_keys(
            a.get(key).unwrap_or(&null),
            b.get(key).unwrap_or(&null),
            &path,
            depth - 1,
            out,
        );
    }
}
