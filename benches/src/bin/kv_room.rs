//! Admission by KV room against fixed sequences, at the same KV budget: 16 short
//! requests at once (a ~30-token prompt, 32 tokens out) on SmolLM2, two models on one
//! server with the same 4096 cells of KV cache: `fixed` (one sequence of 4096 tokens,
//! today's default) and `room` (16 sequences sharing `kv_budget = 4096`). Rounds
//! interleaved; prints the time until all 16 are done and the median request latency.
//!
//! `cargo run -p modelpool-benches --bin kv_room -- --rounds 5`

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use modelpool_benches::median;
use modelpool_proto::v1::inference_client::InferenceClient;
use modelpool_proto::v1::model_control_client::ModelControlClient;
use modelpool_proto::v1::LoadModelRequest;
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Requests sent at once.
    #[arg(long, default_value_t = 16)]
    requests: usize,
    #[arg(long, default_value_t = 32)]
    max_tokens: u32,
}

const SIDES: [(&str, &str); 2] = [
    ("fixed", "max_sequences = 1\n"),
    ("room", "max_sequences = 16\nkv_budget = 4096\n"),
];

fn main() -> anyhow::Result<()> {
    modelpool_benches::run_as_worker_if_asked();
    let args = Args::parse();
    tokio::runtime::Runtime::new()?.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let model = std::fs::canonicalize(&args.model)
        .with_context(|| format!("{} (run `just fetch-models`)", args.model.display()))?;
    let runtime = tempfile::tempdir()?;
    let server = start(&model, runtime.path()).await?;
    let channel = Channel::from_shared(format!("http://{}", server.local_addr))?
        .connect()
        .await?;
    let mut control = ModelControlClient::new(channel.clone());
    let client = InferenceClient::new(channel);
    for (id, _) in SIDES {
        control
            .load_model(LoadModelRequest {
                id: id.into(),
                ..Default::default()
            })
            .await?;
        burst(&client, id, &args, 0).await?; // warm-up
    }
    let mut figures: [Vec<(f64, f64)>; 2] = [Vec::new(), Vec::new()];
    for round in 0..args.rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            figures[i].push(burst(&client, SIDES[i].0, &args, round + 1).await?);
        }
    }
    server.stop().await?;
    println!(
        "{} requests at once, a ~30-token prompt and {} tokens out each, greedy; {} rounds\n",
        args.requests, args.max_tokens, args.rounds
    );
    println!("| | all done (ms, median) | request latency p50 (ms, median) |\n|---|---|---|");
    for (i, (id, keys)) in SIDES.iter().enumerate() {
        let all: Vec<f64> = figures[i].iter().map(|f| f.0).collect();
        let p50: Vec<f64> = figures[i].iter().map(|f| f.1).collect();
        println!(
            "| {id} ({}) | {:.0} | {:.0} |",
            keys.trim().replace('\n', ", "),
            median(&all),
            median(&p50)
        );
    }
    Ok(())
}

async fn start(model: &Path, runtime: &Path) -> anyhow::Result<modelpool_server::RunningServer> {
    let mut toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"\"\n[workers]\nruntime_dir = \"{}\"\nexe = \"{}\"\n",
        runtime.display(),
        std::env::current_exe()?.display()
    );
    for (id, keys) in SIDES {
        toml += &format!(
            "[[models]]\nid = \"{id}\"\npath = \"{}\"\nengine = \"llama.cpp\"\ncontext_length = 4096\n\
             max_concurrency = 16\nprefix_cache = false\n{keys}",
            model.display()
        );
    }
    let settings = modelpool_server::Settings::from_toml(&toml, Path::new("/"))?;
    Ok(modelpool_server::start(settings).await?)
}

/// Sends the burst; returns (ms until all were done, median request latency in ms).
async fn burst(
    client: &InferenceClient<Channel>,
    id: &str,
    args: &Args,
    round: usize,
) -> anyhow::Result<(f64, f64)> {
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.requests)
        .map(|n| {
            let mut client = client.clone();
            let prompt = format!(
                "Request {round}-{n}: write one short sentence about the sea, the wind and the boats."
            );
            let request = modelpool_benches::greedy_request(id, prompt, args.max_tokens);
            tokio::spawn(async move {
                let mut stream = client.generate(request).await?.into_inner();
                while stream.message().await?.is_some() {}
                anyhow::Ok(started.elapsed().as_secs_f64() * 1e3)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.push(t.await??);
    }
    let all = started.elapsed().as_secs_f64() * 1e3;
    Ok((all, median(&latencies)))
}
