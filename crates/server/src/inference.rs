//! `modelpool.v1.Inference`: validates a request, takes a lease on its model (loading it
//! when cold), and relays the worker's token stream, adding the timings only the server
//! can know (load wait, time to first token from arrival).

use std::pin::Pin;
use std::time::Instant;

use futures::{Stream, StreamExt};
use modelpool_engine::llm::duration;
use modelpool_engine::{sampling, WorkerBackend};
use modelpool_pool::{Lease, Pool};
use modelpool_proto::v1::inference_server::Inference;
use modelpool_proto::v1::{ChatRequest, GenerateChunk, GenerateRequest, Role, SamplingParams};
use modelpool_proto::worker::v1::worker_generate_request::Prompt;
use modelpool_proto::worker::v1::{ChatPrompt, WorkerGenerateRequest};
use tonic::{Request, Response, Status};

use crate::error::ServerError;

/// Largest prompt accepted, in bytes of text (all messages together).
pub const MAX_PROMPT_BYTES: usize = 1 << 20;

pub struct InferenceService {
    pool: Pool<WorkerBackend>,
}

impl InferenceService {
    pub fn new(pool: Pool<WorkerBackend>) -> Self {
        Self { pool }
    }

    async fn run(
        &self,
        model: String,
        prompt: Prompt,
        sampling: SamplingParams,
        arrived: Instant,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<ChunkStream, ServerError> {
        let lease = self.pool.acquire(&model, deadline).await?;
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
                    model: model.clone(),
                    status,
                })?;
        let relay = Relay {
            lease,
            upstream,
            arrived,
            first_chunk_at: None,
            done: false,
        };
        Ok(Box::pin(futures::stream::unfold(relay, Relay::next)))
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<GenerateChunk, Status>> + Send>>;

/// Carries the lease for as long as the client reads; dropping the relay (the client
/// went away) drops the worker stream, which cancels generation in the worker.
struct Relay {
    lease: Lease<WorkerBackend>,
    upstream: tonic::Streaming<GenerateChunk>,
    arrived: Instant,
    first_chunk_at: Option<Instant>,
    done: bool,
}

impl Relay {
    async fn next(mut self) -> Option<(Result<GenerateChunk, Status>, Self)> {
        if self.done {
            return None;
        }
        match self.upstream.next().await {
            Some(Ok(mut chunk)) => {
                let now = Instant::now();
                let first = *self.first_chunk_at.get_or_insert(now);
                if let Some(usage) = chunk.usage.as_mut() {
                    self.done = true;
                    usage.time_to_first_token = duration(first - self.arrived);
                    usage.total_time = duration(now - self.arrived);
                    usage.load_wait = duration(self.lease.load_wait());
                    usage.cold_start = self.lease.cold_start();
                }
                Some((Ok(chunk), self))
            }
            Some(Err(status)) => {
                self.done = true;
                let err = ServerError::Worker {
                    model: self.lease.model_id().to_owned(),
                    status,
                };
                Some((Err(err.into()), self))
            }
            None => {
                self.done = true;
                let err = ServerError::Worker {
                    model: self.lease.model_id().to_owned(),
                    status: Status::unavailable(
                        "the worker ended the stream without a final chunk",
                    ),
                };
                Some((Err(err.into()), self))
            }
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

fn validate_chat(r: &ChatRequest) -> Result<(), ServerError> {
    check_model(&r.model)?;
    if r.messages.is_empty() {
        return Err(ServerError::invalid(
            "messages",
            "at least one message is required",
        ));
    }
    let mut total = 0usize;
    for (i, m) in r.messages.iter().enumerate() {
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
    tokio::time::Instant::now().checked_add(timeout)
}

#[tonic::async_trait]
impl Inference for InferenceService {
    type ChatStream = ChunkStream;
    type GenerateStream = ChunkStream;

    async fn chat(&self, request: Request<ChatRequest>) -> Result<Response<ChunkStream>, Status> {
        let arrived = Instant::now();
        let deadline = deadline_of(request.metadata());
        let r = request.into_inner();
        validate_chat(&r)?;
        let sampling = check_sampling(r.sampling)?;
        let prompt = Prompt::Chat(ChatPrompt {
            messages: r.messages,
        });
        tracing::debug!(model = %r.model, "chat");
        Ok(Response::new(
            self.run(r.model, prompt, sampling, arrived, deadline).await?,
        ))
    }

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let arrived = Instant::now();
        let deadline = deadline_of(request.metadata());
        let r = request.into_inner();
        check_model(&r.model)?;
        if r.prompt.is_empty() {
            return Err(ServerError::invalid("prompt", "must not be empty").into());
        }
        if r.prompt.len() > MAX_PROMPT_BYTES {
            return Err(ServerError::invalid(
                "prompt",
                format!(
                    "{} bytes; at most {MAX_PROMPT_BYTES} are accepted",
                    r.prompt.len()
                ),
            )
            .into());
        }
        let sampling = check_sampling(r.sampling)?;
        tracing::debug!(model = %r.model, "generate");
        Ok(Response::new(
            self.run(r.model, Prompt::Raw(r.prompt), sampling, arrived, deadline)
                .await?,
        ))
    }
}
