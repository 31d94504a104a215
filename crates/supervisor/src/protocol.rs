//! The worker protocol's process side: the command line a worker is started with
//! ([`WorkerArgs`], parsed by the worker, written by the supervisor) and the lines it
//! prints on stdout as it loads and once it serves. The gRPC side is
//! `modelpool_proto::worker::v1`.

use std::ffi::OsString;
use std::path::PathBuf;

use modelpool_catalog::{EngineKind, ModelFormat};
use serde::{Deserialize, Serialize};

/// Prefix of the line a worker prints on stdout once it serves.
pub const READY_PREFIX: &str = "MODELPOOL_WORKER_READY ";

/// Prefix of the lines a worker prints on stdout as it reaches each load stage.
pub const STAGE_PREFIX: &str = "MODELPOOL_WORKER_STAGE ";

/// Command-line arguments of `modelpool worker`.
#[derive(clap::Args, Debug, Clone)]
pub struct WorkerArgs {
    /// Unix socket to serve on; must not exist yet.
    #[arg(long)]
    pub socket: PathBuf,
    /// GGUF file to load.
    #[arg(long)]
    pub model_path: PathBuf,
    /// The model's id, for logs.
    #[arg(long)]
    pub model_id: String,
    /// Tokens of context.
    #[arg(long)]
    pub context_length: u32,
    /// Sequences batched at once.
    #[arg(long)]
    pub max_sequences: u32,
    /// "cpu" or "cuda:N"; a GPU model loads entirely on that GPU or fails.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// "gguf" (a file) or "safetensors" (a model directory).
    #[arg(long)]
    pub format: ModelFormat,
    /// Safetensors: quantize to this precision at load ("none" keeps the files' own).
    #[arg(long)]
    pub precision: Option<String>,
    /// Safetensors: load these already-quantized weights (UQFF) instead of quantizing.
    #[arg(long, conflicts_with = "write_quantized")]
    pub reuse_quantized: Option<PathBuf>,
    /// Safetensors: write the quantized weights here (UQFF) for the next load.
    #[arg(long)]
    pub write_quantized: Option<PathBuf>,
    /// The engine: "llama.cpp" or "mistral.rs" (the supervisor resolved it).
    #[arg(long)]
    pub engine: EngineKind,
    /// llama.cpp: let ggml repack weights for its CPU kernels (an anonymous copy).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub repack: bool,
    /// llama.cpp: lock the mapped weights in memory.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub mlock: bool,
    /// llama.cpp: reuse the KV of shared prompt prefixes (off: every request prefills
    /// from its first token, and nothing is saved).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub prefix_cache: bool,
    /// llama.cpp: cells of the KV cache the sequences share (0: context length for each).
    #[arg(long, default_value_t = 0)]
    pub kv_budget_tokens: u32,
    /// llama.cpp: the shortest time between two chunks of one stream, in
    /// microseconds (0: every token is sent as it is decoded).
    #[arg(long, default_value_t = 0)]
    pub stream_interval_us: u64,
    /// llama.cpp: save kept prefixes here when asked before a stop, and restore them.
    #[arg(long)]
    pub saved_prefixes_dir: Option<PathBuf>,
    /// Bytes of saved prefixes kept per model file and setting.
    #[arg(long, default_value_t = 0)]
    pub saved_prefixes_budget_bytes: u64,
}

impl WorkerArgs {
    /// The same arguments as a command line, after the `worker` subcommand.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--socket".into(),
            self.socket.clone().into(),
            "--model-path".into(),
            self.model_path.clone().into(),
            "--model-id".into(),
            self.model_id.clone().into(),
            "--context-length".into(),
            self.context_length.to_string().into(),
            "--max-sequences".into(),
            self.max_sequences.to_string().into(),
            "--device".into(),
            self.device.clone().into(),
            "--format".into(),
            self.format.as_str().into(),
            "--engine".into(),
            self.engine.as_str().into(),
            "--repack".into(),
            self.repack.to_string().into(),
            "--mlock".into(),
            self.mlock.to_string().into(),
            "--prefix-cache".into(),
            self.prefix_cache.to_string().into(),
            "--kv-budget-tokens".into(),
            self.kv_budget_tokens.to_string().into(),
            "--stream-interval-us".into(),
            self.stream_interval_us.to_string().into(),
            "--saved-prefixes-budget-bytes".into(),
            self.saved_prefixes_budget_bytes.to_string().into(),
        ];
        let optional = [
            ("--precision", self.precision.clone().map(OsString::from)),
            (
                "--reuse-quantized",
                self.reuse_quantized.clone().map(OsString::from),
            ),
            (
                "--write-quantized",
                self.write_quantized.clone().map(OsString::from),
            ),
            (
                "--saved-prefixes-dir",
                self.saved_prefixes_dir.clone().map(OsString::from),
            ),
        ];
        for (flag, value) in optional {
            if let Some(v) = value {
                args.push(flag.into());
                args.push(v);
            }
        }
        args
    }
}

/// What a worker reports when it is ready.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ReadyInfo {
    pub context_length: u32,
    pub load_ms: u64,
}
