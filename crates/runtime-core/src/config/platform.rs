//! The platform's own configuration sections: `[runtime]` and `[pools.<name>]`.

use std::collections::BTreeMap;
use std::time::Duration;

use runtime_contracts::config::{parse_section, parse_section_with_unknown, require_positive};
use runtime_contracts::ConfigProblem;
use serde::{Deserialize, Serialize};

use crate::retry::RetryPolicy;
use crate::telemetry::TelemetryConfig;

/// The format of the process's log lines on stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message`, `fields`,
    /// `spans` (outermost first, each with its name and fields), and `trace_id` and
    /// `span_id` (W3C hex) when the event happened inside a traced span.
    Json,
}

/// `[runtime]`: lifecycle settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RuntimeConfig {
    /// How long in-flight work may take to finish at shutdown before it is given back to
    /// its queue, in milliseconds.
    pub shutdown_deadline_ms: u64,
    /// Log filter in `tracing` syntax (`info`, `mail_order_bot=debug,info`). `RUST_LOG`
    /// wins when set.
    pub log: String,
    /// `text` (the default: one readable line per event) or `json` (one JSON object per
    /// line, with the trace and span ids of the event's task, for a log pipeline).
    pub log_format: LogFormat,
    /// A source is not ready when its last successful scan, poll or event is older than
    /// this, in milliseconds.
    pub source_progress_bound_ms: u64,
    /// A pool is not ready when its queue holds work and no task has settled for this
    /// long, in milliseconds.
    pub pool_progress_bound_ms: u64,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            shutdown_deadline_ms: 10_000,
            log: "info".to_owned(),
            log_format: LogFormat::Text,
            source_progress_bound_ms: 60_000,
            pool_progress_bound_ms: 300_000,
        }
    }
}

/// `[pools.<name>]`: one worker pool and the queue it consumes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PoolConfig {
    /// Concurrent workers. 0 runs none in this process: its sources only publish, for
    /// other processes that share the queue (Redis or AMQP) to handle.
    pub workers: usize,
    /// Longest a handler may run for one attempt, in milliseconds; then the attempt fails.
    pub handler_timeout_ms: u64,
    /// Attempts before a task is dead-lettered (the first delivery counts).
    pub max_attempts: u32,
    /// Sources feeding this pool stop fetching while queued plus in-flight work is at or
    /// above this many tasks.
    pub high_watermark: usize,
    /// Tasks a worker leases at once (then handles one after another). 1 spreads work most
    /// evenly and suits heavy tasks such as mail; raise it for pools of many small tasks, where
    /// one round trip to the queue per task would dominate.
    pub prefetch: usize,
    /// Delays between attempts: exponential backoff, or a stepped `schedule`.
    pub retry: RetryPolicy,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            workers: 4,
            handler_timeout_ms: 30_000,
            max_attempts: 5,
            high_watermark: 256,
            prefetch: 1,
            retry: RetryPolicy::default(),
        }
    }
}

impl PoolConfig {
    /// The handler timeout as a duration.
    pub fn handler_timeout(&self) -> Duration {
        Duration::from_millis(self.handler_timeout_ms)
    }

    /// With a retry schedule the attempts are its steps plus one: `max_attempts` is set
    /// so, and one written beside the schedule is a problem.
    fn scheduled_attempts(&mut self, prefix: &str, raw: &serde_json::Value) -> Vec<ConfigProblem> {
        let steps = self.retry.schedule.len();
        if steps == 0 {
            return Vec::new();
        }
        let attempts = u32::try_from(steps).unwrap_or(u32::MAX).saturating_add(1);
        self.max_attempts = attempts;
        if raw.get("max_attempts").is_some() {
            return vec![ConfigProblem::new(
                format!("{prefix}.max_attempts"),
                format!(
                    "the retry schedule of {steps} steps makes {attempts} attempts (the first and one after each step); leave max_attempts out"
                ),
            )];
        }
        Vec::new()
    }

    fn problems(&self, prefix: &str) -> Vec<ConfigProblem> {
        let mut problems = require_positive(
            prefix,
            &[
                ("handler_timeout_ms", self.handler_timeout_ms),
                ("max_attempts", u64::from(self.max_attempts)),
                ("high_watermark", self.high_watermark as u64),
            ],
        );
        if self.workers > 1024 {
            problems.push(ConfigProblem::new(
                format!("{prefix}.workers"),
                "must be at most 1024",
            ));
        }
        if !(1..=1024).contains(&self.prefetch) {
            problems.push(ConfigProblem::new(
                format!("{prefix}.prefetch"),
                "must be between 1 and 1024",
            ));
        }
        problems.extend(self.retry.problems(&format!("{prefix}.retry")));
        problems
    }
}

