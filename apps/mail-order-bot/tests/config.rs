//! Bad configurations are reported with their keys, all at once, before anything starts.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use mail_order_bot::compose::load_config;

fn valid(dir: &Path) -> String {
    std::fs::create_dir_all(dir.join("maildir/new")).expect("new");
    std::fs::create_dir_all(dir.join("maildir/cur")).expect("cur");
    format!(
        r#"
[runtime]
shutdown_deadline_ms = 1000

[queue]
type = "memory"

[pools.orders]
workers = 2
handler_timeout_ms = 5000

[sources.inbox]
type = "maildir"
path = "{maildir}"
pool = "orders"

[apps.mail_order_bot]
store_url = "sqlite://{db}"
sender_auth = {{ mode = "off" }}

[[apps.mail_order_bot.clients]]
id = "C-1"
name = "Acme"
domains = ["acme.example"]
"#,
        maildir = dir.join("maildir").display(),
        db = dir.join("orders.db").display(),
    )
}

/// Writes `text` as a config file and returns the problem keys and messages it produces.
fn problems(dir: &Path, text: &str) -> Vec<(String, String)> {
    let path = dir.join("bot.toml");
    std::fs::write(&path, text).expect("write config");
    match load_config(Some(&path), Some(HashMap::new())) {
        Ok(_) => Vec::new(),
        Err(report) => report
            .problems
            .into_iter()
            .map(|p| (p.key, p.message))
            .collect(),
    }
}

fn check(mutate: impl Fn(&str) -> String, expected_key: &str, expected_words: &str) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let text = mutate(&valid(tmp.path()));
    let got = problems(tmp.path(), &text);
    assert!(
        got.iter()
            .any(|(k, m)| k == expected_key && m.contains(expected_words)),
        "expected {expected_key}: …{expected_words}…, got {got:#?}"
    );
}

#[test]
fn the_valid_base_config_is_valid() {
    let tmp = tempfile::tempdir().expect("tempdir");
    assert_eq!(problems(tmp.path(), &valid(tmp.path())), vec![]);
}

