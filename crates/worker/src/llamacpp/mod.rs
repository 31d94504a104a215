//! llama.cpp (through the `llama-cpp-2` crate) as a worker's engine.
//!
//! The GGUF is mapped read-only, so a resident model's weights are page-cache pages
//! shared with every other process mapping the file, and a model evicted and loaded
//! again finds them still cached. Decoding runs on a thread of its own (see
//! [`decode`]); this side renders chat templates and turns the thread's steps into the
//! worker protocol's chunks.

mod decode;

mod prefix;
mod repack;
mod room;
mod template;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use modelpool_pool::Device;
use modelpool_proto::v1::{GenerateChunk, SamplingParams, Usage};
use tokio::sync::{mpsc, oneshot};

use crate::engine::{ChunkStream, Counters, Engine, Prompt};
use crate::llm::duration;
use crate::sampling;
use crate::EngineError;
use decode::{GenJob, Job, Step};
pub use modelpool_store::SavedPrefixes;
pub use template::ChatTemplate;

/// Generations that may wait for the decode thread to take them; the server bounds
/// concurrent requests per model far below this.
const JOB_QUEUE: usize = 256;

/// The llama-cpp-2 release this build links (the workspace pins it): a saved prefix
/// is only restored by the build that wrote it.
const LLAMA_CPP_2_VERSION: &str = "0.1.160";

/// GGUF architectures llama.cpp generates text with.
pub use modelpool_catalog::LLAMA_CPP_ARCHITECTURES as ARCHITECTURES;

/// How to load a model into llama.cpp.
#[derive(Clone, Debug)]
pub struct LlamaOptions {
    pub path: PathBuf,
    pub context_length: u32,
    pub max_sequences: u32,
    pub device: Device,
    /// Let ggml repack weights for its CPU kernels. Repacking copies every weight into
    /// anonymous memory at load (CPU-bound seconds for a 7B model, and the mapped file
    /// no longer backs the weights); off, weights stay mapped from the page cache. The
    /// build decides which one llama.cpp does (`GGML_CPU_REPACK`); a model asking for
    /// the other is refused at load (see `repack.rs`).
    pub repack: bool,
    /// Lock the mapped weights in memory (needs RLIMIT_MEMLOCK or CAP_IPC_LOCK; without
    /// them llama.cpp warns and goes on unlocked).
    pub mlock: bool,
    /// Reuse the KV of shared prompt prefixes across requests. Off, a finished
    /// sequence keeps nothing and every request prefills from its first token.
    pub prefix_cache: bool,
    /// Cells of the KV cache the sequences share; `None`: `context_length` for each of
    /// `max_sequences`. A request starts once its prompt and answer fit the cells free.
    pub kv_budget_tokens: Option<u32>,
    /// The shortest time between two chunks of one stream: text decoded sooner waits
    /// for the next. Every chunk the decode thread sends wakes the worker's relay, the
    /// server and the client, each taking a core from the decode; holding fast tokens
    /// for a few milliseconds sends several in one chunk. Zero sends every token.
    pub stream_interval: std::time::Duration,
    /// Threads for decoding and prompt processing.
    pub threads: u32,
    /// Where to save kept prefixes before the worker stops, and restore them from;
    /// `None` keeps them in memory only.
    pub saved_prefixes: Option<SavedPrefixes>,
}

/// A GGUF model loaded into llama.cpp, decoded on its own thread.
pub struct LlamaEngine {
    jobs: mpsc::Sender<Job>,
    template: Option<ChatTemplate>,
    context_length: u32,
    counters: Arc<Counters>,
}

impl LlamaEngine {
    /// Starts the decode thread and loads the model on it.
    pub async fn load(opts: LlamaOptions) -> Result<Self, EngineError> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (jobs_tx, jobs_rx) = mpsc::channel(JOB_QUEUE);
        let counters = Arc::new(Counters::default());
        let thread_counters = Arc::clone(&counters);
        std::thread::Builder::new()
            .name("llama-decode".into())
            .spawn(move || decode::run(opts, jobs_rx, thread_counters, ready_tx))?;
        let loaded = ready_rx.await.map_err(|_| {
            EngineError::Load("the llama.cpp thread ended during the load".into())
        })??;
        let template = loaded
            .chat_template
            .map(|src| ChatTemplate::new(src, loaded.bos_token, loaded.eos_token))
            .transpose()?;
        Ok(Self {
            jobs: jobs_tx,
            template,
            context_length: loaded.context_length,
            counters,
        })
    }

    /// The text to tokenize and whether the tokenizer adds the model's special tokens:
    /// a chat template writes them itself; a raw prompt gets them as for any prompt.
    fn render(&self, prompt: &Prompt) -> Result<(String, bool), EngineError> {
        match prompt {
            Prompt::Raw(text) => Ok((text.clone(), true)),
            Prompt::Chat(turns) => {
                let template = self.template.as_ref().ok_or_else(|| {
                    EngineError::invalid(
                        "messages",
                        "the model's GGUF has no chat template (tokenizer.chat_template); use Generate with a raw prompt",
                    )
                })?;
                Ok((template.render(turns)?, false))
            }
        }
    }

    async fn send(&self, job: Job) -> Result<(), EngineError> {
        self.jobs.send(job).await.map_err(|_| thread_stopped())
    }
}

