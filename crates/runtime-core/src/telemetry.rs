//! Trace export over OTLP: the `[telemetry]` section, the exporter behind a bounded
//! buffer, and the counters of exported and dropped spans.
//!
//! Spans go from the `tracing` layer to OpenTelemetry's batch processor through a gate
//! that admits at most `max_queue_spans` spans not yet exported: when the collector is
//! slow or unreachable, spans beyond that are dropped and counted, and no worker ever
//! waits for the collector.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, Span, SpanData,
    SpanExporter, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use prometheus_client::metrics::counter::Counter;
use runtime_contracts::ConfigProblem;
use serde::{Deserialize, Serialize};

/// How spans travel to the collector.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum OtlpProtocol {
    /// OTLP over gRPC (a collector's port 4317).
    #[default]
    #[serde(rename = "grpc")]
    Grpc,
    /// OTLP over HTTP with protobuf bodies (port 4318, path `/v1/traces`).
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

/// `[telemetry]`: where traces go. Without `endpoint`, nothing is exported (trace ids
/// still join logs and task headers).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TelemetryConfig {
    /// The collector's OTLP endpoint, e.g. `http://localhost:4317` (gRPC) or
    /// `http://localhost:4318` (HTTP; `/v1/traces` is added when no path is given).
    pub endpoint: Option<String>,
    /// `grpc` (the default) or `http/protobuf`.
    pub protocol: OtlpProtocol,
    /// Headers sent with every export, each naming the environment variable that holds its
    /// value (`authorization = "OTLP_AUTH"`), so secrets stay out of the file.
    /// `OTEL_EXPORTER_OTLP_HEADERS` is honoured too.
    pub headers: BTreeMap<String, String>,
    /// Share of traces kept, from 0 to 1, decided where a trace starts (a source) and
    /// followed by every span of it, in every process.
    pub sampling_ratio: f64,
    /// `service.name` of the spans; the application's name when unset.
    pub service_name: Option<String>,
    /// More resource attributes (`deployment.environment = "prod"`).
    pub resource: BTreeMap<String, String>,
    /// Most spans buffered for export; beyond it spans are dropped and counted in
    /// `plba_spans_dropped_total`.
    pub max_queue_spans: usize,
    /// Longest one export may take, and longest the flush at shutdown waits, in
    /// milliseconds.
    pub export_timeout_ms: u64,
    /// Longest a span waits in the buffer before its batch is sent, in milliseconds.
    pub batch_delay_ms: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            protocol: OtlpProtocol::Grpc,
            headers: BTreeMap::new(),
            sampling_ratio: 1.0,
            service_name: None,
            resource: BTreeMap::new(),
            max_queue_spans: 8192,
            export_timeout_ms: 5_000,
            batch_delay_ms: 1_000,
        }
    }
}

impl TelemetryConfig {
    /// Problems of a parsed section (keys prefixed with `telemetry.`).
    pub fn problems(&self) -> Vec<ConfigProblem> {
        let mut problems = runtime_contracts::config::require_positive(
            "telemetry",
            &[
                ("max_queue_spans", self.max_queue_spans as u64),
                ("export_timeout_ms", self.export_timeout_ms),
                ("batch_delay_ms", self.batch_delay_ms),
            ],
        );
        if let Some(endpoint) = &self.endpoint {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                problems.push(ConfigProblem::new(
                    "telemetry.endpoint",
                    format!("{endpoint:?} is not an http:// or https:// URL"),
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            problems.push(ConfigProblem::new(
                "telemetry.sampling_ratio",
                "must be between 0 and 1",
            ));
        }
        for (header, var) in &self.headers {
            if std::env::var_os(var).is_none() {
                problems.push(ConfigProblem::new(
                    format!("telemetry.headers.{header}"),
                    format!("the environment variable {var} is not set"),
                ));
            }
        }
        problems
    }

    fn header_values(&self) -> Vec<(String, String)> {
        self.headers
            .iter()
            .filter_map(|(h, var)| std::env::var(var).ok().map(|v| (h.to_lowercase(), v)))
            .collect()
    }
}

/// Why the exporter could not be built.
#[derive(Debug, thiserror::Error)]
#[error("telemetry: {0}")]
pub struct TelemetryError(String);

/// Spans handed to the exporter and spans lost, as Prometheus counters.
#[derive(Clone, Debug, Default)]
pub struct SpanCounters {
    /// Spans the collector accepted.
    pub exported: Counter,
    /// Spans dropped: the buffer was full, or their export failed.
    pub dropped: Counter,
    pending: Arc<AtomicUsize>,
}

/// The process's trace export: a handle to flush it at shutdown and its counters.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    counters: SpanCounters,
    flush_timeout: Duration,
}

impl Telemetry {
    /// No export.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// True when spans leave the process.
    pub fn is_exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// The counters of exported and dropped spans.
    pub fn counters(&self) -> &SpanCounters {
        &self.counters
    }

