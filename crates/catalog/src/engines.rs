//! Which engines exist and what each can run: their names, the formats they read, the
//! GGUF architectures they generate with, and which engine a model gets when its
//! configuration names none.

use crate::ModelFormat;

/// GGUF architectures llama.cpp generates text with (its `general.architecture`
/// names; encoders, embedding-only, speech and draft-only architectures left out).
pub const LLAMA_CPP_ARCHITECTURES: &[&str] = &[
    "llama",
    "llama4",
    "deci",
    "falcon",
    "grok",
    "gpt2",
    "gptj",
    "gptneox",
    "mpt",
    "baichuan",
    "starcoder",
    "refact",
    "bloom",
    "stablelm",
    "qwen",
    "qwen2",
    "qwen2moe",
    "qwen2vl",
    "qwen3",
    "qwen3moe",
    "qwen3next",
    "qwen3vl",
    "qwen3vlmoe",
    "qwen35",
    "qwen35moe",
    "phi2",
    "phi3",
    "phimoe",
    "plamo",
    "plamo2",
    "plamo3",
    "codeshell",
    "orion",
    "internlm2",
    "minicpm",
    "minicpm3",
    "gemma",
    "gemma2",
    "gemma3",
    "gemma3n",
    "gemma4",
    "starcoder2",
    "mamba",
    "mamba2",
    "jamba",
    "falcon-h1",
    "xverse",
    "command-r",
    "cohere2",
    "dbrx",
    "olmo",
    "olmo2",
    "olmoe",
    "openelm",
    "arctic",
    "deepseek",
    "deepseek2",
    "chatglm",
    "glm4",
    "glm4moe",
    "bitnet",
    "t5",
    "jais",
    "nemotron",
    "nemotron_h",
    "exaone",
    "exaone4",
    "rwkv6",
    "rwkv6qwen2",
    "rwkv7",
    "arwkv7",
    "granite",
    "granitemoe",
    "granitehybrid",
    "chameleon",
    "plm",
    "bailingmoe",
    "bailingmoe2",
    "dots1",
    "arcee",
    "ernie4_5",
    "ernie4_5-moe",
    "hunyuan-moe",
    "hunyuan-dense",
    "smollm3",
    "gpt-oss",
    "lfm2",
    "lfm2moe",
    "dream",
    "smallthinker",
    "llada",
    "llada-moe",
    "seed_oss",
    "grovemoe",
    "apertus",
    "minimax-m2",
    "cogvlm",
    "pangu-embedded",
    "mistral3",
    "mistral4",
];

/// GGUF architectures mistral.rs 0.8 loads (its GGUF pipeline's model match).
pub const MISTRAL_RS_ARCHITECTURES: &[&str] = &[
    "llama",
    "mistral3",
    "phi2",
    "phi3",
    "starcoder2",
    "qwen2",
    "qwen3",
    "qwen3moe",
];

/// The engines a worker can run a model in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EngineKind {
    /// llama.cpp through the `llama-cpp-2` crate: GGUF only; the default for GGUF.
    LlamaCpp,
    /// mistral.rs: GGUF and safetensors directories (quantized at load, UQFF).
    MistralRs,
}

impl EngineKind {
    /// Every engine, by its configuration name.
    pub const ALL: [EngineKind; 2] = [EngineKind::LlamaCpp, EngineKind::MistralRs];

