//! `modelpool.v1.Inference`: validates a request, takes a lease on its model (loading it
//! when cold), and relays the worker's token stream, adding the timings only the server
//! can know (load wait, time to first token from arrival).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures::{Stream, StreamExt};
use modelpool_pool::{Lease, Pool};
use modelpool_proto::v1::inference_server::Inference;
use modelpool_proto::v1::{
    ChatMessage, ChatRequest, GenerateChunk, GenerateRequest, Role, SamplingParams,
};
pub(crate) use modelpool_proto::worker::v1::worker_generate_request::Prompt;
use modelpool_proto::worker::v1::{ChatPrompt, WorkerGenerateRequest};
use modelpool_supervisor::duration;
use modelpool_supervisor::{sampling, WorkerBackend};
use tonic::{Request, Response, Status};

use crate::error::ServerError;
use crate::metrics::Metrics;
use tracing::Instrument;

/// Largest prompt accepted, in bytes of text (all messages together).
pub const MAX_PROMPT_BYTES: usize = 1 << 20;

/// The metrics label of requests for ids that are not registered.
const UNREGISTERED_LABEL: &str = "(unregistered)";

/// What every front-end adapter (OpenAI HTTP, KServe v2) is built from: the one
/// inference path, the control service (model lists, load, evict) and the tokens.
#[derive(Clone)]
pub struct FrontEnd {
    pub(crate) inference: InferenceService,
    pub(crate) control: Arc<crate::control::ControlService>,
    pub(crate) auth: crate::auth::AuthSettings,
}

impl FrontEnd {
    pub fn new(
        inference: InferenceService,
        control: Arc<crate::control::ControlService>,
        auth: crate::auth::AuthSettings,
    ) -> Self {
        Self {
            inference,
            control,
            auth,
        }
    }
}

/// Cheap to clone: the gRPC service, the OpenAI HTTP routes and the KServe service share
/// one, so every front end runs through [`InferenceService::open`].
#[derive(Clone)]
pub struct InferenceService {
    pool: Pool<WorkerBackend>,
    metrics: Arc<Metrics>,
    /// True once shutdown began: new requests are refused with UNAVAILABLE.
    draining: tokio::sync::watch::Receiver<bool>,
    /// One permit per open generation stream (`server.max_concurrent_streams`).
    streams: Arc<tokio::sync::Semaphore>,
    max_streams: u32,
}

/// One generation as any front end asks for it: what to run, and what the request
/// carries besides its payload. Dropping the stream [`InferenceService::open`] returns
/// cancels it.
pub(crate) struct Generation {
    pub model: String,
    pub prompt: Prompt,
    pub sampling: Option<SamplingParams>,
    /// The client's deadline (gRPC `grpc-timeout`); the pool's queue timeout otherwise.
    pub deadline: Option<tokio::time::Instant>,
    /// Which front end and call, for the request's span ("chat", "openai.chat", ...).
    pub kind: &'static str,
    /// The W3C `traceparent` header, when the client sent one.
    pub traceparent: Option<String>,
}

impl Generation {
    /// A generation with the deadline and trace context of gRPC metadata.
    pub(crate) fn from_grpc(
        kind: &'static str,
        model: String,
        prompt: Prompt,
        sampling: Option<SamplingParams>,
        meta: &tonic::metadata::MetadataMap,
    ) -> Self {
        Self {
            model,
            prompt,
            sampling,
            deadline: deadline_of(meta),
            kind,
            traceparent: meta
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        }
    }
}

/// What every request carries besides its payload.
struct RequestContext {
    arrived: Instant,
    deadline: Option<tokio::time::Instant>,
    span: tracing::Span,
}

impl RequestContext {
    /// Opens the request's span: model, a request id, and the W3C trace context when
    /// the client sent `traceparent`.
    fn new(
        kind: &'static str,
        model: &str,
        traceparent: Option<&str>,
        deadline: Option<tokio::time::Instant>,
    ) -> Self {
        let (trace_id, parent_id) = traceparent.and_then(parse_traceparent).unzip();
        let span = tracing::info_span!(
            "request",
            kind,
            model = %model,
            request_id = %next_request_id(),
            trace_id = trace_id.as_deref().unwrap_or(""),
            parent_span_id = parent_id.as_deref().unwrap_or(""),
        );
        Self {
            arrived: Instant::now(),
            deadline,
            span,
        }
    }
}