/// The platform sections, typed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PlatformConfig {
    /// `[runtime]`.
    pub runtime: RuntimeConfig,
    /// `[pools.<name>]`, by name.
    pub pools: BTreeMap<String, PoolConfig>,
    /// `[telemetry]`.
    pub telemetry: TelemetryConfig,
    /// `[reconcile]`: the reconciliation sweep, when configured.
    pub reconcile: Option<crate::reconcile::ReconcileConfig>,
    /// `[retention]`: how long records are kept (the sweep runs on a schedule's tasks of
    /// its kind).
    pub retention: crate::retention::RetentionConfig,
}

impl PlatformConfig {
    /// Reads and checks `[runtime]`, `[pools]` and `[telemetry]` from the whole configuration, collecting
    /// every problem.
    pub fn from_root(root: &serde_json::Value) -> (Option<Self>, Vec<ConfigProblem>) {
        let mut problems = Vec::new();
        let runtime = match root.get("runtime") {
            None => Some(RuntimeConfig::default()),
            Some(v) => parse_section::<RuntimeConfig>(v, "runtime")
                .map_err(|p| problems.extend(p))
                .ok(),
        };
        let telemetry = match root.get("telemetry") {
            None => Some(TelemetryConfig::default()),
            Some(v) => match parse_section::<TelemetryConfig>(v, "telemetry") {
                Ok(t) => {
                    problems.extend(t.problems());
                    Some(t)
                }
                Err(p) => {
                    problems.extend(p);
                    None
                }
            },
        };
        let reconcile = root.get("reconcile").and_then(|v| {
            let (cfg, parse_problems) =
                parse_section_with_unknown::<crate::reconcile::ReconcileConfig>(v, "reconcile");
            problems.extend(parse_problems);
            if let Some(cfg) = &cfg {
                problems.extend(cfg.problems(root));
            }
            cfg
        });
        let retention = match root.get("retention") {
            None => crate::retention::RetentionConfig::default(),
            Some(v) => {
                let (cfg, parse_problems) =
                    parse_section_with_unknown::<crate::retention::RetentionConfig>(v, "retention");
                problems.extend(parse_problems);
                let cfg = cfg.unwrap_or_default();
                problems.extend(cfg.problems());
                cfg
            }
        };
        let mut pools = BTreeMap::new();
        match root.get("pools") {
            None => {}
            Some(serde_json::Value::Object(map)) => {
                for (name, value) in map {
                    let key = format!("pools.{name}");
                    let (pool, parse_problems) =
                        parse_section_with_unknown::<PoolConfig>(value, &key);
                    problems.extend(parse_problems);
                    if let Some(mut pool) = pool {
                        problems.extend(pool.problems(&key));
                        if let Some(retry) = value.get("retry") {
                            problems
                                .extend(RetryPolicy::raw_problems(&format!("{key}.retry"), retry));
                        }
                        problems.extend(pool.scheduled_attempts(&key, value));
                        pools.insert(name.clone(), pool);
                    }
                }
            }
            Some(_) => problems.push(ConfigProblem::new("pools", "must be a table of pools")),
        }
        if let Some(rt) = &runtime {
            problems.extend(require_positive(
                "runtime",
                &[
                    ("shutdown_deadline_ms", rt.shutdown_deadline_ms),
                    ("source_progress_bound_ms", rt.source_progress_bound_ms),
                    ("pool_progress_bound_ms", rt.pool_progress_bound_ms),
                ],
            ));
            if tracing_subscriber::EnvFilter::try_new(&rt.log).is_err() {
                problems.push(ConfigProblem::new(
                    "runtime.log",
                    format!(
                        "{:?} is not a log filter (e.g. \"info\" or \"mail_order_bot=debug,warn\")",
                        rt.log
                    ),
                ));
            }
        }
        match (runtime, telemetry) {
            (Some(runtime), Some(telemetry)) if problems.is_empty() => (
                Some(Self {
                    runtime,
                    pools,
                    telemetry,
                    reconcile,
                    retention,
                }),
                problems,
            ),
            _ => (None, problems),
        }
    }
}
