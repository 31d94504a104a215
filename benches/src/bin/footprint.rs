//! Predicted against measured worker memory for the real model at several context
//! sizes: the base footprint right after load (weights, embedding table, overhead) and
//! the peak after a prompt fills the context (KV cache fully grown).

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use modelpool_benches::mib;
use modelpool_pool::{Instance, ModelSpec};
use modelpool_proto::v1::SamplingParams;
use modelpool_proto::worker::v1::worker_generate_request::Prompt;
use modelpool_proto::worker::v1::WorkerGenerateRequest;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// For a safetensors model directory: the precision to quantize to at load.
    #[arg(long)]
    precision: Option<String>,
    /// The engine: "llama.cpp" (default for GGUF) or "mistral.rs".
    #[arg(long)]
    engine: Option<String>,
    /// llama.cpp: let ggml repack the weights (an anonymous copy).
    #[arg(long)]
    repack: bool,
    /// Sequences batched at once (each gets the context unless `--kv-budget` is set).
    #[arg(long, default_value_t = 1)]
    max_sequences: u32,
    /// llama.cpp: cells of the one KV cache the sequences share (`kv_budget`).
    #[arg(long)]
    kv_budget: Option<u32>,
    /// Context sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "512,1024,2048,4096")]
    contexts: Vec<u32>,
}

fn main() -> anyhow::Result<()> {
    modelpool_benches::run_as_worker_if_asked();
    let args = Args::parse();
    tokio::runtime::Runtime::new()?.block_on(run(args))
}

fn pct(predicted: u64, measured: u64) -> f64 {
    (predicted as f64 - measured as f64) * 100.0 / measured.max(1) as f64
}

async fn run(args: Args) -> anyhow::Result<()> {
    let model = std::fs::canonicalize(&args.model)
        .with_context(|| format!("{} (run `just fetch-models`)", args.model.display()))?;
    println!(
        "model {}, engine {}{}, {} sequence(s){}; MiB; error = (predicted - measured) / measured\n",
        model.file_name().unwrap_or_default().to_string_lossy(),
        args.engine.as_deref().unwrap_or("(default)"),
        if args.repack { ", repack" } else { "" },
        args.max_sequences,
        args.kv_budget
            .map(|t| format!(", kv_budget {t} tokens"))
            .unwrap_or_default()
    );
    println!("| context | worker load | predicted base | measured after load | error | predicted with full KV | peak with context filled | error |");
    println!("|---|---|---|---|---|---|---|---|");
    for ctx in args.contexts {
        let mut spec = ModelSpec::new("m", &model);
        spec.context_length = ctx;
        spec.max_sequences = args.max_sequences;
        let mut extra = format!(
            "context_length = {ctx}\nmax_sequences = {}\n",
            args.max_sequences
        );
        if let Some(tokens) = args.kv_budget {
            spec.engine.llama_cpp.kv_budget_tokens = Some(tokens);
            extra += &format!("kv_budget = {tokens}\n");
        }
        if let Some(engine) = &args.engine {
            spec.engine.kind = Some(engine.parse().map_err(anyhow::Error::msg)?);
            extra += &format!("engine = \"{engine}\"\n");
        }
        if args.repack {
            spec.engine.llama_cpp.repack = true;
            extra += "repack = true\n";
        }
        if model.is_dir() {
            spec.format = modelpool_pool::ModelFormat::Safetensors;
            let p = args.precision.clone().unwrap_or_else(|| "none".into());
            extra += &format!("precisions = [\"{p}\"]\n");
            spec.precision = Some(p);
        }
        let fp = modelpool_supervisor::footprint::predict(&spec)?;
        let runtime = tempfile::tempdir()?;
        let server =
            modelpool_benches::start_server_with(&model, "m", runtime.path(), &extra).await?;
        let lease = server.pool.acquire("m", None).await?;
        let base = lease.instance().resident_bytes();
        let load_ms = lease.instance().load_ms();
        // " the" is one token: fill the context but for room to generate.
        let prompt = " the".repeat(ctx.saturating_sub(48) as usize);
        let request = WorkerGenerateRequest {
            prompt: Some(Prompt::Raw(prompt)),
            sampling: Some(SamplingParams {
                max_tokens: Some(16),
                temperature: Some(0.0),
                ..Default::default()
            }),
        };
        let mut stream = lease
            .instance()
            .generate(request)
            .await
            .map_err(|s| anyhow::anyhow!("generate: {s}"))?;
        while stream
            .message()
            .await
            .map_err(|s| anyhow::anyhow!("stream: {s}"))?
            .is_some()
        {}
        let peak = lease.instance().peak_bytes();
        drop(lease);
        server.stop().await?;
        let base_predicted = fp.at_load_bytes();
        println!(
            "| {ctx} | {load_ms} ms | {:.1} | {:.1} | {:+.1}% | {:.1} | {:.1} | {:+.1}% |",
            mib(base_predicted),
            mib(base),
            pct(base_predicted, base),
            mib(fp.total_bytes()),
            mib(peak),
            pct(fp.total_bytes(), peak)
        );
    }
    Ok(())
}
