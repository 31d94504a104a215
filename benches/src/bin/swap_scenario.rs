//! The seed scenario: a fixed RAM budget, small models under continuous load, and one
//! swap slot that alternates between two large (7B-shaped, synthetic) models.
//!
//! One run has two phases of equal length: first the small models alone (the large slot
//! holds one idle model), then the same small load while the slot swaps every
//! `--swap-every`. It prints small-model latency and tokens/s for both phases, swap-in
//! and swap-out times against the file's bytes over the measured read bandwidth, and
//! the peak of charged bytes against the budget; it writes an SVG of memory over time
//! (budget, charged bytes per model, swap moments).
//!
//! The large models' text is meaningless (random weights); they are here to be loaded,
//! measured and swapped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use modelpool_benches::synth;
use modelpool_benches::{median, mib, percentile, svg};
use modelpool_proto::v1::inference_client::InferenceClient;
use modelpool_proto::v1::model_control_client::ModelControlClient;
use modelpool_proto::v1::pool_event::Kind;
use modelpool_proto::v1::{
    GenerateRequest, GetPoolStatusRequest, LoadModelRequest, SamplingParams, WatchEventsRequest,
};
use modelpool_server::Settings;
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    /// The two large models of the swap slot.
    #[arg(long, num_args = 2, default_values = ["models/synth-llama-7b-a.gguf", "models/synth-llama-7b-b.gguf"])]
    large: Vec<PathBuf>,
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    small: PathBuf,
    /// Small models under load (copies of --small under different ids).
    #[arg(long, default_value_t = 3)]
    small_count: usize,
    /// Seconds of each phase.
    #[arg(long, default_value_t = 40)]
    phase_secs: u64,
    #[arg(long, default_value_t = 10)]
    swap_every_secs: u64,
    /// Tokens per small request.
    #[arg(long, default_value_t = 16)]
    tokens: u32,
    /// RAM budget; default: what the models need (each small, one large) plus 10%.
    #[arg(long)]
    budget: Option<String>,
    /// `workers.load_nice`: the CPU priority a loading worker yields (0: none).
    #[arg(long, default_value_t = 10)]
    load_nice: i32,
    #[arg(long, default_value = "benches/swap_scenario.svg")]
    svg: PathBuf,
    /// Where every model runs: "cpu" (budget: RAM) or "cuda:N" (budget: that GPU's VRAM).
    #[arg(long, default_value = "cpu")]
    device: modelpool_pool::Device,
}

fn main() -> anyhow::Result<()> {
    modelpool_benches::run_as_worker_if_asked();
    let args = Args::parse();
    tokio::runtime::Runtime::new()?.block_on(run(args))
}

/// Sequential read bandwidth of `path` with its pages dropped first, bytes/s.
fn read_bandwidth(path: &Path) -> anyhow::Result<f64> {
    let _ = modelpool_pool::store::pagecache::drop_cached(path);
    let f = std::fs::File::open(path)?;
    Ok(modelpool_benches::read_through_bps(
        f,
        &mut vec![0u8; 8 << 20],
    )?)
}

struct Sample {
    t: f64,
    budget: u64,
    charged: BTreeMap<String, u64>,
    /// Charged and reserved on the scenario's device, as its status says.
    device_used: u64,
}

