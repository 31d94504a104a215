//! Loading, on the decode thread: the llama.cpp backend, the model, the context the
//! sequences share, and the saved prefixes that fit them.

use std::num::NonZeroU32;
use std::thread::JoinHandle;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::{LlamaModelParams, LlamaSplitMode};
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use modelpool_pool::Device;

use super::{persist, Loaded};
use crate::llamacpp::LlamaOptions;
use crate::EngineError;

/// Starts llama.cpp's backend and loads the model on it.
pub(super) fn backend_and_model(
    opts: &LlamaOptions,
) -> Result<(LlamaBackend, LlamaModel), EngineError> {
    let backend =
        LlamaBackend::init().map_err(|e| EngineError::Load(format!("llama.cpp backend: {e}")))?;
    let model = load_model(&backend, opts)?;
    Ok((backend, model))
}

/// The saved prefixes of this model file (its digest, read by `digest`), setting and
/// context length; `None` when saving or the prefix cache is off, or they cannot be
/// opened (logged).
pub(super) fn open_saved(
    opts: &LlamaOptions,
    digest: Option<JoinHandle<std::io::Result<String>>>,
    context_length: u32,
) -> Option<persist::Saved> {
    opts.saved_prefixes
        .as_ref()
        .filter(|_| opts.prefix_cache)
        .zip(digest)
        .and_then(|(config, digest)| {
            let digest = digest
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("the digest thread panicked")));
            let opened = digest.map(|digest| {
                let key = saved_key(&digest, opts, context_length);
                persist::Saved::open(config, key, context_length)
            });
            opened
                .inspect_err(|e| tracing::warn!("saved prefixes off for this model: {e}"))
                .ok()
        })
}

/// What the worker reports once loaded: the context length, chat template and special
/// tokens.
pub(super) fn loaded_info(model: &LlamaModel, context_length: u32) -> Loaded {
    let vocab = model.vocab();
    let token_text = |t: LlamaToken| {
        vocab
            .text(t)
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    Loaded {
        context_length,
        chat_template: model
            .chat_template(None)
            .ok()
            .and_then(|t| t.to_string().ok()),
        bos_token: token_text(vocab.bos()),
        eos_token: token_text(vocab.eos()),
    }
}

fn load_model(backend: &LlamaBackend, opts: &LlamaOptions) -> Result<LlamaModel, EngineError> {
    let mut params = LlamaModelParams::default().with_use_mlock(opts.mlock);
    params = match opts.device {
        Device::Cpu => params.with_n_gpu_layers(0),
        Device::Cuda(_) => {
            if !backend.supports_gpu_offload() {
                return Err(EngineError::Load(format!(
                    "{} requested, but llama.cpp has no GPU backend here: {}",
                    opts.device,
                    no_gpu_reason()
                )));
            }
            // Every layer on the GPU or the load fails; never split or left on the CPU.
            // The worker sees only its own GPU (CUDA_VISIBLE_DEVICES), as device 0.
            params
                .with_n_gpu_layers(u32::MAX)
                .with_split_mode(LlamaSplitMode::None)
                .with_main_gpu(0)
        }
    };
    if opts.device == Device::Cpu {
        crate::llamacpp::repack::check(opts.repack)?;
    }
    let params = Box::pin(params);
    LlamaModel::load_from_file(backend, &opts.path, &params).map_err(|e| {
        EngineError::Load(format!(
            "llama.cpp could not load {}: {e}",
            opts.path.display()
        ))
    })
}

/// Why llama.cpp found no GPU: the build, or the machine.
fn no_gpu_reason() -> &'static str {
    if cfg!(feature = "cuda") {
        "no CUDA device is visible to the worker (driver, CUDA_VISIBLE_DEVICES)"
    } else if cfg!(feature = "llama-shared") {
        "the libggml on the library path was built without CUDA, or no CUDA device is visible"
    } else {
        "this modelpool was built without the `cuda` feature"
    }
}

/// The context the sequences share: `context_length` cells for each, or the KV budget
/// when that is smaller.
pub(super) fn new_context<'m>(
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
    let every_sequence = context_length
        .checked_mul(sequences)
        .ok_or_else(|| EngineError::Load("context length x sequences overflows".into()))?;
    let cells = opts
        .kv_budget_tokens
        .map_or(every_sequence, |t| t.min(every_sequence));
    let cells =
        NonZeroU32::new(cells).ok_or_else(|| EngineError::Load("a KV cache of no cells".into()))?;
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

/// What a saved prefix is valid for: this model file's content (its digest, whatever
/// path or copy it is read from), this engine build, context length and device.
fn saved_key(file_digest: &str, opts: &LlamaOptions, context_length: u32) -> String {
    format!(
        "model={file_digest} engine=llama-cpp-2/{} context={context_length} device={}",
        crate::llamacpp::LLAMA_CPP_2_VERSION,
        opts.device,
    )
}
