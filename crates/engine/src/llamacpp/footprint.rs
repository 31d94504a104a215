//! Predicts a llama.cpp worker's memory from the GGUF header (`just bench-footprint`
//! checks it against measured workers; BENCHMARKS.md, "footprint").
//!
//! What a llama.cpp worker holds:
//! - the tensors as stored in the file, mapped read-only: file-backed pages of the page
//!   cache once touched (the first decode touches them all). With `repack` on, ggml
//!   copies the weights into anonymous memory in its own layout as well, and the mapped
//!   pages it read stay resident until the kernel reclaims them: twice the weights;
//! - the KV cache in f16 for `context_length` x `max_sequences` cells (rounded up to 256
//!   cells), cleared, and so resident, at load;
//! - compute buffers for a batch of up to 512 tokens, and the logits of one output per
//!   sequence;
//! - a fixed runtime overhead (binary, OpenMP threads, tokenizer tables).

use modelpool_pool::gguf::GgufInfo;
use modelpool_pool::{BackendError, Device, Footprint, ModelSpec};

use crate::footprint::assemble_with;
use crate::EngineKind;

/// Fixed resident bytes of a CPU worker besides weights, KV cache and compute buffers.
pub const CPU_OVERHEAD_BYTES: u64 = 24 << 20;

/// KV elements are f16, llama.cpp's default cache type.
const KV_ELEMENT_BYTES: u64 = 2;

/// llama.cpp rounds the cache up to a multiple of this many cells.
const KV_PAD_CELLS: u64 = 256;

/// Tokens in one physical batch (n_ubatch).
const UBATCH_TOKENS: u64 = 512;

/// Compute scratch per batch token, in units of the hidden size times 4 bytes
/// (activations of one layer's attention and feed-forward, reused layer to layer).
const SCRATCH_HIDDEN_MULTIPLE: u64 = 12;

pub fn predict_from(info: &GgufInfo, spec: &ModelSpec) -> Result<Footprint, BackendError> {
    EngineKind::LlamaCpp
        .check(spec.format, Some(&info.architecture))
        .map_err(|e| BackendError::InvalidModel(format!("{}: engine: {e}", spec.source)))?;
    let implausible = || {
        BackendError::InvalidModel(format!(
            "{}: implausible shape: its footprint overflows 64 bits",
            spec.source
        ))
    };
    let shape = info
        .kv_shape()
        .map_err(|e| BackendError::InvalidModel(format!("{}: {e}", spec.source)))?;
    let context = u64::from(spec.context_length).min(shape.max_context.unwrap_or(u64::MAX));
    let cells = context
        .checked_mul(u64::from(spec.max_sequences.max(1)))
        .ok_or_else(implausible)?
        .div_ceil(KV_PAD_CELLS)
        * KV_PAD_CELLS;
    let kv_bytes = shape.kv_bytes(cells, KV_ELEMENT_BYTES);
    if kv_bytes == u64::MAX {
        return Err(implausible());
    }
    let hidden = info.arch_u64("embedding_length").unwrap_or(0);
    let vocab = info
        .get("tokenizer.ggml.tokens")
        .and_then(modelpool_pool::gguf::Value::array_len)
        .unwrap_or(0);
    let activation_bytes = hidden
        .checked_mul(4 * SCRATCH_HIDDEN_MULTIPLE)
        .and_then(|b| b.checked_mul(UBATCH_TOKENS.min(context)))
        .and_then(|b| b.checked_add(vocab.checked_mul(4 * u64::from(spec.max_sequences.max(1)))?))
        .ok_or_else(implausible)?;
    let copies = if spec.repack && spec.device == Device::Cpu {
        2
    } else {
        1
    };
    let weights_bytes = info
        .weight_bytes
        .checked_mul(copies)
        .ok_or_else(implausible)?;
    assemble_with(
        spec,
        CPU_OVERHEAD_BYTES,
        weights_bytes,
        kv_bytes,
        activation_bytes,
    )
    .ok_or_else(implausible)
}