async fn run(args: Args) -> anyhow::Result<()> {
    let small = std::fs::canonicalize(&args.small)
        .with_context(|| format!("{} (run `just fetch-models`)", args.small.display()))?;
    synth::make_missing_7b(&args.large, &small)?;
    let large: Vec<PathBuf> = args
        .large
        .iter()
        .map(|p| {
            std::fs::canonicalize(p).with_context(|| {
                format!(
                    "{} (run `just synth-model 7b {}`)",
                    p.display(),
                    p.display()
                )
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let small_ids: Vec<String> = (1..=args.small_count)
        .map(|i| format!("small-{i}"))
        .collect();
    let device = args.device;
    let mut models = String::new();
    for id in &small_ids {
        models += &format!(
            "[[models]]\nid = \"{id}\"\npath = \"{}\"\ncontext_length = 1024\ndevice = \"{device}\"\n",
            small.display()
        );
    }
    for (i, p) in large.iter().enumerate() {
        models += &format!(
            "[[models]]\nid = \"large-{}\"\npath = \"{}\"\ncontext_length = 1024\ndevice = \"{device}\"\n",
            i + 1,
            p.display()
        );
    }
    models += "[[groups]]\nname = \"large\"\nmembers = [\"large-1\", \"large-2\"]\nmax_resident = 1\nmin_residency = \"0s\"\n";
    let predict = |p: &Path| -> anyhow::Result<u64> {
        let mut spec = modelpool_pool::ModelSpec::new("p", p);
        spec.context_length = 1024;
        spec.device = device;
        Ok(modelpool_supervisor::footprint::predict(&spec)?
            .charge
            .get(device))
    };
    let needed = predict(&small)? * args.small_count as u64
        + large
            .iter()
            .map(|p| predict(p))
            .collect::<anyhow::Result<Vec<_>>>()?
            .into_iter()
            .max()
            .unwrap_or(0);
    let budget = match &args.budget {
        Some(b) => modelpool_pool::budget::parse_bytes(b).map_err(anyhow::Error::msg)?,
        None => needed * 11 / 10,
    };
    let runtime = tempfile::tempdir()?;
    let budget_key = if device == modelpool_pool::Device::Cpu {
        "ram_budget"
    } else {
        "vram_budget"
    };
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"\"\n[workers]\nruntime_dir = \"{}\"\nexe = \"{}\"\nload_timeout = \"600s\"\nload_nice = {}\n\
         [pool]\n{budget_key} = \"{budget}\"\nreserve = \"0\"\nqueue_timeout = \"600s\"\n{models}",
        runtime.path().display(),
        std::env::current_exe()?.display(),
        args.load_nice,
    );
    let server = modelpool_server::start(Settings::from_toml(&toml, Path::new("/"))?).await?;
    let channel = Channel::from_shared(format!("http://{}", server.local_addr))?
        .connect()
        .await?;
    let mut control = ModelControlClient::new(channel.clone());
    let mut events = control
        .watch_events(WatchEventsRequest {})
        .await?
        .into_inner();

    let bandwidth = read_bandwidth(&large[0])?;
    let large_bytes = std::fs::metadata(&large[0])?.len();
    eprintln!(
        "{budget_key} {:.0} MiB; large file {:.0} MiB read at {:.0} MiB/s",
        mib(budget),
        mib(large_bytes),
        bandwidth / 1048576.0
    );

    for id in small_ids.iter().chain(["large-1".to_string()].iter()) {
        control
            .load_model(LoadModelRequest {
                id: id.clone(),
                ..Default::default()
            })
            .await?;
    }
    let started = Instant::now();
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let swaps: Arc<Mutex<Vec<(f64, String, String)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn({
        let (mut c, samples, stop) = (control.clone(), Arc::clone(&samples), Arc::clone(&stop));
        async move {
            while !stop.load(Ordering::SeqCst) {
                if let Ok(s) = c.get_pool_status(GetPoolStatusRequest {}).await {
                    let s = s.into_inner();
                    let dev = s.devices.iter().find(|d| d.device == device.to_string());
                    samples.lock().unwrap().push(Sample {
                        t: started.elapsed().as_secs_f64(),
                        budget: dev.map_or(0, |d| d.budget_bytes),
                        device_used: dev.map_or(0, |d| d.used_bytes + d.reserved_bytes),
                        charged: s
                            .models
                            .iter()
                            .map(|m| (m.id.clone(), m.charged_bytes))
                            .collect(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    });
    let swap_events = tokio::spawn({
        let swaps = Arc::clone(&swaps);
        async move {
            let mut swap_in_ms = Vec::new();
            let mut out_started: BTreeMap<String, f64> = BTreeMap::new();
            let mut swap_out_ms = Vec::new();
            while let Ok(Some(e)) = events.message().await {
                let t = started.elapsed().as_secs_f64();
                match e.kind {
                    Some(Kind::SwapStarted(s)) => {
                        for o in &s.outgoing {
                            out_started.insert(o.clone(), t);
                        }
                        swaps
                            .lock()
                            .unwrap()
                            .push((t, e.model.clone(), "start".into()));
                    }
                    Some(Kind::Evicted(ev)) if ev.reason == "swap" => {
                        if let Some(s) = out_started.remove(&e.model) {
                            swap_out_ms.push((t - s) * 1e3);
                        }
                    }
                    Some(Kind::LoadFinished(f)) if e.model.starts_with("large") => {
                        let d = f.duration.unwrap_or_default();
                        swap_in_ms.push(d.seconds as f64 * 1e3 + d.nanos as f64 / 1e6);
                        swaps
                            .lock()
                            .unwrap()
                            .push((t, e.model.clone(), "ready".into()));
                    }
                    _ => {}
                }
            }
            (swap_in_ms, swap_out_ms)
        }
    });

    let phase = Duration::from_secs(args.phase_secs);
    let baseline = small_load(&channel, &small_ids, args.tokens, phase).await?;
    let swapper = tokio::spawn({
        let channel = channel.clone();
        let every = Duration::from_secs(args.swap_every_secs);
        async move {
            let mut c = InferenceClient::new(channel);
            let mut next = 2;
            let end = Instant::now() + phase;
            while Instant::now() + every / 2 < end {
                tokio::time::sleep(every).await;
                let req = GenerateRequest {
                    model: format!("large-{next}"),
                    prompt: "Once".into(),
                    sampling: Some(SamplingParams {
                        max_tokens: Some(1),
                        ..Default::default()
                    }),
                };
                if let Ok(s) = c.generate(req).await {
                    let mut s = s.into_inner();
                    while let Ok(Some(_)) = s.message().await {}
                }
                next = 3 - next;
            }
        }
    });
    let with_swaps = small_load(&channel, &small_ids, args.tokens, phase).await?;
    swapper.await?;
    stop.store(true, Ordering::SeqCst);
    sampler.await?;
    server.stop().await?;
    let (swap_in_ms, swap_out_ms) = swap_events.await?;

    let samples = samples.lock().unwrap();
    // On the CPU, models' charges sum to what the budget holds; a GPU model's charge
    // is part host RAM, so there the device's own books are read.
    let charged = |s: &Sample| {
        if device == modelpool_pool::Device::Cpu {
            s.charged.values().sum::<u64>()
        } else {
            s.device_used
        }
    };
    let peak = samples.iter().map(charged).max().unwrap_or(0);
    let over = samples.iter().filter(|s| charged(s) > s.budget).count();
    let ideal_ms = large_bytes as f64 / bandwidth * 1e3;
    println!("| | without swaps | with swaps | ratio |\n|---|---|---|---|");
    let row = |name: &str, a: f64, b: f64| println!("| {name} | {a:.0} | {b:.0} | {:.2}x |", b / a);
    row(
        "small p50 latency (ms)",
        median(&baseline.latency_ms),
        median(&with_swaps.latency_ms),
    );
    row(
        "small p99 latency (ms)",
        percentile(&baseline.latency_ms, 0.99),
        percentile(&with_swaps.latency_ms, 0.99),
    );
    println!(
        "| small tokens/s (all models) | {:.1} | {:.1} | {:.2}x |",
        baseline.tokens_per_s,
        with_swaps.tokens_per_s,
        with_swaps.tokens_per_s / baseline.tokens_per_s
    );
    println!(
        "| small requests (failed) | {} ({}) | {} ({}) | |",
        baseline.latency_ms.len(),
        baseline.failed,
        with_swaps.latency_ms.len(),
        with_swaps.failed
    );
    println!(
        "\nswaps: {} ; swap-in (load) p50 {:.0} ms, max {:.0} ms ; swap-out p50 {:.0} ms ; \
         file {:.0} MiB at {:.0} MiB/s = {:.0} ms, target 2x + 300 = {:.0} ms",
        swap_out_ms.len(),
        median(&swap_in_ms),
        swap_in_ms.iter().copied().fold(0.0, f64::max),
        if swap_out_ms.is_empty() {
            0.0
        } else {
            median(&swap_out_ms)
        },
        mib(large_bytes),
        bandwidth / 1048576.0,
        ideal_ms,
        2.0 * ideal_ms + 300.0
    );
    println!(
        "{budget_key} {:.0} MiB; peak charged on {device} {:.0} MiB; samples over budget: {over} of {}",
        mib(budget),
        mib(peak),
        samples.len()
    );
    let swaps = swaps.lock().unwrap();
    std::fs::write(
        &args.svg,
        svg::memory_plot(&samples_for_plot(&samples), &swaps, args.phase_secs as f64),
    )?;
    println!("plot: {}", args.svg.display());
    Ok(())
}

fn samples_for_plot(samples: &[Sample]) -> Vec<svg::Point> {
    samples
        .iter()
        .map(|s| svg::Point {
            t: s.t,
            budget: s.budget,
            series: s.charged.clone(),
        })
        .collect()
}

struct LoadResult {
    latency_ms: Vec<f64>,
    tokens_per_s: f64,
    failed: usize,
}

/// One client per small model, each sending requests back to back for `phase`.
async fn small_load(
    channel: &Channel,
    ids: &[String],
    tokens: u32,
    phase: Duration,
) -> anyhow::Result<LoadResult> {
    let started = Instant::now();
    let tasks: Vec<_> = ids
        .iter()
        .map(|id| {
            let mut c = InferenceClient::new(channel.clone());
            let id = id.clone();
            tokio::spawn(async move {
                let (mut lat, mut toks, mut failed) = (Vec::new(), 0u64, 0);
                while started.elapsed() < phase {
                    let t0 = Instant::now();
                    let req = GenerateRequest {
                        model: id.clone(),
                        prompt: "The quick brown fox".into(),
                        sampling: Some(SamplingParams {
                            max_tokens: Some(tokens),
                            ..Default::default()
                        }),
                    };
                    let ok = match c.generate(req).await {
                        Ok(s) => {
                            let mut s = s.into_inner();
                            let mut n = 0;
                            let mut ok = true;
                            loop {
                                match s.message().await {
                                    Ok(Some(chunk)) => {
                                        if let Some(u) = chunk.usage {
                                            n = u.completion_tokens;
                                        }
                                    }
                                    Ok(None) => break,
                                    Err(_) => {
                                        ok = false;
                                        break;
                                    }
                                }
                            }
                            toks += u64::from(n);
                            ok
                        }
                        Err(_) => false,
                    };
                    if ok {
                        lat.push(t0.elapsed().as_secs_f64() * 1e3);
                    } else {
                        failed += 1;
                    }
                }
                (lat, toks, failed)
            })
        })
        .collect();
    let mut out = LoadResult {
        latency_ms: Vec::new(),
        tokens_per_s: 0.0,
        failed: 0,
    };
    let mut tokens_total = 0;
    for t in tasks {
        let (lat, toks, failed) = t.await?;
        out.latency_ms.extend(lat);
        tokens_total += toks;
        out.failed += failed;
    }
    out.tokens_per_s = tokens_total as f64 / started.elapsed().as_secs_f64();
    Ok(out)
}
