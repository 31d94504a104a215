//! Decode speed and time to first token through gRPC + worker process, against
//! mistral.rs called directly in this process: same model, prompt and settings, runs
//! interleaved (direct, gRPC, direct, ...) so machine drift hits both alike.
//!
//! This binary is also its own worker: `grpc_vs_direct worker ...` runs the worker, so
//! the gRPC path spawns exactly the program under test.

use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use futures::StreamExt;
use modelpool_benches::median;
use modelpool_benches::timing::{figures, Run, RunArgs};
use modelpool_proto::v1::inference_client::InferenceClient;
use modelpool_proto::v1::{GenerateRequest, SamplingParams};
use modelpool_worker::llm::{LoadedModel, Prompt};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    run: RunArgs,
}

const PROMPT: &str = "Once upon a time, in a small village by the sea, there lived";

fn main() -> anyhow::Result<()> {
    modelpool_benches::run_as_worker_if_asked();
    let args = Args::parse();
    tokio::runtime::Runtime::new()?.block_on(bench(args))
}

fn sampling(max_tokens: u32) -> SamplingParams {
    SamplingParams {
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        ..Default::default()
    }
}

async fn direct(model: &LoadedModel, max_tokens: u32) -> anyhow::Result<Run> {
    let start = Instant::now();
    let mut stream = model
        .generate(Prompt::Raw(PROMPT.into()), &sampling(max_tokens))
        .await?;
    let mut stamps = Vec::new();
    let mut tokens = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        stamps.push(Instant::now());
        if let Some(u) = chunk.usage {
            tokens = u.completion_tokens;
        }
    }
    figures(start, &stamps, tokens).context("a run produced nothing")
}

async fn grpc(
    client: &mut InferenceClient<tonic::transport::Channel>,
    max_tokens: u32,
) -> anyhow::Result<Run> {
    let start = Instant::now();
    let mut stream = client
        .generate(GenerateRequest {
            model: "bench".into(),
            prompt: PROMPT.into(),
            sampling: Some(sampling(max_tokens)),
        })
        .await?
        .into_inner();
    let mut stamps = Vec::new();
    let mut tokens = 0;
    while let Some(chunk) = stream.message().await? {
        stamps.push(Instant::now());
        if let Some(u) = chunk.usage {
            tokens = u.completion_tokens;
        }
    }
    figures(start, &stamps, tokens).context("a run produced nothing")
}

/// One line: the median gRPC/direct ratio and every round's.
fn print_ratio(what: &str, ratios: &[f64]) {
    let rounds: Vec<String> = ratios.iter().map(|r| format!("{r:.3}")).collect();
    println!(
        "{what} ratio gRPC/direct: median {:.3} (per-round: {})",
        median(ratios),
        rounds.join(", ")
    );
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let model_path = std::fs::canonicalize(&args.run.model)
        .with_context(|| format!("{} (run `just fetch-models`)", args.run.model.display()))?;
    let direct_model =
        LoadedModel::load_gguf(&model_path, 4096, 1, modelpool_pool::Device::Cpu).await?;

    let runtime = tempfile::tempdir()?;
    let server = modelpool_benches::start_server(&model_path, "bench", runtime.path()).await?;
    let mut client = InferenceClient::connect(format!("http://{}", server.local_addr)).await?;

    // Warm-up: loads the worker, fills caches on both paths.
    direct(&direct_model, 8).await?;
    grpc(&mut client, 8).await?;

    let mut d_runs = Vec::new();
    let mut g_runs = Vec::new();
    for _ in 0..args.run.rounds {
        d_runs.push(direct(&direct_model, args.run.max_tokens).await?);
        g_runs.push(grpc(&mut client, args.run.max_tokens).await?);
    }
    if d_runs
        .iter()
        .chain(&g_runs)
        .any(|r| r.tokens != args.run.max_tokens)
    {
        bail!("a run stopped early; pick a prompt that does not end: {d_runs:?} {g_runs:?}");
    }
    let ratios = |f: fn(&Run) -> f64| -> Vec<f64> {
        d_runs
            .iter()
            .zip(&g_runs)
            .map(|(d, g)| f(g) / f(d))
            .collect()
    };
    let ratios_tok = ratios(|r| r.decode_tok_s);
    let ratios_ttft = ratios(|r| r.ttft.as_secs_f64());
    let ms = |runs: &[Run]| {
        median(
            &runs
                .iter()
                .map(|r| r.ttft.as_secs_f64() * 1e3)
                .collect::<Vec<_>>(),
        )
    };
    let tps = |runs: &[Run]| median(&runs.iter().map(|r| r.decode_tok_s).collect::<Vec<_>>());
    println!(
        "model {}, {} tokens per run, {} interleaved rounds, greedy\n",
        model_path.file_name().unwrap_or_default().to_string_lossy(),
        args.run.max_tokens,
        args.run.rounds
    );
    println!("| path | decode tok/s (median) | time to first token ms (median) |");
    println!("|---|---|---|");
    println!(
        "| mistral.rs in-process | {:.1} | {:.1} |",
        tps(&d_runs),
        ms(&d_runs)
    );
    println!(
        "| gRPC + worker process | {:.1} | {:.1} |",
        tps(&g_runs),
        ms(&g_runs)
    );
    println!();
    print_ratio("decode", &ratios_tok);
    print_ratio("time-to-first-token", &ratios_ttft);
    server.stop().await?;
    Ok(())
}
