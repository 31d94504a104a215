//! mistral.rs behind a small, owned interface: load a GGUF file, stream a generation.
//!
//! The worker process serves this over its socket, and the benchmark calls it directly
//! in-process to measure what the gRPC + worker path costs on top.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use indexmap::IndexMap;
use mistralrs::{
    GgufModelBuilder, MessageContent, NormalRequest, Request, RequestMessage, Response,
    TextModelBuilder, UqffTextModelBuilder,
};
use modelpool_pool::{Device, Quantized, NATIVE_PRECISION};
use modelpool_proto::v1::{ChatMessage, FinishReason, GenerateChunk, Role, SamplingParams, Usage};

pub use crate::engine::Prompt;
use crate::engine::{ChunkStream, Counters, Engine};
use crate::sampling::{self, StopMatcher, TokenCounter};
use crate::EngineError;

/// One mistral.rs model, loaded and ready.
pub struct LoadedModel {
    model: mistralrs::Model,
    context_length: u32,
    counters: Arc<Counters>,
}

impl LoadedModel {
    /// Loads a GGUF file from a local path: no hub, no token. On `cpu` every layer is
    /// on the CPU; on `cuda:N` every layer is on that GPU or the load fails: mistral.rs'
    /// automatic device mapping is never allowed to put layers elsewhere.
    pub async fn load_gguf(
        path: &Path,
        context_length: u32,
        max_sequences: u32,
        device: Device,
    ) -> Result<Self, EngineError> {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let file = path
            .file_name()
            .ok_or_else(|| EngineError::Load(format!("{} is not a file path", path.display())))?;
        let builder = GgufModelBuilder::new(
            dir.to_string_lossy(),
            vec![file.to_string_lossy().into_owned()],
        )
        .with_token_source(mistralrs::TokenSource::None)
        .with_max_num_seqs(max_sequences.max(1) as usize)
        // The prefix cache keeps the KV cache of every finished sequence and, on the
        // CPU, never evicts: memory would climb with each new conversation.
        .with_prefix_cache_n(None)
        // Everything on the one device: the automatic mapper would move layers to the
        // CPU when a GPU is short of memory, with only a log line.
        .with_device_mapping(mistralrs::DeviceMapSetting::dummy());
        let builder = if on_cpu(device)? {
            builder.with_force_cpu()
        } else {
            builder
        };
        let model = builder
            .build()
            .await
            .map_err(|e| EngineError::Load(format!("{e:#}")))?;
        Ok(Self::new(model, context_length))
    }

    /// Loads a Hugging Face model directory (config.json, tokenizer.json, safetensors),
    /// quantized at load to `precision` (mistral.rs ISQ) unless it is `none`. With
    /// `quantized`, reuses the UQFF a previous load wrote, or writes one for the next.
    pub async fn load_safetensors(
        dir: &Path,
        precision: Option<&str>,
        quantized: Option<&Quantized>,
        context_length: u32,
        max_sequences: u32,
        device: Device,
    ) -> Result<Self, EngineError> {
        let isq = match precision.filter(|p| *p != NATIVE_PRECISION) {
            Some(p) => Some(
                mistralrs::core::parse_isq_value(p, None)
                    .map_err(|e| EngineError::Load(format!("precision {p:?}: {e}")))?,
            ),
            None => None,
        };
        let model_id = dir.to_string_lossy();
        let base = match (isq, quantized) {
            (Some(_), Some(Quantized::Reuse(uqff))) => {
                UqffTextModelBuilder::new(model_id, vec![uqff.clone()]).into_inner()
            }
            _ => TextModelBuilder::new(model_id),
        };
        let mut builder = base
            .with_token_source(mistralrs::TokenSource::None)
            .with_max_num_seqs(max_sequences.max(1) as usize)
            .with_prefix_cache_n(None)
            .with_device_mapping(mistralrs::DeviceMapSetting::dummy());
        if on_cpu(device)? {
            builder = builder.with_force_cpu();
        }
        match (isq, quantized) {
            (Some(_), Some(Quantized::Reuse(_))) | (None, _) => {}
            (Some(isq), Some(Quantized::Write(uqff))) => {
                if let Some(parent) = uqff.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                builder = builder.with_isq(isq).write_uqff(uqff.clone());
            }
            (Some(isq), None) => builder = builder.with_isq(isq),
        }
        let model = builder
            .build()
            .await
            .map_err(|e| EngineError::Load(format!("{e:#}")))?;
        Ok(Self::new(model, context_length))
    }

