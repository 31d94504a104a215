//! Load generator: many concurrent generation streams across several models, with a
//! RAM budget that cannot hold them all, so the pool must evict, queue and refuse.
//!
//! Reports requests/s, every error by gRPC code with a sample message (only the
//! intended RESOURCE_EXHAUSTED and UNAVAILABLE should appear, each with its reason),
//! p50/p99 latency of the successful requests, per model the requests served and their
//! wait (time to the first chunk: queueing, load or turn, prefill), turns given to
//! models that waited for room, the most the budget was ever charged, and the RSS of
//! the server process and of its workers over time.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use modelpool_benches::{median, mib, percentile};
use modelpool_proto::v1::inference_client::InferenceClient;
use modelpool_proto::v1::model_control_client::ModelControlClient;
use modelpool_proto::v1::{GenerateRequest, GetPoolStatusRequest, SamplingParams};
use modelpool_server::Settings;
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: std::path::PathBuf,
    /// Concurrent streams (client tasks, each sending requests back to back).
    #[arg(long, default_value_t = 200)]
    streams: usize,
    /// Models (the same file under different ids).
    #[arg(long, default_value_t = 5)]
    models: usize,
    /// How many of them the RAM budget holds at once.
    #[arg(long, default_value_t = 3)]
    fit: u64,
    #[arg(long, default_value_t = 60)]
    secs: u64,
    /// Tokens per request.
    #[arg(long, default_value_t = 8)]
    tokens: u32,
    /// Each request picks its model at random (else each client walks the models).
    #[arg(long)]
    random: bool,
    /// Context length of every model (its KV cache is part of what the budget holds).
    #[arg(long, default_value_t = 1024)]
    context: u32,
    /// Sequences each model decodes in one batch (`max_sequences`; llama.cpp batches
    /// them). Each model takes `max_concurrency = 4` requests at once.
    #[arg(long, default_value_t = 4)]
    sequences: u32,
    #[arg(long, default_value = "30s")]
    queue_timeout: String,
    #[arg(long, default_value = "3s")]
    fairness_window: String,
    #[arg(long, default_value = "10s")]
    min_residency: String,
    #[arg(long, default_value = "30s")]
    drain_timeout: String,
}

/// A tiny xorshift for picking models: no dependency, a different stream per client.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn main() -> anyhow::Result<()> {
    modelpool_benches::run_as_worker_if_asked();
    let args = Args::parse();
    tokio::runtime::Runtime::new()?.block_on(run(args))
}

/// Errors grouped by code and reason: the message up to its first colon, with model
/// ids and numbers blanked ("ResourceExhausted: model `mN` does not fit").
fn reason_key(code: tonic::Code, message: &str) -> String {
    let head = message.split(':').next().unwrap_or("");
    let mut out = String::new();
    let mut last_digit = false;
    for c in head.chars() {
        if c.is_ascii_digit() || c == '.' && last_digit {
            if !last_digit {
                out.push('N');
            }
            last_digit = true;
        } else {
            out.push(c);
            last_digit = false;
        }
    }
    format!("{code:?}: {out}")
}

/// (seconds, server RSS, workers' RSS, live workers).
type RssSample = (f64, u64, u64, usize);

#[derive(Default)]
struct Tally {
    latency_ms: Vec<f64>,
    /// Code -> (count, a sample message).
    errors: BTreeMap<String, (u64, String)>,
    /// Model -> (served, refused or failed, time to first chunk of each served, ms,
    /// and the pool's wait for its model, `load_wait`, of each served, ms).
    per_model: BTreeMap<String, (u64, u64, Vec<f64>, Vec<f64>)>,
}

