//! The decode thread: it owns the llama.cpp backend, model and context (a context is
//! used from one thread at a time, and llama.cpp's calls block), and runs continuous
//! batching. Every step decodes one batch holding the prompt of each sequence that
//! joins and the last token of each sequence already generating; each sequence has its
//! own sampler and its own KV cells (sequence id = slot). A sequence joins and leaves
//! between steps; one whose client went away is freed at the next step.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::{LlamaModelParams, LlamaSplitMode};
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use modelpool_pool::Device;
use modelpool_proto::v1::{FinishReason, SamplingParams};
use tokio::sync::{mpsc, oneshot};

use super::LlamaOptions;
use crate::engine::Counters;
use crate::sampling::{self, StopMatcher};
use crate::text::Utf8Stream;
use crate::EngineError;

/// What the thread reports once the model is loaded.
pub(super) struct Loaded {
    pub context_length: u32,
    pub chat_template: Option<String>,
    pub bos_token: String,
    pub eos_token: String,
}

/// Work for the decode thread.
pub(super) enum Job {
    /// Tokens `text` takes.
    Count {
        text: String,
        add_special: bool,
        reply: oneshot::Sender<u32>,
    },
    Generate(GenJob),
}

pub(super) struct GenJob {
    pub text: String,
    pub add_special: bool,
    /// The prompt's field in the public API, for errors.
    pub field: &'static str,
    pub params: SamplingParams,
    /// Answered once the prompt is tokenized and checked: its token count, or why not.
    pub accepted: oneshot::Sender<Result<u32, EngineError>>,
    pub out: mpsc::Sender<Result<Step, EngineError>>,
}

/// Text of one step of one sequence; the last one has `finish`.
#[derive(Debug)]
pub(super) struct Step {
    pub text: String,
    pub finish: Option<FinishReason>,
    pub completion_tokens: u32,
}

/// Runs the thread. A panic inside llama.cpp's bindings would leave the worker up but
/// unable to serve: the process exits instead, so the pool sees a crash and the model
/// turns cold.
pub(super) fn run(
    opts: LlamaOptions,
    jobs: mpsc::Receiver<Job>,
    counters: Arc<Counters>,
    ready: oneshot::Sender<Result<Loaded, EngineError>>,
) {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        serve(opts, jobs, counters, ready)
    }));
    if outcome.is_err() {
        eprintln!("modelpool worker: the llama.cpp decode thread panicked; exiting");
        std::process::exit(70);
    }
}

