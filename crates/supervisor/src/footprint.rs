//! Predicts a worker's memory before it is started: [`predict`] picks the engine's
//! predictor (llama.cpp in [`llamacpp`], safetensors directories in [`hf`]); this module
//! holds mistral.rs' for GGUF files, from the header and figures measured for
//! mistral.rs 0.8 on the CPU (`just bench-footprint`, BENCHMARKS.md).
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

pub mod hf;
pub mod llamacpp;

use modelpool_catalog::gguf::{self, GgufInfo};
use modelpool_pool::{BackendError, Charge, Device, Footprint, ModelFormat, ModelSpec};

/// Fixed resident bytes of a CPU worker besides weights: measured with SmolLM2-135M as
/// RSS after load less the file's tensors and the f32 embedding table (workers skip
/// mistral.rs' warm-up pass and library backtraces; both were once ~80 MiB of this).
pub const CPU_OVERHEAD_BYTES: u64 = 71 << 20;

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
    let one = predict_each(spec, std::slice::from_ref(&spec.precision))?;
    Ok(one
        .into_iter()
        .next()
        .expect("one precision, one footprint"))
}

/// The footprint of `spec` at each of `precisions`, reading its headers once.
pub fn predict_each(
    spec: &ModelSpec,
    precisions: &[Option<String>],
) -> Result<Vec<Footprint>, BackendError> {
    if spec.format == ModelFormat::Safetensors {
        return hf::predict_each(spec, precisions);
    }
    let file = spec.local_file()?;
    let info = gguf::read_header(file)
        .map_err(|e| BackendError::InvalidModel(format!("{}: {e}", file.display())))?;
    let engine = crate::process::engine_of(spec)?;
    precisions
        .iter()
        .map(|precision| match engine {
            modelpool_catalog::EngineKind::LlamaCpp => llamacpp::predict_from(&info, spec)
                .map(|footprint| mapped_from_file(footprint, &info, spec)),
            modelpool_catalog::EngineKind::MistralRs => {
                predict_from(&info, &spec.at_precision(precision))
            }
        })
        .collect()
}

/// llama.cpp maps the file's tensors into a CPU worker (repacking copies some of them as
/// well, but leaves their pages mapped): pages of the page cache that every worker
/// mapping the same file shares, which the pool charges once.
fn mapped_from_file(mut footprint: Footprint, info: &GgufInfo, spec: &ModelSpec) -> Footprint {
    if spec.device == Device::Cpu {
        footprint.mapped_bytes = info.weight_bytes.min(footprint.weights_bytes);
    }
    footprint
}

/// GGUF architectures mistral.rs 0.8 loads.
pub use modelpool_catalog::MISTRAL_RS_ARCHITECTURES as SUPPORTED_ARCHITECTURES;

