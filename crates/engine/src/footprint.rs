//! Predicts a worker's memory before it is started, from the GGUF header and figures
//! measured for mistral.rs 0.8 on the CPU (`just bench-footprint`, BENCHMARKS.md).
//!
//! What a worker holds, from reading mistral.rs and measuring it:
//! - the tensors as stored in the file (quantized weights stay quantized), plus the
//!   token embedding expanded to an f32 table for lookups;
//! - the KV cache in bf16, grown lazily in 512-token blocks up to the context, for each
//!   sequence; growing copies it (old and new coexist for a moment), and a per-request
//!   tensor half its size is allocated at admission;
//! - a one-pass prefill's scratch (the attention mask and activations), which grows
//!   with the square of the prompt length;
//! - a fixed runtime overhead (binary, tokenizer, thread pools).

use modelpool_pool::gguf::{self, GgufInfo};
use modelpool_pool::{BackendError, Charge, Device, Footprint, ModelSpec};

/// Fixed resident bytes of a CPU worker besides weights: measured with SmolLM2-135M as
/// RSS after load less the file's tensors and the f32 embedding table.
pub const CPU_OVERHEAD_BYTES: u64 = 150 << 20;

/// Host memory of a GPU worker (runtime, tokenizer, CUDA context); its weights and KV
/// cache are charged to the GPU. Not measured here (no GPU): an estimate.
pub const GPU_HOST_OVERHEAD_BYTES: u64 = 400 << 20;

/// CUDA context and cuBLAS workspace on the GPU itself. An estimate, as above.
pub const GPU_OVERHEAD_BYTES: u64 = 300 << 20;

/// KV elements are bf16 (mistral.rs picks bf16 on the CPU and f16/bf16 on a GPU).
const KV_ELEMENT_BYTES: u64 = 2;

/// The cache grows in blocks of this many tokens.
const KV_BLOCK_TOKENS: u64 = 512;

/// Peak KV bytes per sequence, in halves of the cache itself: the cache, its copy while
/// growing, and the admission tensor (2.5x). Fitted with the prefill scratch below to
/// peak RSS at 512..4096 tokens of context (BENCHMARKS.md, "footprint").
const KV_HALVES: u64 = 5;

/// Prefill scratch per token squared, in bytes (fitted as above).
pub const ACTIVATION_BYTES_PER_TOKEN_SQ: u64 = 4;

/// The footprint of `spec`, from its file header.
pub fn predict(spec: &ModelSpec) -> Result<Footprint, BackendError> {
    let file = spec.local_file()?;
    let info = gguf::read_header(file)
        .map_err(|e| BackendError::InvalidModel(format!("{}: {e}", file.display())))?;
    predict_from(&info, spec)
}

/// GGUF architectures mistral.rs 0.8 loads (its GGUF pipeline's model match).
pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "llama",
    "mistral3",
    "phi2",
    "phi3",
    "starcoder2",
    "qwen2",
    "qwen3",
    "qwen3moe",
];

pub fn predict_from(info: &GgufInfo, spec: &ModelSpec) -> Result<Footprint, BackendError> {
    if !SUPPORTED_ARCHITECTURES.contains(&info.architecture.to_ascii_lowercase().as_str()) {
        return Err(BackendError::InvalidModel(format!(
            "{}: architecture {:?} is not supported (supported: {})",
            spec.source,
            info.architecture,
            SUPPORTED_ARCHITECTURES.join(", ")
        )));
    }
    let shape = info
        .kv_shape()
        .map_err(|e| BackendError::InvalidModel(format!("{}: {e}", spec.source)))?;
    let context = u64::from(spec.context_length).min(shape.max_context.unwrap_or(u64::MAX));
    let blocks = context.div_ceil(KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS;
    let per_sequence = shape.kv_bytes(blocks, KV_ELEMENT_BYTES) * KV_HALVES / 2;
    let kv_bytes = per_sequence * u64::from(spec.max_sequences.max(1));
    let activation_bytes = ACTIVATION_BYTES_PER_TOKEN_SQ * context * context;
    let weights_bytes = info.weight_bytes + embedding_table_bytes(info);
    let (overhead_bytes, charge) = match spec.device {
        Device::Cpu => {
            let total = weights_bytes + kv_bytes + activation_bytes + CPU_OVERHEAD_BYTES;
            (CPU_OVERHEAD_BYTES, Charge::on(Device::Cpu, total))
        }
        gpu @ Device::Cuda(_) => {
            let on_gpu = weights_bytes + kv_bytes + activation_bytes + GPU_OVERHEAD_BYTES;
            let mut charge = Charge::on(gpu, on_gpu);
            charge.0.insert(Device::Cpu, GPU_HOST_OVERHEAD_BYTES);
            (GPU_OVERHEAD_BYTES + GPU_HOST_OVERHEAD_BYTES, charge)
        }
    };
    Ok(Footprint {
        weights_bytes,
        kv_bytes,
        overhead_bytes,
        activation_bytes,
        charge,
    })
}

/// Bytes of the token embedding as a dense f32 table (vocabulary x hidden size).
fn embedding_table_bytes(info: &GgufInfo) -> u64 {
    let hidden = info.arch_u64("embedding_length").unwrap_or(0);
    let vocab = match info.metadata.get("tokenizer.ggml.tokens") {
        Some(gguf::Value::Array(n)) => *n,
        _ => 0,
    };
    vocab * hidden * 4
}