fn serve(
    opts: LlamaOptions,
    jobs: mpsc::Receiver<Job>,
    counters: Arc<Counters>,
    ready: oneshot::Sender<Result<Loaded, EngineError>>,
) {
    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
    let loaded = LlamaBackend::init()
        .map_err(|e| EngineError::Load(format!("llama.cpp backend: {e}")))
        .and_then(|backend| {
            let model = load_model(&backend, &opts)?;
            Ok((backend, model))
        });
    let (backend, model) = match loaded {
        Ok(pair) => pair,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let context_length = match model.n_ctx_train() {
        0 => opts.context_length,
        trained => opts.context_length.min(trained),
    };
    let sequences = opts.max_sequences.max(1);
    let n_batch = context_length + sequences;
    let ctx = match new_context(&model, &backend, &opts, context_length, sequences, n_batch) {
        Ok(ctx) => ctx,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let vocab = model.vocab();
    let token_text = |t: LlamaToken| {
        vocab
            .text(t)
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let info = Loaded {
        context_length,
        chat_template: model
            .chat_template(None)
            .ok()
            .and_then(|t| t.to_string().ok()),
        bos_token: token_text(vocab.bos()),
        eos_token: token_text(vocab.eos()),
    };
    if ready.send(Ok(info)).is_err() {
        return;
    }
    let mut decoder = Decoder {
        model: &model,
        ctx,
        batch: LlamaBatch::new(n_batch as usize, 1),
        n_batch,
        context_length,
        free_slots: (0..sequences as i32).rev().collect(),
        active: Vec::new(),
        queued: VecDeque::new(),
        counters,
    };
    decoder.run(jobs);
}

fn load_model(backend: &LlamaBackend, opts: &LlamaOptions) -> Result<LlamaModel, EngineError> {
    let mut params = LlamaModelParams::default().with_use_mlock(opts.mlock);
    params = match opts.device {
        Device::Cpu => params.with_n_gpu_layers(0),
        Device::Cuda(n) => {
            if !backend.supports_gpu_offload() {
                return Err(EngineError::Load(format!(
                    "{} requested, but this modelpool was built without the `cuda` feature",
                    opts.device
                )));
            }
            // Every layer on GPU n or the load fails; never split or left on the CPU.
            params
                .with_n_gpu_layers(u32::MAX)
                .with_split_mode(LlamaSplitMode::None)
                .with_main_gpu(n as i32)
        }
    };
    if opts.device == Device::Cpu {
        super::repack::check(opts.repack)?;
    }
    let params = Box::pin(params);
    LlamaModel::load_from_file(backend, &opts.path, &params).map_err(|e| {
        EngineError::Load(format!(
            "llama.cpp could not load {}: {e}",
            opts.path.display()
        ))
    })
}

fn new_context<'m>(
    model: &'m LlamaModel,
    backend: &LlamaBackend,
    opts: &LlamaOptions,
    context_length: u32,
    sequences: u32,
    n_batch: u32,
) -> Result<LlamaContext<'m>, EngineError> {
    let threads = opts.threads.max(1) as i32;
    // `context_length` cells per sequence, in one cache the sequences share (unified):
    // a sequence never holds more than `context_length` cells (prompt and answer are
    // capped by it), so the shared cache cannot run out, and a step attends over one
    // buffer instead of one per sequence (measured faster at 4 and 8 streams).
    let cells = context_length
        .checked_mul(sequences)
        .and_then(NonZeroU32::new)
        .ok_or_else(|| EngineError::Load("context length x sequences overflows".into()))?;
    let params = LlamaContextParams::default()
        .with_n_ctx(Some(cells))
        .with_n_batch(n_batch)
        .with_n_ubatch(n_batch.min(512))
        .with_n_seq_max(sequences)
        .with_kv_unified(true)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    model
        .new_context(backend, params)
        .map_err(|e| EngineError::Load(format!("llama.cpp context of {cells} cells: {e}")))
}

/// One generating sequence.
struct Seq {
    slot: i32,
    /// Prompt tokens still to decode (the whole prompt on the step it joins).
    prompt: Option<Vec<LlamaToken>>,
    /// Next position in its KV cells.
    pos: i32,
    last: LlamaToken,
    /// Batch index of its logits in the step just decoded.
    logits_at: i32,
    sampler: LlamaSampler,
    max_tokens: u32,
    completion_tokens: u32,
    utf8: Utf8Stream,
    stop: StopMatcher,
    out: mpsc::Sender<Result<Step, EngineError>>,
}

/// A sequence waiting for a free slot.
struct Pending {
    tokens: Vec<LlamaToken>,
    max_tokens: u32,
    params: SamplingParams,
    out: mpsc::Sender<Result<Step, EngineError>>,
}

struct Decoder<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    n_batch: u32,
    context_length: u32,
    free_slots: Vec<i32>,
    active: Vec<Seq>,
    queued: VecDeque<Pending>,
    counters: Arc<Counters>,
}

