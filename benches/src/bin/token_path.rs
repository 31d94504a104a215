//! Keeps one llama.cpp model decoding through modelpool's gRPC stream for `--secs`, one
//! greedy request after another, so a profiler can watch the per-token path from the
//! decode thread through the worker's relay to the client (issue 27). Prints the pids
//! to attach to, then each request's decode rate and their median.
//!
//! With `--rounds N` it measures instead, N rounds interleaved: a request through
//! modelpool against the same decode run bare in this process on the same llama.cpp
//! build (`llama-cpp-2`, as the worker links it, with the worker's context settings):
//! prompt, then one greedy token per `llama_decode`, no relay, no second process. The
//! ratio is modelpool's own cost on the per-token path, free of any difference between
//! llama.cpp commits (llama-bench is built from another).
//!
//! `benches/profile/token_path.sh` runs it under `perf record -a -g` and reports where
//! the time goes by process, thread and library.
//!
//! `cargo run -p modelpool-benches --bin token_path -- --secs 20`

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use modelpool_benches::median;
use modelpool_proto::v1::inference_client::InferenceClient;
use modelpool_proto::v1::model_control_client::ModelControlClient;
use modelpool_proto::v1::{GetModelRequest, LoadModelRequest};
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// How long to keep decoding, after a warm-up request.
    #[arg(long, default_value_t = 20)]
    secs: u64,
    #[arg(long, default_value_t = 256)]
    max_tokens: u32,
    /// Measure: this many interleaved rounds of modelpool against the bare decode.
    #[arg(long)]
    rounds: Option<usize>,
    /// KV cells of the bare decode's context (modelpool's model has 4,096); llama-bench
    /// sizes its context to the prompt plus the tokens generated.
    #[arg(long, default_value_t = 4096)]
    bare_context: u32,
    /// The model's `stream_interval` ("0s": every token in a chunk of its own).
    #[arg(long, default_value = "0s")]
    stream_interval: String,
}

const ID: &str = "path";
const PROMPT: &str = "Once upon a time, in a small village by the sea, there lived";

fn main() -> anyhow::Result<()> {
    modelpool_benches::run_as_worker_if_asked();
    let args = Args::parse();
    tokio::runtime::Runtime::new()?.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let model = std::fs::canonicalize(&args.model)
        .with_context(|| format!("{} (run `just fetch-models`)", args.model.display()))?;
    let runtime = tempfile::tempdir()?;
    let keys = format!(
        "engine = \"llama.cpp\"\ncontext_length = 4096\nmax_sequences = 1\nprefix_cache = false\n\
         stream_interval = \"{}\"\n",
        args.stream_interval
    );
    let server = modelpool_benches::start_server_with(&model, ID, runtime.path(), &keys).await?;
    let channel = Channel::from_shared(format!("http://{}", server.local_addr))?
        .connect()
        .await?;
    let mut control = ModelControlClient::new(channel.clone());
    let mut client = InferenceClient::new(channel);
    control
        .load_model(LoadModelRequest {
            id: ID.into(),
            ..Default::default()
        })
        .await?;
    decode(&mut client, 0, 8).await?;
    if let Some(rounds) = args.rounds {
        compare(&mut client, &model, rounds, &args).await?;
        server.stop().await?;
        return Ok(());
    }
    let worker = control
        .get_model(GetModelRequest { id: ID.into() })
        .await?
        .into_inner()
        .worker_pid;
    println!("pids: server {} worker {worker}", std::process::id());
    println!("decoding for {} s", args.secs);
    let until = Instant::now() + Duration::from_secs(args.secs);
    let mut rates = Vec::new();
    let mut n = 1;
    while Instant::now() < until {
        rates.push(decode(&mut client, n, args.max_tokens).await?);
        n += 1;
    }
    println!(
        "{} requests of {} tokens: decode {:.1} tok/s (median)",
        rates.len(),
        args.max_tokens,
        median(&rates)
    );
    server.stop().await?;
    Ok(())
}

/// One greedy request with a unique prompt; tokens after the first per second, as the
/// client sees them arrive.
async fn decode(
    client: &mut InferenceClient<Channel>,
    n: usize,
    max_tokens: u32,
) -> anyhow::Result<f64> {
    let request = modelpool_benches::greedy_request(ID, format!("{n}: {PROMPT}"), max_tokens);
    let started = Instant::now();
    let mut stream = client.generate(request).await?.into_inner();
    let (mut first, mut last, mut tokens) = (None, Duration::ZERO, 0);
    while let Some(chunk) = stream.message().await? {
        last = started.elapsed();
        first.get_or_insert(last);
        if let Some(usage) = chunk.usage {
            tokens = usage.completion_tokens;
        }
    }
    let first = first.context("an empty stream")?;
    Ok(f64::from(tokens.saturating_sub(1)) / (last - first).as_secs_f64().max(1e-9))
}

