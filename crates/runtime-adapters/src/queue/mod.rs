//! Queue adapters.

#[cfg(feature = "queue-memory")]
pub mod memory;

#[cfg(feature = "queue-redis")]
pub mod redis;

#[cfg(feature = "queue-amqp")]
pub mod amqp;

#[cfg(any(feature = "queue-redis", feature = "queue-amqp"))]
pub(crate) mod signing;

/// The encrypted link of a broker URL: `secure` is whether its scheme is the TLS one
/// (`rediss://`, `amqps://`); `ca_file` a PEM bundle of the CAs trusted for it instead of the
/// public (WebPKI) roots. Problems: a `ca_file` on a plain link (it would protect nothing), one
/// that cannot be read or holds no certificate, and certificate checks turned off.
#[cfg(any(feature = "queue-redis", feature = "queue-amqp"))]
pub(crate) fn link_problems(
    prefix: &str,
    url: &str,
    secure_scheme: &str,
    ca_file: Option<&std::path::Path>,
) -> Vec<runtime_contracts::ConfigProblem> {
    use runtime_contracts::ConfigProblem;
    let mut problems = Vec::new();
    let secure = url.starts_with(secure_scheme);
    if secure && url.contains("#insecure") {
        problems.push(ConfigProblem::new(
            format!("{prefix}.url"),
            "#insecure turns certificate checks off; trust a private CA with ca_file instead",
        ));
    }
    if let Some(path) = ca_file {
        if !secure {
            problems.push(ConfigProblem::new(
                format!("{prefix}.ca_file"),
                format!("needs a {secure_scheme} URL: a plain link is not encrypted"),
            ));
        } else if let Err(why) = read_ca_file(path) {
            problems.push(ConfigProblem::new(format!("{prefix}.ca_file"), why));
        }
    }
    problems
}

/// The PEM text of a CA bundle: at most 1 MiB, with at least one certificate. The error
/// names the file.
#[cfg(any(feature = "queue-redis", feature = "queue-amqp"))]
pub(crate) fn read_ca_file(path: &std::path::Path) -> Result<String, String> {
    const MAX: u64 = 1 << 20;
    let size = std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    if size > MAX {
        return Err(format!("{} is larger than 1 MiB", path.display()));
    }
    let pem = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(pem)
}

/// A named fault point of the fault suite (`failpoints` feature; nothing without it). Its
/// actions are the `fail` crate's (`panic`, `sleep(ms)`, `pause`, ...); `return` makes the
/// operation fail as unavailable, `return(abort)` aborts the process there, as `kill -9`
/// would.
#[allow(dead_code)]
pub(crate) fn fault(name: &str) -> Result<(), runtime_contracts::QueueError> {
    let _ = name;
    fail::fail_point!(name, |arg| {
        if arg.as_deref() == Some("abort") {
            std::process::abort();
        }
        Err(runtime_contracts::QueueError::Unavailable(format!(
            "fault point {name}"
        )))
    });
    Ok(())
}

/// Decodes a task envelope read from a broker: at most `max_bytes`, UTF-8 JSON of a known
/// schema version; otherwise why not (the entry is dead-lettered as `undecodable`).
#[cfg(any(feature = "queue-redis", feature = "queue-amqp"))]
pub(crate) fn decode_envelope(
    raw: &[u8],
    max_bytes: usize,
) -> Result<runtime_contracts::Task, String> {
    use runtime_contracts::Task;
    if raw.len() > max_bytes {
        return Err(format!(
            "envelope of {} bytes is above the {max_bytes}-byte cap",
            raw.len()
        ));
    }
    let Ok(text) = std::str::from_utf8(raw) else {
        return Err("envelope is not UTF-8".into());
    };
    match serde_json::from_str::<Task>(text) {
        Ok(task) if task.schema_version == Task::SCHEMA_VERSION => Ok(task),
        Ok(task) => Err(format!(
            "unknown envelope schema version {}",
            task.schema_version
        )),
        Err(e) => Err(format!("envelope does not decode: {e}")),
    }
}

#[cfg(all(test, any(feature = "queue-redis", feature = "queue-amqp")))]
mod tests {
    use super::decode_envelope;

    #[test]
    fn envelopes_of_another_version_or_shape_are_refused_with_why() {
        let task =
            runtime_contracts::Task::new("t", "job", "src", serde_json::json!({})).expect("task");
        let mut value = serde_json::to_value(&task).expect("json");
        assert!(decode_envelope(value.to_string().as_bytes(), 4096).is_ok());
        value["schema_version"] = serde_json::json!(99);
        let refused = decode_envelope(value.to_string().as_bytes(), 4096);
        assert_eq!(
            refused.err().as_deref(),
            Some("unknown envelope schema version 99")
        );
        assert!(decode_envelope(b"{not json", 4096)
            .is_err_and(|e| e.starts_with("envelope does not decode")));
        assert!(decode_envelope(&[0xff, 0xfe], 4096).is_err_and(|e| e.contains("UTF-8")));
        assert!(decode_envelope(&[b' '; 5000], 4096).is_err_and(|e| e.contains("cap")));
    }
}

/// Readiness of a queue's server: `check` must succeed within 2 s. Liveness is always `Up`
/// (an outage of a shared server turns readiness down, never liveness). `what` names the
/// server in the reasons ("redis", "amqp broker").
#[cfg(any(feature = "queue-redis", feature = "queue-amqp"))]
pub(crate) async fn server_readiness(
    probe: runtime_contracts::Probe,
    what: &str,
    check: impl std::future::Future<Output = Result<(), runtime_contracts::QueueError>>,
) -> runtime_contracts::HealthStatus {
    use runtime_contracts::HealthStatus;
    if probe == runtime_contracts::Probe::Liveness {
        return HealthStatus::Up;
    }
    match tokio::time::timeout(std::time::Duration::from_secs(2), check).await {
        Ok(Ok(())) => HealthStatus::Up,
        Ok(Err(e)) => HealthStatus::Down {
            reason: format!("{what} unavailable: {e}"),
        },
        Err(_) => HealthStatus::Down {
            reason: format!("{what} did not answer within 2 s"),
        },
    }
}
