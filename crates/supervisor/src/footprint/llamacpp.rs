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
//!   sequence (twice with the prefix cache on: a slot keeps its last prompt's);
//! - a fixed runtime overhead (binary, OpenMP threads, tokenizer tables).

use modelpool_catalog::gguf::GgufInfo;
use modelpool_pool::{BackendError, Device, Footprint, ModelSpec};

use super::{assemble_with, context_tokens, vocab_and_hidden};
use modelpool_catalog::EngineKind;

/// Fixed resident bytes of a CPU worker besides weights, KV cache and compute buffers:
/// measured with SmolLM2-135M right after load as RSS less the file's tensors and the
/// KV cache (42.6-42.7 MiB at 512..2048 tokens of context; `just bench-footprint`).
pub const CPU_OVERHEAD_BYTES: u64 = 43 << 20;

/// KV elements are f16, llama.cpp's default cache type.
const KV_ELEMENT_BYTES: u64 = 2;

/// llama.cpp rounds the cache up to a multiple of this many cells.
const KV_PAD_CELLS: u64 = 256;

/// VRAM of a GPU worker right after its load besides weights, KV cache and compute
/// buffers: the CUDA context, runtime and ggml's device state. Measured on an H200 (CUDA
/// 13.0, driver 580): a SmolLM2-shaped worker held 776 MiB after its load, of which 86
/// weights, 45 KV cache and ~143 compute buffers (BENCHMARKS.md, "GPU").
pub const GPU_CONTEXT_BYTES: u64 = 500 << 20;

/// VRAM a GPU worker adds at its first generation (kernels CUDA loads on first use, and
/// ggml's and cuBLAS' pools): 148 MiB on the same H200, charged from the load on.
pub const GPU_FIRST_USE_BYTES: u64 = 150 << 20;