#[test]
fn each_bad_config_is_reported_with_its_key() {
    type Mutation = Box<dyn Fn(&str) -> String>;
    std::env::set_var("PLBA_TEST_EMPTY_HOOK_SECRET", "");
    let cases: Vec<(&str, Mutation, &str, &str)> = vec![
        (
            "syntax error",
            Box::new(|t: &str| t.replace("workers = 2", "workers = = 2")),
            "(syntax)",
            "",
        ),
        (
            "unknown key",
            Box::new(|t: &str| t.replace("workers = 2", "workers = 2\nwokers = 3")),
            "pools.orders.wokers",
            "unknown key",
        ),
        (
            "a retry schedule beside the exponential backoff",
            Box::new(|t: &str| {
                t.replace(
                    "handler_timeout_ms = 5000",
                    "handler_timeout_ms = 5000\n[pools.orders.retry]\nschedule = [\"1m\"]\njitter = 0.1",
                )
            }),
            "pools.orders.retry.schedule",
            "remove jitter or the schedule",
        ),
        (
            "max_attempts beside a retry schedule",
            Box::new(|t: &str| {
                t.replace(
                    "handler_timeout_ms = 5000",
                    "handler_timeout_ms = 5000\nmax_attempts = 9\n[pools.orders.retry]\nschedule = [\"1m\", \"5m\"]",
                )
            }),
            "pools.orders.max_attempts",
            "makes 3 attempts",
        ),
        (
            "a retry step that is no duration",
            Box::new(|t: &str| {
                t.replace(
                    "handler_timeout_ms = 5000",
                    "handler_timeout_ms = 5000\n[pools.orders.retry]\nschedule = [\"1m\", \"five minutes\"]",
                )
            }),
            "pools.orders.retry.schedule[1]",
            "is not a duration",
        ),
        (
            "unknown section",
            Box::new(|t: &str| format!("{t}\n[telemetrie]\nx = 1\n")),
            "telemetrie",
            "unknown section",
        ),
        (
            "sampling ratio above 1",
            Box::new(|t: &str| {
                format!(
                    "{t}\n[telemetry]\nendpoint = \"http://localhost:4317\"\nsampling_ratio = 2\n"
                )
            }),
            "telemetry.sampling_ratio",
            "between 0 and 1",
        ),
        (
            "unknown OTLP protocol",
            Box::new(|t: &str| format!("{t}\n[telemetry]\nprotocol = \"udp\"\n")),
            "telemetry.protocol",
            "unknown variant",
        ),
        (
            "collector that is no URL",
            Box::new(|t: &str| format!("{t}\n[telemetry]\nendpoint = \"localhost:4317\"\n")),
            "telemetry.endpoint",
            "not an http:// or https:// URL",
        ),
        (
            "header from an unset variable",
            Box::new(|t: &str| {
                format!("{t}\n[telemetry]\nheaders = {{ authorization = \"PLBA_TEST_NO_SUCH_VARIABLE\" }}\n")
            }),
            "telemetry.headers.authorization",
            "PLBA_TEST_NO_SUCH_VARIABLE is not set",
        ),
        (
            "wrong type",
            Box::new(|t: &str| t.replace("workers = 2", "workers = \"four\"")),
            "pools.orders.workers",
            "invalid type",
        ),
        (
            "unknown log format",
            Box::new(|t: &str| {
                t.replace(
                    "shutdown_deadline_ms = 1000",
                    "shutdown_deadline_ms = 1000\nlog_format = \"xml\"",
                )
            }),
            "runtime.log_format",
            "unknown variant",
        ),
        (
            "zero workers",
            Box::new(|t: &str| t.replace("workers = 2", "workers = 0")),
            "pools.orders.workers",
            "needs a queue other processes share",
        ),
        (
            "negative timeout",
            Box::new(|t: &str| t.replace("handler_timeout_ms = 5000", "handler_timeout_ms = -5")),
            "pools.orders.handler_timeout_ms",
            "invalid value",
        ),
        (
            "missing maildir",
            Box::new(|t: &str| t.replace("/maildir\"", "/no-such-maildir\"")),
            "sources.inbox.path",
            "is not a maildir",
        ),
        (
            "maildir path key missing",
            Box::new(|t: &str| {
                t.lines()
                    .filter(|l| !l.starts_with("path ="))
                    .collect::<Vec<_>>()
                    .join("\n")
            }),
            "sources.inbox",
            "missing field `path`",
        ),
        (
            "unknown source type",
            Box::new(|t: &str| t.replace("type = \"maildir\"", "type = \"pop3\"")),
            "sources.inbox.type",
            "unknown source type",
        ),
        (
            "schedule with a bad cron expression",
            Box::new(|t: &str| {
                format!("{t}\n[sources.sweep]\ntype = \"schedule\"\ncron = \"0 61 * * * *\"\npool = \"orders\"\n")
            }),
            "sources.sweep.cron",
            "is not a cron expression",
        ),
        (
            "schedule in an unknown time zone",
            Box::new(|t: &str| {
                format!("{t}\n[sources.sweep]\ntype = \"schedule\"\ncron = \"0 * * * * *\"\ntime_zone = \"Europe/Atlantis\"\npool = \"orders\"\n")
            }),
            "sources.sweep.time_zone",
            "is not an IANA time zone",
        ),
        (
            "reconcile names an unknown source",
            Box::new(|t: &str| format!("{t}\n[reconcile]\nsources = [\"outbox\"]\n")),
            "reconcile.sources",
            "\"outbox\" is not a configured source",
        ),
        (
            "graph auth on a plain JSON webhook",
            Box::new(|t: &str| {
                format!("{t}\n[sources.hook]\ntype = \"webhook\"\nbind = \"127.0.0.1:0\"\npool = \"orders\"\nallow_volatile_queue = true\n[sources.hook.auth]\ntype = \"graph_client_state\"\nclient_state_env = \"HOME\"\n")
            }),
            "sources.hook.auth",
            "graph_client_state goes with format = \"graph\"",
        ),
        (
            "a webhook secret that is set but empty",
            Box::new(|t: &str| {
                format!("{t}\n[sources.hook]\ntype = \"webhook\"\nbind = \"127.0.0.1:0\"\npool = \"orders\"\nallow_volatile_queue = true\n[sources.hook.auth]\ntype = \"shared_secret\"\nheader = \"x-token\"\nsecret_env = \"PLBA_TEST_EMPTY_HOOK_SECRET\"\n")
            }),
            "sources.hook.auth",
            "secret 1 is empty",
        ),
        (
            "a short control token",
            Box::new(|t: &str| {
                format!("{t}\n[control]\nenabled = true\nadmin_tokens = [\"short-token\"]\n")
            }),
            "control.admin_tokens",
            "token 1 has 11 bytes; at least 32",
        ),
        (
            "the shipped placeholder token",
            Box::new(|t: &str| {
                format!("{t}\n[control]\nenabled = true\nread_tokens = [\"change-me-read-0000000000000000000000\"]\n")
            }),
            "control.read_tokens",
            "is a placeholder",
        ),
        (
            "source names a pool that does not exist",
            Box::new(|t: &str| t.replace("pool = \"orders\"", "pool = \"invoices\"")),
            "sources.inbox.pool",
            "neither configured under [pools]",
        ),
        (
            "bad client address",
            Box::new(|t: &str| t.replace("domains = [\"acme.example\"]", "addresses = [\"acme\"]")),
            "apps.mail_order_bot.clients[0].addresses[0]",
            "not an email address",
        ),
        (
            "control plane on a public address without tokens",
            Box::new(|t: &str| {
                format!("{t}\n[control]\nenabled = true\nbind = \"0.0.0.0:8080\"\n")
            }),
            "control.bind",
            "refusing to listen on non-loopback",
        ),
        (
            "control plane bind is not an address",
            Box::new(|t: &str| format!("{t}\n[control]\nbind = \"localhost\"\n")),
            "control.bind",
            "is not an address",
        ),
        (
            "an AMQP URL that is not one",
            Box::new(|t: &str| {
                t.replace(
                    "type = \"memory\"",
                    "type = \"amqp\"\nurl = \"redis://127.0.0.1\"",
                )
            }),
            "queue.url",
            "not an amqp://",
        ),
        (
            "an unknown AMQP queue kind",
            Box::new(|t: &str| {
                t.replace(
                    "type = \"memory\"",
                    "type = \"amqp\"\nqueue_kind = \"stream\"",
                )
            }),
            "queue.queue_kind",
            "unknown variant",
        ),
        (
            "an unknown AMQP key",
            Box::new(|t: &str| t.replace("type = \"memory\"", "type = \"amqp\"\nprefech = 3")),
            "queue.prefech",
            "unknown key",
        ),
        (
            "an unknown queue type",
            Box::new(|t: &str| t.replace("type = \"memory\"", "type = \"kafka\"")),
            "queue.type",
            "\"amqp\"",
        ),
        (
            "unsupported store",
            Box::new(|t: &str| t.replace("sqlite://", "mysql://")),
            "apps.mail_order_bot.store_url",
            "not supported",
        ),
        (
            "a limit of zero",
            Box::new(|t: &str| {
                t.replace(
                    "[apps.mail_order_bot]",
                    "[apps.mail_order_bot]\nsheet_max_cells = 0",
                )
            }),
            "apps.mail_order_bot.sheet_max_cells",
            "at least 1",
        ),
        (
            "missing clients file",
            Box::new(|t: &str| {
                t.replace(
                    "[apps.mail_order_bot]",
                    "[apps.mail_order_bot]\nclients_file = \"/no/such/clients.csv\"",
                )
            }),
            "apps.mail_order_bot.clients_file",
            "/no/such/clients.csv",
        ),
        (
            "a helper memory limit too small to start one",
            Box::new(|t: &str| {
                t.replace(
                    "[apps.mail_order_bot]",
                    "[apps.mail_order_bot]\nparse_memory_mb = 16",
                )
            }),
            "apps.mail_order_bot.parse_memory_mb",
            "at least 64",
        ),
        (
            "a parse timeout of zero",
            Box::new(|t: &str| {
                t.replace(
                    "[apps.mail_order_bot]",
                    "[apps.mail_order_bot]\nparse_timeout_ms = 0",
                )
            }),
            "apps.mail_order_bot.parse_timeout_ms",
            "at least 1",
        ),
        (
            "an unknown isolation",
            Box::new(|t: &str| {
                t.replace(
                    "[apps.mail_order_bot]",
                    "[apps.mail_order_bot]\nparse_isolation = \"sandbox\"",
                )
            }),
            "apps.mail_order_bot.parse_isolation",
            "unknown variant",
        ),
    ];
    for (name, mutate, key, words) in cases {
        eprintln!("case: {name}");
        check(mutate, key, words);
    }
}