/// KV cache bytes for `spec`'s context and sequences, and the prefill scratch, for a
/// model of `shape`; `None` when the numbers overflow.
pub(crate) fn kv_and_activation(shape: &gguf::KvShape, spec: &ModelSpec) -> Option<(u64, u64)> {
    let context = context_tokens(shape, spec);
    let blocks = context.div_ceil(KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS;
    let one = shape.kv_bytes(blocks, KV_ELEMENT_BYTES);
    let per_sequence = (one != u64::MAX).then(|| one.checked_mul(KV_HALVES))?? / 2;
    let kv = per_sequence.checked_mul(u64::from(spec.max_sequences.max(1)))?;
    let activation = ACTIVATION_BYTES_PER_TOKEN_SQ
        .checked_mul(context)?
        .checked_mul(context)?;
    Some((kv, activation))
}

/// [`assemble_with`] mistral.rs' CPU overhead.
pub(crate) fn assemble(
    spec: &ModelSpec,
    weights_bytes: u64,
    kv_bytes: u64,
    activation_bytes: u64,
) -> Option<Footprint> {
    assemble_with(
        spec,
        CPU_OVERHEAD_BYTES,
        weights_bytes,
        kv_bytes,
        activation_bytes,
    )
}

/// Puts a footprint together: the charge per device for weights, KV cache, scratch
/// and the engine's overhead on `spec`'s device.
pub(crate) fn assemble_with(
    spec: &ModelSpec,
    cpu_overhead_bytes: u64,
    weights_bytes: u64,
    kv_bytes: u64,
    activation_bytes: u64,
) -> Option<Footprint> {
    let sum = |overhead: u64| {
        weights_bytes
            .checked_add(kv_bytes)?
            .checked_add(activation_bytes)?
            .checked_add(overhead)
    };
    let (overhead_bytes, charge) = match spec.device {
        Device::Cpu => (
            cpu_overhead_bytes,
            Charge::on(Device::Cpu, sum(cpu_overhead_bytes)?),
        ),
        gpu @ Device::Cuda(_) => {
            let mut charge = Charge::on(gpu, sum(GPU_OVERHEAD_BYTES)?);
            charge.0.insert(Device::Cpu, GPU_HOST_OVERHEAD_BYTES);
            (GPU_OVERHEAD_BYTES + GPU_HOST_OVERHEAD_BYTES, charge)
        }
    };
    Some(Footprint {
        kv_resident_at_load: false,
        weights_bytes,
        mapped_bytes: 0,
        kv_bytes,
        overhead_bytes,
        activation_bytes,
        charge,
    })
}

pub fn predict_from(info: &GgufInfo, spec: &ModelSpec) -> Result<Footprint, BackendError> {
    if !SUPPORTED_ARCHITECTURES.contains(&info.architecture.to_ascii_lowercase().as_str()) {
        return Err(BackendError::InvalidModel(format!(
            "{}: engine: architecture {:?} is not supported by mistral.rs (supported: {}); engine \"llama.cpp\" loads far more",
            spec.source,
            info.architecture,
            SUPPORTED_ARCHITECTURES.join(", ")
        )));
    }
    let shape = info
        .kv_shape()
        .map_err(|e| BackendError::InvalidModel(format!("{}: {e}", spec.source)))?;
    // A hostile header can claim any shape: every product is checked, and one that
    // overflows is an invalid model, not a panic or a wrapped small number.
    let implausible = || {
        BackendError::InvalidModel(format!(
            "{}: implausible shape (layers {}, kv heads {}, head size {}): its footprint overflows 64 bits",
            spec.source, shape.layers, shape.kv_heads, shape.head_dim
        ))
    };
    let (kv_bytes, activation_bytes) = kv_and_activation(&shape, spec).ok_or_else(implausible)?;
    let weights_bytes = embedding_table_bytes(info)
        .and_then(|e| e.checked_add(info.weight_bytes))
        .ok_or_else(implausible)?;
    assemble(spec, weights_bytes, kv_bytes, activation_bytes).ok_or_else(implausible)
}

/// Bytes of the token embedding as a dense f32 table (vocabulary x hidden size);
/// `None` when the header's numbers overflow.
fn embedding_table_bytes(info: &GgufInfo) -> Option<u64> {
    let (vocab, hidden) = vocab_and_hidden(info);
    vocab.checked_mul(hidden)?.checked_mul(4)
}

/// The vocabulary size and hidden size the header states (0 where it does not).
pub(crate) fn vocab_and_hidden(info: &GgufInfo) -> (u64, u64) {
    let vocab = info
        .get("tokenizer.ggml.tokens")
        .and_then(gguf::Value::array_len)
        .unwrap_or(0);
    (vocab, info.arch_u64("embedding_length").unwrap_or(0))
}

/// Tokens of context a worker allocates for: the configured length, capped by the
/// model's own.
pub(crate) fn context_tokens(shape: &gguf::KvShape, spec: &ModelSpec) -> u64 {
    u64::from(spec.context_length).min(shape.max_context.unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn info(layers: i128, hidden: i128, vocab: u64) -> GgufInfo {
        let int = |v: i128| gguf::Value::Int(v);
        GgufInfo {
            version: 3,
            architecture: "llama".into(),
            metadata: BTreeMap::from([
                ("llama.block_count".to_owned(), int(layers)),
                ("llama.attention.head_count".to_owned(), int(32)),
                ("llama.attention.head_count_kv".to_owned(), int(8)),
                ("llama.embedding_length".to_owned(), int(hidden)),
                (
                    "tokenizer.ggml.tokens".to_owned(),
                    gguf::Value::Array(vocab),
                ),
            ]),
            tensor_count: 1,
            weight_bytes: 1 << 30,
            tensors: vec![gguf::TensorEntry {
                name: "token_embd.weight".into(),
                dims: vec![hidden as u64, vocab],
                ggml_type: 8,
                offset: 0,
                bytes: 100 << 20,
            }],
            data_start: 0,
        }
    }

    #[test]
    fn hostile_shapes_are_invalid_models_not_panics() {
        let spec = ModelSpec::new("m", "/m.gguf");
        assert!(predict_from(&info(32, 4096, 32000), &spec).is_ok());
        for bad in [
            info(0xa900_0000_0002, 4096, 32000),
            info(32, 1 << 60, 32000),
            info(32, 4096, u64::MAX / 2),
        ] {
            let err = predict_from(&bad, &spec).unwrap_err();
            assert!(err.to_string().contains("implausible shape"), "{err}");
        }
    }

    #[test]
    fn llama_cpp_maps_the_file_tensors_on_the_cpu_only() {
        let info = info(32, 4096, 32000);
        let mut spec = ModelSpec::new("m", "/m.gguf");
        spec.engine.kind = Some(modelpool_pool::EngineKind::LlamaCpp);
        let predict = |spec: &ModelSpec| {
            let footprint = llamacpp::predict_from(&info, spec).unwrap();
            mapped_from_file(footprint, &info, spec)
        };
        let cpu = predict(&spec);
        assert_eq!(cpu.mapped_bytes, info.weight_bytes);
        assert!(cpu.mapped_bytes <= cpu.charge.get(Device::Cpu));
        // Offloaded to a GPU, the weights are copies there.
        spec.device = Device::Cuda(0);
        assert_eq!(predict(&spec).mapped_bytes, 0);
        // ...but for the token embedding, which stays on the host: every weight on the
        // GPU (the output projection is tied to the embedding, so a copy is there too).
        let gpu = predict(&spec);
        let embedding = 100 << 20;
        let kept_logits = 2 * 4 * 32000;
        assert_eq!(
            gpu.charge.get(Device::Cpu),
            llamacpp::GPU_HOST_BYTES + embedding + kept_logits
        );
        assert_eq!(gpu.weights_bytes, info.weight_bytes);
        assert_eq!(
            gpu.charge.get(Device::Cuda(0)),
            gpu.at_load_bytes() + gpu.growth_bytes()
        );
        // mistral.rs copies them.
        assert_eq!(
            predict_from(&info, &ModelSpec::new("m", "/m.gguf"))
                .unwrap()
                .mapped_bytes,
            0
        );
    }
}
