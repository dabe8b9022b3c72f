//! Configuration overrides kept in a database table (`config-sql` feature), SQLite or
//! PostgreSQL: `[config_store]` names the database; each row is a dotted key and a TOML
//! value (`pools.orders.workers` = `8`, `sources.inbox.search` = `"UNSEEN"`).
//!
//! The runtime merges them over the file and under the environment, and validates the
//! result exactly like the file. A watcher polls the table's version (the highest row
//! version and the row count, so an insert, an update and a delete all show) and reloads:
//! an invalid change is refused as a whole and the configuration before it stays in force.
//!
//! ```sql
//! CREATE TABLE plba_config (key TEXT PRIMARY KEY, value TEXT NOT NULL,
//!                           version BIGINT NOT NULL, updated_at TEXT NOT NULL,
//!                           config_version BIGINT NOT NULL DEFAULT 1);
//! ```

use std::sync::Once;
use std::time::Duration;

use runtime_contracts::ConfigProblem;
use serde::Deserialize;
use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Row};

/// `[config_store]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ConfigStoreConfig {
    /// `sqlite://PATH` or `postgres://USER@HOST/DB`.
    pub url: String,
    /// The table (created when missing).
    #[serde(default = "default_table")]
    pub table: String,
    /// How often the table's version is read, in milliseconds.
    #[serde(default = "default_poll")]
    pub poll_interval_ms: u64,
    /// More key patterns a row may set, besides the tuning keys of
    /// [`runtime_core::config::OVERRIDABLE`] (`*` is one segment; hosts, credentials, tokens,
    /// addresses and paths cannot be allowed).
    #[serde(default)]
    pub allow: Vec<String>,
}

fn default_table() -> String {
    "plba_config".into()
}
fn default_poll() -> u64 {
    1_000
}

impl ConfigStoreConfig {
    /// Problems with these values, keyed under `prefix`.
    pub fn problems(&self, prefix: &str) -> Vec<ConfigProblem> {
        let mut problems = runtime_contracts::config::require_positive(
            prefix,
            &[("poll_interval_ms", self.poll_interval_ms)],
        );
        for (i, pattern) in self.allow.iter().enumerate() {
            if runtime_core::config::never_overridable(pattern) {
                problems.push(ConfigProblem::new(
                    format!("{prefix}.allow[{i}]"),
                    format!("{pattern:?} names a host, a credential, a token, an address or a path: those are set in the file only"),
                ));
            }
        }
        if !["sqlite:", "postgres://", "postgresql://"]
            .iter()
            .any(|s| self.url.starts_with(s))
        {
            problems.push(ConfigProblem::new(
                format!("{prefix}.url"),
                "must be sqlite://PATH or postgres://USER@HOST/DB",
            ));
        }
        let identifier = self
            .table
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && self
                .table
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !identifier {
            problems.push(ConfigProblem::new(
                format!("{prefix}.table"),
                "must be a plain SQL name (letters, digits, _)",
            ));
        }
        problems
    }
}

/// What went wrong with the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigStoreError {
    /// The database could not be reached or refused a statement.
    #[error("configuration store {url}: {message}")]
    Database {
        /// The store (its URL without a password).
        url: String,
        /// What failed.
        message: String,
    },
}

/// One override as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredOverride {
    /// The dotted key.
    pub key: String,
    /// Its TOML value text.
    pub value: String,
    /// The row's version.
    pub version: i64,
    /// The `config_version` the row was written for (rows older than the column: 1).
    pub config_version: u32,
}

/// The table of overrides. See the module docs.
#[derive(Debug, Clone)]
pub struct SqlConfigStore {
    pool: AnyPool,
    table: String,
    name: String,
    poll: Duration,
    allow: Vec<String>,
}

use crate::secret::redact_url as redacted;

