//! What every engine inside a worker does, and which engines there are.
//!
//! A worker holds one model in one engine: llama.cpp (`llama-cpp-2`, GGUF files, weights
//! mapped from the page cache) or mistral.rs (GGUF files and safetensors directories,
//! quantized at load). Everything outside the worker (the worker protocol, `ReadyInfo`,
//! the pool) is engine-neutral; it asks `modelpool_catalog::EngineKind` what an engine
//! can read.

use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::Arc;

use futures::Stream;
use modelpool_proto::v1::{ChatMessage, GenerateChunk, SamplingParams};

use crate::EngineError;

/// What to generate from.
#[derive(Clone, Debug)]
pub enum Prompt {
    /// Chat turns; the model's chat template renders them.
    Chat(Vec<ChatMessage>),
    /// Raw text, continued as-is.
    Raw(String),
}

impl Prompt {
    /// The public API's name of the field the prompt came from, for errors.
    pub fn field(&self) -> &'static str {
        match self {
            Prompt::Chat(_) => "messages",
            Prompt::Raw(_) => "prompt",
        }
    }
}

/// Counters shared by every generation of one model.
#[derive(Default, Debug)]
pub struct Counters {
    pub generated_tokens_total: Arc<AtomicU64>,
    pub active_sequences: AtomicU32,
    pub cancelled_total: AtomicU64,
    /// The most sequences decoded in one step (engines that batch report it).
    pub peak_batch_sequences: AtomicU32,
    /// Prompt tokens taken from kept KV cells instead of decoded (engines that reuse
    /// prefixes report it).
    pub reused_prompt_tokens_total: AtomicU64,
    /// Idle slots holding kept cells, and the tokens in them.
    pub kept_prefixes: AtomicU32,
    pub kept_prefix_tokens: AtomicU64,
    /// Saved prefixes restored into a slot instead of prefilled.
    pub restored_prefixes_total: AtomicU64,
    /// Saved prefixes on disk for this model and setting, and their bytes.
    pub saved_prefixes: AtomicU32,
    pub saved_prefix_bytes: AtomicU64,
    /// The KV cache's cells, those the running sequences may take, and the requests
    /// waiting for room in it.
    pub kv_cells: AtomicU32,
    pub kv_cells_reserved: AtomicU64,
    pub waiting_for_kv_room: AtomicU32,
}

/// A stream of generated chunks; the last one carries finish reason and usage. Dropping
/// it cancels the sequence at the engine's next step.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<GenerateChunk, EngineError>> + Send>>;

/// One loaded model in one engine.
#[tonic::async_trait]
pub trait Engine: Send + Sync + 'static {
    /// The context length in force: the configured one, capped by the model's own.
    fn context_length(&self) -> u32;
    /// Counters of every generation so far.
    fn counters(&self) -> &Arc<Counters>;
    /// Tokens `prompt` takes once rendered (chat template included).
    async fn count_tokens(&self, prompt: &Prompt) -> Result<u32, EngineError>;
    /// Starts one generation. A prompt that fills the context is refused; the answer is
    /// capped to what the context has left.
    async fn generate(
        &self,
        prompt: Prompt,
        params: &SamplingParams,
    ) -> Result<ChunkStream, EngineError>;
    /// Saves what the engine keeps of finished sequences so that a later load of the
    /// same model can restore it: (prefixes, bytes) written. Engines that keep nothing
    /// write nothing.
    async fn save_prefixes(&self) -> Result<(u32, u64), EngineError> {
        Ok((0, 0))
    }
}