/// `traceparent: 00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`; ids of all
/// zeros are invalid per the W3C spec.
fn parse_traceparent(v: &str) -> Option<(String, String)> {
    let mut parts = v.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && hex(parent, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && parent.bytes().any(|b| b != b'0');
    valid.then(|| (trace.to_ascii_lowercase(), parent.to_ascii_lowercase()))
}

/// A process-unique request id: 16 hex digits, unpredictable enough for log grepping.
pub(crate) fn next_request_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    // Mixed (time, counter): distinct per request, spread over all digits.
    let mut mix = sampling::SplitMix64(seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    format!("{:016x}", mix.next_u64())
}

impl InferenceService {
    pub fn new(
        pool: Pool<WorkerBackend>,
        metrics: Arc<Metrics>,
        draining: tokio::sync::watch::Receiver<bool>,
        max_streams: u32,
    ) -> Self {
        Self {
            pool,
            metrics,
            draining,
            streams: Arc::new(tokio::sync::Semaphore::new(max_streams as usize)),
            max_streams,
        }
    }

    /// The pool the generations run on (for the front ends' model lists and states).
    pub(crate) fn pool(&self) -> &Pool<WorkerBackend> {
        &self.pool
    }

    /// Whether shutdown began (new requests are refused).
    pub(crate) fn draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// The one entry of every front end: validates the request, takes a lease on its
    /// model (loading it when cold) and returns the worker's chunks, the last with the
    /// finish reason and usage. Dropping the stream cancels the generation.
    pub(crate) async fn open(&self, g: Generation) -> Result<ChunkStream, Status> {
        let ctx = RequestContext::new(g.kind, &g.model, g.traceparent.as_deref(), g.deadline);
        let sampling = validate(&g.model, &g.prompt, g.sampling)?;
        tracing::debug!(model = %g.model, kind = g.kind, "generation");
        self.run(g.model, g.prompt, sampling, ctx).await
    }

    async fn run(
        &self,
        model: String,
        prompt: Prompt,
        sampling: SamplingParams,
        ctx: RequestContext,
    ) -> Result<ChunkStream, Status> {
        // Metrics are labelled by model; ids nobody registered share one label, so
        // clients cannot grow the series without bound.
        let label = if self.pool.is_registered(&model) {
            model.as_str()
        } else {
            UNREGISTERED_LABEL
        };
        if *self.draining.borrow() {
            self.metrics.request_done(label, tonic::Code::Unavailable);
            return Err(Status::unavailable(
                "modelpool is shutting down and takes no new requests; retry on another instance",
            ));
        }
        // Held by the relay for the whole stream, so it bounds open streams (not
        // just their start), and a refused request costs nothing downstream.
        let Ok(stream_permit) = Arc::clone(&self.streams).try_acquire_owned() else {
            self.metrics
                .request_done(label, tonic::Code::ResourceExhausted);
            return Err(Status::resource_exhausted(format!(
                "too many concurrent streams: all {} allowed (server.max_concurrent_streams) are open; retry later",
                self.max_streams
            )));
        };
        let started = self
            .start(&model, prompt, sampling, &ctx)
            .instrument(ctx.span.clone())
            .await;
        let (lease, upstream) = match started {
            Ok(v) => v,
            Err(e) => {
                let status = Status::from(e);
                self.metrics.request_done(label, status.code());
                let _entered = ctx.span.enter();
                tracing::info!(code = ?status.code(), "request refused: {}", status.message());
                return Err(status);
            }
        };
        let relay = Relay {
            lease,
            upstream,
            arrived: ctx.arrived,
            first_chunk_at: None,
            last_chunk_at: None,
            done: false,
            model,
            metrics: Arc::clone(&self.metrics),
            span: ctx.span,
            _stream_permit: stream_permit,
        };
        Ok(Box::pin(futures::stream::unfold(relay, Relay::next)))
    }

    /// Takes the lease (loading the model if cold) and opens the worker stream.
    async fn start(
        &self,
        model: &str,
        prompt: Prompt,
        sampling: SamplingParams,
        ctx: &RequestContext,
    ) -> Result<(Lease<WorkerBackend>, tonic::Streaming<GenerateChunk>), ServerError> {
        let lease = self.pool.acquire(model, ctx.deadline).await?;
        if lease.cold_start() {
            self.metrics.cold_start(model, lease.load_wait());
        }
        let request = WorkerGenerateRequest {
            prompt: Some(prompt),
            sampling: Some(sampling),
        };
        let upstream =
            lease
                .instance()
                .generate(request)
                .await
                .map_err(|status| ServerError::Worker {
                    model: model.to_owned(),
                    status,
                })?;
        Ok((lease, upstream))
    }
}

pub(crate) type ChunkStream = Pin<Box<dyn Stream<Item = Result<GenerateChunk, Status>> + Send>>;

/// Reads a chunk stream to its end: the whole text and the last chunk (with the finish
/// reason and usage), for front ends that answer in one piece.
pub(crate) async fn collect_text(
    mut chunks: ChunkStream,
) -> Result<(String, GenerateChunk), Status> {
    let mut text = String::new();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        text.push_str(&chunk.text);
        if chunk.usage.is_some() {
            return Ok((text, chunk));
        }
    }
    Err(Status::internal(
        "the generation ended without a final chunk",
    ))
}

