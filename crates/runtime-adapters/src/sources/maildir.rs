//! A Maildir as Dovecot and Postfix write it: `tmp/`, `new/`, `cur/`; a message's file name
//! is `unique` in `new/` and `unique:2,FLAGS` in `cur/` (flags sorted ASCII letters).
//!
//! Publishes one pointer task per message in `new/` and per message in `cur/` without the
//! `S` (seen) flag. Completion moves the file to `cur/` with `S` added to its flags, keeping
//! the others; failed and dead-lettered messages stay unseen.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use runtime_contracts::{
    BoxFuture, ConfigProblem, Disposition, SourceContext, SourceError, SourceStatus, Task,
    TaskSource,
};
use serde::Deserialize;

/// `[sources.<id>]` with `type = "maildir"`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct MaildirConfig {
    /// The Maildir folder (holding `new/`, `cur/` and `tmp/`).
    pub path: PathBuf,
    /// The pool whose queue receives the tasks.
    pub pool: String,
    /// Kind of the published tasks.
    #[serde(default = "default_kind")]
    pub kind: String,
    /// Pause between scans, in milliseconds.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// Create `new/`, `cur/` and `tmp/` when missing, instead of refusing to start.
    #[serde(default)]
    pub create_if_missing: bool,
    /// Largest message the source will hand to a handler, in bytes.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: u64,
}

/// Pointers published per call to the queue (one round trip for a durable queue).
const PUBLISH_CHUNK: usize = 32;

fn default_kind() -> String {
    "mail.message".to_owned()
}
fn default_poll_interval_ms() -> u64 {
    1_000
}
fn default_max_message_bytes() -> u64 {
    25 * 1024 * 1024
}

impl MaildirConfig {
    /// Problems with these values, keyed under `prefix`.
    pub fn problems(&self, prefix: &str) -> Vec<ConfigProblem> {
        let mut problems = runtime_contracts::config::require_positive(
            prefix,
            &[
                ("poll_interval_ms", self.poll_interval_ms),
                ("max_message_bytes", self.max_message_bytes),
            ],
        );
        if !self.create_if_missing {
            for sub in ["new", "cur"] {
                if !self.path.join(sub).is_dir() {
                    problems.push(ConfigProblem::new(
                        format!("{prefix}.path"),
                        format!(
                            "{} is not a maildir (no {sub}/ folder); set create_if_missing = true to create it",
                            self.path.display()
                        ),
                    ));
                    break;
                }
            }
        }
        problems
    }
}

/// Splits a Maildir file name into its unique part and its flags.
fn split_name(name: &str) -> (&str, Option<&str>) {
    for sep in [":2,", "!2,"] {
        if let Some((unique, flags)) = name.split_once(sep) {
            return (unique, Some(flags));
        }
    }
    (name, None)
}

/// The file name with the `S` flag added, other flags kept, sorted as the spec requires.
fn seen_name(unique: &str, flags: Option<&str>) -> String {
    let mut set: Vec<char> = flags.unwrap_or("").chars().collect();
    if !set.contains(&'S') {
        set.push('S');
    }
    set.sort_unstable();
    set.dedup();
    format!("{unique}:2,{}", set.into_iter().collect::<String>())
}

#[derive(Default)]
struct Inner {
    progress: super::Progress,
    located: HashMap<String, PathBuf>,
}

