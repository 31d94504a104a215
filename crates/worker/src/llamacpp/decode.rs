//! The decode thread: it owns the llama.cpp backend, model and context (a context is
//! used from one thread at a time, and llama.cpp's calls block), and runs continuous
//! batching. Every step decodes one batch holding the prompt of each sequence that
//! joins and the last token of each sequence already generating; each sequence has its
//! own sampler and its own KV cells (sequence id = slot). A sequence joins and leaves
//! between steps; one whose client went away is freed at the next step. A slot's cells
//! outlive its sequence: the next prompt that shares their prefix takes that slot and
//! prefills only what follows it (see [`super::prefix`]); before the worker stops,
//! what the slots keep can be saved to disk and restored after the next load (see
//! [`persist`]).

mod kv_room;
mod load;
mod outbox;
mod persist;
mod repeat;

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use modelpool_proto::v1::{FinishReason, SamplingParams};
use tokio::sync::{mpsc, oneshot};

use super::prefix::{self, SlotCache};
use super::LlamaOptions;
use crate::engine::Counters;
use crate::sampling::{self, StopMatcher};
use crate::text::Utf8Stream;
use crate::EngineError;
use modelpool_store::saved;
use outbox::Outbox;
pub(super) use persist::SaveReport;

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
    /// Write what idle slots keep to the saved-prefix directory.
    Save {
        reply: oneshot::Sender<SaveReport>,
    },
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
    /// Prompt tokens taken from the slot's kept cells instead of decoded.
    pub cached_tokens: u32,
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
    // The model file's digest for saved prefixes, read while the model loads.
    let digest = opts.saved_prefixes.as_ref().map(|_| {
        let path = opts.path.clone();
        std::thread::spawn(move || saved::file_digest(&path))
    });
    let (backend, model) = match load::backend_and_model(&opts) {
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
    let n_batch = batch_tokens(context_length, sequences);
    let ctx = match load::new_context(&model, &backend, &opts, context_length, sequences, n_batch) {
        Ok(ctx) => ctx,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let saved = load::open_saved(&opts, digest, context_length);
    if ready
        .send(Ok(load::loaded_info(&model, context_length)))
        .is_err()
    {
        return;
    }
    let mut decoder = Decoder::new(
        &model,
        ctx,
        context_length,
        sequences,
        &opts,
        saved,
        counters,
    );
    decoder.publish_saved();
    decoder.run(jobs);
}

/// Tokens one step's batch holds: a prompt of up to a full context plus one token for
/// each sequence.
fn batch_tokens(context_length: u32, sequences: u32) -> u32 {
    context_length + sequences
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
    /// Cells its prompt and answer may take: what admission set aside for it.
    reserved: u64,
    completion_tokens: u32,
    cached_tokens: u32,
    utf8: Utf8Stream,
    stop: StopMatcher,
    out: Outbox,
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
    /// Cells of the KV cache the sequences share.
    kv_cells: u64,
    /// Requests queued behind one whose prompt and answer do not fit the cells free.
    waiting_for_room: u32,
    free_slots: Vec<i32>,
    /// What each slot's cells hold, by slot.
    caches: Vec<SlotCache<LlamaToken>>,
    /// The logits after each slot's last prompt, while its cells still hold it.
    end_logits: Vec<Option<repeat::EndLogits>>,
    /// Ticks once per released slot: orders slots by when they were last used.
    clock: u64,
    /// Whether finished sequences keep their cells for a prompt that shares them; off,
    /// every prompt is prefilled from its first token and nothing is kept or saved.
    prefix_cache: bool,
    /// The shortest time between two chunks of one stream (see [`outbox`]).
    stream_interval: std::time::Duration,
    /// Prefixes saved by earlier workers of this model; `None` when saving is off.
    saved: Option<persist::Saved>,
    active: Vec<Seq>,
    queued: VecDeque<Pending>,
    counters: Arc<Counters>,
}

impl<'m> Decoder<'m> {
    /// A decoder with every slot free and empty.
    fn new(
        model: &'m LlamaModel,
        ctx: LlamaContext<'m>,
        context_length: u32,
        sequences: u32,
        opts: &LlamaOptions,
        saved: Option<persist::Saved>,
        counters: Arc<Counters>,
    ) -> Self {
        let kv_cells = u64::from(ctx.n_ctx());
        let n_batch = batch_tokens(context_length, sequences);
        Decoder {
            model,
            ctx,
            batch: LlamaBatch::new(n_batch as usize, 1),
            n_batch,
            context_length,
            kv_cells,
            waiting_for_room: 0,
            free_slots: (0..sequences as i32).rev().collect(),
            caches: (0..sequences).map(|_| SlotCache::default()).collect(),
            end_logits: (0..sequences).map(|_| None).collect(),
            clock: 0,
            prefix_cache: opts.prefix_cache,
            stream_interval: opts.stream_interval,
            saved,
            active: Vec::new(),
            queued: VecDeque::new(),
            counters,
        }
    }
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
            self.publish_counts();
        }
    }

    /// Active sequences and kept prefixes, for the worker's stats.
    fn publish_counts(&self) {
        let c = &self.counters;
        c.active_sequences
            .store(self.active.len() as u32, Ordering::Relaxed);
        let kept = self
            .free_slots
            .iter()
            .map(|&slot| self.caches[slot as usize].tokens.len() as u64)
            .filter(|&n| n > 0);
        let (count, tokens) = kept.fold((0, 0), |(c, t), n| (c + 1, t + n));
        c.kept_prefixes.store(count, Ordering::Relaxed);
        c.kept_prefix_tokens.store(tokens, Ordering::Relaxed);
        c.kv_cells.store(self.kv_cells as u32, Ordering::Relaxed);
        let reserved = self.active.iter().map(|s| s.reserved).sum();
        c.kv_cells_reserved.store(reserved, Ordering::Relaxed);
        c.waiting_for_kv_room
            .store(self.waiting_for_room, Ordering::Relaxed);
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
            Job::Save { reply } => {
                let _ = reply.send(self.save_prefixes());
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
            self.release(slot);
        }
        let dropped = before - self.queued.len() - self.active.len();
        if dropped > 0 {
            self.counters
                .cancelled_total
                .fetch_add(dropped as u64, Ordering::Relaxed);
            tracing::debug!(dropped, "generations cancelled");
        }
    }

    /// Moves waiting sequences into free slots while the prompt tokens they still have
    /// to decode fit this step's batch. Each takes the free slot whose kept cells share
    /// the longest prefix with its prompt.
    fn admit(&mut self) {
        self.waiting_for_room = 0;
        let mut room = self.n_batch as usize - self.active.len();
        while let Some(next) = self.queued.front() {
            let choice = if self.prefix_cache {
                prefix::choose(&self.free_slots, &self.caches, &next.tokens)
            } else {
                prefix::fresh(&self.free_slots)
            };
            let Some(choice) = choice else {
                break;
            };
            if next.tokens.len() - choice.skipped() > room {
                break;
            }
            if !self.make_kv_room(choice.slot, self.reserve(next)) {
                // Its prompt and answer do not fit beside the sequences running: it
                // waits (first in line) for one of them to finish.
                self.waiting_for_room = self.queued.len() as u32;
                break;
            }
            let p = self.queued.pop_front().expect("front exists");
            let slot = choice.slot;
            self.free_slots.retain(|&s| s != slot);
            let reuse = if self.prefix_cache && self.is_repeat(slot, &p.tokens) {
                self.keep_prefix(slot, p.tokens.len())
            } else {
                let reuse = match choice.copy_from {
                    Some((source, n)) => self.share_prefix(source, slot, n),
                    None => choice.reuse,
                };
                let reuse = self.restore_saved(slot, &p.tokens, reuse);
                self.keep_prefix(slot, reuse)
            };
            if reuse == p.tokens.len() {
                room = room.saturating_sub(1);
                self.start_repeat(slot, p);
                continue;
            }
            let need = p.tokens.len() - reuse;
            if need > room {
                // The slot's memory could not keep the prefix: the whole prompt waits
                // for the next step.
                self.queued.push_front(p);
                self.release(slot);
                break;
            }
            room -= need;
            self.caches[slot as usize].prompt_len = p.tokens.len();
            self.counters
                .reused_prompt_tokens_total
                .fetch_add(reuse as u64, Ordering::Relaxed);
            self.active.push(Seq {
                slot,
                pos: reuse as i32,
                last: p.tokens[p.tokens.len() - 1],
                prompt: Some(p.tokens[reuse..].to_vec()),
                logits_at: 0,
                sampler: sampler_for(&p.params),
                max_tokens: p.max_tokens,
                reserved: self.reserve(&p),
                completion_tokens: 0,
                cached_tokens: reuse as u32,
                utf8: Utf8Stream::default(),
                stop: StopMatcher::new(p.params.stop.clone()),
                out: Outbox::new(p.out, self.stream_interval),
            });
        }
    }

    /// Whether `prompt` is exactly what `slot`'s last prompt was, its cells and its
    /// final logits still held.
    fn is_repeat(&self, slot: i32, prompt: &[LlamaToken]) -> bool {
        let cached = &self.caches[slot as usize].tokens;
        let end = self.end_logits[slot as usize].as_ref();
        end.is_some_and(|e| e.len == prompt.len())
            && cached.len() >= prompt.len()
            && cached[..prompt.len()] == *prompt
    }

    /// Starts a sequence whose whole prompt `slot` holds: its first token is sampled
    /// from the logits kept for that prompt.
    fn start_repeat(&mut self, slot: i32, p: Pending) {
        let len = p.tokens.len();
        self.caches[slot as usize].prompt_len = len;
        let logits = &self.end_logits[slot as usize]
            .as_ref()
            .expect("a repeat has its logits")
            .logits;
        let mut sampler = sampler_for(&p.params);
        let token = repeat::sample_from(&mut sampler, logits);
        self.counters
            .reused_prompt_tokens_total
            .fetch_add(len as u64, Ordering::Relaxed);
        self.counters
            .generated_tokens_total
            .fetch_add(1, Ordering::Relaxed);
        let mut seq = Seq {
            slot,
            pos: len as i32,
            last: token,
            prompt: None,
            logits_at: 0,
            sampler,
            max_tokens: p.max_tokens,
            reserved: self.reserve(&p),
            completion_tokens: 0,
            cached_tokens: len as u32,
            utf8: Utf8Stream::default(),
            stop: StopMatcher::new(p.params.stop.clone()),
            out: Outbox::new(p.out, self.stream_interval),
        };
        if next_text(self.model, &mut seq, token) {
            self.release(slot);
        } else {
            self.active.push(seq);
        }
    }

    /// Drops `slot`'s cells past its first `reuse` tokens and returns how many it
    /// keeps: `reuse`, or 0 when the model's memory cannot drop a tail (recurrent
    /// models) or no longer holds the prefix's start (sliding-window attention).
    fn keep_prefix(&mut self, slot: i32, reuse: usize) -> usize {
        let dropped = self
            .ctx
            .clear_kv_cache_seq(Some(slot as u32), Some(reuse as u32), None);
        let whole = reuse == 0 || self.ctx.kv_cache_seq_pos_min(slot) == 0;
        if matches!(dropped, Ok(true)) && whole {
            self.caches[slot as usize].tokens.truncate(reuse);
            if self.end_logits[slot as usize]
                .as_ref()
                .is_some_and(|e| e.len > reuse)
            {
                self.end_logits[slot as usize] = None;
            }
            return reuse;
        }
        self.clear_slot(slot);
        0
    }

    /// Empties `slot`'s cells and what is known of them.
    fn clear_slot(&mut self, slot: i32) {
        let _ = self.ctx.clear_kv_cache_seq(Some(slot as u32), None, None);
        self.caches[slot as usize].tokens.clear();
        self.caches[slot as usize].prompt_len = 0;
        self.end_logits[slot as usize] = None;
    }

    /// Replaces what `slot`'s cells hold with `source`'s first `n` cells, shared (a
    /// unified cache marks the cells as the slot's too; nothing is copied); returns the
    /// tokens the slot now holds: `n`, or 0 where the memory cannot share a part.
    fn share_prefix(&mut self, source: i32, slot: i32, n: usize) -> usize {
        self.clear_slot(slot);
        let shared = self
            .ctx
            .copy_kv_cache_seq(source, slot, Some(0), Some(n as u32));
        let whole = self.ctx.kv_cache_seq_pos_min(slot) == 0
            && self.ctx.kv_cache_seq_pos_max(slot) == n as i32 - 1;
        if shared.is_ok() && whole {
            let tokens = self.caches[source as usize].tokens[..n].to_vec();
            self.caches[slot as usize].tokens = tokens;
            return n;
        }
        self.clear_slot(slot);
        0
    }

    /// Frees `slot` for the next sequence, its cells kept for a prompt that shares them
    /// (with the prefix cache off, cleared).
    fn release(&mut self, slot: i32) {
        if !self.prefix_cache && !self.caches[slot as usize].tokens.is_empty() {
            self.clear_slot(slot);
        }
        self.clock += 1;
        self.caches[slot as usize].released_at = self.clock;
        self.free_slots.push(slot);
    }

    /// Frees `slot` with its cells cleared: what they hold is not known to be whole.
    fn forget(&mut self, slot: i32) {
        self.clear_slot(slot);
        self.release(slot);
    }

    /// Decodes one batch and samples one token for every sequence in it.
    fn step(&mut self) -> Result<(), EngineError> {
        self.batch.clear();
        let mut prefilled = Vec::new();
        for (i, seq) in self.active.iter_mut().enumerate() {
            if seq.prompt.is_some() {
                prefilled.push(i);
            }
            let tokens = seq.prompt.take().unwrap_or_else(|| vec![seq.last]);
            let last = tokens.len() - 1;
            for (i, &token) in tokens.iter().enumerate() {
                self.batch
                    .add(token, seq.pos, &[seq.slot], i == last)
                    .map_err(|e| EngineError::Generation(format!("batch: {e}")))?;
                seq.pos += 1;
            }
            self.caches[seq.slot as usize].tokens.extend(tokens);
            seq.logits_at = self.batch.n_tokens() - 1;
        }
        self.counters
            .peak_batch_sequences
            .fetch_max(self.active.len() as u32, Ordering::Relaxed);
        self.ctx
            .decode(&mut self.batch)
            .map_err(|e| EngineError::Generation(format!("llama.cpp decode: {e}")))?;
        for i in prefilled.into_iter().filter(|_| self.prefix_cache) {
            let seq = &self.active[i];
            self.end_logits[seq.slot as usize] = Some(repeat::EndLogits {
                len: seq.pos as usize,
                logits: self.ctx.get_logits_ith(seq.logits_at).to_vec(),
            });
        }
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
            self.release(seq.slot);
        }
        Ok(())
    }

    /// A failed decode ends every sequence in it with the reason.
    fn fail_all(&mut self, e: &EngineError) {
        tracing::error!("{e}");
        for seq in std::mem::take(&mut self.active) {
            seq.out.fail(EngineError::Generation(e.to_string()));
            self.forget(seq.slot);
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
        cached_tokens: seq.cached_tokens,
    };
    seq.out.send(step, std::time::Instant::now());
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
