//! Footprint prediction for a Hugging Face model directory (config.json plus
//! safetensors files) loaded through mistral.rs' normal pipeline, at each precision it
//! may be quantized to at load (ISQ).
//!
//! What such a worker holds, from reading mistral.rs and measuring it on the CPU: the
//! weights in f16 (mistral.rs' dtype on a CPU), except the linear layers that ISQ
//! quantizes (attention and MLP projections, and the output head, which for tied
//! embeddings becomes a quantized copy of the embedding table); the same KV cache,
//! prefill scratch and overhead as a GGUF worker.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use modelpool_catalog::gguf::KvShape;
use modelpool_pool::{BackendError, Footprint, ModelSpec, NATIVE_PRECISION};
use serde::Deserialize;

use super::{assemble, kv_and_activation};

/// Bytes per element of unquantized weights: mistral.rs loads f16 on the CPU.
const NATIVE_ELEMENT_BYTES: u64 = 2;

/// Largest safetensors header accepted (the format's own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// (weights per block, bytes per block) of an ISQ type: the ggml type it quantizes to.
pub fn block_layout(precision: &str) -> Option<(u64, u64)> {
    let ggml_type = match precision {
        "q4_0" => 2,
        "q4_1" => 3,
        "q5_0" => 6,
        "q5_1" => 7,
        "q8_0" => 8,
        "q8_1" => 9,
        "q2k" => 10,
        "q3k" => 11,
        "q4k" => 12,
        "q5k" => 13,
        "q6k" => 14,
        "q8k" => 15,
        _ => return None,
    };
    modelpool_catalog::gguf::block_layout(ggml_type)
}

/// The fields of config.json the prediction needs.
#[derive(Deserialize)]
struct Config {
    hidden_size: u64,
    num_hidden_layers: u64,
    num_attention_heads: u64,
    num_key_value_heads: Option<u64>,
    head_dim: Option<u64>,
    max_position_embeddings: Option<u64>,
    #[serde(default)]
    tie_word_embeddings: bool,
}

/// One tensor of a safetensors header.
#[derive(Deserialize)]
struct TensorInfo {
    shape: Vec<u64>,
}

/// Linear layers mistral.rs quantizes at load (ISQ).
fn quantized_at_load(name: &str) -> bool {
    const LINEAR: &[&str] = &[
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "lm_head",
    ];
    name.ends_with(".weight") && LINEAR.iter().any(|l| name.contains(l))
}

fn invalid(dir: &Path, reason: impl std::fmt::Display) -> BackendError {
    BackendError::InvalidModel(format!("{}: {reason}", dir.display()))
}

/// Element counts of every tensor in the directory's safetensors files, by name.
fn tensors(dir: &Path) -> Result<Vec<(String, u64)>, BackendError> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| invalid(dir, format!("cannot read the directory: {e}")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(invalid(dir, "no .safetensors files"));
    }
    let mut out = Vec::new();
    for file in files {
        let mut f = File::open(&file).map_err(|e| invalid(&file, e))?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len)
            .map_err(|_| invalid(&file, "too short to be a safetensors file"))?;
        let len = u64::from_le_bytes(len);
        if len > MAX_HEADER_BYTES {
            return Err(invalid(
                &file,
                format!("header of {len} bytes is implausible"),
            ));
        }
        let mut header = vec![0u8; len as usize];
        f.read_exact(&mut header)
            .map_err(|_| invalid(&file, "truncated header"))?;
        let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| invalid(&file, format!("unreadable header: {e}")))?;
        for (name, value) in map {
            if name == "__metadata__" {
                continue;
            }
            let info: TensorInfo = serde_json::from_value(value)
                .map_err(|e| invalid(&file, format!("tensor {name}: {e}")))?;
            let elements = info
                .shape
                .iter()
                .try_fold(1u64, |a, d| a.checked_mul(*d))
                .ok_or_else(|| invalid(&file, format!("tensor {name}: implausible shape")))?;
            out.push((name, elements));
        }
    }
    Ok(out)
}

/// Bytes of `elements` weights at `precision` (`None`: unquantized).
fn bytes_at(elements: u64, layout: Option<(u64, u64)>) -> Option<u64> {
    match layout {
        Some((block_weights, block_bytes)) => {
            elements.div_ceil(block_weights).checked_mul(block_bytes)
        }
        None => elements.checked_mul(NATIVE_ELEMENT_BYTES),
    }
}