/// The Maildir source. See the module docs.
pub struct MaildirSource {
    id: String,
    shared_id: std::sync::Arc<str>,
    kind: std::sync::Arc<str>,
    config: MaildirConfig,
    poll_interval_ms: std::sync::atomic::AtomicU64,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for MaildirSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MaildirSource")
            .field("id", &self.id)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

struct Candidate {
    unique: String,
    path: PathBuf,
    size: u64,
}

impl MaildirSource {
    /// A source reading `config.path`.
    pub fn new(id: impl Into<String>, config: MaildirConfig) -> Self {
        let id: String = id.into();
        Self {
            shared_id: id.as_str().into(),
            kind: config.kind.as_str().into(),
            poll_interval_ms: std::sync::atomic::AtomicU64::new(config.poll_interval_ms),
            id,
            config,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn io_error(&self, what: &str, e: io::Error) -> SourceError {
        SourceError::Io {
            source_id: self.id.clone(),
            message: format!("{what}: {e}"),
        }
    }

    fn task_id(&self, unique: &str) -> String {
        format!("maildir:{}:{unique}", self.id)
    }

    fn unique_of(&self, task: &Task) -> Result<String, SourceError> {
        task.payload
            .get("unique")
            .and_then(|u| u.as_str())
            .filter(|u| !u.is_empty() && !u.contains(['/', '\\']) && *u != "." && *u != "..")
            .map(str::to_owned)
            .ok_or_else(|| SourceError::InvalidPointer {
                source_id: self.id.clone(),
                message: format!("task {} has no usable `unique` file name", task.id),
            })
    }

    fn ensure_layout(&self) -> Result<(), SourceError> {
        for sub in ["tmp", "new", "cur"] {
            let dir = self.config.path.join(sub);
            if self.config.create_if_missing {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| self.io_error(&format!("creating {}", dir.display()), e))?;
            } else if !dir.is_dir() {
                return Err(self.io_error(
                    &format!("{} is missing", dir.display()),
                    io::Error::from(io::ErrorKind::NotFound),
                ));
            }
        }
        Ok(())
    }

    /// Every unseen message now in `new/` and `cur/`, oldest name first.
    fn scan(&self) -> Result<Vec<Candidate>, SourceError> {
        let mut found = Vec::new();
        let mut located = HashMap::new();
        for sub in ["new", "cur"] {
            let dir = self.config.path.join(sub);
            let entries = std::fs::read_dir(&dir)
                .map_err(|e| self.io_error(&format!("reading {}", dir.display()), e))?;
            for entry in entries {
                let entry = entry.map_err(|e| self.io_error("reading a directory entry", e))?;
                let Ok(name) = entry.file_name().into_string() else {
                    tracing::warn!(source = %self.id, file = ?entry.file_name(), "skipping a file whose name is not UTF-8");
                    continue;
                };
                if name.starts_with('.') {
                    continue;
                }
                let (unique, flags) = split_name(&name);
                let path = entry.path();
                located.insert(unique.to_owned(), path.clone());
                if flags.is_some_and(|f| f.contains('S')) {
                    continue;
                }
                let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
                found.push(Candidate {
                    unique: unique.to_owned(),
                    path,
                    size,
                });
            }
        }
        found.sort_by(|a, b| a.unique.cmp(&b.unique));
        self.lock().located = located;
        Ok(found)
    }

    /// Finds the message's current file, whatever its flags.
    fn locate(&self, unique: &str) -> Result<Option<PathBuf>, SourceError> {
        let known = self.lock().located.get(unique).cloned();
        if let Some(path) = known.filter(|p| p.exists()) {
            return Ok(Some(path));
        }
        let direct = self.config.path.join("new").join(unique);
        if direct.exists() {
            return Ok(Some(direct));
        }
        let cur = self.config.path.join("cur");
        let entries = std::fs::read_dir(&cur)
            .map_err(|e| self.io_error(&format!("reading {}", cur.display()), e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_str().map(|n| split_name(n).0) == Some(unique) {
                return Ok(Some(entry.path()));
            }
        }
        Ok(None)
    }

    /// The pointer task of a message.
    fn task_for(&self, candidate: &Candidate) -> Result<Task, SourceError> {
        let payload = serde_json::json!({"unique": candidate.unique, "size": candidate.size});
        Task::new(
            self.task_id(&candidate.unique),
            std::sync::Arc::clone(&self.kind),
            std::sync::Arc::clone(&self.shared_id),
            payload,
        )
        .map_err(|e| SourceError::InvalidPointer {
            source_id: self.id.clone(),
            message: e.to_string(),
        })
    }

    async fn publish_new(&self, ctx: &SourceContext) -> Result<(), SourceError> {
        let candidates = self.scan()?;
        let mut chunk: Vec<(String, Task)> = Vec::with_capacity(PUBLISH_CHUNK);
        // The traces of the chunk's tasks: their publish spans end once it is published.
        let mut traces = Vec::with_capacity(PUBLISH_CHUNK);
        for candidate in candidates {
            if self.lock().progress.pending.contains(&candidate.unique) {
                continue;
            }
            // Checked after `pending`: a completion renames first, then forgets the pointer,
            // so a message completed since the listing is gone from its listed path here.
            if !candidate.path.exists() {
                continue;
            }
            let mut task = self.task_for(&candidate)?;
            traces.push(ctx.tracer.start_trace(&mut task, "scan", &*ctx.queue));
            chunk.push((candidate.unique, task));
            if chunk.len() == PUBLISH_CHUNK {
                let published = self.publish_chunk(ctx, &mut chunk).await?;
                traces.clear();
                if !published {
                    return Ok(());
                }
            }
        }
        self.publish_chunk(ctx, &mut chunk).await?;
        drop(traces);
        Ok(())
    }

    /// Publishes a chunk of pointers in one call once the pool has capacity; false when
    /// shutdown came first (nothing of the chunk was published).
    async fn publish_chunk(
        &self,
        ctx: &SourceContext,
        chunk: &mut Vec<(String, Task)>,
    ) -> Result<bool, SourceError> {
        super::publish_reserved(ctx, chunk, |f| f(&mut self.lock().progress))
            .await
            .map_err(|e| SourceError::Io {
                source_id: self.id.clone(),
                message: format!("publishing failed, messages left unread: {e}"),
            })
    }

    async fn run(&self, ctx: SourceContext) -> Result<(), SourceError> {
        self.ensure_layout()?;
        self.lock().progress.running();
        let mut failures = 0u32;
        while !ctx.shutdown.is_cancelled() {
            let interval = Duration::from_millis(
                self.poll_interval_ms
                    .load(std::sync::atomic::Ordering::Relaxed),
            );
            let pause = match self.publish_new(&ctx).await {
                Ok(()) => {
                    failures = 0;
                    self.lock().progress.progressed();
                    interval
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(source = %self.id, error = %e, "maildir scan failed; retrying");
                    self.lock().progress.degraded(e.to_string());
                    interval.saturating_mul(failures.min(30))
                }
            };
            tokio::select! {
                _ = ctx.shutdown.cancelled() => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        self.lock().progress.stopped();
        Ok(())
    }

    /// Changes the pause between scans while the source runs (configuration reload).
    pub fn set_poll_interval_ms(&self, ms: u64) {
        if ms > 0 {
            self.poll_interval_ms
                .store(ms, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn mark_seen(&self, unique: &str) -> Result<(), SourceError> {
        let Some(path) = self.locate(unique)? else {
            tracing::warn!(source = %self.id, unique, "message gone before it could be marked seen");
            return Ok(());
        };
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(unique)
            .to_owned();
        let (_, flags) = split_name(&name);
        let in_cur = path.parent() == Some(&self.config.path.join("cur"));
        if in_cur && flags.is_some_and(|f| f.contains('S')) {
            return Ok(());
        }
        let target = self.config.path.join("cur").join(seen_name(unique, flags));
        std::fs::rename(&path, &target)
            .map_err(|e| self.io_error(&format!("marking {} seen", path.display()), e))?;
        self.lock().located.insert(unique.to_owned(), target);
        Ok(())
    }
}

impl TaskSource for MaildirSource {
    fn id(&self) -> &str {
        &self.id
    }

    /// `poll_interval_ms` applies at the next pause; any other change is refused (the
    /// folder and the tasks' kind and pool are fixed for the process).
    fn reconfigure(&self, section: &serde_json::Value) -> runtime_contracts::Reconfigure {
        use runtime_contracts::Reconfigure;
        let (kind, new) = match super::typed_section::<MaildirConfig>(section) {
            Ok(read) => read,
            Err(e) => return Reconfigure::Refused(e),
        };
        if kind != "maildir" {
            return Reconfigure::Refused(format!(
                "source {} cannot change its type from maildir to {kind} while it runs",
                self.id
            ));
        }
        let same_otherwise = MaildirConfig {
            poll_interval_ms: self.config.poll_interval_ms,
            ..new.clone()
        };
        if same_otherwise != self.config {
            return Reconfigure::Refused(format!(
                "source {}: only poll_interval_ms changes while it runs; the other settings take effect after a restart",
                self.id
            ));
        }
        self.set_poll_interval_ms(new.poll_interval_ms);
        Reconfigure::Applied
    }

    fn start(&self, ctx: SourceContext) -> BoxFuture<'_, Result<(), SourceError>> {
        Box::pin(self.run(ctx))
    }

    fn status(&self) -> SourceStatus {
        self.lock().progress.status()
    }

    fn load_content<'a>(
        &'a self,
        task: &'a Task,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, SourceError>> {
        Box::pin(async move {
            let unique = self.unique_of(task)?;
            let Some(path) = self.locate(&unique)? else {
                return Ok(None);
            };
            let size = match tokio::fs::metadata(&path).await {
                Ok(m) => m.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(self.io_error(&format!("reading {}", path.display()), e)),
            };
            if size > self.config.max_message_bytes {
                return Err(SourceError::TooLarge {
                    source_id: self.id.clone(),
                    size,
                    limit: self.config.max_message_bytes,
                });
            }
            match tokio::fs::read(&path).await {
                Ok(bytes) => Ok(Some(bytes)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(self.io_error(&format!("reading {}", path.display()), e)),
            }
        })
    }

    fn complete<'a>(&'a self, task: &'a Task) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            let unique = self.unique_of(task)?;
            self.mark_seen(&unique)?;
            self.lock().progress.completed(&unique);
            Ok(())
        })
    }

    fn release(&self, task: &Task, disposition: Disposition) {
        // A dead-lettered message stays pending: it must not come back on the next scan.
        if disposition == Disposition::Returned {
            if let Ok(unique) = self.unique_of(task) {
                self.lock().progress.pending.remove(&unique);
            }
        }
    }

    /// Unseen messages whose file was last changed at least `older_than` ago.
    fn unsettled(
        &self,
        older_than: Duration,
        max: usize,
    ) -> BoxFuture<'_, Result<Vec<Task>, SourceError>> {
        Box::pin(async move {
            let now = std::time::SystemTime::now();
            let mut tasks = Vec::new();
            for candidate in self.scan()? {
                if tasks.len() == max {
                    break;
                }
                let age = std::fs::metadata(&candidate.path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| now.duration_since(t).ok());
                if age.is_some_and(|a| a >= older_than) {
                    tasks.push(self.task_for(&candidate)?);
                }
            }
            Ok(tasks)
        })
    }
}

/// Whether the Maildir holds a message with this unique name, in `new/` or `cur/`, seen or not.
pub fn holds(maildir: &Path, unique: &str) -> bool {
    ["new", "cur"].iter().any(|sub| {
        std::fs::read_dir(maildir.join(sub)).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_str().map(|n| split_name(n).0) == Some(unique))
        })
    })
}

