//! Model formats, and what each engine does with them: the precisions a model
//! quantized at load may ask for and the files an engine writes its quantized weights to.

use std::path::{Path, PathBuf};

/// File format of a model's weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFormat {
    /// One GGUF file, quantized ahead of time.
    Gguf,
    /// A Hugging Face model directory (config.json, tokenizer.json, *.safetensors),
    /// optionally quantized at load (mistral.rs' in-situ quantization).
    Safetensors,
}

impl ModelFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelFormat::Gguf => "gguf",
            ModelFormat::Safetensors => "safetensors",
        }
    }

    /// Whether a model of this format is quantized at load (a list of precisions
    /// applies to it); a GGUF file keeps its own precision.
    pub fn quantized_at_load(self) -> bool {
        self == ModelFormat::Safetensors
    }
}

impl std::str::FromStr for ModelFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "gguf" => Ok(ModelFormat::Gguf),
            "safetensors" => Ok(ModelFormat::Safetensors),
            other => Err(format!(
                "unknown model format {other:?}; expected one of: gguf, safetensors"
            )),
        }
    }
}

/// The precision that keeps a model's weights as its files store them.
pub const NATIVE_PRECISION: &str = "none";

/// Precisions a model quantized at load may list: [`NATIVE_PRECISION`] and the
/// quantization types mistral.rs applies on the CPU (its ISQ types, lowercased).
pub const PRECISIONS: &[&str] = &[
    NATIVE_PRECISION,
    "q4_0",
    "q4_1",
    "q5_0",
    "q5_1",
    "q8_0",
    "q8_1",
    "q2k",
    "q3k",
    "q4k",
    "q5k",
    "q6k",
    "q8k",
];

/// Extension of the quantized weights a load quantized at load writes for the next
/// one (mistral.rs' UQFF).
pub const QUANTIZED_WEIGHTS_EXT: &str = "uqff";

/// The files mistral.rs wrote for quantized weights named `file`: it numbers shards
/// (`model-0.uqff`, `model-1.uqff`, ...) beside the name it was given.
pub fn quantized_weights_shards(file: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(stem), Some(ext)) = (
        file.parent(),
        file.file_stem().and_then(|s| s.to_str()),
        file.extension().and_then(|s| s.to_str()),
    ) else {
        return Vec::new();
    };
    let prefix = format!("{stem}-");
    let suffix = format!(".{ext}");
    let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name == format!("{stem}{suffix}")
                || name
                    .strip_prefix(&prefix)
                    .and_then(|r| r.strip_suffix(&suffix))
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|e| e.path())
        .collect();
    shards.sort();
    shards
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_and_name_the_known_ones() {
        assert_eq!("gguf".parse(), Ok(ModelFormat::Gguf));
        assert_eq!("safetensors".parse(), Ok(ModelFormat::Safetensors));
        let err = "onnx".parse::<ModelFormat>().unwrap_err();
        assert!(err.contains("gguf, safetensors"), "{err}");
        assert!(ModelFormat::Safetensors.quantized_at_load());
        assert!(!ModelFormat::Gguf.quantized_at_load());
    }

    #[test]
    fn shards_are_the_numbered_files_beside_the_name() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "model.uqff",
            "model-0.uqff",
            "model-12.uqff",
            "model-x.uqff",
            "other-1.uqff",
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let found: Vec<String> = quantized_weights_shards(&dir.path().join("model.uqff"))
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(found, ["model-0.uqff", "model-12.uqff", "model.uqff"]);
    }
}