    fn new(model: mistralrs::Model, context_length: u32) -> Self {
        let model_max = model
            .max_sequence_length()
            .ok()
            .flatten()
            .map_or(u32::MAX, |n| n.min(u32::MAX as usize) as u32);
        Self {
            model,
            context_length: context_length.min(model_max),
            counters: Arc::new(Counters::default()),
        }
    }

    /// Starts one generation. Parameters must have passed [`sampling::validate`].
    pub async fn generate(
        &self,
        prompt: Prompt,
        params: &SamplingParams,
    ) -> Result<ChunkStream, EngineError> {
        sampling::validate(params)?;
        let started = Instant::now();
        let (is_chat, messages) = match prompt {
            Prompt::Chat(turns) => (
                true,
                RequestMessage::Chat {
                    messages: chat_messages(&turns),
                    enable_thinking: None,
                    reasoning_effort: None,
                },
            ),
            Prompt::Raw(text) => (
                false,
                RequestMessage::Completion {
                    text,
                    echo_prompt: false,
                    best_of: None,
                },
            ),
        };
        // The configured context bounds prompt and answer together (it is what the
        // pool budgeted the KV cache for): refuse a prompt that fills it, and cap the
        // answer to what is left.
        let prompt_tokens = self.count_tokens(&messages).await?;
        if prompt_tokens >= self.context_length as usize {
            return Err(EngineError::InvalidArgument {
                field: if is_chat { "messages" } else { "prompt" },
                reason: format!(
                    "the prompt is {prompt_tokens} tokens; the model's context is {} tokens (prompt and answer together)",
                    self.context_length
                ),
            });
        }
        let room = self.context_length - prompt_tokens as u32;
        let (sampling_params, counter) = sampling::to_mistral(
            params,
            room,
            Arc::clone(&self.counters.generated_tokens_total),
        );
        // Capacity 1: mistral.rs waits for us, and a dropped receiver cancels the sequence.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let request = Request::Normal(Box::new(NormalRequest {
            messages,
            sampling_params,
            response: tx,
            return_logprobs: false,
            is_streaming: true,
            id: 0,
            constraint: mistralrs::Constraint::None,
            suffix: None,
            tools: None,
            tool_choice: None,
            logits_processors: Some(vec![Arc::clone(&counter) as _]),
            return_raw_logits: false,
            web_search_options: None,
            model_id: None,
            truncate_sequence: false,
        }));
        self.submit(request).await?;
        self.counters
            .active_sequences
            .fetch_add(1, Ordering::Relaxed);
        let state = GenState {
            rx,
            counter,
            counters: Arc::clone(&self.counters),
            started,
            first_token_at: None,
            finished: false,
            is_chat,
            stop: StopMatcher::new(params.stop.clone()),
            max_tokens: sampling::max_tokens(params, room),
        };
        Ok(Box::pin(futures::stream::unfold(state, next_chunk)))
    }
}

struct GenState {
    rx: tokio::sync::mpsc::Receiver<Response>,
    counter: Arc<TokenCounter>,
    counters: Arc<Counters>,
    started: Instant,
    first_token_at: Option<Instant>,
    finished: bool,
    is_chat: bool,
    stop: StopMatcher,
    /// Tokens the sequence may generate (mistral.rs' `max_len`).
    max_tokens: u32,
}

impl Drop for GenState {
    fn drop(&mut self) {
        self.counters
            .active_sequences
            .fetch_sub(1, Ordering::Relaxed);
        if !self.finished {
            self.counters
                .cancelled_total
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                completion_tokens = self.counter.completion_tokens(),
                "generation cancelled"
            );
        }
    }
}