impl SqlConfigStore {
    /// Opens the database and creates the table when it is missing.
    pub async fn open(config: &ConfigStoreConfig) -> Result<Self, ConfigStoreError> {
        static DRIVERS: Once = Once::new();
        DRIVERS.call_once(sqlx::any::install_default_drivers);
        let url = match config.url.strip_prefix("sqlite://") {
            Some(path) if !path.contains('?') => format!("sqlite://{path}?mode=rwc"),
            _ => config.url.clone(),
        };
        let name = format!("database {}", redacted(&config.url));
        let failed = |e: sqlx::Error| ConfigStoreError::Database {
            url: redacted(&config.url),
            message: e.to_string(),
        };
        let pool = AnyPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&url)
            .await
            .map_err(failed)?;
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {} (key TEXT PRIMARY KEY, value TEXT NOT NULL, \
             version BIGINT NOT NULL, updated_at TEXT NOT NULL, \
             config_version BIGINT NOT NULL DEFAULT 1)",
            config.table
        ))
        .execute(&pool)
        .await
        .map_err(failed)?;
        // A table made before rows recorded their config_version: its rows are version 1.
        let versioned = sqlx::query(&format!(
            "SELECT config_version FROM {} WHERE 1 = 0",
            config.table
        ))
        .fetch_all(&pool)
        .await;
        if versioned.is_err() {
            sqlx::query(&format!(
                "ALTER TABLE {} ADD COLUMN config_version BIGINT NOT NULL DEFAULT 1",
                config.table
            ))
            .execute(&pool)
            .await
            .map_err(failed)?;
        }
        Ok(Self {
            pool,
            table: config.table.clone(),
            name,
            poll: Duration::from_millis(config.poll_interval_ms),
            allow: config.allow.clone(),
        })
    }

    /// The store, for messages (`database postgres://bot:[redacted]@db/orders`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How often the watcher reads the version.
    pub fn poll_interval(&self) -> Duration {
        self.poll
    }

    fn failed(&self, e: sqlx::Error) -> ConfigStoreError {
        ConfigStoreError::Database {
            url: self.name.trim_start_matches("database ").to_owned(),
            message: e.to_string(),
        }
    }

    /// The table's version: changes with every insert, update and delete.
    pub async fn version(&self) -> Result<String, ConfigStoreError> {
        let row = sqlx::query(&format!(
            "SELECT CAST(COALESCE(MAX(version), 0) AS BIGINT) AS v, CAST(COUNT(*) AS BIGINT) AS n FROM {}",
            self.table
        ))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| self.failed(e))?;
        let (v, n): (i64, i64) = (
            row.try_get("v").map_err(|e| self.failed(e))?,
            row.try_get("n").map_err(|e| self.failed(e))?,
        );
        Ok(format!("{v}.{n}"))
    }

    /// Every override, by key.
    pub async fn list(&self) -> Result<Vec<StoredOverride>, ConfigStoreError> {
        let rows = sqlx::query(&format!(
            "SELECT key, value, version, config_version FROM {} ORDER BY key",
            self.table
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.failed(e))?;
        rows.iter()
            .map(|row| {
                Ok(StoredOverride {
                    key: row.try_get("key").map_err(|e| self.failed(e))?,
                    value: row.try_get("value").map_err(|e| self.failed(e))?,
                    version: row.try_get("version").map_err(|e| self.failed(e))?,
                    config_version: row
                        .try_get::<i64, _>("config_version")
                        .map_err(|e| self.failed(e))
                        .map(|v| u32::try_from(v).unwrap_or(u32::MAX))?,
                })
            })
            .collect()
    }

    /// The overrides with their version, as the configuration merges them. The version is
    /// read first: a change made while reading shows as a newer version next time.
    pub async fn read(&self) -> Result<runtime_core::Overrides, ConfigStoreError> {
        let version = self.version().await?;
        let rows = self.list().await?;
        let config_versions = rows
            .iter()
            .map(|o| (o.key.clone(), o.config_version))
            .collect();
        let entries = rows.into_iter().map(|o| (o.key, o.value)).collect();
        Ok(runtime_core::Overrides {
            name: self.name.clone(),
            version,
            entries,
            config_versions,
            allowed: self.allow.clone(),
        })
    }

    /// Sets `key` to the TOML value text `value` (the caller validated it), written for
    /// this release's `config_version`.
    pub async fn set(&self, key: &str, value: &str) -> Result<(), ConfigStoreError> {
        let t = &self.table;
        sqlx::query(&format!(
            "INSERT INTO {t} (key, value, version, updated_at, config_version) \
             VALUES ($1, $2, (SELECT COALESCE(MAX(version), 0) + 1 FROM {t}), $3, $4) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, \
             version = excluded.version, updated_at = excluded.updated_at, \
             config_version = excluded.config_version"
        ))
        .bind(key)
        .bind(value)
        .bind(crate::now_unix_ms().to_string())
        .bind(i64::from(runtime_core::config::CONFIG_VERSION))
        .execute(&self.pool)
        .await
        .map_err(|e| self.failed(e))?;
        Ok(())
    }

    /// Removes `key`; false when it was not there.
    pub async fn unset(&self, key: &str) -> Result<bool, ConfigStoreError> {
        let done = sqlx::query(&format!("DELETE FROM {} WHERE key = $1", self.table))
            .bind(key)
            .execute(&self.pool)
            .await
            .map_err(|e| self.failed(e))?;
        Ok(done.rows_affected() > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table made before rows recorded their `config_version` gets the column (its rows
    /// are version 1); `set` writes this release's version; a row written for a newer
    /// version than this release reads is refused with its key, the others read.
    #[tokio::test]
    async fn rows_record_the_config_version_they_were_written_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("config.db").display());
        {
            DRIVERS_FOR_TEST.call_once(sqlx::any::install_default_drivers);
            let pool = sqlx::any::AnyPoolOptions::new()
                .connect(&format!("{url}?mode=rwc"))
                .await
                .expect("db");
            sqlx::query("CREATE TABLE plba_config (key TEXT PRIMARY KEY, value TEXT NOT NULL, version BIGINT NOT NULL, updated_at TEXT NOT NULL)")
                .execute(&pool).await.expect("old table");
            sqlx::query("INSERT INTO plba_config VALUES ('pools.orders.workers', '3', 1, '0')")
                .execute(&pool)
                .await
                .expect("old row");
        }
        let cfg = ConfigStoreConfig {
            url: url.clone(),
            table: default_table(),
            poll_interval_ms: 1000,
            allow: Vec::new(),
        };
        let store = SqlConfigStore::open(&cfg).await.expect("open");
        let rows = store.list().await.expect("list");
        assert_eq!(
            (rows[0].key.as_str(), rows[0].config_version),
            ("pools.orders.workers", 1)
        );
        store.set("pools.orders.prefetch", "8").await.expect("set");
        sqlx::query("UPDATE plba_config SET config_version = 7 WHERE key = 'pools.orders.workers'")
            .execute(&store.pool)
            .await
            .expect("a newer row");
        let overrides = store.read().await.expect("read");
        assert_eq!(
            overrides.config_versions["pools.orders.prefetch"],
            runtime_core::config::CONFIG_VERSION
        );
        let problems = overrides
            .to_toml_versioned(&[], runtime_core::config::CONFIG_VERSION)
            .expect_err("a row of version 7");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, "pools.orders.workers");
        assert!(
            problems[0].message.contains("written for config_version 7"),
            "{problems:?}"
        );
    }

    static DRIVERS_FOR_TEST: Once = Once::new();

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(
            redacted("postgres://bot:s3cret@db:5432/orders"),
            "postgres://bot:[redacted]@db:5432/orders"
        );
        assert_eq!(redacted("sqlite://var/config.db"), "sqlite://var/config.db");
    }

    #[test]
    fn table_names_are_plain() {
        let cfg = |table: &str| ConfigStoreConfig {
            url: "sqlite://x.db".into(),
            table: table.into(),
            poll_interval_ms: 1000,
            allow: Vec::new(),
        };
        assert!(cfg("plba_config").problems("config_store").is_empty());
        assert_eq!(
            cfg("x; DROP TABLE orders").problems("config_store")[0].key,
            "config_store.table"
        );
    }

    #[test]
    fn hosts_credentials_and_paths_cannot_be_allowed() {
        let cfg = |allow: &[&str]| ConfigStoreConfig {
            url: "sqlite://x.db".into(),
            table: "plba_config".into(),
            poll_interval_ms: 1000,
            allow: allow.iter().map(|s| (*s).to_owned()).collect(),
        };
        assert!(cfg(&["apps.mail_order_bot.csv_max_rows"])
            .problems("config_store")
            .is_empty());
        for bad in [
            "sources.*.host",
            "control.admin_tokens",
            "sources.inbox.password_file",
            "control.bind",
            "apps.mail_order_bot.store_url",
            "apps.mail_order_bot.seed_samples_into",
        ] {
            let problems = cfg(&[bad]).problems("config_store");
            assert_eq!(problems.len(), 1, "{bad}");
            assert_eq!(problems[0].key, "config_store.allow[0]");
        }
    }
}
