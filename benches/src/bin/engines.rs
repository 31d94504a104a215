//! Both engines through modelpool against llama.cpp's own tools on the same GGUF, runs
//! interleaved so drift on a shared machine hits every side alike, ratios taken within
//! each round:
//!
//! - decode: `llama-bench -p 0 -n 128` (and `-p 512 -n 0` for prompt speed) against a
//!   128-token greedy generation through gRPC on each engine; time to first token;
//! - aggregate tok/s at 1, 4 and 8 concurrent streams on one model (`max_sequences` =
//!   streams) against `llama-server --parallel N` driven over `/completion`;
//! - reload from the page cache and from the disk, request to ready (LoadModel), on each
//!   engine, and the first request after it against the same request on the model
//!   resident (the mapped pages it faults in, counted);
//! - resident footprint (Rss, anonymous, file-backed) after load and after one request,
//!   against llama-server's for the same model and context.
//!
//! The peers come from `just peers` (benches/peers/build.sh). This binary is also its
//! own worker (`engines worker ...`).
//!
//! `cargo run -p modelpool-benches --bin engines -- --rounds 3`

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use modelpool_benches::peers::{self, LlamaServer, ServerArgs, Smaps};
use modelpool_benches::{median, mib};
use modelpool_pool::store::pagecache;
use modelpool_proto::v1::inference_client::InferenceClient;
use modelpool_proto::v1::model_control_client::ModelControlClient;
use modelpool_proto::v1::{EvictModelRequest, GetModelRequest, LoadModelRequest, ModelInfo};
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    /// GGUF model.
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// Interleaved rounds of each measurement.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Tokens generated per request (and by llama-bench's `-n`).
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// Context of the single-stream models and of llama-server in the footprint part.
    #[arg(long, default_value_t = 4096)]
    context: u32,
    /// Concurrent streams to measure aggregate tok/s at.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    streams: Vec<u32>,
    /// Context per stream in the concurrency part (llama-server gets streams x this).
    #[arg(long, default_value_t = 1024)]
    stream_context: u32,
    /// Reloads per engine in the reload part.
    #[arg(long, default_value_t = 5)]
    reloads: usize,
    /// Repack weights for ggml's CPU kernels, in modelpool's llama.cpp engine and in
    /// both peers alike (default off: weights stay mapped).
    #[arg(long)]
    repack: bool,
    /// Engines to measure through modelpool.
    #[arg(long, value_delimiter = ',', default_value = "llama.cpp,mistral.rs")]
    engines: Vec<String>,
    /// Parts to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "decode,concurrency,reload,footprint"
    )]
    parts: Vec<Part>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    Decode,
    Concurrency,
    Reload,
    Footprint,
}

const PROMPT: &str = "Once upon a time, in a small village by the sea, there lived";
/// Tokens of the long prompt (prompt speed): " the" is one token in llama vocabularies.
const LONG_PROMPT_TOKENS: usize = 511;

/// `base` made unique with a request number in front: the llama.cpp engine reuses the
/// KV cells of a prompt it has seen (and samples a repeat from kept logits), so a
/// repeated prompt would measure the cache, not the prompt's processing. Both sides of
/// every comparison get such prompts.
fn fresh(base: &str) -> String {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{n}:{base}")
}

fn main() -> anyhow::Result<()> {
    modelpool_benches::run_as_worker_if_asked();
    let args = Args::parse();
    tokio::runtime::Runtime::new()?.block_on(run(args))
}

/// Everything a part needs: the server, its clients and the settings.
struct Bench {
    args: Args,
    model: PathBuf,
    threads: u32,
    inference: InferenceClient<Channel>,
    control: ModelControlClient<Channel>,
}

/// The id of a model with `engine` ("llama.cpp" or "mistral.rs") and one sequence.
fn single_id(engine: &str) -> String {
    format!("single-{engine}")
}

/// The id of the llama.cpp model with `n` sequences.
fn multi_id(n: u32) -> String {
    format!("multi-{n}")
}

