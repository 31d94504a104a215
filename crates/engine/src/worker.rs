//! The worker process: `modelpool worker ...` loads one model, then serves the private
//! worker protocol on a Unix socket until its parent goes away.
//!
//! Readiness is one line on stdout (`MODELPOOL_WORKER_READY {json}`) printed after the
//! socket is bound. The worker exits when its stdin reaches end-of-file, which happens
//! when the server closes the pipe or dies for any reason, so no worker outlives its
//! server (the server also sets a parent-death signal).

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use futures::{Stream, StreamExt};
use modelpool_proto::v1::GenerateChunk;
use modelpool_proto::worker::v1::worker_generate_request::Prompt as WirePrompt;
use modelpool_proto::worker::v1::worker_server::{Worker, WorkerServer};
use modelpool_proto::worker::v1::{
    SavePrefixesRequest, SavePrefixesResponse, StatsRequest, StatsResponse, WorkerGenerateRequest,
};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use crate::engine::{Engine, Prompt};
use crate::llamacpp::{LlamaEngine, LlamaOptions, SavedPrefixes};
use crate::llm::LoadedModel;
use crate::EngineError;
use crate::EngineKind;
use modelpool_pool::{Device, ModelFormat, Quantized};

/// Prefix of the line a worker prints on stdout once it serves.
pub const READY_PREFIX: &str = "MODELPOOL_WORKER_READY ";

/// Prefix of the lines a worker prints on stdout as it reaches each load stage.
pub const STAGE_PREFIX: &str = "MODELPOOL_WORKER_STAGE ";

fn stage(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{STAGE_PREFIX}{text}");
    let _ = out.flush();
}

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
    #[arg(long, default_value = "gguf")]
    pub format: String,
    /// Safetensors: quantize to this precision at load ("none" keeps the files' own).
    #[arg(long)]
    pub precision: Option<String>,
    /// Safetensors: load these already-quantized weights (UQFF) instead of quantizing.
    #[arg(long, conflicts_with = "write_quantized")]
    pub reuse_quantized: Option<PathBuf>,
    /// Safetensors: write the quantized weights here (UQFF) for the next load.
    #[arg(long)]
    pub write_quantized: Option<PathBuf>,
    /// The engine: "llama.cpp" or "mistral.rs".
    #[arg(long, default_value = "llama.cpp")]
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
            self.format.clone().into(),
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

/// Runs the worker until its parent goes away.
pub async fn run(args: WorkerArgs) -> Result<(), EngineError> {
    exit_when_parent_closes_stdin();
    let started = Instant::now();
    tracing::info!(model = %args.model_id, path = %args.model_path.display(), "worker loading");
    stage("loading weights, tokenizer and chat template");
    let model = load(&args).await?;
    stage("weights loaded; releasing load buffers");
    release_freed_heap();
    let listener = tokio::net::UnixListener::bind(&args.socket)?;
    let ready = ReadyInfo {
        context_length: model.context_length(),
        load_ms: started.elapsed().as_millis() as u64,
    };
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "{READY_PREFIX}{}",
            serde_json::to_string(&ready).map_err(|e| EngineError::Load(e.to_string()))?
        )?;
        out.flush()?;
    }
    tracing::info!(model = %args.model_id, load_ms = ready.load_ms, "worker ready");
    tonic::transport::Server::builder()
        .add_service(WorkerServer::new(WorkerService { model }))
        .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
        .await
        .map_err(|e| EngineError::Generation(format!("worker server: {e}")))
}

/// Loads the model in the engine the arguments name.
async fn load(args: &WorkerArgs) -> Result<Arc<dyn Engine>, EngineError> {
    let device: Device = args.device.parse().map_err(EngineError::Load)?;
    let format = match args.format.as_str() {
        "safetensors" => ModelFormat::Safetensors,
        _ => ModelFormat::Gguf,
    };
    args.engine.check(format, None).map_err(EngineError::Load)?;
    Ok(match (args.engine, format) {
        (EngineKind::LlamaCpp, _) => Arc::new(
            LlamaEngine::load(LlamaOptions {
                path: args.model_path.clone(),
                context_length: args.context_length,
                max_sequences: args.max_sequences,
                device,
                repack: args.repack,
                mlock: args.mlock,
                prefix_cache: args.prefix_cache,
                kv_budget_tokens: Some(args.kv_budget_tokens).filter(|&t| t > 0),
                threads: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
                saved_prefixes: args
                    .saved_prefixes_dir
                    .clone()
                    .filter(|_| args.saved_prefixes_budget_bytes > 0)
                    .map(|dir| SavedPrefixes {
                        dir,
                        budget_bytes: args.saved_prefixes_budget_bytes,
                    }),
            })
            .await?,
        ),
        (EngineKind::MistralRs, ModelFormat::Safetensors) => {
            let quantized = match (&args.reuse_quantized, &args.write_quantized) {
                (Some(p), _) => Some(Quantized::Reuse(p.clone())),
                (None, Some(p)) => Some(Quantized::Write(p.clone())),
                (None, None) => None,
            };
            Arc::new(
                LoadedModel::load_safetensors(
                    &args.model_path,
                    args.precision.as_deref(),
                    quantized.as_ref(),
                    args.context_length,
                    args.max_sequences,
                    device,
                )
                .await?,
            )
        }
        (EngineKind::MistralRs, ModelFormat::Gguf) => Arc::new(
            LoadedModel::load_gguf(
                &args.model_path,
                args.context_length,
                args.max_sequences,
                device,
            )
            .await?,
        ),
    })
}

