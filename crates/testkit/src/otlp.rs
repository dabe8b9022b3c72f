//! An OTLP/gRPC trace receiver on loopback: the collector a test points the runtime at.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;

/// One span as the receiver got it, ids in lower-case hex.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceivedSpan {
    /// `service.name` of the span's resource.
    pub service: String,
    /// The trace id.
    pub trace_id: String,
    /// The span id.
    pub span_id: String,
    /// The parent's span id; empty for a root.
    pub parent_span_id: String,
    /// The span's name.
    pub name: String,
    /// OTLP span kind (1 internal, 2 server, 3 client, 4 producer, 5 consumer).
    pub kind: i32,
    /// Attributes, values as text.
    pub attributes: BTreeMap<String, String>,
    /// OTLP status code (0 unset, 1 ok, 2 error).
    pub status_code: i32,
    /// The status message.
    pub status_message: String,
    /// Start and end, in Unix nanoseconds.
    pub start_ns: u64,
    /// End, in Unix nanoseconds.
    pub end_ns: u64,
}

impl ReceivedSpan {
    /// An attribute's value as text.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

impl Collector {
    fn collect(&self, request: ExportTraceServiceRequest) {
        let mut got = Vec::new();
        for resource_spans in request.resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .map(text)
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    let status = span.status.unwrap_or_default();
                    got.push(ReceivedSpan {
                        service: service.clone(),
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        name: span.name,
                        kind: span.kind,
                        attributes: span
                            .attributes
                            .iter()
                            .map(|kv| (kv.key.clone(), text(kv)))
                            .collect(),
                        status_code: status.code,
                        status_message: status.message,
                        start_ns: span.start_time_unix_nano,
                        end_ns: span.end_time_unix_nano,
                    });
                }
            }
        }
        self.spans
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(got);
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.collect(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// OTLP/HTTP: `POST /v1/traces` with a protobuf body.
async fn http_export(
    axum::extract::State(collector): axum::extract::State<Collector>,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    use prost::Message;
    match ExportTraceServiceRequest::decode(body) {
        Ok(request) => {
            collector.collect(request);
            let answer = ExportTraceServiceResponse {
                partial_success: None,
            };
            (
                [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
                answer.encode_to_vec(),
            )
                .into_response()
        }
        Err(e) => (axum::http::StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

/// Which OTLP transport a receiver speaks.
#[derive(Clone, Copy)]
enum Transport {
    Grpc,
    Http,
}

/// A gRPC OTLP trace receiver on a free loopback port, stopped when dropped.
pub struct OtlpReceiver {
    endpoint: String,
    collector: Collector,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for OtlpReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpReceiver")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl OtlpReceiver {
    /// Starts an OTLP/gRPC receiver on its own thread and runtime (so it outlives any test
    /// runtime); panics with the reason when it cannot listen.
    pub fn start() -> Self {
        Self::start_as(Transport::Grpc)
    }

    /// [`OtlpReceiver::start`] for OTLP/HTTP with protobuf bodies (`POST /v1/traces`).
    pub fn start_http() -> Self {
        Self::start_as(Transport::Http)
    }

    fn start_as(transport: Transport) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the OTLP receiver");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let endpoint = format!("http://{}", listener.local_addr().expect("local address"));
        let collector = Collector::default();
        let service = collector.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("otlp-receiver".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("the OTLP receiver's runtime");
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                    let stopped = async {
                        let _ = stopped.await;
                    };
                    let served = match transport {
                        Transport::Grpc => tonic::transport::Server::builder()
                            .add_service(TraceServiceServer::new(service))
                            .serve_with_incoming_shutdown(
                                tokio_stream::wrappers::TcpListenerStream::new(listener),
                                stopped,
                            )
                            .await
                            .map_err(|e| e.to_string()),
                        Transport::Http => {
                            let app = axum::Router::new()
                                .route("/v1/traces", axum::routing::post(http_export))
                                .with_state(service);
                            axum::serve(listener, app)
                                .with_graceful_shutdown(stopped)
                                .await
                                .map_err(|e| e.to_string())
                        }
                    };
                    if let Err(e) = served {
                        eprintln!("the OTLP receiver stopped: {e}");
                    }
                });
            })
            .expect("spawn the OTLP receiver");
        Self {
            endpoint,
            collector,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Its endpoint (`http://127.0.0.1:PORT`).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.collector
            .spans
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The spans once `done` holds for them; panics with what was received after `limit`.
    pub fn wait_for(
        &self,
        limit: Duration,
        what: &str,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let started = Instant::now();
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            assert!(
                started.elapsed() < limit,
                "the OTLP receiver did not get {what} within {limit:?}; it got {} spans: {:#?}",
                spans.len(),
                spans
                    .iter()
                    .map(|s| (&s.name, &s.trace_id, &s.parent_span_id))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