/// Server settings: one model per engine (one sequence, `context`) and one llama.cpp
/// model per stream count (`max_sequences` = `max_concurrency` = streams).
fn settings_toml(args: &Args, model: &Path, runtime_dir: &Path) -> anyhow::Result<String> {
    let mut toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\n[workers]\nruntime_dir = \"{}\"\nexe = \"{}\"\n\
         load_timeout = \"600s\"\n",
        runtime_dir.display(),
        std::env::current_exe()?.display()
    );
    let mut table = |id: &str, engine: &str, context: u32, sequences: u32| {
        toml += &format!(
            "[[models]]\nid = \"{id}\"\npath = \"{}\"\nengine = \"{engine}\"\n\
             context_length = {context}\nmax_sequences = {sequences}\nmax_concurrency = {}\n",
            model.display(),
            sequences.max(1)
        );
        if engine == "llama.cpp" {
            toml += &format!("repack = {}\n", args.repack);
        }
    };
    for engine in &args.engines {
        table(&single_id(engine), engine, args.context, 1);
    }
    for &n in &args.streams {
        table(&multi_id(n), "llama.cpp", args.stream_context, n);
    }
    Ok(toml)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let model = std::fs::canonicalize(&args.model)
        .with_context(|| format!("{} (run `just fetch-models`)", args.model.display()))?;
    for engine in &args.engines {
        if engine != "llama.cpp" && engine != "mistral.rs" {
            bail!("--engines: unknown engine {engine:?} (llama.cpp, mistral.rs)");
        }
    }
    peers::peer_exe("llama-bench")?;
    peers::peer_exe("llama-server")?;
    let runtime = tempfile::tempdir()?;
    let toml = settings_toml(&args, &model, runtime.path())?;
    let settings = modelpool_server::Settings::from_toml(&toml, Path::new("/"))?;
    let server = modelpool_server::start(settings).await?;
    let channel = Channel::from_shared(format!("http://{}", server.local_addr))?
        .connect()
        .await?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    print_header(&args, &model, threads)?;
    let mut bench = Bench {
        model,
        threads,
        inference: InferenceClient::new(channel.clone()),
        control: ModelControlClient::new(channel),
        args,
    };
    let parts = bench.args.parts.clone();
    for part in [
        Part::Decode,
        Part::Concurrency,
        Part::Reload,
        Part::Footprint,
    ] {
        if parts.contains(&part) {
            match part {
                Part::Decode => bench.decode().await?,
                Part::Concurrency => bench.concurrency().await?,
                Part::Reload => bench.reload().await?,
                Part::Footprint => bench.footprint().await?,
            }
        }
    }
    server.stop().await?;
    println!("load average at the end: {}", load_average());
    Ok(())
}

fn print_header(args: &Args, model: &Path, threads: u32) -> anyhow::Result<()> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")?
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or_else(|| "unknown".into(), |s| s.trim().to_owned());
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    println!(
        "{date}; nproc {threads}; CPU {cpu}; load average {}; model {} ({:.1} MiB); \
         {} interleaved rounds; {} tokens per request, greedy; {} threads everywhere; repack {}\n",
        load_average(),
        model.file_name().unwrap_or_default().to_string_lossy(),
        mib(std::fs::metadata(model)?.len()),
        args.rounds,
        args.max_tokens,
        threads,
        if args.repack { "on" } else { "off" }
    );
    Ok(())
}

/// The 1, 5 and 15 minute load averages: how busy the shared machine was.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// One generation through gRPC, timed at the client.
#[derive(Clone, Copy, Debug)]
struct GrpcRun {
    ttft: Duration,
    last_chunk: Duration,
    prompt_tokens: u32,
    completion_tokens: u32,
}

impl GrpcRun {
    /// Decode speed: the tokens after the first over the time between first and last.
    fn decode_tok_s(&self) -> f64 {
        decode_rate(self.completion_tokens, self.ttft, self.last_chunk)
    }
}