impl Decoder<'_> {
    fn run(&mut self, mut jobs: mpsc::Receiver<Job>) {
        loop {
            if self.active.is_empty() && self.queued.is_empty() {
                // Idle: sleep until work arrives; the engine going away ends the thread.
                match jobs.blocking_recv() {
                    Some(job) => self.intake(job),
                    None => return,
                }
            }
            while let Ok(job) = jobs.try_recv() {
                self.intake(job);
            }
            self.drop_cancelled();
            self.admit();
            if !self.active.is_empty() {
                if let Err(e) = self.step() {
                    self.fail_all(&e);
                }
            }
            self.counters
                .active_sequences
                .store(self.active.len() as u32, Ordering::Relaxed);
        }
    }

    fn tokenize(&self, text: &str, add_special: bool) -> Vec<LlamaToken> {
        self.model
            .vocab()
            .tokenize(text.as_bytes(), add_special, true)
    }

    fn intake(&mut self, job: Job) {
        match job {
            Job::Count {
                text,
                add_special,
                reply,
            } => {
                let _ = reply.send(self.tokenize(&text, add_special).len() as u32);
            }
            Job::Generate(job) => {
                let tokens = self.tokenize(&job.text, job.add_special);
                let n = tokens.len();
                let verdict = if n == 0 {
                    Err(EngineError::invalid(
                        job.field,
                        "the prompt is no tokens once tokenized",
                    ))
                } else if n >= self.context_length as usize {
                    Err(EngineError::invalid(
                        job.field,
                        format!(
                            "the prompt is {n} tokens; the model's context is {} tokens (prompt and answer together)",
                            self.context_length
                        ),
                    ))
                } else {
                    Ok(n as u32)
                };
                let room = self.context_length.saturating_sub(n as u32);
                let ok = verdict.is_ok();
                if job.accepted.send(verdict).is_err() || !ok {
                    return;
                }
                self.queued.push_back(Pending {
                    tokens,
                    max_tokens: sampling::max_tokens(&job.params, room),
                    params: job.params,
                    out: job.out,
                });
            }
        }
    }

    /// Frees the sequences whose client went away.
    fn drop_cancelled(&mut self) {
        let before = self.queued.len() + self.active.len();
        self.queued.retain(|p| !p.out.is_closed());
        let mut freed = Vec::new();
        self.active.retain(|s| {
            let gone = s.out.is_closed();
            if gone {
                freed.push(s.slot);
            }
            !gone
        });
        for slot in freed {
            self.free(slot);
        }
        let dropped = before - self.queued.len() - self.active.len();
        if dropped > 0 {
            self.counters
                .cancelled_total
                .fetch_add(dropped as u64, Ordering::Relaxed);
            tracing::debug!(dropped, "generations cancelled");
        }
    }

    /// Moves waiting sequences into free slots while their prompts fit this step's batch.
    fn admit(&mut self) {
        let mut room = self.n_batch as usize - self.active.len();
        while let Some(next) = self.queued.front() {
            if next.tokens.len() > room {
                break;
            }
            let Some(slot) = self.free_slots.pop() else {
                break;
            };
            let p = self.queued.pop_front().expect("front exists");
            room -= p.tokens.len();
            self.active.push(Seq {
                slot,
                pos: 0,
                last: p.tokens[p.tokens.len() - 1],
                prompt: Some(p.tokens),
                logits_at: 0,
                sampler: sampler_for(&p.params),
                max_tokens: p.max_tokens,
                completion_tokens: 0,
                utf8: Utf8Stream::default(),
                stop: StopMatcher::new(p.params.stop.clone()),
                out: p.out,
            });
        }
    }

    fn free(&mut self, slot: i32) {
        let _ = self.ctx.clear_kv_cache_seq(Some(slot as u32), None, None);
        self.free_slots.push(slot);
    }

    /// Decodes one batch and samples one token for every sequence in it.
    fn step(&mut self) -> Result<(), EngineError> {
        self.batch.clear();
        for seq in &mut self.active {
            let tokens = seq.prompt.take().unwrap_or_else(|| vec![seq.last]);
            let last = tokens.len() - 1;
            for (i, token) in tokens.into_iter().enumerate() {
                self.batch
                    .add(token, seq.pos, &[seq.slot], i == last)
                    .map_err(|e| EngineError::Generation(format!("batch: {e}")))?;
                seq.pos += 1;
            }
            seq.logits_at = self.batch.n_tokens() - 1;
        }
        self.counters
            .peak_batch_sequences
            .fetch_max(self.active.len() as u32, Ordering::Relaxed);
        self.ctx
            .decode(&mut self.batch)
            .map_err(|e| EngineError::Generation(format!("llama.cpp decode: {e}")))?;
        let mut finished = Vec::new();
        for (i, seq) in self.active.iter_mut().enumerate() {
            let token = seq.sampler.sample(&self.ctx, seq.logits_at);
            self.counters
                .generated_tokens_total
                .fetch_add(1, Ordering::Relaxed);
            if next_text(self.model, seq, token) {
                finished.push(i);
            }
        }
        for i in finished.into_iter().rev() {
            let seq = self.active.swap_remove(i);
            self.free(seq.slot);
        }
        Ok(())
    }

    /// A failed decode ends every sequence in it with the reason.
    fn fail_all(&mut self, e: &EngineError) {
        tracing::error!("{e}");
        for seq in std::mem::take(&mut self.active) {
            let _ = seq
                .out
                .try_send(Err(EngineError::Generation(e.to_string())));
            self.free(seq.slot);
        }
    }
}

