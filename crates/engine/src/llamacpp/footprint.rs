//! Predicts a llama.cpp worker's memory from the GGUF header (`just bench-footprint`
//! checks it against measured workers; BENCHMARKS.md, "footprint").
//!
//! What a llama.cpp worker holds:
//! - the tensors as stored in the file, mapped read-only: file-backed pages of the page
//!   cache (llama.cpp maps with MAP_POPULATE, so they are resident from the load). With
//!   `repack` on, ggml copies the matrices of the types it has repacked kernels for into
//!   anonymous memory in its own layout as well, and the mapped pages it read stay
//!   resident until the kernel reclaims them: those tensors count twice;
//! - the KV cache in f16 for `context_length` x `max_sequences` cells (rounded up to 256
//!   cells), cleared, and so resident, at load;
//! - compute buffers for a batch of up to 512 tokens, and the logits of one output per
//!   sequence;
//! - a fixed runtime overhead (binary, OpenMP threads, tokenizer tables).

use modelpool_pool::gguf::GgufInfo;
use modelpool_pool::{BackendError, Device, Footprint, ModelSpec};

use crate::footprint::{assemble_with, context_tokens, vocab_and_hidden};
use crate::EngineKind;

/// Fixed resident bytes of a CPU worker besides weights, KV cache and compute buffers:
/// measured with SmolLM2-135M right after load as RSS less the file's tensors and the
/// KV cache (42.6-42.7 MiB at 512..2048 tokens of context; `just bench-footprint`).
pub const CPU_OVERHEAD_BYTES: u64 = 43 << 20;

/// KV elements are f16, llama.cpp's default cache type.
const KV_ELEMENT_BYTES: u64 = 2;

/// llama.cpp rounds the cache up to a multiple of this many cells.
const KV_PAD_CELLS: u64 = 256;

/// Tokens in one physical batch (n_ubatch).
const UBATCH_TOKENS: u64 = 512;

/// Compute scratch per batch token, in units of the hidden size times 4 bytes
/// (activations of one layer's attention and feed-forward, reused layer to layer).
/// Fitted to the growth after a prompt fills the context (15-20 MiB for SmolLM2).
const SCRATCH_HIDDEN_MULTIPLE: u64 = 16;

/// ggml types whose matrices ggml's x86 CPU backend repacks (Q4_0, Q8_0, Q4_K, IQ4_NL);
/// a Q4_1 model, like SmolLM2's, has none (measured: the same RSS either way).
const REPACKED_TYPES: [u32; 4] = [2, 8, 12, 20];

/// Bytes of the tensors repacking copies: the matrices of repacked types, not the token
/// embedding (read row by row, never multiplied).
fn repacked_bytes(info: &GgufInfo) -> u64 {
    info.tensors
        .iter()
        .filter(|t| REPACKED_TYPES.contains(&t.ggml_type) && t.dims.len() == 2)
        .filter(|t| t.name != "token_embd.weight")
        .map(|t| t.bytes)
        .fold(0, u64::saturating_add)
}

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
    let context = context_tokens(&shape, spec);
    let cells = context
        .checked_mul(u64::from(spec.max_sequences.max(1)))
        .ok_or_else(implausible)?
        .div_ceil(KV_PAD_CELLS)
        * KV_PAD_CELLS;
    let kv_bytes = shape.kv_bytes(cells, KV_ELEMENT_BYTES);
    if kv_bytes == u64::MAX {
        return Err(implausible());
    }
    let (vocab, hidden) = vocab_and_hidden(info);
    let activation_bytes = hidden
        .checked_mul(4 * SCRATCH_HIDDEN_MULTIPLE)
        .and_then(|b| b.checked_mul(UBATCH_TOKENS.min(context)))
        .and_then(|b| b.checked_add(vocab.checked_mul(4 * u64::from(spec.max_sequences.max(1)))?))
        .ok_or_else(implausible)?;
    let repacked = if spec.repack && spec.device == Device::Cpu {
        repacked_bytes(info)
    } else {
        0
    };
    let weights_bytes = info
        .weight_bytes
        .checked_add(repacked)
        .ok_or_else(implausible)?;
    let mut footprint = assemble_with(
        spec,
        CPU_OVERHEAD_BYTES,
        weights_bytes,
        kv_bytes,
        activation_bytes,
    )
    .ok_or_else(implausible)?;
    // llama.cpp clears its KV cache at load: it is resident from the start.
    footprint.kv_resident_at_load = true;
    Ok(footprint)
}