#[test]
fn several_problems_are_all_reported_at_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let text = valid(tmp.path())
        .replace("workers = 2", "workers = 0\nwokers = 1")
        .replace(
            "shutdown_deadline_ms = 1000",
            "shutdown_deadline_ms = \"soon\"",
        )
        .replace("/maildir\"", "/no-such-maildir\"")
        .replace("domains = [\"acme.example\"]", "domains = [\"nodot\"]");
    let keys: Vec<String> = problems(tmp.path(), &text)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    for expected in [
        "pools.orders.wokers",
        "pools.orders.workers",
        "runtime.shutdown_deadline_ms",
        "sources.inbox.path",
        "apps.mail_order_bot.clients[0].domains[0]",
    ] {
        assert!(
            keys.iter().any(|k| k == expected),
            "{expected} missing from {keys:?}"
        );
    }
}

#[test]
fn environment_overrides_win_and_are_validated_too() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("bot.toml");
    std::fs::write(&path, valid(tmp.path())).expect("write");
    let env = HashMap::from([("PLBA__POOLS__ORDERS__WORKERS".to_owned(), "7".to_owned())]);
    let manager = load_config(Some(&path), Some(env)).expect("valid");
    assert_eq!(manager.platform().pools["orders"].workers, 7);
    let env = HashMap::from([("PLBA__POOLS__ORDERS__WORKERS".to_owned(), "0".to_owned())]);
    let report = load_config(Some(&path), Some(env)).expect_err("0 workers from env");
    assert_eq!(report.problems[0].key, "pools.orders.workers");
}