async fn next_chunk(mut st: GenState) -> Option<(Result<GenerateChunk, EngineError>, GenState)> {
    if st.finished {
        return None;
    }
    let response = match st.rx.recv().await {
        Some(r) => r,
        // mistral.rs sends no last chunk when the last token ends inside a multi-byte
        // character (its text is not valid UTF-8 yet): a sequence that used all its
        // tokens ended for its length, with the unfinished character dropped.
        None if st.counter.completion_tokens() >= st.max_tokens => {
            return Some((
                Ok(last_chunk(&mut st, FinishReason::Length, String::new())),
                st,
            ));
        }
        None => {
            st.finished = true;
            let err =
                EngineError::Generation("the engine ended the sequence without a reason".into());
            return Some((Err(err), st));
        }
    };
    let (text, finish) = match response_text(response, st.is_chat) {
        Ok(pair) => pair,
        Err(e) => {
            st.finished = true;
            return Some((Err(e), st));
        }
    };
    if st.first_token_at.is_none() {
        st.first_token_at = Some(Instant::now());
    }
    let (mut text, hit_stop) = st.stop.push(&text);
    // Dropping the receiver (with this state) at a stop cancels the sequence in
    // mistral.rs.
    let finish = if hit_stop {
        Some(FinishReason::Stop)
    } else {
        finish.as_deref().map(finish_reason)
    };
    if let Some(reason) = finish {
        if !hit_stop {
            text.push_str(&st.stop.finish());
        }
        return Some((Ok(last_chunk(&mut st, reason, text)), st));
    }
    Some((
        Ok(GenerateChunk {
            text,
            ..Default::default()
        }),
        st,
    ))
}

/// The text of one engine response and mistral.rs' finish reason, if any; an error, or
/// a response of the other kind (chat against completion), ends the sequence.
fn response_text(
    response: Response,
    is_chat: bool,
) -> Result<(String, Option<String>), EngineError> {
    match response {
        Response::Chunk(c) if is_chat => {
            let choice = c.choices.into_iter().next();
            let finish = choice.as_ref().and_then(|c| c.finish_reason.clone());
            Ok((
                choice.and_then(|c| c.delta.content).unwrap_or_default(),
                finish,
            ))
        }
        Response::CompletionChunk(c) if !is_chat => {
            let choice = c.choices.into_iter().next();
            let finish = choice.as_ref().and_then(|c| c.finish_reason.clone());
            Ok((choice.map(|c| c.text).unwrap_or_default(), finish))
        }
        Response::ValidationError(e) => Err(EngineError::invalid("request", e.to_string())),
        Response::InternalError(e) => Err(EngineError::Generation(e.to_string())),
        Response::ModelError(e, _) | Response::CompletionModelError(e, _) => {
            Err(EngineError::Generation(e))
        }
        _ => Err(EngineError::Generation(
            "unexpected response kind from the engine".into(),
        )),
    }
}

/// mistral.rs' finish reason on the wire: "length", or a stop.
fn finish_reason(reason: &str) -> FinishReason {
    match reason {
        "length" => FinishReason::Length,
        _ => FinishReason::Stop,
    }
}

/// The last chunk of a sequence: its text, why it ended, and its usage.
fn last_chunk(st: &mut GenState, reason: FinishReason, text: String) -> GenerateChunk {
    st.finished = true;
    let now = Instant::now();
    let mut chunk = GenerateChunk {
        text,
        ..Default::default()
    };
    chunk.set_finish_reason(reason);
    chunk.usage = Some(Usage {
        prompt_tokens: st.counter.prompt_tokens(),
        completion_tokens: st.counter.completion_tokens(),
        time_to_first_token: duration(st.first_token_at.unwrap_or(now) - st.started),
        total_time: duration(now - st.started),
        load_wait: None,
        cold_start: false,
        swap_wait: None,
        // mistral.rs' prefix cache is off (README, lean defaults): nothing is reused.
        cached_tokens: 0,
    });
    chunk
}

pub use modelpool_supervisor::duration;

