//! Aggregate tok/s of concurrent streams of mixed lengths on one llama.cpp model, against
//! `llama-server` with a unified KV cache of the same total size (issue 27).
//!
//! At each stream count N (default 1, 4, 8, 16), N clients each send `--requests`
//! greedy completions back to back; prompt lengths and `max_tokens` are drawn from a
//! fixed seed (prompts ~16-1,500 tokens, 16-256 tokens out), the same list on both
//! sides. modelpool serves them from one model with `max_sequences = N` sharing
//! `kv_budget = --kv-total` cells (admission by KV room), llama-server with
//! `--parallel N --kv-unified -c --kv-total` (no prompt cache on either side). Sides
//! alternate who goes first each round; the ratio is taken within each round.
//!
//! Needs `just peers`. This binary is also its own worker (`mixed_streams worker ...`).
//!
//! `cargo run -p modelpool-benches --bin mixed_streams -- --rounds 2`

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use modelpool_benches::median;
use modelpool_benches::peers::{self, LlamaServer, ServerArgs};
use modelpool_proto::v1::inference_client::InferenceClient;
use modelpool_proto::v1::model_control_client::ModelControlClient;
use modelpool_proto::v1::{EvictModelRequest, LoadModelRequest};
use modelpool_supervisor::sampling::SplitMix64;
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// Interleaved rounds per stream count.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Concurrent streams to measure at.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
    streams: Vec<u32>,
    /// Requests each stream sends, one after another.
    #[arg(long, default_value_t = 2)]
    requests: usize,
    /// KV cells shared by all streams, on both sides, at most 2,048 per stream (a
    /// model's `kv_budget` is at most a full context per sequence).
    #[arg(long, default_value_t = 32768)]
    kv_total: u32,
    /// Longest prompt, in repeats of a ~10-token sentence.
    #[arg(long, default_value_t = 150)]
    max_prompt_repeats: u32,
    /// modelpool's `stream_interval` ("0s": every token in a chunk of its own).
    #[arg(long, default_value = "0s")]
    stream_interval: String,
}

/// One sentence of about ten tokens; prompts are a request number and repeats of it.
const SENTENCE: &str = " The boats came back to the harbour at dusk.";
/// Per-request context limit on the modelpool side (the longest prompt plus 256 fits).
const CONTEXT_LENGTH: u32 = 2048;

/// One request of the mix: its prompt and how many tokens it may generate.
#[derive(Clone)]
struct Job {
    prompt: String,
    max_tokens: u32,
}