    /// The name configuration and the API use.
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::LlamaCpp => "llama.cpp",
            EngineKind::MistralRs => "mistral.rs",
        }
    }

    /// The engine a model of `format` gets when its configuration names none: llama.cpp
    /// for GGUF (3.7-4x mistral.rs' decode speed and a fifth of its load time on the
    /// same file, BENCHMARKS.md "engines"), mistral.rs for safetensors directories.
    pub fn default_for(format: ModelFormat) -> Self {
        match format {
            ModelFormat::Gguf => EngineKind::LlamaCpp,
            ModelFormat::Safetensors => EngineKind::MistralRs,
        }
    }

    /// The engine a model runs in: the one `name` names (empty: the default for its
    /// format), refused when unknown or when it cannot read `format`. Configuration,
    /// the control API and the supervisor all decide here.
    pub fn resolve(name: &str, format: ModelFormat) -> Result<Self, String> {
        let engine = if name.is_empty() {
            Self::default_for(format)
        } else {
            name.parse()?
        };
        engine.check(format, None)?;
        Ok(engine)
    }

    /// Whether this engine loads models of `format`.
    pub fn reads(self, format: ModelFormat) -> bool {
        match self {
            EngineKind::LlamaCpp => format == ModelFormat::Gguf,
            EngineKind::MistralRs => true,
        }
    }

    /// The GGUF architectures (`general.architecture`) this engine generates text with.
    pub fn architectures(self) -> &'static [&'static str] {
        match self {
            EngineKind::LlamaCpp => LLAMA_CPP_ARCHITECTURES,
            EngineKind::MistralRs => MISTRAL_RS_ARCHITECTURES,
        }
    }

    /// Checks that this engine can run a model of `format` whose GGUF header names
    /// `architecture` (`None` for a safetensors directory).
    pub fn check(self, format: ModelFormat, architecture: Option<&str>) -> Result<(), String> {
        if !self.reads(format) {
            return Err(format!(
                "engine {:?} cannot read {} models (engines that can: {})",
                self.as_str(),
                format.as_str(),
                Self::ALL
                    .iter()
                    .filter(|e| e.reads(format))
                    .map(|e| e.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if let Some(arch) = architecture {
            let lower = arch.to_ascii_lowercase();
            if !self.architectures().contains(&lower.as_str()) {
                let others: Vec<&str> = Self::ALL
                    .iter()
                    .filter(|e| **e != self && e.architectures().contains(&lower.as_str()))
                    .map(|e| e.as_str())
                    .collect();
                let hint = if others.is_empty() {
                    String::new()
                } else {
                    format!("; engine {} loads it", others.join(", "))
                };
                return Err(format!(
                    "architecture {arch:?} is not one engine {:?} generates with{hint}",
                    self.as_str()
                ));
            }
        }
        Ok(())
    }
}

/// The engine a model runs in and that engine's own switches, as configuration set
/// them. The pool carries them to its backend and decides nothing by them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineOptions {
    /// The engine; `None`: the default for the model's format.
    pub kind: Option<EngineKind>,
    /// llama.cpp's switches (configuration refuses them for another engine).
    pub llama_cpp: LlamaCppOptions,
}

impl EngineOptions {
    /// The engine a model of `format` runs in (see [`EngineKind::resolve`]).
    pub fn resolve(&self, format: ModelFormat) -> Result<EngineKind, String> {
        match self.kind {
            Some(kind) => kind.check(format, None).map(|()| kind),
            None => Ok(EngineKind::default_for(format)),
        }
    }
}

/// llama.cpp's own switches for one model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LlamaCppOptions {
    /// Repack weights for ggml's CPU kernels instead of keeping them mapped.
    pub repack: bool,
    /// Lock the mapped weights in memory.
    pub mlock: bool,
    /// Reuse the KV of shared prompt prefixes, and save them across eviction.
    pub prefix_cache: bool,
    /// Cells of the one KV cache the model's sequences share; a request runs when its
    /// prompt and answer fit the cells free. `None`: the context length for each
    /// sequence (every sequence can always run).
    pub kv_budget_tokens: Option<u32>,
    /// The most cells the pool may give that cache at a load when the model's requests
    /// outnumber what `kv_budget_tokens` holds at full context and the room is spare
    /// (`None`: it never grows).
    pub kv_budget_max_tokens: Option<u32>,
    /// The shortest time between two chunks of one stream: text decoded sooner is held
    /// and sent with the next chunk (the first and the last are never held). Zero
    /// streams every token.
    pub stream_interval: std::time::Duration,
}

impl Default for LlamaCppOptions {
    fn default() -> Self {
        Self {
            repack: false,
            mlock: false,
            prefix_cache: true,
            kv_budget_tokens: None,
            kv_budget_max_tokens: None,
            stream_interval: std::time::Duration::ZERO,
        }
    }
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|e| e.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown engine {s:?}; expected one of: {}",
                    Self::ALL.map(|e| e.as_str()).join(", ")
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_list_the_known_ones() {
        for e in EngineKind::ALL {
            assert_eq!(e.as_str().parse::<EngineKind>(), Ok(e));
        }
        let err = "llamacpp".parse::<EngineKind>().unwrap_err();
        assert!(err.contains("llama.cpp, mistral.rs"), "{err}");
    }

    #[test]
    fn formats_and_architectures_are_checked_per_engine() {
        use ModelFormat::*;
        assert_eq!(EngineKind::default_for(Gguf), EngineKind::LlamaCpp);
        assert_eq!(EngineKind::default_for(Safetensors), EngineKind::MistralRs);
        let err = EngineKind::LlamaCpp.check(Safetensors, None).unwrap_err();
        assert!(err.contains("cannot read safetensors"), "{err}");
        assert!(EngineKind::LlamaCpp.check(Gguf, Some("gemma3")).is_ok());
        let err = EngineKind::MistralRs
            .check(Gguf, Some("gemma3"))
            .unwrap_err();
        assert!(err.contains("engine llama.cpp loads it"), "{err}");
        assert!(EngineKind::LlamaCpp.check(Gguf, Some("Llama")).is_ok());
        assert!(EngineKind::LlamaCpp.check(Gguf, Some("clip")).is_err());
    }

    #[test]
    fn resolve_defaults_by_format_and_refuses_what_cannot_read_it() {
        use ModelFormat::*;
        assert_eq!(EngineKind::resolve("", Gguf), Ok(EngineKind::LlamaCpp));
        assert_eq!(
            EngineKind::resolve("", Safetensors),
            Ok(EngineKind::MistralRs)
        );
        assert_eq!(
            EngineKind::resolve("mistral.rs", Gguf),
            Ok(EngineKind::MistralRs)
        );
        let err = EngineKind::resolve("llama.cpp", Safetensors).unwrap_err();
        assert!(err.contains("cannot read safetensors"), "{err}");
        assert!(EngineKind::resolve("vllm", Gguf).is_err());
    }

    #[test]
    fn options_resolve_like_names_and_default_llama_cpp_switches() {
        use ModelFormat::*;
        let default = EngineOptions::default();
        assert_eq!(default.resolve(Gguf), Ok(EngineKind::LlamaCpp));
        assert_eq!(default.resolve(Safetensors), Ok(EngineKind::MistralRs));
        assert!(default.llama_cpp.prefix_cache && !default.llama_cpp.repack);
        let llama = EngineOptions {
            kind: Some(EngineKind::LlamaCpp),
            ..default
        };
        assert!(llama
            .resolve(Safetensors)
            .unwrap_err()
            .contains("cannot read"));
    }
}