/// mistral.rs takes chat turns as maps of `role` and `content`.
fn chat_messages(turns: &[ChatMessage]) -> Vec<IndexMap<String, MessageContent>> {
    turns
        .iter()
        .map(|t| {
            let role = match t.role() {
                Role::System => "system",
                Role::Assistant => "assistant",
                Role::User | Role::Unspecified => "user",
            };
            IndexMap::from([
                ("role".to_owned(), MessageContent::Left(role.to_owned())),
                (
                    "content".to_owned(),
                    MessageContent::Left(t.content.clone()),
                ),
            ])
        })
        .collect()
}

impl LoadedModel {
    /// Hands a request to mistral.rs' engine.
    async fn submit(&self, request: Request) -> Result<(), EngineError> {
        let sender = self
            .model
            .inner()
            .get_sender(None)
            .map_err(|e| EngineError::Generation(e.to_string()))?;
        sender
            .send(request)
            .await
            .map_err(|_| EngineError::Generation("the engine stopped".into()))
    }

    /// Tokens `messages` take once rendered (chat template included), counted by the
    /// model's own tokenizer.
    async fn count_tokens(&self, messages: &RequestMessage) -> Result<usize, EngineError> {
        let (text, is_chat) = match messages {
            RequestMessage::Chat { messages, .. } => (either::Either::Left(messages.clone()), true),
            RequestMessage::Completion { text, .. } => (either::Either::Right(text.clone()), false),
            _ => return Ok(0),
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let request = Request::Tokenize(mistralrs::core::TokenizationRequest {
            text,
            tools: None,
            add_generation_prompt: is_chat,
            add_special_tokens: !is_chat,
            enable_thinking: None,
            reasoning_effort: None,
            response: tx,
        });
        self.submit(request).await?;
        let tokens = rx
            .recv()
            .await
            .ok_or_else(|| EngineError::Generation("tokenizer did not answer".into()))?
            // What fails here is the prompt: the chat template refusing the messages
            // (roles out of order, a template's own `raise_exception`) or text the
            // tokenizer cannot take. Retrying the same request cannot help.
            .map_err(|e| {
                EngineError::invalid(
                    "messages",
                    format!("the model's chat template or tokenizer refused the prompt: {e}"),
                )
            })?;
        Ok(tokens.len())
    }
}

/// Whether `device` is the CPU (the builder is then forced there); a GPU this build
/// cannot drive is an error. mistral.rs' loaders ignore `with_device` and always take
/// the first visible GPU, so the server starts a GPU worker with
/// `CUDA_VISIBLE_DEVICES=N`: "the first visible GPU" is then GPU N and no other GPU
/// gets a CUDA context.
fn on_cpu(device: Device) -> Result<bool, EngineError> {
    match device {
        Device::Cpu => Ok(true),
        #[cfg(feature = "cuda-mistralrs")]
        Device::Cuda(_) => Ok(false),
        #[cfg(not(feature = "cuda-mistralrs"))]
        Device::Cuda(_) => Err(EngineError::Load(format!(
            "{device} requested for mistral.rs, but this modelpool was built without the `cuda-mistralrs` feature"
        ))),
    }
}

#[tonic::async_trait]
impl Engine for LoadedModel {
    fn context_length(&self) -> u32 {
        self.context_length
    }

    fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    async fn count_tokens(&self, prompt: &Prompt) -> Result<u32, EngineError> {
        let messages = match prompt.clone() {
            Prompt::Chat(turns) => RequestMessage::Chat {
                messages: chat_messages(&turns),
                enable_thinking: None,
                reasoning_effort: None,
            },
            Prompt::Raw(text) => RequestMessage::Completion {
                text,
                echo_prompt: false,
                best_of: None,
            },
        };
        Ok(LoadedModel::count_tokens(self, &messages).await? as u32)
    }

    async fn generate(
        &self,
        prompt: Prompt,
        params: &SamplingParams,
    ) -> Result<ChunkStream, EngineError> {
        LoadedModel::generate(self, prompt, params).await
    }
}