#[test]
fn the_cli_exits_non_zero_and_starts_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let text = valid(tmp.path()).replace("workers = 2", "workers = 0\nwokers = 1");
    let path = tmp.path().join("bad.toml");
    std::fs::write(&path, text).expect("write");
    let bin = env!("CARGO_BIN_EXE_mail-order-bot");

    let check = Command::new(bin)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .expect("run check-config");
    assert_eq!(check.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(
        stderr.contains("pools.orders.workers: 0 workers needs a queue other processes share"),
        "{stderr}"
    );
    assert!(
        stderr.contains("pools.orders.wokers: unknown key"),
        "{stderr}"
    );

    let run = Command::new(bin)
        .args(["run", "--once", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(run.status.code(), Some(2));
    assert!(
        !tmp.path().join("orders.db").exists(),
        "nothing was started"
    );

    let good = tmp.path().join("good.toml");
    std::fs::write(&good, valid(tmp.path())).expect("write");
    let ok = Command::new(bin)
        .args(["check-config", "--config"])
        .arg(&good)
        .output()
        .expect("run check-config");
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[test]
fn imap_sources_are_checked_with_every_problem_named() {
    use mail_order_bot::compose::{source_config, SourceConfig};
    let good = serde_json::json!({
        "type": "imap_idle", "host": "mail.example", "port": 993, "tls": "implicit",
        "user": "orders", "password_env": "PATH", "pool": "orders"
    });
    assert!(matches!(
        source_config("inbox", &good),
        Ok(SourceConfig::Imap(
            _,
            runtime_adapters::sources::imap::ImapMode::Idle
        ))
    ));
    let mut bad = good.clone();
    bad["idle_reissue_secs"] = serde_json::json!(1800);
    bad["connections"] = serde_json::json!(10);
    bad["password_env"] = serde_json::json!("PLBA_NO_SUCH_VARIABLE_SET");
    bad["failed_keyword"] = serde_json::json!("bad keyword");
    bad["tls"] = serde_json::json!("sometimes");
    let problems = source_config("inbox", &bad).expect_err("problems");
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        ["sources.inbox.tls"],
        "a wrong enum value is reported alone first: {problems:?}"
    );
    bad["tls"] = serde_json::json!("starttls");
    let problems = source_config("inbox", &bad).expect_err("problems");
    let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
    for (key, words) in [
        ("sources.inbox.idle_reissue_secs", "below 29 minutes"),
        ("sources.inbox.connections", "max_connections"),
        (
            "sources.inbox.password_env",
            "PLBA_NO_SUCH_VARIABLE_SET is not set",
        ),
        ("sources.inbox.failed_keyword", "not an IMAP keyword"),
    ] {
        assert!(
            text.iter().any(|t| t.contains(key) && t.contains(words)),
            "{key}: {words} missing from {text:?}"
        );
    }
    let mut unknown = good;
    unknown["type"] = serde_json::json!("pop3");
    let problems = source_config("inbox", &unknown).expect_err("unknown type");
    assert!(problems[0].to_string().contains("imap_idle"));
}

#[test]
fn the_shipped_configs_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config");
    for name in ["default.toml", "imap.toml", "replicas.toml"] {
        let out = Command::new(env!("CARGO_BIN_EXE_mail-order-bot"))
            .args(["check-config", "--config"])
            .arg(dir.join(name))
            .env("ORDERS_IMAP_PASSWORD", "not-used")
            // replicas.toml listens on all interfaces, which needs tokens (from a Secret).
            .env(
                "PLBA_CONTROL_ADMIN_TOKENS",
                "admin-token-1-4b8e2d6f0a3c9e17b5d2",
            )
            .env(
                "PLBA_CONTROL_READ_TOKENS",
                "read-token-1-7c1f0e9b2d4a6f835e21",
            )
            .output()
            .expect("check-config");
        assert_eq!(
            out.status.code(),
            Some(0),
            "config/{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The Kubernetes manifest for replicas carries config/replicas.toml as it is.
#[test]
fn the_replicas_manifest_carries_the_replicas_config() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let config = std::fs::read_to_string(root.join("config/replicas.toml")).expect("config");
    let manifest =
        std::fs::read_to_string(root.join("deploy/kubernetes-replicas.yaml")).expect("manifest");
    let start = manifest
        .find("  bot.toml: |\n")
        .expect("bot.toml in the ConfigMap")
        + 14;
    let end = manifest[start..]
        .find("\n---")
        .expect("end of the ConfigMap")
        + start
        + 1;
    let embedded: String = manifest[start..end]
        .lines()
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    assert_eq!(embedded, config);
    assert!(manifest.contains("replicas: 3") && config.contains("replicas = 3"));
}

#[test]
fn the_outbox_pools_are_not_held_to_the_main_queues_lease() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let redis = valid(tmp.path()).replace(
        "type = \"memory\"",
        "type = \"redis\"\nurl = \"redis://127.0.0.1:1\"\nclaim_min_idle_ms = 10000",
    );
    // The outbox pools lease rows from the order store (their default handler timeout is
    // 30 s, over the Redis claim time): nothing to say.
    let outbox_pools = format!(
        "{redis}\n[pools.outbox.retry]\ninitial_backoff_ms = 100\n\n[pools.replies.retry]\ninitial_backoff_ms = 100\n"
    );
    assert_eq!(problems(tmp.path(), &outbox_pools), vec![]);
    // A pool that does lease from Redis is.
    let got = problems(
        tmp.path(),
        &format!("{redis}\n[pools.other]\nworkers = 1\n"),
    );
    assert!(
        got.iter()
            .any(|(k, m)| k == "queue.claim_min_idle_ms"
                && m.contains("pools.other.handler_timeout_ms")),
        "{got:#?}"
    );
}

#[test]
fn a_retention_schedule_that_is_no_cron_expression_is_named() {
    check(
        |t| format!("{t}\n[retention]\nschedule = \"every night\"\n"),
        "retention.schedule",
        "every night",
    );
}

/// A syntax error names the line and column, never the line's text: it may hold a token or
/// a URL with its password, and the message reaches logs, `/status` and HTTP answers.
#[test]
fn a_syntax_error_does_not_echo_the_line() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let text = valid(tmp.path()).replacen(
        "[apps.mail_order_bot]",
        "[control]\nadmin_tokens = [\"the-secret-admin-token-0123456789abcdef\"\n\n[apps.mail_order_bot]",
        1,
    );
    let path = tmp.path().join("bad.toml");
    std::fs::write(&path, text).expect("write");
    let err = load_config(Some(&path), Some(HashMap::new())).expect_err("a syntax error");
    let shown = err.to_string();
    assert!(
        shown.contains("(syntax)") && shown.contains("line"),
        "{shown}"
    );
    assert!(!shown.contains("the-secret-admin-token"), "{shown}");
}

/// `config_version`: a file without it predates versioning, and an old key it uses is
/// read under its new name with a warning; a file of version 1 gets a problem naming the
/// new key (not `unknown key`); a version this release does not read is refused; and
/// `check-config --explain` prints any key's line of the README's table.
#[test]
fn configs_are_versioned_and_any_key_is_explained() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let amqp = valid(tmp.path()).replace(
        "[queue]\ntype = \"memory\"",
        "[queue]\ntype = \"amqp\"\nurl = \"amqp://guest:guest@127.0.0.1:5672/%2f\"\nmax_message_bytes = 4096",
    );
    assert!(
        amqp.contains("max_message_bytes"),
        "the queue section was changed"
    );
    let bin = env!("CARGO_BIN_EXE_mail-order-bot");
    let check = |text: &str, args: &[&str]| {
        let path = tmp.path().join("versioned.toml");
        std::fs::write(&path, text).expect("write");
        let out = Command::new(bin)
            .arg("check-config")
            .args(args)
            .arg("--config")
            .arg(&path)
            .output()
            .expect("check-config");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (code, out, err) = check(&amqp, &[]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        err.contains("warning: queue.max_message_bytes: renamed to queue.max_entry_bytes in config_version 1; read as queue.max_entry_bytes"),
        "{err}"
    );
    let path = tmp.path().join("versioned.toml");
    let manager = load_config(Some(&path), Some(HashMap::new())).expect("valid");
    assert_eq!(
        manager.root()["queue"]["max_entry_bytes"],
        4096,
        "read under its new name"
    );

    let (code, _, err) = check(&format!("config_version = 1\n{amqp}"), &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(
            "queue.max_message_bytes: renamed to queue.max_entry_bytes in config_version 1"
        ),
        "{err}"
    );
    assert!(
        !err.contains("unknown key"),
        "one problem per old key: {err}"
    );

    let current = format!("config_version = 1\n{}", valid(tmp.path()));
    assert_eq!(check(&current, &[]).0, Some(0));
    for (version, words) in [
        ("2", "newer than this release reads"),
        ("0", "whole number"),
        ("\"1\"", "whole number"),
    ] {
        let (code, _, err) = check(
            &current.replacen(
                "config_version = 1",
                &format!("config_version = {version}"),
                1,
            ),
            &[],
        );
        assert_eq!(code, Some(2), "{version}: {err}");
        assert!(
            err.contains("config_version:") && err.contains(words),
            "{version}: {err}"
        );
    }

    // --explain: the key's line, for the type its section has in the configuration.
    let (code, out, _) = check(&current, &["--explain", "pools.orders.max_attempts"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("`max_attempts` (5)") && out.contains("[pools.NAME]"),
        "{out}"
    );
    let (code, out, _) = check(&current, &["--explain", "sources.inbox.poll_interval_ms"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("(1000)") && out.contains("maildir") && !out.contains("imap_poll"),
        "the maildir row only: {out}"
    );
    let (code, out, _) = check(&amqp, &["--explain", "queue.max_message_bytes"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("renamed to queue.max_entry_bytes")
            && out.contains("`max_entry_bytes` (65536"),
        "{out}"
    );
    let (code, _, err) = check(&current, &["--explain", "pools.orders.wokers"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("pools.orders.wokers: no such key is documented"),
        "{err}"
    );
}
