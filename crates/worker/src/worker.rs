//! The worker process: `modelpool worker ...` loads one model, then serves the private
//! worker protocol on a Unix socket until its parent goes away.
//!
//! Readiness is one line on stdout (`MODELPOOL_WORKER_READY {json}`) printed after the
//! socket is bound. The worker exits when its stdin reaches end-of-file, which happens
//! when the server closes the pipe or dies for any reason, so no worker outlives its
//! server (the server also sets a parent-death signal).

use std::io::{Read, Write};
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
use tonic::{Request, Response, Status};

use crate::engine::{Engine, Prompt};
use crate::llamacpp::{LlamaEngine, LlamaOptions, SavedPrefixes};
use crate::llm::LoadedModel;
use crate::EngineError;
use modelpool_catalog::EngineKind;
use modelpool_pool::{Device, ModelFormat, Quantized};
use modelpool_supervisor::protocol::{ReadyInfo, WorkerArgs, READY_PREFIX, STAGE_PREFIX};

fn stage(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{STAGE_PREFIX}{text}");
    let _ = out.flush();
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
    let format = args.format;
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
                stream_interval: std::time::Duration::from_micros(args.stream_interval_us),
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
                return Err(modelpool_supervisor::invalid_argument_status(
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