#[tonic::async_trait]
impl Engine for LlamaEngine {
    fn context_length(&self) -> u32 {
        self.context_length
    }

    fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    async fn count_tokens(&self, prompt: &Prompt) -> Result<u32, EngineError> {
        let (text, add_special) = self.render(prompt)?;
        let (reply, answer) = oneshot::channel();
        self.send(Job::Count {
            text,
            add_special,
            reply,
        })
        .await?;
        answer.await.map_err(|_| thread_stopped())
    }

    async fn generate(
        &self,
        prompt: Prompt,
        params: &SamplingParams,
    ) -> Result<ChunkStream, EngineError> {
        sampling::validate(params)?;
        let started = Instant::now();
        let (text, add_special) = self.render(&prompt)?;
        let (accepted, verdict) = oneshot::channel();
        // Room for every step the sequence can take, so the thread never waits on it.
        let steps = sampling::max_tokens(params, self.context_length) as usize + 2;
        let (out, steps_rx) = mpsc::channel(steps);
        self.send(Job::Generate(GenJob {
            text,
            add_special,
            field: prompt.field(),
            params: params.clone(),
            accepted,
            out,
        }))
        .await?;
        let prompt_tokens = verdict.await.map_err(|_| thread_stopped())??;
        let state = Relay {
            steps: steps_rx,
            prompt_tokens,
            started,
            first_text_at: None,
            done: false,
        };
        Ok(Box::pin(futures::stream::unfold(state, Relay::next)))
    }

    async fn save_prefixes(&self) -> Result<(u32, u64), EngineError> {
        let (reply, report) = oneshot::channel();
        self.send(Job::Save { reply }).await?;
        let report = report.await.map_err(|_| thread_stopped())?;
        Ok((report.prefixes, report.bytes))
    }
}

/// Turns the thread's steps into chunks, adding usage to the last.
struct Relay {
    steps: mpsc::Receiver<Result<Step, EngineError>>,
    prompt_tokens: u32,
    started: Instant,
    first_text_at: Option<Instant>,
    done: bool,
}

impl Relay {
    async fn next(mut self) -> Option<(Result<GenerateChunk, EngineError>, Self)> {
        if self.done {
            return None;
        }
        let step = match self.steps.recv().await {
            Some(Ok(step)) => step,
            Some(Err(e)) => {
                self.done = true;
                return Some((Err(e), self));
            }
            None => {
                self.done = true;
                let e = thread_stopped();
                return Some((Err(e), self));
            }
        };
        let now = Instant::now();
        let first = *self.first_text_at.get_or_insert(now);
        let mut chunk = GenerateChunk {
            text: step.text,
            ..Default::default()
        };
        if let Some(reason) = step.finish {
            self.done = true;
            chunk.set_finish_reason(reason);
            chunk.usage = Some(Usage {
                prompt_tokens: self.prompt_tokens,
                completion_tokens: step.completion_tokens,
                cached_tokens: step.cached_tokens,
                time_to_first_token: duration(first - self.started),
                total_time: duration(now - self.started),
                ..Default::default()
            });
        }
        Some((Ok(chunk), self))
    }
}

/// The decode thread is gone (it only ends when the engine is dropped, or the worker
/// exits after a panic in it).
fn thread_stopped() -> EngineError {
    EngineError::Generation("the llama.cpp decode thread stopped".into())
}

#[cfg(test)]
mod tests {
    /// Saved prefixes name the llama-cpp-2 release; the constant follows the pin.
    #[test]
    fn the_saved_prefix_version_is_the_pinned_llama_cpp_2() {
        let manifest = include_str!("../../../../Cargo.toml");
        let pin = format!(
            "llama-cpp-2 = {{ version = \"={}\"",
            super::LLAMA_CPP_2_VERSION
        );
        assert!(manifest.contains(&pin), "Cargo.toml does not pin {pin}");
    }
}