/// Loading reads every tensor into a temporary buffer before copying it to its final
/// place; glibc keeps those freed pages. Hand them back so the worker's RSS (and the
/// pool's measurement of it) is what the model really holds.
fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let before = modelpool_pool::memory::process_rss(std::process::id()).0;
        // SAFETY: malloc_trim only releases free heap memory; it has no preconditions.
        unsafe { libc::malloc_trim(0) };
        let after = modelpool_pool::memory::process_rss(std::process::id()).0;
        tracing::debug!(
            released_bytes = before.saturating_sub(after),
            "heap trimmed after load"
        );
    }
}

fn exit_when_parent_closes_stdin() {
    std::thread::spawn(|| {
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => std::process::exit(0),
                Ok(_) => {}
            }
        }
    });
}

struct WorkerService {
    model: Arc<dyn Engine>,
}

type ChunkResultStream = Pin<Box<dyn Stream<Item = Result<GenerateChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for WorkerService {
    type GenerateStream = ChunkResultStream;

    async fn generate(
        &self,
        request: Request<WorkerGenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let req = request.into_inner();
        let prompt = match req.prompt {
            Some(WirePrompt::Chat(chat)) => Prompt::Chat(chat.messages),
            Some(WirePrompt::Raw(text)) => Prompt::Raw(text),
            None => {
                return Err(crate::invalid_argument_status(
                    "prompt",
                    "prompt: missing".into(),
                ))
            }
        };
        let stream = self
            .model
            .generate(prompt, &req.sampling.unwrap_or_default())
            .await?;
        Ok(Response::new(Box::pin(
            stream.map(|r| r.map_err(Status::from)),
        )))
    }

    async fn save_prefixes(
        &self,
        _: Request<SavePrefixesRequest>,
    ) -> Result<Response<SavePrefixesResponse>, Status> {
        let started = Instant::now();
        let (prefixes, bytes) = self.model.save_prefixes().await?;
        if prefixes > 0 {
            tracing::info!(
                prefixes,
                bytes,
                ms = started.elapsed().as_millis() as u64,
                "prefixes saved"
            );
        }
        Ok(Response::new(SavePrefixesResponse { prefixes, bytes }))
    }

    async fn stats(&self, _: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        let c = self.model.counters();
        Ok(Response::new(StatsResponse {
            generated_tokens_total: c.generated_tokens_total.load(Ordering::Relaxed),
            active_sequences: c.active_sequences.load(Ordering::Relaxed),
            cancelled_total: c.cancelled_total.load(Ordering::Relaxed),
            max_sequence_length: self.model.context_length(),
            peak_batch_sequences: c.peak_batch_sequences.load(Ordering::Relaxed),
            restored_prefixes_total: c.restored_prefixes_total.load(Ordering::Relaxed),
            saved_prefixes: c.saved_prefixes.load(Ordering::Relaxed),
            saved_prefix_bytes: c.saved_prefix_bytes.load(Ordering::Relaxed),
            reused_prompt_tokens_total: c.reused_prompt_tokens_total.load(Ordering::Relaxed),
            kept_prefixes: c.kept_prefixes.load(Ordering::Relaxed),
            kept_prefix_tokens: c.kept_prefix_tokens.load(Ordering::Relaxed),
            kv_cells: c.kv_cells.load(Ordering::Relaxed),
            kv_cells_reserved: c.kv_cells_reserved.load(Ordering::Relaxed),
            waiting_for_kv_room: c.waiting_for_kv_room.load(Ordering::Relaxed),
        }))
    }
}