/// Delivers a message the way an MDA does (write to `tmp/`, rename into `new/`): for tests
/// and tools that deliver mail.
pub fn deliver(maildir: &Path, unique: &str, bytes: &[u8]) -> io::Result<PathBuf> {
    for sub in ["tmp", "new", "cur"] {
        std::fs::create_dir_all(maildir.join(sub))?;
    }
    let tmp = maildir.join("tmp").join(unique);
    std::fs::write(&tmp, bytes)?;
    let target = maildir.join("new").join(unique);
    std::fs::rename(&tmp, &target)?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_flag_is_added_and_other_flags_kept_sorted() {
        assert_eq!(seen_name("u", None), "u:2,S");
        assert_eq!(seen_name("u", Some("")), "u:2,S");
        assert_eq!(seen_name("u", Some("RF")), "u:2,FRS");
        assert_eq!(seen_name("u", Some("TS")), "u:2,ST");
    }

    #[test]
    fn names_split_at_the_info_separator() {
        assert_eq!(split_name("1.M2P3.host"), ("1.M2P3.host", None));
        assert_eq!(split_name("1.M2P3.host:2,FS"), ("1.M2P3.host", Some("FS")));
        assert_eq!(split_name("1.M2P3.host!2,"), ("1.M2P3.host", Some("")));
    }
}