/// Host memory of a GPU worker besides the token embedding it maps (CUDA runtime and
/// libraries, tokenizer): 474 MiB measured as above.
pub const GPU_HOST_BYTES: u64 = 475 << 20;

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
    let every_sequence = context
        .checked_mul(u64::from(spec.max_sequences.max(1)))
        .ok_or_else(implausible)?;
    // The cells the sequences share (`kv_budget`), never more than all at full context.
    let cells = spec
        .engine
        .llama_cpp
        .kv_budget_tokens
        .map_or(every_sequence, |t| u64::from(t).min(every_sequence))
        .div_ceil(KV_PAD_CELLS)
        * KV_PAD_CELLS;
    let kv_bytes = shape.kv_bytes(cells, KV_ELEMENT_BYTES);
    if kv_bytes == u64::MAX {
        return Err(implausible());
    }
    if spec.device != Device::Cpu {
        return gpu_footprint(info, spec, kv_bytes, cells, context).ok_or_else(implausible);
    }
    let (vocab, hidden) = vocab_and_hidden(info);
    let activation_bytes = hidden
        .checked_mul(4 * SCRATCH_HIDDEN_MULTIPLE)
        .and_then(|b| b.checked_mul(UBATCH_TOKENS.min(context)))
        .and_then(|b| b.checked_add(logits_bytes(vocab, spec)?))
        .ok_or_else(implausible)?;
    let repacked = if spec.engine.llama_cpp.repack && spec.device == Device::Cpu {
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

/// The logits a worker holds on the host: one output per sequence, and with the prefix
/// cache on, a copy of each slot's last prompt's (what an exact repeat samples from).
fn logits_bytes(vocab: u64, spec: &ModelSpec) -> Option<u64> {
    let copies = if spec.engine.llama_cpp.prefix_cache {
        2
    } else {
        1
    };
    vocab.checked_mul(4 * copies * u64::from(spec.max_sequences.max(1)))
}

/// Every layer offloaded to the GPU (the worker allows nothing else): weights, KV cache,
/// compute buffers and the CUDA context in VRAM. llama.cpp keeps the token embedding on
/// the host (its rows are looked up, never multiplied) and reads it from the mapped
/// file; a model whose output projection is that same tensor (tied) holds a copy of it
/// on the GPU as well. `None` when a number overflows.
fn gpu_footprint(
    info: &GgufInfo,
    spec: &ModelSpec,
    kv_bytes: u64,
    cells: u64,
    context: u64,
) -> Option<Footprint> {
    let embedding = info
        .tensors
        .iter()
        .find(|t| t.name == "token_embd.weight")
        .map_or(0, |t| t.bytes);
    let tied = !info.tensors.iter().any(|t| t.name == "output.weight");
    let weights_bytes = if tied {
        info.weight_bytes
    } else {
        info.weight_bytes.saturating_sub(embedding)
    };
    let overhead_bytes = GPU_CONTEXT_BYTES.checked_add(gpu_compute_bytes(info, cells, context)?)?;
    let vram = weights_bytes
        .checked_add(kv_bytes)?
        .checked_add(overhead_bytes)?
        .checked_add(GPU_FIRST_USE_BYTES)?;
    let mut charge = modelpool_pool::Charge::on(spec.device, vram);
    let (vocab, _) = vocab_and_hidden(info);
    let host = GPU_HOST_BYTES
        .checked_add(embedding)?
        .checked_add(logits_bytes(vocab, spec)?)?;
    charge.0.insert(Device::Cpu, host);
    Some(Footprint {
        kv_resident_at_load: true,
        weights_bytes,
        mapped_bytes: 0,
        kv_bytes,
        overhead_bytes,
        activation_bytes: GPU_FIRST_USE_BYTES,
        charge,
    })
}

/// The compute buffers llama.cpp reserves on the GPU for one batch of up to 512 tokens,
/// in f32: the logits of every batch token, the attention scores of every head over all
/// `cells` of the cache (without flash attention), the feed-forward pair and a few
/// hidden-size activations. 143 MiB for a SmolLM2 shape at 2048 cells.
fn gpu_compute_bytes(info: &GgufInfo, cells: u64, context: u64) -> Option<u64> {
    let (vocab, hidden) = vocab_and_hidden(info);
    let heads = info.arch_u64("attention.head_count").unwrap_or(1);
    let ffn = info
        .arch_u64("feed_forward_length")
        .unwrap_or(hidden.checked_mul(4)?);
    let per_token = vocab
        .checked_add(heads.checked_mul(cells)?)?
        .checked_add(ffn.checked_mul(2)?)?
        .checked_add(hidden.checked_mul(4)?)?;
    per_token.checked_mul(4 * UBATCH_TOKENS.min(context))
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelpool_catalog::gguf::{TensorEntry, Value};
    use std::collections::BTreeMap;

    /// A SmolLM2-shaped header: 30 layers, hidden 576, 9 heads (3 KV), FFN 1536.
    fn smol(output: bool) -> GgufInfo {
        let int = |v: i128| Value::Int(v);
        let tensor = |name: &str, bytes| TensorEntry {
            name: name.into(),
            dims: vec![576, 49152],
            ggml_type: 8,
            offset: 0,
            bytes,
        };
        let mut tensors = vec![tensor("token_embd.weight", 30 << 20)];
        if output {
            tensors.push(tensor("output.weight", 30 << 20));
        }
        GgufInfo {
            version: 3,
            architecture: "llama".into(),
            metadata: BTreeMap::from([
                ("llama.block_count".to_owned(), int(30)),
                ("llama.attention.head_count".to_owned(), int(9)),
                ("llama.attention.head_count_kv".to_owned(), int(3)),
                ("llama.embedding_length".to_owned(), int(576)),
                ("llama.feed_forward_length".to_owned(), int(1536)),
                ("tokenizer.ggml.tokens".to_owned(), Value::Array(49152)),
            ]),
            tensor_count: tensors.len() as u64,
            weight_bytes: 86 << 20,
            tensors,
            data_start: 0,
        }
    }

    #[test]
    fn a_gpu_model_is_charged_to_its_gpu_but_for_the_host_side() {
        let mut spec = ModelSpec::new("m", "/m.gguf");
        spec.engine.kind = Some(modelpool_pool::EngineKind::LlamaCpp);
        spec.device = Device::Cuda(0);
        spec.context_length = 2048;
        let tied = predict_from(&smol(false), &spec).unwrap();
        // Measured on an H200: 776 MiB of VRAM after the load, 924 after a generation.
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        assert!(
            (770.0..780.0).contains(&mib(tied.at_load_bytes())),
            "{}",
            mib(tied.at_load_bytes())
        );
        let vram = tied.charge.get(Device::Cuda(0));
        assert!((915.0..935.0).contains(&mib(vram)), "{}", mib(vram));
        let logits = 2 * 4 * 49152;
        assert_eq!(
            tied.charge.get(Device::Cpu),
            GPU_HOST_BYTES + (30 << 20) + logits
        );
        // An output projection of its own: the embedding stays on the host only.
        let untied = predict_from(&smol(true), &spec).unwrap();
        assert_eq!(untied.weights_bytes, tied.weights_bytes - (30 << 20));
        assert_eq!(untied.charge.get(Device::Cuda(0)), vram - (30 << 20));
        // On the CPU nothing is on a GPU; without the prefix cache no logits are kept.
        spec.device = Device::Cpu;
        let cpu = predict_from(&smol(false), &spec).unwrap();
        assert_eq!(cpu.charge.get(Device::Cuda(0)), 0);
        spec.engine.llama_cpp.prefix_cache = false;
        let uncached = predict_from(&smol(false), &spec).unwrap();
        assert_eq!(cpu.activation_bytes - uncached.activation_bytes, 4 * 49152);
    }

    #[test]
    fn the_kv_cache_is_the_budget_the_sequences_share() {
        let mut spec = ModelSpec::new("m", "/m.gguf");
        spec.engine.kind = Some(modelpool_pool::EngineKind::LlamaCpp);
        spec.context_length = 1024;
        spec.max_sequences = 4;
        let every = predict_from(&smol(false), &spec).unwrap();
        spec.engine.llama_cpp.kv_budget_tokens = Some(2048);
        let shared = predict_from(&smol(false), &spec).unwrap();
        assert_eq!(shared.kv_bytes * 2, every.kv_bytes);
        assert_eq!(
            every.charge.get(Device::Cpu) - shared.charge.get(Device::Cpu),
            shared.kv_bytes
        );
    }
}