fn decode_rate(tokens: u32, first: Duration, last: Duration) -> f64 {
    let secs = last.saturating_sub(first).as_secs_f64();
    if secs > 0.0 {
        f64::from(tokens.saturating_sub(1)) / secs
    } else {
        0.0
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// "median (min-max)" of `v`.
fn spread(v: &[f64], decimals: usize) -> String {
    let (min, max) = v
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
    format!("{m:.d$} ({min:.d$}-{max:.d$})", m = median(v), d = decimals)
}

/// Per-round ratios and their median: "0.97 (0.95, 0.98, 0.99)".
fn ratios(num: &[f64], den: &[f64]) -> String {
    let r: Vec<f64> = num.iter().zip(den).map(|(n, d)| n / d).collect();
    let each: Vec<String> = r.iter().map(|x| format!("{x:.2}")).collect();
    format!("{:.2} ({})", median(&r), each.join(", "))
}

impl Bench {
    async fn generate(
        &mut self,
        id: &str,
        prompt: &str,
        max_tokens: u32,
    ) -> anyhow::Result<GrpcRun> {
        generate(self.inference.clone(), id, prompt, max_tokens).await
    }

    async fn load(&mut self, id: &str) -> anyhow::Result<(Duration, Duration)> {
        let started = Instant::now();
        let response = self
            .control
            .load_model(LoadModelRequest {
                id: id.into(),
                ..Default::default()
            })
            .await
            .with_context(|| format!("loading {id}"))?
            .into_inner();
        let wall = started.elapsed();
        let pool = response
            .load_time
            .and_then(|d| Duration::try_from(d).ok())
            .unwrap_or_default();
        Ok((wall, pool))
    }

    async fn evict(&mut self, id: &str) -> anyhow::Result<()> {
        self.control
            .evict_model(EvictModelRequest { id: id.into() })
            .await
            .with_context(|| format!("evicting {id}"))?;
        Ok(())
    }

    async fn info(&mut self, id: &str) -> anyhow::Result<ModelInfo> {
        Ok(self
            .control
            .get_model(GetModelRequest { id: id.into() })
            .await?
            .into_inner())
    }

    /// Evicts every single-stream model but `keep`, so an idle worker holds no memory
    /// or threads while another is measured.
    async fn evict_singles_but(&mut self, keep: &str) -> anyhow::Result<()> {
        for engine in self.args.engines.clone() {
            let id = single_id(&engine);
            if id != keep {
                self.evict(&id).await?;
            }
        }
        Ok(())
    }
}

async fn generate(
    mut client: InferenceClient<Channel>,
    id: &str,
    prompt: &str,
    max_tokens: u32,
) -> anyhow::Result<GrpcRun> {
    let started = Instant::now();
    let mut stream = client
        .generate(modelpool_benches::greedy_request(id, prompt, max_tokens))
        .await
        .with_context(|| format!("generate on {id}"))?
        .into_inner();
    let mut ttft = None;
    let mut last_chunk = Duration::ZERO;
    let mut usage = None;
    while let Some(chunk) = stream.message().await? {
        last_chunk = started.elapsed();
        ttft.get_or_insert(last_chunk);
        usage = chunk.usage.or(usage);
    }
    let usage = usage.with_context(|| format!("{id}: no usage in the last chunk"))?;
    Ok(GrpcRun {
        ttft: ttft.context("an empty stream")?,
        last_chunk,
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
    })
}

/// Decode and prompt speed, time to first token: llama-bench against each engine.
struct DecodeRound {
    bench_tg: f64,
    bench_pp: f64,
    /// Per engine: the 128-token run and the long-prompt run.
    engines: Vec<(GrpcRun, GrpcRun)>,
}

impl Bench {
    async fn decode(&mut self) -> anyhow::Result<()> {
        let long_prompt = " the".repeat(LONG_PROMPT_TOKENS);
        let engines = self.args.engines.clone();
        for engine in &engines {
            self.generate(&single_id(engine), &fresh(PROMPT), 8).await?;
        }
        let mut rounds = Vec::new();
        for _ in 0..self.args.rounds {
            let (model, threads, repack) = (self.model.clone(), self.threads, self.args.repack);
            let bench_tg =
                peers::llama_bench(&model, 0, self.args.max_tokens, threads, repack).await?;
            let bench_pp = peers::llama_bench(&model, 512, 0, threads, repack).await?;
            let mut runs = Vec::new();
            for engine in &engines {
                let id = single_id(engine);
                let run = self
                    .generate(&id, &fresh(PROMPT), self.args.max_tokens)
                    .await?;
                let long = self.generate(&id, &fresh(&long_prompt), 1).await?;
                runs.push((run, long));
            }
            rounds.push(DecodeRound {
                bench_tg,
                bench_pp,
                engines: runs,
            });
        }
        self.print_decode(&engines, &rounds);
        Ok(())
    }

    fn print_decode(&self, engines: &[String], rounds: &[DecodeRound]) {
        let tg: Vec<f64> = rounds.iter().map(|r| r.bench_tg).collect();
        let pp: Vec<f64> = rounds.iter().map(|r| r.bench_pp).collect();
        println!("### Decode and prompt speed, single stream\n");
        println!("| path | decode tok/s | decode / llama-bench (per round) | prompt tok/s | prompt / llama-bench | time to first token ms | tokens |");
        println!("|---|---|---|---|---|---|---|");
        println!(
            "| llama-bench tg{} / pp512 | {} | 1 | {} | 1 | - | {} |",
            self.args.max_tokens,
            spread(&tg, 1),
            spread(&pp, 1),
            self.args.max_tokens
        );
        for (i, engine) in engines.iter().enumerate() {
            let runs: Vec<&(GrpcRun, GrpcRun)> = rounds.iter().map(|r| &r.engines[i]).collect();
            let decode: Vec<f64> = runs.iter().map(|(r, _)| r.decode_tok_s()).collect();
            let prompt: Vec<f64> = runs
                .iter()
                .map(|(_, l)| f64::from(l.prompt_tokens) / l.ttft.as_secs_f64())
                .collect();
            let ttft: Vec<f64> = runs.iter().map(|(r, _)| ms(r.ttft)).collect();
            let tokens: Vec<String> = runs
                .iter()
                .map(|(r, _)| r.completion_tokens.to_string())
                .collect();
            println!(
                "| modelpool {engine} (gRPC) | {} | {} | {} | {} | {} | {} |",
                spread(&decode, 1),
                ratios(&decode, &tg),
                spread(&prompt, 1),
                ratios(&prompt, &pp),
                spread(&ttft, 1),
                tokens.join(",")
            );
        }
        let long_tokens = rounds
            .first()
            .and_then(|r| r.engines.first())
            .map_or(0, |(_, l)| l.prompt_tokens);
        println!(
            "\ndecode = (tokens - 1) / (last chunk - first chunk); prompt = prompt tokens ({long_tokens}) / \
             time to first token of a {LONG_PROMPT_TOKENS}x\" the\" prompt, 1 token generated\n"
        );
    }
}

/// Aggregate tok/s of `n` streams started at once: every token / wall time.
#[derive(Clone, Copy, Debug)]
struct Aggregate {
    tok_s: f64,
    tokens: u32,
    ttft_p50: Duration,
}

fn aggregate(wall: Duration, runs: &[(u32, Duration)]) -> Aggregate {
    let tokens = runs.iter().map(|(t, _)| t).sum::<u32>();
    let ttfts: Vec<f64> = runs.iter().map(|(_, d)| d.as_secs_f64()).collect();
    Aggregate {
        tok_s: f64::from(tokens) / wall.as_secs_f64(),
        tokens,
        ttft_p50: Duration::from_secs_f64(median(&ttfts)),
    }
}

impl Bench {
    async fn modelpool_streams(&self, n: u32) -> anyhow::Result<Aggregate> {
        let id = multi_id(n);
        let started = Instant::now();
        let prompts: Vec<String> = (0..n).map(|_| fresh(PROMPT)).collect();
        let runs = futures::future::try_join_all(
            prompts
                .iter()
                .map(|p| generate(self.inference.clone(), &id, p, self.args.max_tokens)),
        )
        .await?;
        let wall = started.elapsed();
        Ok(aggregate(
            wall,
            &runs
                .iter()
                .map(|r| (r.completion_tokens, r.ttft))
                .collect::<Vec<_>>(),
        ))
    }

    async fn server_streams(&self, port: u16, n: u32) -> anyhow::Result<Aggregate> {
        let started = Instant::now();
        let prompts: Vec<String> = (0..n).map(|_| fresh(PROMPT)).collect();
        let runs = futures::future::try_join_all(
            prompts
                .iter()
                .map(|p| peers::completion(port, p, self.args.max_tokens)),
        )
        .await?;
        let wall = started.elapsed();
        Ok(aggregate(
            wall,
            &runs.iter().map(|r| (r.tokens, r.ttft)).collect::<Vec<_>>(),
        ))
    }

    async fn concurrency(&mut self) -> anyhow::Result<()> {
        self.evict_singles_but("").await?;
        let mut rows = Vec::new();
        for n in self.args.streams.clone() {
            let id = multi_id(n);
            self.load(&id).await?;
            self.modelpool_streams(n).await?;
            let server = LlamaServer::start(&ServerArgs {
                model: &self.model,
                context_total: self.args.stream_context * n,
                parallel: n,
                threads: self.threads,
                repack: self.args.repack,
                kv_unified: false,
            })
            .await?;
            self.server_streams(server.port, n).await?;
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            for round in 0..self.args.rounds {
                // Alternate who goes first, so neither always runs on a warmer machine.
                if round % 2 == 0 {
                    ours.push(self.modelpool_streams(n).await?);
                    theirs.push(self.server_streams(server.port, n).await?);
                } else {
                    theirs.push(self.server_streams(server.port, n).await?);
                    ours.push(self.modelpool_streams(n).await?);
                }
            }
            server.stop().await?;
            self.evict(&id).await?;
            rows.push((n, ours, theirs));
        }
        println!("### Aggregate tok/s, concurrent streams on one model\n");
        println!("| streams | modelpool llama.cpp tok/s | llama-server --parallel tok/s | modelpool / llama-server (per round) | TTFT p50 ms modelpool / llama-server | tokens per round |");
        println!("|---|---|---|---|---|---|");
        for (n, ours, theirs) in rows {
            let o: Vec<f64> = ours.iter().map(|a| a.tok_s).collect();
            let t: Vec<f64> = theirs.iter().map(|a| a.tok_s).collect();
            let ttft =
                |v: &[Aggregate]| median(&v.iter().map(|a| ms(a.ttft_p50)).collect::<Vec<_>>());
            println!(
                "| {n} | {} | {} | {} | {:.0} / {:.0} | {} / {} |",
                spread(&o, 1),
                spread(&t, 1),
                ratios(&o, &t),
                ttft(&ours),
                ttft(&theirs),
                ours[0].tokens,
                theirs[0].tokens
            );
        }
        println!(
            "\nboth: {} tokens per stream, greedy, {} tokens of context per stream (llama-server: \
             -c streams x that, --parallel streams); llama-server with cache_prompt false\n",
            self.args.max_tokens, self.args.stream_context
        );
        Ok(())
    }
}

/// One reload of a model: request to ready, then the first request after it, the same
/// request again (the model now resident throughout), and the mapped pages the first
/// request faulted in.
struct Reload {
    wall_ms: f64,
    pool_ms: f64,
    first_ms: f64,
    resident_ms: f64,
    faulted_file_mib: f64,
    faults: (u64, u64),
}

/// Tokens of the request after a reload: enough to run every layer for the prompt and
/// a few decode steps.
const RELOAD_REQUEST_TOKENS: u32 = 8;

impl Bench {
    async fn reload(&mut self) -> anyhow::Result<()> {
        let bytes = std::fs::metadata(&self.model)?.len();
        let cache_bps = modelpool_benches::cached_read_bps(&self.model)?;
        let disk_bps = modelpool_benches::direct_read_bps(&self.model)?;
        let limit_ms = |bps: f64| 2.0 * bytes as f64 / bps * 1e3 + 300.0;
        println!("### Reload, request to ready, and the first request after it\n");
        println!(
            "File {:.0} MiB; page cache {:.2} GB/s, disk (O_DIRECT) {:.2} GB/s, so 2 x bytes / \
             bandwidth + 0.3 s = {:.0} ms from the page cache, {:.0} ms from the disk. \
             The request: {RELOAD_REQUEST_TOKENS} tokens after a {}-byte prompt.\n",
            mib(bytes),
            cache_bps / 1e9,
            disk_bps / 1e9,
            limit_ms(cache_bps),
            limit_ms(disk_bps),
            PROMPT.len()
        );
        println!(
            "| engine | from | LoadModel RPC ms p50 (min-max) | pool's load_time ms p50 | \
             first request ms p50 | same request, resident, ms p50 | first-request extra ms \
             p50 (max) | file pages faulted in by it, MiB | minor / major faults | reloads |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
        for engine in self.args.engines.clone() {
            let id = single_id(&engine);
            self.evict_singles_but(&id).await?;
            for (tier, warm) in [("page cache", true), ("disk", false)] {
                let mut runs = Vec::new();
                for _ in 0..self.args.reloads {
                    runs.push(self.reload_once(&id, warm).await?);
                }
                print_reloads(&engine, tier, &runs);
            }
        }
        println!();
        Ok(())
    }

    /// Evicts `id`, warms or drops its file's pages, reloads it and runs the request.
    async fn reload_once(&mut self, id: &str, warm: bool) -> anyhow::Result<Reload> {
        self.evict(id).await?;
        if warm {
            pagecache::prefetch(&self.model)?;
        } else {
            pagecache::drop_cached(&self.model)?;
        }
        let (wall, pool) = self.load(id).await?;
        let pid = self.info(id).await?.worker_pid;
        let (smaps, faults) = (
            peers::smaps_rollup(pid)?,
            modelpool_benches::page_faults(pid)?,
        );
        let first = self
            .generate(id, &fresh(PROMPT), RELOAD_REQUEST_TOKENS)
            .await?;
        let after = peers::smaps_rollup(pid)?;
        let faults_after = modelpool_benches::page_faults(pid)?;
        let resident = self
            .generate(id, &fresh(PROMPT), RELOAD_REQUEST_TOKENS)
            .await?;
        Ok(Reload {
            wall_ms: ms(wall),
            pool_ms: ms(pool),
            first_ms: ms(first.last_chunk),
            resident_ms: ms(resident.last_chunk),
            faulted_file_mib: mib(after.file_bytes().saturating_sub(smaps.file_bytes())),
            faults: (faults_after.0 - faults.0, faults_after.1 - faults.1),
        })
    }
}

fn print_reloads(engine: &str, tier: &str, runs: &[Reload]) {
    let col = |f: fn(&Reload) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
    let extra = col(|r| r.first_ms - r.resident_ms);
    let faults = runs.iter().map(|r| r.faults).max().unwrap_or_default();
    println!(
        "| {engine} | {tier} | {} | {:.0} | {:.0} | {:.0} | {:.0} ({:.0}) | {:.0} | {} / {} (most) | {} |",
        spread(&col(|r| r.wall_ms), 0),
        median(&col(|r| r.pool_ms)),
        median(&col(|r| r.first_ms)),
        median(&col(|r| r.resident_ms)),
        median(&extra),
        extra.iter().copied().fold(f64::MIN, f64::max),
        median(&col(|r| r.faulted_file_mib)),
        faults.0,
        faults.1,
        runs.len()
    );
}

/// Memory of one process after load and after one request, and what the pool charged.
struct Footprint {
    name: String,
    after_load: Smaps,
    after_request: Smaps,
    charged_bytes: Option<u64>,
}

impl Bench {
    async fn footprint(&mut self) -> anyhow::Result<()> {
        let mut rows = Vec::new();
        for engine in self.args.engines.clone() {
            let id = single_id(&engine);
            self.evict_singles_but("").await?;
            self.load(&id).await?;
            let pid = self.info(&id).await?.worker_pid;
            let after_load = peers::smaps_rollup(pid)?;
            self.generate(&id, &fresh(PROMPT), self.args.max_tokens)
                .await?;
            let after_request = peers::smaps_rollup(pid)?;
            let charged = self.info(&id).await?.charged_bytes;
            self.evict(&id).await?;
            rows.push(Footprint {
                name: format!("modelpool {engine} worker"),
                after_load,
                after_request,
                charged_bytes: Some(charged),
            });
        }
        let server = LlamaServer::start(&ServerArgs {
            model: &self.model,
            context_total: self.args.context,
            parallel: 1,
            threads: self.threads,
            repack: self.args.repack,
            kv_unified: false,
        })
        .await?;
        let after_load = peers::smaps_rollup(server.pid)?;
        peers::completion(server.port, &fresh(PROMPT), self.args.max_tokens).await?;
        let after_request = peers::smaps_rollup(server.pid)?;
        let ready_ms = ms(server.ready_after);
        server.stop().await?;
        rows.push(Footprint {
            name: "llama-server".into(),
            after_load,
            after_request,
            charged_bytes: None,
        });
        self.print_footprint(&rows, ready_ms);
        Ok(())
    }

    fn print_footprint(&self, rows: &[Footprint], server_ready_ms: f64) {
        let peer = rows.last().map_or(1, |r| r.after_request.rss_bytes).max(1);
        println!(
            "### Resident footprint, {} tokens of context, one sequence (MiB)\n",
            self.args.context
        );
        println!("| process | Rss after load | Rss after one request | anonymous | file-backed | Rss / llama-server | pool charged |");
        println!("|---|---|---|---|---|---|---|");
        for r in rows {
            println!(
                "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {} |",
                r.name,
                mib(r.after_load.rss_bytes),
                mib(r.after_request.rss_bytes),
                mib(r.after_request.anonymous_bytes),
                mib(r.after_request.file_bytes()),
                r.after_request.rss_bytes as f64 / peer as f64,
                r.charged_bytes
                    .map_or_else(|| "-".into(), |b| format!("{:.1}", mib(b)))
            );
        }
        println!(
            "\nanonymous and file-backed (Rss - Anonymous) after the request, from \
             /proc/PID/smaps_rollup; llama-server started to /health ready in {server_ready_ms:.0} ms \
             (its warm-up included)\n"
        );
    }
}
