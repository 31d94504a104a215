//! What the llama.cpp prefix cache costs on prompts it cannot help: one server, one GGUF
//! as two models, `prefix_cache` on (the default) and off, every request a prompt no
//! earlier one shares (a request number first), the two sides interleaved and taking
//! turns to go first. Prints time to first token and decode tok/s per side, and the
//! per-round ratios on / off.
//!
//! `cargo run -p modelpool-benches --bin prefix_ab -- --rounds 9`

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use modelpool_benches::median;
use modelpool_benches::timing::{figures, Run, RunArgs};
use modelpool_proto::v1::inference_client::InferenceClient;
use modelpool_proto::v1::model_control_client::ModelControlClient;
use modelpool_proto::v1::LoadModelRequest;
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    run: RunArgs,
    /// Words of filler after the request number: the prompt's length.
    #[arg(long, default_value_t = 300)]
    prompt_words: usize,
}

const SIDES: [&str; 2] = ["on", "off"];

const FILLER: &str = "The tide rises over the grey stones of the harbour while gulls \
    circle the fishing boats and the keeper of the old lighthouse writes the weather \
    in his book before the evening bell.";

fn main() -> anyhow::Result<()> {
    modelpool_benches::run_as_worker_if_asked();
    let args = Args::parse();
    tokio::runtime::Runtime::new()?.block_on(run(args))
}

/// A prompt of `words` words that starts with `n`, so no two share more than their
/// first token.
fn prompt(n: usize, words: usize) -> String {
    let filler: Vec<&str> = FILLER.split_whitespace().cycle().take(words).collect();
    format!("{n}: {}", filler.join(" "))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let model = std::fs::canonicalize(&args.run.model)
        .with_context(|| format!("{} (run `just fetch-models`)", args.run.model.display()))?;
    let runtime = tempfile::tempdir()?;
    let mut toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"\"\n[workers]\nruntime_dir = \"{}\"\nexe = \"{}\"\n",
        runtime.path().display(),
        std::env::current_exe()?.display()
    );
    for side in SIDES {
        toml += &format!(
            "[[models]]\nid = \"{side}\"\npath = \"{}\"\nengine = \"llama.cpp\"\ncontext_length = 2048\n\
             prefix_cache = {}\n",
            model.display(),
            side == "on"
        );
    }
    let server = modelpool_server::start(modelpool_server::Settings::from_toml(
        &toml,
        Path::new("/"),
    )?)
    .await?;
    let channel = Channel::from_shared(format!("http://{}", server.local_addr))?
        .connect()
        .await?;
    let mut control = ModelControlClient::new(channel.clone());
    let client = InferenceClient::new(channel);
    for side in SIDES {
        control
            .load_model(LoadModelRequest {
                id: side.into(),
                ..Default::default()
            })
            .await?;
    }
    let mut n = 0;
    let mut next = || {
        n += 1;
        prompt(n, args.prompt_words)
    };
    // Warm-up: first-use costs stay out of the figures.
    for side in SIDES {
        generate(client.clone(), side, &next(), args.run.max_tokens).await?;
    }
    let mut runs: [Vec<Run>; 2] = [Vec::new(), Vec::new()];
    for round in 0..args.run.rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let run = generate(client.clone(), SIDES[i], &next(), args.run.max_tokens).await?;
            runs[i].push(run);
        }
    }
    server.stop().await?;
    report(&args, &runs);
    Ok(())
}

async fn generate(
    mut client: InferenceClient<Channel>,
    id: &str,
    prompt: &str,
    max_tokens: u32,
) -> anyhow::Result<Run> {
    let start = Instant::now();
    let mut stream = client
        .generate(modelpool_benches::greedy_request(id, prompt, max_tokens))
        .await?
        .into_inner();
    let (mut stamps, mut tokens, mut cached) = (Vec::new(), 0, 0);
    while let Some(chunk) = stream.message().await? {
        if !chunk.text.is_empty() {
            stamps.push(Instant::now());
        }
        if let Some(u) = chunk.usage {
            (tokens, cached) = (u.completion_tokens, u.cached_tokens);
        }
    }
    anyhow::ensure!(
        cached <= 1,
        "{id}: {cached} prompt tokens came from the cache"
    );
    figures(start, &stamps, tokens).context("a run produced nothing")
}

fn report(args: &Args, runs: &[Vec<Run>; 2]) {
    let ttft =
        |i: usize| -> Vec<f64> { runs[i].iter().map(|r| r.ttft.as_secs_f64() * 1e3).collect() };
    let decode = |i: usize| -> Vec<f64> { runs[i].iter().map(|r| r.decode_tok_s).collect() };
    let ratios =
        |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(x, y)| x / y).collect() };
    println!(
        "{} rounds, {} words of prompt, {} tokens out, greedy\n",
        args.run.rounds, args.prompt_words, args.run.max_tokens
    );
    println!("| | prefix_cache on | off | on / off (median; per round) |\n|---|---|---|---|");
    for (name, on, off) in [
        ("time to first token (ms)", ttft(0), ttft(1)),
        ("decode (tok/s)", decode(0), decode(1)),
    ] {
        let r = ratios(&on, &off);
        let each: Vec<String> = r.iter().map(|x| format!("{x:.3}")).collect();
        println!(
            "| {name} | {:.1} | {:.1} | {:.3} ({}) |",
            median(&on),
            median(&off),
            median(&r),
            each.join(", ")
        );
    }
}