    /// Sends what is buffered, waiting at most the export timeout, and stops exporting.
    pub async fn shutdown(&self) {
        let Some(provider) = self.provider.clone() else {
            return;
        };
        let timeout = self.flush_timeout;
        let flush = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(timeout));
        match tokio::time::timeout(timeout + Duration::from_millis(500), flush).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "flushing traces at shutdown"),
            Ok(Err(e)) => tracing::warn!(error = %e, "flushing traces at shutdown"),
            Err(_) => {
                tracing::warn!("flushing traces at shutdown took too long; unsent spans are lost")
            }
        }
    }

    /// The tracer provider for `config`: no exporter without an endpoint. Must run inside
    /// a Tokio runtime (the gRPC exporter's connection lives on it).
    pub(crate) fn build(
        config: &TelemetryConfig,
        default_service: &str,
    ) -> Result<(SdkTracerProvider, Self), TelemetryError> {
        let counters = SpanCounters::default();
        let Some(endpoint) = &config.endpoint else {
            let provider = SdkTracerProvider::builder().build();
            return Ok((provider, Self::disabled()));
        };
        let timeout = Duration::from_millis(config.export_timeout_ms);
        let exporter = exporter(config, endpoint, timeout)?;
        let batch = BatchSpanProcessor::builder(Counted {
            inner: exporter,
            counters: counters.clone(),
        })
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(config.max_queue_spans)
                .with_scheduled_delay(Duration::from_millis(config.batch_delay_ms))
                .build(),
        )
        .build();
        let mut attributes: Vec<KeyValue> = config
            .resource
            .iter()
            .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
            .collect();
        attributes.push(KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION").to_owned(),
        ));
        let resource = Resource::builder()
            .with_service_name(
                config
                    .service_name
                    .clone()
                    .unwrap_or_else(|| default_service.to_owned()),
            )
            .with_attributes(attributes)
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(Gate {
                inner: batch,
                counters: counters.clone(),
                capacity: config.max_queue_spans,
            })
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sampling_ratio,
            ))))
            .with_resource(resource)
            .build();
        let telemetry = Self {
            provider: Some(provider.clone()),
            counters,
            flush_timeout: timeout,
        };
        Ok((provider, telemetry))
    }
}

fn exporter(
    config: &TelemetryConfig,
    endpoint: &str,
    timeout: Duration,
) -> Result<opentelemetry_otlp::SpanExporter, TelemetryError> {
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
    let headers = config.header_values();
    let built = match config.protocol {
        OtlpProtocol::Grpc => {
            let mut metadata = tonic::metadata::MetadataMap::new();
            for (name, value) in &headers {
                let key = tonic::metadata::MetadataKey::from_bytes(name.as_bytes())
                    .map_err(|e| TelemetryError(format!("header {name:?}: {e}")))?;
                let value = value
                    .parse()
                    .map_err(|e| TelemetryError(format!("header {name:?}: {e}")))?;
                metadata.insert(key, value);
            }
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .with_timeout(timeout)
                .with_metadata(metadata)
                .build()
        }
        OtlpProtocol::HttpProtobuf => {
            let url = match endpoint
                .split_once("://")
                .map(|(_, rest)| rest.contains('/'))
            {
                Some(true) if !endpoint.ends_with('/') => endpoint.to_owned(),
                _ => format!("{}/v1/traces", endpoint.trim_end_matches('/')),
            };
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(url)
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_timeout(timeout)
                .with_headers(headers.into_iter().collect())
                .build()
        }
    };
    built.map_err(|e| TelemetryError(format!("building the OTLP exporter for {endpoint}: {e}")))
}

/// Admits a span to the batch processor only while fewer than `capacity` spans wait for
/// export, so the processor's own queue never overflows uncounted.
#[derive(Debug)]
struct Gate {
    inner: BatchSpanProcessor,
    counters: SpanCounters,
    capacity: usize,
}

impl SpanProcessor for Gate {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        let pending = &self.counters.pending;
        if pending.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            pending.fetch_sub(1, Ordering::AcqRel);
            self.counters.dropped.inc();
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Counts what its exporter sent and what it failed to send.
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    counters: SpanCounters,
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let result = self.inner.export(batch).await;
        self.counters.pending.fetch_sub(n, Ordering::AcqRel);
        match &result {
            Ok(()) => self.counters.exported.inc_by(n as u64),
            Err(_) => self.counters.dropped.inc_by(n as u64),
        };
        result
    }

    fn shutdown_with_timeout(&mut self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&mut self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}