/// The footprint of the model directory `spec` names at each of `precisions`, reading
/// its config and safetensors headers once.
pub fn predict_each(
    spec: &ModelSpec,
    precisions: &[Option<String>],
) -> Result<Vec<Footprint>, BackendError> {
    let dir = spec.local_file()?;
    let text = std::fs::read_to_string(dir.join("config.json"))
        .map_err(|e| invalid(dir, format!("config.json: {e}")))?;
    let config: Config =
        serde_json::from_str(&text).map_err(|e| invalid(dir, format!("config.json: {e}")))?;
    if !dir.join("tokenizer.json").is_file() {
        return Err(invalid(dir, "no tokenizer.json"));
    }
    let tensors = tensors(dir)?;
    let heads = config.num_attention_heads.max(1);
    let shape = KvShape {
        layers: config.num_hidden_layers,
        kv_heads: config.num_key_value_heads.unwrap_or(heads),
        head_dim: config.head_dim.unwrap_or(config.hidden_size / heads),
        max_context: config.max_position_embeddings,
    };
    let implausible = || invalid(dir, "implausible shape: its footprint overflows 64 bits");
    let (kv_bytes, activation_bytes) = kv_and_activation(&shape, spec).ok_or_else(implausible)?;
    precisions
        .iter()
        .map(|precision| {
            let weights_bytes = weights_at(dir, &config, &tensors, precision.as_deref())?;
            assemble(spec, weights_bytes, kv_bytes, activation_bytes).ok_or_else(implausible)
        })
        .collect()
}

/// Bytes of the weights once loaded at `precision`.
fn weights_at(
    dir: &Path,
    config: &Config,
    tensors: &[(String, u64)],
    precision: Option<&str>,
) -> Result<u64, BackendError> {
    let layout = match precision.filter(|p| *p != NATIVE_PRECISION) {
        Some(p) => Some(block_layout(p).ok_or_else(|| {
            invalid(
                dir,
                format!("precision {p:?} is not one modelpool can predict"),
            )
        })?),
        None => None,
    };
    let implausible = || invalid(dir, "implausible shape: its footprint overflows 64 bits");
    let mut weights_bytes = 0u64;
    let mut has_head = false;
    let mut embedding = 0u64;
    for (name, elements) in tensors {
        has_head |= name.contains("lm_head");
        if name.contains("embed_tokens") {
            embedding = *elements;
        }
        let at = if quantized_at_load(name) {
            layout
        } else {
            None
        };
        weights_bytes = bytes_at(*elements, at)
            .and_then(|b| weights_bytes.checked_add(b))
            .ok_or_else(implausible)?;
    }
    // Tied embeddings: quantizing the head makes a quantized copy of the table.
    if config.tie_word_embeddings && !has_head && layout.is_some() {
        weights_bytes = bytes_at(embedding, layout)
            .and_then(|b| weights_bytes.checked_add(b))
            .ok_or_else(implausible)?;
    }
    Ok(weights_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_precision_a_config_accepts_has_a_block_layout() {
        for p in modelpool_pool::PRECISIONS {
            assert_eq!(block_layout(p).is_some(), *p != NATIVE_PRECISION, "{p}");
        }
        assert_eq!(block_layout("q8_0"), Some((32, 34)));
        assert_eq!(bytes_at(64, block_layout("q4k")), Some(144));
    }

    /// A tiny tied-embedding model directory: config, tokenizer, one safetensors header.
    fn model_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("modelpool-hf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = r#"{"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "tie_word_embeddings": true}"#;
        std::fs::write(dir.join("config.json"), config).unwrap();
        std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
        let header = serde_json::json!({
            "model.embed_tokens.weight": {"dtype": "F16", "shape": [256, 64], "data_offsets": [0, 0]},
            "model.layers.0.self_attn.q_proj.weight": {"dtype": "F16", "shape": [64, 64], "data_offsets": [0, 0]},
            "model.norm.weight": {"dtype": "F16", "shape": [64], "data_offsets": [0, 0]},
        });
        let header = serde_json::to_vec(&header).unwrap();
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend(header);
        std::fs::write(dir.join("model.safetensors"), file).unwrap();
        dir
    }

    #[test]
    fn predicts_every_precision_from_one_read_as_each_alone() {
        let dir = model_dir();
        let mut spec = ModelSpec::new("m", &dir);
        spec.format = modelpool_pool::ModelFormat::Safetensors;
        let precisions = [None, Some("q8_0".to_owned()), Some("q4_0".to_owned())];
        let all = predict_each(&spec, &precisions).unwrap();
        for (precision, footprint) in precisions.iter().zip(&all) {
            spec.precision = precision.clone();
            assert_eq!(&crate::footprint::predict(&spec).unwrap(), footprint);
        }
        let weights = |p: Option<&str>| {
            let config: Config =
                serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
            weights_at(&dir, &config, &tensors(&dir).unwrap(), p).unwrap()
        };
        // f16: every weight at 2 bytes. q8_0: q_proj quantized, plus a quantized copy
        // of the tied embedding for the output head (34 bytes per 32 weights).
        assert_eq!(weights(None), (256 * 64 + 64 * 64 + 64) * 2);
        assert_eq!(
            weights(Some("q8_0")),
            256 * 64 * 2 + 64 * 64 / 32 * 34 + 64 * 2 + 256 * 64 / 32 * 34
        );
        let unknown = predict_each(&spec, &[Some("q3_x".to_owned())]).unwrap_err();
        assert!(unknown
            .to_string()
            .contains("\"q3_x\" is not one modelpool can predict"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