/// Takes `token` as `seq`'s next token and sends the text it completes; returns whether
/// the sequence is finished.
fn next_text(model: &LlamaModel, seq: &mut Seq, token: LlamaToken) -> bool {
    seq.completion_tokens += 1;
    seq.last = token;
    let vocab = model.vocab();
    let (text, finish) = if vocab.is_eog(token) {
        seq.utf8.finish();
        (seq.stop.finish(), Some(FinishReason::Stop))
    } else {
        let piece = vocab.token_to_piece(token, false, None);
        let whole = seq.utf8.push(&piece);
        let (mut text, hit_stop) = seq.stop.push(&whole);
        if hit_stop {
            (text, Some(FinishReason::Stop))
        } else if seq.completion_tokens >= seq.max_tokens {
            seq.utf8.finish();
            text.push_str(&seq.stop.finish());
            (text, Some(FinishReason::Length))
        } else {
            (text, None)
        }
    };
    if text.is_empty() && finish.is_none() {
        return false;
    }
    let step = Step {
        text,
        finish,
        completion_tokens: seq.completion_tokens,
    };
    // The channel holds every step a sequence can produce (max_tokens + 1), so it is
    // never full; a closed one is a client gone, freed at the next step.
    let _ = seq.out.try_send(Ok(step));
    finish.is_some()
}

/// Greedy at temperature 0; otherwise top-k, top-p and temperature, then a draw from a
/// generator seeded by the request's `seed` (repeatable) or by the clock.
fn sampler_for(p: &SamplingParams) -> LlamaSampler {
    let temperature = p.temperature.unwrap_or(0.0);
    if temperature <= 0.0 {
        return LlamaSampler::greedy();
    }
    let mut chain = Vec::new();
    if let Some(k) = p.top_k.filter(|&k| k > 0) {
        chain.push(LlamaSampler::top_k(k.min(i32::MAX as u32) as i32));
    }
    if let Some(top_p) = p.top_p.filter(|&t| t < 1.0) {
        chain.push(LlamaSampler::top_p(top_p, 1));
    }
    chain.push(LlamaSampler::temp(temperature));
    chain.push(LlamaSampler::dist(seed_for(p.seed)));
    LlamaSampler::chain_simple(chain)
}

/// llama.cpp seeds are 32 bits and reserve `u32::MAX` for "random".
fn seed_for(seed: Option<u64>) -> u32 {
    let folded = match seed {
        Some(s) => (s ^ (s >> 32)) as u32,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() ^ d.as_secs() as u32),
    };
    folded.min(u32::MAX - 1)
}

#[cfg(test)]
mod tests {
    use super::seed_for;

    #[test]
    fn seeds_fold_to_32_bits_and_never_mean_random() {
        assert_eq!(seed_for(Some(7)), 7);
        assert_eq!(seed_for(Some(u64::MAX)), 0);
        assert_eq!(seed_for(Some(u64::from(u32::MAX))), u32::MAX - 1);
        assert_eq!(seed_for(Some(1 << 32)), 1);
    }
}