/// `rounds` interleaved rounds: a request through modelpool, the bare decode; prints
/// both rates and their per-round ratios.
async fn compare(
    client: &mut InferenceClient<Channel>,
    model: &std::path::Path,
    rounds: usize,
    args: &Args,
) -> anyhow::Result<()> {
    let max_tokens = args.max_tokens;
    let bare = bare::Bare::load(model, args.bare_context)?;
    bare.decode(PROMPT, 8)?;
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let n = 1000 + round;
        if round % 2 == 0 {
            ours.push(decode(client, n, max_tokens).await?);
            theirs.push(bare.decode(&format!("{n}: {PROMPT}"), max_tokens)?);
        } else {
            theirs.push(bare.decode(&format!("{n}: {PROMPT}"), max_tokens)?);
            ours.push(decode(client, n, max_tokens).await?);
        }
    }
    let ratios: Vec<f64> = ours.iter().zip(&theirs).map(|(o, t)| o / t).collect();
    let each: Vec<String> = ratios.iter().map(|r| format!("{r:.3}")).collect();
    println!("| path | decode tok/s (median of {rounds}) |\n|---|---|");
    println!(
        "| bare llama-cpp-2, in process, {} cells | {:.1} |",
        args.bare_context,
        median(&theirs)
    );
    println!("| modelpool gRPC stream | {:.1} |", median(&ours));
    println!(
        "\nmodelpool / bare: {:.3} (per round: {})",
        median(&ratios),
        each.join(", ")
    );
    Ok(())
}

mod bare {
    //! llama.cpp's decode with nothing around it, as the worker's decode thread sets it
    //! up: one unified cache (`--bare-context` cells, 4,096 like modelpool's model by
    //! default), one sequence, a batch of the cells plus one, micro-batches of 512, every
    //! core, greedy sampling.

    use std::num::NonZeroU32;
    use std::time::Instant;

    use anyhow::Context;
    use llama_cpp_2::context::params::LlamaContextParams;
    use llama_cpp_2::llama_backend::LlamaBackend;
    use llama_cpp_2::llama_batch::LlamaBatch;
    use llama_cpp_2::model::params::LlamaModelParams;
    use llama_cpp_2::model::LlamaModel;
    use llama_cpp_2::sampling::LlamaSampler;

    pub struct Bare {
        backend: LlamaBackend,
        model: LlamaModel,
        cells: u32,
    }

    impl Bare {
        pub fn load(path: &std::path::Path, cells: u32) -> anyhow::Result<Self> {
            let backend = LlamaBackend::init().context("llama.cpp backend")?;
            let params = LlamaModelParams::default().with_n_gpu_layers(0);
            let model = LlamaModel::load_from_file(&backend, path, &params)
                .context("loading the model bare")?;
            Ok(Self {
                backend,
                model,
                cells,
            })
        }

        /// One greedy generation of `max_tokens` in a fresh context; tokens after the
        /// first per second.
        pub fn decode(&self, prompt: &str, max_tokens: u32) -> anyhow::Result<f64> {
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get() as i32);
            let params = LlamaContextParams::default()
                .with_n_ctx(NonZeroU32::new(self.cells))
                .with_n_batch(self.cells + 1)
                .with_n_ubatch(512)
                .with_n_seq_max(1)
                .with_kv_unified(true)
                .with_n_threads(threads)
                .with_n_threads_batch(threads);
            let mut ctx = self.model.new_context(&self.backend, params)?;
            let tokens = self.model.vocab().tokenize(prompt.as_bytes(), true, true);
            let mut batch = LlamaBatch::new((self.cells + 1) as usize, 1);
            let last = tokens.len() - 1;
            for (i, &t) in tokens.iter().enumerate() {
                batch.add(t, i as i32, &[0], i == last)?;
            }
            ctx.decode(&mut batch)?;
            let mut sampler = LlamaSampler::greedy();
            let (mut first, mut last) = (None, None);
            for pos in (tokens.len() as i32..).take(max_tokens as usize) {
                let token = sampler.sample(&ctx, batch.n_tokens() - 1);
                let now = Instant::now();
                first.get_or_insert(now);
                last = Some(now);
                if pos + 1 - tokens.len() as i32 == max_tokens as i32 {
                    // The last token is not decoded, as the worker does not decode the
                    // last one it sends.
                    break;
                }
                batch.clear();
                batch.add(token, pos, &[0], true)?;
                ctx.decode(&mut batch)?;
            }
            let (first, last) = first.zip(last).context("no token")?;
            Ok(f64::from(max_tokens - 1) / (last - first).as_secs_f64().max(1e-9))
        }
    }
}