async fn run(args: Args) -> anyhow::Result<()> {
    let model = std::fs::canonicalize(&args.model)
        .with_context(|| format!("{} (run `just fetch-models`)", args.model.display()))?;
    let mut spec = modelpool_pool::ModelSpec::new("p", &model);
    spec.context_length = args.context;
    spec.max_sequences = args.sequences;
    let one = modelpool_supervisor::footprint::predict(&spec)?.total_bytes();
    let budget = one * args.fit + one / 2;
    let mut models = String::new();
    for i in 1..=args.models {
        models += &format!(
            "[[models]]\nid = \"m{i}\"\npath = \"{}\"\ncontext_length = {}\nmax_concurrency = 4\n\
             max_sequences = {}\n",
            model.display(),
            args.context,
            args.sequences
        );
    }
    let runtime = tempfile::tempdir()?;
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"\"\nmax_concurrent_streams = {}\n\
         [workers]\nruntime_dir = \"{}\"\nexe = \"{}\"\n\
         [pool]\nram_budget = \"{budget}\"\nreserve = \"0\"\nqueue_depth = 100\nqueue_timeout = \"{}\"\n\
         fairness_window = \"{}\"\nmin_residency = \"{}\"\ndrain_timeout = \"{}\"\n{models}",
        args.streams * 2,
        runtime.path().display(),
        std::env::current_exe()?.display(),
        args.queue_timeout,
        args.fairness_window,
        args.min_residency,
        args.drain_timeout,
    );
    let server = modelpool_server::start(Settings::from_toml(&toml, Path::new("/"))?).await?;
    let channel = Channel::from_shared(format!("http://{}", server.local_addr))?
        .connect()
        .await?;
    let started = Instant::now();
    let until = started + Duration::from_secs(args.secs);
    let tally: Arc<Mutex<Tally>> = Arc::default();
    let rss: Arc<Mutex<Vec<RssSample>>> = Arc::default();
    // The most ever charged (used + reserved) on the RAM budget.
    let peak_charged: Arc<Mutex<u64>> = Arc::default();
    let sampler = tokio::spawn({
        let rss = Arc::clone(&rss);
        let peak = Arc::clone(&peak_charged);
        let mut control = ModelControlClient::new(channel.clone());
        async move {
            while Instant::now() < until {
                let me = modelpool_pool::memory::process_rss(std::process::id()).0;
                let (workers, resident) =
                    match control.get_pool_status(GetPoolStatusRequest {}).await {
                        Ok(s) => {
                            let s = s.into_inner();
                            let charged = s.devices.iter().filter(|d| d.device == "cpu");
                            let charged = charged.map(|d| d.used_bytes + d.reserved_bytes).max();
                            let mut peak = peak.lock().unwrap();
                            *peak = (*peak).max(charged.unwrap_or(0));
                            let live: Vec<_> =
                                s.models.iter().filter(|m| m.worker_pid != 0).collect();
                            (live.iter().map(|m| m.resident_bytes).sum(), live.len())
                        }
                        Err(_) => (0, 0),
                    };
                rss.lock()
                    .unwrap()
                    .push((started.elapsed().as_secs_f64(), me, workers, resident));
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    });
    let clients: Vec<_> = (0..args.streams)
        .map(|i| {
            let mut c = InferenceClient::new(channel.clone());
            let tally = Arc::clone(&tally);
            let n = args.models;
            let tokens = args.tokens;
            let random = args.random;
            tokio::spawn(async move {
                let mut k = i;
                let mut seed = 0x9E37_79B9_7F4A_7C15_u64 ^ (i as u64 + 1).wrapping_mul(0x2545_F491);
                while Instant::now() < until {
                    // Spread over the models: at random, or each client moving on after
                    // every request.
                    let pick = if random {
                        next_random(&mut seed) as usize
                    } else {
                        k += 7;
                        k - 7
                    };
                    let id = format!("m{}", pick % n + 1);
                    let model = id.clone();
                    let t0 = Instant::now();
                    let req = GenerateRequest {
                        model: id,
                        prompt: "The quick brown fox".into(),
                        sampling: Some(SamplingParams {
                            max_tokens: Some(tokens),
                            ..Default::default()
                        }),
                    };
                    let mut first_ms = None;
                    let mut pool_wait_ms = 0.0;
                    let outcome = match c.generate(req).await {
                        Ok(s) => {
                            let mut s = s.into_inner();
                            loop {
                                match s.message().await {
                                    Ok(Some(chunk)) => {
                                        first_ms.get_or_insert(t0.elapsed().as_secs_f64() * 1e3);
                                        let wait = chunk.usage.and_then(|u| u.load_wait);
                                        if let Some(w) =
                                            wait.and_then(|w| Duration::try_from(w).ok())
                                        {
                                            pool_wait_ms = w.as_secs_f64() * 1e3;
                                        }
                                    }
                                    Ok(None) => break Ok(()),
                                    Err(e) => break Err(e),
                                }
                            }
                        }
                        Err(e) => Err(e),
                    };
                    {
                        let mut t = tally.lock().unwrap();
                        let per = t.per_model.entry(model).or_default();
                        match &outcome {
                            Ok(()) => {
                                per.0 += 1;
                                per.2.push(first_ms.unwrap_or(0.0));
                                per.3.push(pool_wait_ms);
                            }
                            Err(_) => per.1 += 1,
                        }
                        match outcome {
                            Ok(()) => t.latency_ms.push(t0.elapsed().as_secs_f64() * 1e3),
                            Err(e) => {
                                let entry = t
                                    .errors
                                    .entry(reason_key(e.code(), e.message()))
                                    .or_insert((0, e.message().to_owned()));
                                entry.0 += 1;
                            }
                        }
                    }
                    if Instant::now() < until {
                        // A refused client backs off briefly instead of spinning.
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();
    for c in clients {
        c.await?;
    }
    sampler.await?;
    let status = ModelControlClient::new(channel.clone())
        .get_pool_status(GetPoolStatusRequest {})
        .await?
        .into_inner();
    let loads: u64 = status.models.iter().map(|m| m.loads_started).sum();
    let (turns, turns_last_minute) = (status.turns_total, status.turns_last_minute);
    server.stop().await?;
    let elapsed = started.elapsed().as_secs_f64();
    let t = tally.lock().unwrap();
    let errors: u64 = t.errors.values().map(|(n, _)| n).sum();
    println!(
        "{} streams over {} models for {:.0} s; budget {:.0} MiB ({} of the {:.0} MiB models fit)\n",
        args.streams,
        args.models,
        elapsed,
        mib(budget),
        args.fit,
        mib(one)
    );
    println!("| | value |\n|---|---|");
    println!(
        "| requests ok | {} ({:.1}/s) |",
        t.latency_ms.len(),
        t.latency_ms.len() as f64 / elapsed
    );
    println!("| requests refused or failed | {errors} |");
    if !t.latency_ms.is_empty() {
        println!(
            "| latency p50 / p99 (ms) | {:.0} / {:.0} |",
            median(&t.latency_ms),
            percentile(&t.latency_ms, 0.99)
        );
    }
    println!("| loads started (all models) | {loads} |");
    println!(
        "| turns (per minute: run average / last minute) | {turns} ({:.1} / {turns_last_minute}) |",
        turns as f64 * 60.0 / elapsed
    );
    println!(
        "| most ever charged (used + reserved) of the budget | {:.0} of {:.0} MiB |",
        mib(*peak_charged.lock().unwrap()),
        mib(budget)
    );
    println!(
        "\n| model | served | refused or failed | wait p50 / p99 (ms, to first chunk) | \
         pool wait p50 / p99 (ms, load_wait) |\n|---|---|---|---|---|"
    );
    let p50_p99 = |v: &[f64]| match v.is_empty() {
        true => "-".to_owned(),
        false => format!("{:.0} / {:.0}", median(v), percentile(v, 0.99)),
    };
    for (id, (ok, failed, first, pool)) in &t.per_model {
        println!(
            "| {id} | {ok} | {failed} | {} | {} |",
            p50_p99(first),
            p50_p99(pool)
        );
    }
    println!("\n| code: reason | count | sample message |\n|---|---|---|");
    for (code, (n, msg)) in &t.errors {
        println!("| {code} | {n} | {} |", msg.replace('|', "/"));
    }
    println!("\n| t (s) | server RSS (MiB) | workers RSS (MiB) | workers |\n|---|---|---|---|");
    let rss = rss.lock().unwrap();
    let step = (rss.len() / 8).max(1);
    for (i, (ts, me, w, n)) in rss.iter().enumerate() {
        if i % step == 0 || i + 1 == rss.len() {
            println!("| {ts:.0} | {:.0} | {:.0} | {n} |", mib(*me), mib(*w));
        }
    }
    Ok(())
}