/// Carries the lease for as long as the client reads; dropping the relay (the client
/// went away) drops the worker stream, which cancels generation in the worker.
struct Relay {
    lease: Lease<WorkerBackend>,
    upstream: tonic::Streaming<GenerateChunk>,
    arrived: Instant,
    first_chunk_at: Option<Instant>,
    last_chunk_at: Option<Instant>,
    done: bool,
    model: String,
    metrics: Arc<Metrics>,
    span: tracing::Span,
    _stream_permit: tokio::sync::OwnedSemaphorePermit,
}

impl Relay {
    async fn next(mut self) -> Option<(Result<GenerateChunk, Status>, Self)> {
        if self.done {
            return None;
        }
        let item = match self.upstream.next().await {
            Some(Ok(mut chunk)) => {
                let now = Instant::now();
                let first = match self.first_chunk_at {
                    Some(first) => first,
                    None => {
                        self.metrics.first_token(&self.model, now - self.arrived);
                        *self.first_chunk_at.insert(now)
                    }
                };
                let gap = self.last_chunk_at.replace(now).map(|prev| now - prev);
                let mut tokens = 0;
                if let Some(usage) = chunk.usage.as_mut() {
                    self.done = true;
                    usage.time_to_first_token = duration(first - self.arrived);
                    usage.total_time = duration(now - self.arrived);
                    usage.load_wait = duration(self.lease.load_wait());
                    usage.cold_start = self.lease.cold_start();
                    usage.swap_wait = duration(self.lease.swap_wait());
                    tokens = u64::from(usage.completion_tokens);
                    self.metrics.request_done(&self.model, tonic::Code::Ok);
                    let _entered = self.span.enter();
                    tracing::info!(
                        prompt_tokens = usage.prompt_tokens,
                        cached_tokens = usage.cached_tokens,
                        completion_tokens = usage.completion_tokens,
                        ttft_ms = (first - self.arrived).as_millis() as u64,
                        total_ms = (now - self.arrived).as_millis() as u64,
                        cold_start = usage.cold_start,
                        "request finished"
                    );
                }
                self.metrics.chunk(&self.model, tokens, gap);
                Ok(chunk)
            }
            Some(Err(status)) => {
                self.done = true;
                let err = ServerError::Worker {
                    model: self.model.clone(),
                    status,
                };
                Err(self.fail(err))
            }
            None => {
                self.done = true;
                let err = ServerError::Worker {
                    model: self.model.clone(),
                    status: Status::unavailable(
                        "the worker ended the stream without a final chunk",
                    ),
                };
                Err(self.fail(err))
            }
        };
        Some((item, self))
    }

    fn fail(&self, err: ServerError) -> Status {
        // A worker stopped by the pool under this request (a swap past its drain
        // timeout) says so, rather than looking like a crash.
        let status = match (&err, self.lease.cut_reason()) {
            (ServerError::Worker { .. }, Some(reason)) => Status::unavailable(reason),
            _ => Status::from(err),
        };
        self.metrics.request_done(&self.model, status.code());
        let _entered = self.span.enter();
        tracing::warn!(code = ?status.code(), "request failed: {}", status.message());
        status
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if !self.done {
            // The client went away before the last chunk.
            self.metrics
                .request_done(&self.model, tonic::Code::Cancelled);
            let _entered = self.span.enter();
            tracing::info!("client went away; generation cancelled");
        }
    }
}

fn check_model(model: &str) -> Result<(), ServerError> {
    if model.is_empty() {
        return Err(ServerError::invalid(
            "model",
            "required; name a registered model id",
        ));
    }
    Ok(())
}