/// `streams` lists of `requests` jobs each, for round `round` (prompts unique per
/// round, so no cache on either side could serve one).
fn mix(args: &Args, streams: u32, round: usize) -> Vec<Vec<Job>> {
    let mut rng = SplitMix64(0x6d69_7865_6400 + u64::from(streams));
    (0..streams)
        .map(|s| {
            (0..args.requests)
                .map(|r| {
                    let repeats = 1 + rng.next_u64() % u64::from(args.max_prompt_repeats);
                    let max_tokens = 16 + (rng.next_u64() % 241) as u32;
                    let body = SENTENCE.repeat(repeats as usize);
                    Job {
                        prompt: format!("Request {round}-{s}-{r}:{body}"),
                        max_tokens,
                    }
                })
                .collect()
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    modelpool_benches::run_as_worker_if_asked();
    let args = Args::parse();
    tokio::runtime::Runtime::new()?.block_on(run(args))
}

fn model_id(n: u32) -> String {
    format!("mixed-{n}")
}

/// KV cells shared by `n` streams, the same on both sides.
fn cells(args: &Args, n: u32) -> u32 {
    args.kv_total.min(CONTEXT_LENGTH * n)
}

async fn start(
    args: &Args,
    model: &Path,
    runtime: &Path,
) -> anyhow::Result<modelpool_server::RunningServer> {
    let mut toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"\"\n[workers]\nruntime_dir = \"{}\"\nexe = \"{}\"\n",
        runtime.display(),
        std::env::current_exe()?.display()
    );
    for &n in &args.streams {
        toml += &format!(
            "[[models]]\nid = \"{}\"\npath = \"{}\"\nengine = \"llama.cpp\"\n\
             context_length = {CONTEXT_LENGTH}\nmax_sequences = {n}\nmax_concurrency = {n}\n\
             kv_budget = {}\nprefix_cache = false\nstream_interval = \"{}\"\n",
            model_id(n),
            model.display(),
            cells(args, n),
            args.stream_interval
        );
    }
    let settings = modelpool_server::Settings::from_toml(&toml, Path::new("/"))?;
    Ok(modelpool_server::start(settings).await?)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let model = std::fs::canonicalize(&args.model)
        .with_context(|| format!("{} (run `just fetch-models`)", args.model.display()))?;
    peers::peer_exe("llama-server")?;
    let runtime = tempfile::tempdir()?;
    let server = start(&args, &model, runtime.path()).await?;
    let channel = Channel::from_shared(format!("http://{}", server.local_addr))?
        .connect()
        .await?;
    let mut control = ModelControlClient::new(channel.clone());
    let client = InferenceClient::new(channel);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let mut rows = Vec::new();
    for &n in &args.streams {
        let id = model_id(n);
        control
            .load_model(LoadModelRequest {
                id: id.clone(),
                ..Default::default()
            })
            .await?;
        let peer = LlamaServer::start(&ServerArgs {
            model: &model,
            context_total: cells(&args, n),
            parallel: n,
            threads,
            repack: false,
            kv_unified: true,
        })
        .await?;
        // Warm-up on both sides: first-use costs stay out of the rounds.
        let warm = mix(&args, 1, usize::MAX);
        ours(&client, &id, &warm).await?;
        theirs(peer.port, &warm).await?;
        let (mut o, mut t) = (Vec::new(), Vec::new());
        for round in 0..args.rounds {
            let jobs = mix(&args, n, round);
            if round % 2 == 0 {
                o.push(ours(&client, &id, &jobs).await?);
                t.push(theirs(peer.port, &jobs).await?);
            } else {
                t.push(theirs(peer.port, &jobs).await?);
                o.push(ours(&client, &id, &jobs).await?);
            }
        }
        peer.stop().await?;
        control.evict_model(EvictModelRequest { id }).await?;
        rows.push((n, o, t));
    }
    server.stop().await?;
    print(&args, &rows);
    Ok(())
}

/// What one side did with one mix: generated tokens and wall seconds.
#[derive(Clone, Copy)]
struct Side {
    tokens: u64,
    secs: f64,
}

impl Side {
    fn tok_s(&self) -> f64 {
        self.tokens as f64 / self.secs
    }
}

/// Every stream's jobs through modelpool's gRPC Generate, the streams at once.
async fn ours(
    client: &InferenceClient<Channel>,
    id: &str,
    jobs: &[Vec<Job>],
) -> anyhow::Result<Side> {
    let (client, id) = (client.clone(), id.to_owned());
    run_streams(jobs, move |job| {
        let (mut client, id) = (client.clone(), id.clone());
        async move {
            let request = modelpool_benches::greedy_request(&id, job.prompt, job.max_tokens);
            let mut chunks = client.generate(request).await?.into_inner();
            let mut tokens = 0;
            while let Some(chunk) = chunks.message().await? {
                if let Some(usage) = chunk.usage {
                    tokens += u64::from(usage.completion_tokens);
                }
            }
            Ok(tokens)
        }
    })
    .await
}

/// Every stream's jobs through llama-server's `/completion`, the streams at once.
async fn theirs(port: u16, jobs: &[Vec<Job>]) -> anyhow::Result<Side> {
    run_streams(jobs, move |job| async move {
        let done = peers::completion(port, &job.prompt, job.max_tokens).await?;
        Ok(u64::from(done.tokens))
    })
    .await
}

/// Runs each stream's jobs one after another through `one` (which answers the tokens a
/// job generated), all streams at once; the tokens and the wall time.
async fn run_streams<F, Fut>(jobs: &[Vec<Job>], one: F) -> anyhow::Result<Side>
where
    F: Fn(Job) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<u64>> + Send,
{
    let started = Instant::now();
    let tasks: Vec<_> = jobs
        .iter()
        .map(|stream| {
            let (one, stream) = (one.clone(), stream.clone());
            tokio::spawn(async move {
                let mut tokens = 0u64;
                for job in stream {
                    tokens += one(job).await?;
                }
                anyhow::Ok(tokens)
            })
        })
        .collect();
    let mut tokens = 0;
    for t in tasks {
        tokens += t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(Side { tokens, secs })
}

fn print(args: &Args, rows: &[(u32, Vec<Side>, Vec<Side>)]) {
    println!(
        "{} requests per stream back to back, prompts of 1-{} repeats of a ~10-token sentence, \
         16-256 tokens out, greedy, fixed seed; min({}, 2048 x streams) KV cells shared on \
         both sides; {} rounds\n",
        args.requests, args.max_prompt_repeats, args.kv_total, args.rounds
    );
    println!("| streams | modelpool tok/s | llama-server --kv-unified tok/s | modelpool / llama-server (per round) | tokens per round modelpool / llama-server |");
    println!("|---|---|---|---|---|");
    for (n, o, t) in rows {
        let ours: Vec<f64> = o.iter().map(Side::tok_s).collect();
        let theirs: Vec<f64> = t.iter().map(Side::tok_s).collect();
        let ratios: Vec<f64> = ours.iter().zip(&theirs).map(|(a, b)| a / b).collect();
        let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "| {n} | {:.1} | {:.1} | {:.2} ({}) | {} / {} |",
            median(&ours),
            median(&theirs),
            median(&ratios),
            each.join(", "),
            o[0].tokens,
            t[0].tokens
        );
    }
}