fn check_sampling(sampling: Option<SamplingParams>) -> Result<SamplingParams, ServerError> {
    let sampling = sampling.unwrap_or_default();
    sampling::validate(&sampling)?;
    Ok(sampling)
}

/// The one validation of every request, whichever front end it came through; returns
/// the sampling parameters with defaults filled in.
pub(crate) fn validate(
    model: &str,
    prompt: &Prompt,
    sampling: Option<SamplingParams>,
) -> Result<SamplingParams, ServerError> {
    check_model(model)?;
    match prompt {
        Prompt::Chat(chat) => validate_messages(&chat.messages)?,
        Prompt::Raw(text) => validate_raw(text)?,
    }
    check_sampling(sampling)
}

fn validate_raw(prompt: &str) -> Result<(), ServerError> {
    if prompt.is_empty() {
        return Err(ServerError::invalid("prompt", "must not be empty"));
    }
    if prompt.len() > MAX_PROMPT_BYTES {
        return Err(ServerError::invalid(
            "prompt",
            format!(
                "{} bytes; at most {MAX_PROMPT_BYTES} are accepted",
                prompt.len()
            ),
        ));
    }
    Ok(())
}

fn validate_messages(messages: &[ChatMessage]) -> Result<(), ServerError> {
    if messages.is_empty() {
        return Err(ServerError::invalid(
            "messages",
            "at least one message is required",
        ));
    }
    let mut total = 0usize;
    for (i, m) in messages.iter().enumerate() {
        let role = Role::try_from(m.role).unwrap_or(Role::Unspecified);
        if role == Role::Unspecified {
            return Err(ServerError::invalid(
                format!("messages[{i}].role"),
                format!(
                    "must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT, got {}",
                    m.role
                ),
            ));
        }
        if m.content.is_empty() && role != Role::Assistant {
            return Err(ServerError::invalid(
                format!("messages[{i}].content"),
                "must not be empty",
            ));
        }
        total += m.content.len();
    }
    if total > MAX_PROMPT_BYTES {
        return Err(ServerError::invalid(
            "messages",
            format!("{total} bytes of text; at most {MAX_PROMPT_BYTES} are accepted"),
        ));
    }
    Ok(())
}

/// The client's deadline from its `grpc-timeout` header ("500m", "30S", ...), as an
/// instant; `None` when it set none or sent garbage.
pub(crate) fn deadline_of(meta: &tonic::metadata::MetadataMap) -> Option<tokio::time::Instant> {
    let text = meta.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => std::time::Duration::from_secs(n.saturating_mul(3600)),
        "M" => std::time::Duration::from_secs(n.saturating_mul(60)),
        "S" => std::time::Duration::from_secs(n),
        "m" => std::time::Duration::from_millis(n),
        "u" => std::time::Duration::from_micros(n),
        "n" => std::time::Duration::from_nanos(n),
        _ => return None,
    };
    // Give up a little before the client does: tonic's own timer ends the call at the
    // deadline with a bare CANCELLED, while the pool's error says DEADLINE_EXCEEDED and
    // what the request was waiting for.
    let margin = (timeout / 10).min(std::time::Duration::from_millis(50));
    tokio::time::Instant::now().checked_add(timeout - margin)
}

#[tonic::async_trait]
impl Inference for InferenceService {
    type ChatStream = ChunkStream;
    type GenerateStream = ChunkStream;

    async fn chat(&self, request: Request<ChatRequest>) -> Result<Response<ChunkStream>, Status> {
        let (meta, _, r) = request.into_parts();
        let prompt = Prompt::Chat(ChatPrompt {
            messages: r.messages,
        });
        let g = Generation::from_grpc("chat", r.model, prompt, r.sampling, &meta);
        Ok(Response::new(self.open(g).await?))
    }

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let (meta, _, r) = request.into_parts();
        let prompt = Prompt::Raw(r.prompt);
        let g = Generation::from_grpc("generate", r.model, prompt, r.sampling, &meta);
        Ok(Response::new(self.open(g).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_parsed_or_ignored() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            parse_traceparent(ok),
            Some((
                "4bf92f3577b34da6a3ce929d0e0e4736".into(),
                "00f067aa0ba902b7".into()
            ))
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad:?}");
        }
        assert_ne!(next_request_id(), next_request_id());
    }
}
