//! Reload latency from each storage tier, next to the physical limit measured in the
//! same run: a model's file read cold from the disk with O_DIRECT (bytes / disk
//! bandwidth) and read again from the page cache (bytes / page-cache bandwidth). Each
//! reload is a whole worker process started through the real pool, request to ready;
//! each evict is request to worker reaped (its memory returned).
//!
//! Whether workers got transparent huge pages is the host's decision, so it is reported
//! here with the host's THP settings: per load, the worker's bytes advised
//! MADV_HUGEPAGE (what modelpool asks for, through glibc's hugetlb tunable) and its
//! AnonHugePages (what the kernel granted). `--huge-pages-from never` runs the same
//! reloads on small pages, for what huge pages buy.
//!
//! `cargo run -p modelpool-benches --bin reload_tiers -- --reps 3`

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use modelpool_benches::{cached_read_bps, direct_read_bps, median, mib};
use modelpool_pool::store::pagecache;
use modelpool_pool::Instance;

#[derive(Parser)]
struct Args {
    /// GGUF files to reload: synthetic 7B-shaped ones (`synth-llama-7b*`) are made when
    /// missing (tokenizer from the first real one); other missing ones are skipped.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf,models/synth-llama-7b-a.gguf"
    )]
    models: Vec<PathBuf>,
    /// Reloads per tier and model.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// `workers.huge_pages_from` for the run ("1GiB" is the server's default; "0" gives
    /// every worker huge pages, "never" none).
    #[arg(long, default_value = "1GiB")]
    huge_pages_from: String,
}

fn main() -> anyhow::Result<()> {
    modelpool_benches::run_as_worker_if_asked();
    let args = Args::parse();
    tokio::runtime::Runtime::new()?.block_on(run(args))
}

struct Row {
    tier: &'static str,
    /// Loaded with its file in the page cache (else with its pages dropped).
    warm: bool,
    load_ms: Vec<f64>,
    cached_fraction: Vec<f64>,
    /// Per load, the worker's bytes advised MADV_HUGEPAGE and in huge pages, at ready.
    advised_mib: Vec<f64>,
    huge_mib: Vec<f64>,
}

async fn run(args: Args) -> anyhow::Result<()> {
    println!(
        "host THP: {}; workers.huge_pages_from = {}",
        modelpool_benches::thp_settings(),
        args.huge_pages_from
    );
    println!();
    println!("| model | MiB | tier | reload p50 ms (min-max) | effective GB/s | physical limit ms | reload / limit | file cached at start | worker MADV_HUGEPAGE MiB | worker AnonHugePages MiB |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut evicts = Vec::new();
    // The synthetic 7B-shaped models are made when missing (the disk checked first).
    let synthetic: Vec<PathBuf> = args
        .models
        .iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("synth-llama-7b"))
        })
        .cloned()
        .collect();
    if let Some(real) = args.models.iter().find(|p| !synthetic.contains(p)) {
        modelpool_benches::synth::make_missing_7b(&synthetic, real)?;
    }
    for model in &args.models {
        let Ok(model) = std::fs::canonicalize(model) else {
            eprintln!("skipping {}: missing", model.display());
            continue;
        };
        let bytes = std::fs::metadata(&model)?.len();
        pagecache::drop_cached(&model)?;
        let disk_bps = direct_read_bps(&model)?;
        let cache_bps = cached_read_bps(&model)?;
        let runtime = tempfile::tempdir()?;
        let server = modelpool_benches::start_server_with_workers(
            &model,
            "m",
            runtime.path(),
            &format!("huge_pages_from = \"{}\"", args.huge_pages_from),
            "context_length = 2048\nmax_sequences = 1\n",
        )
        .await?;
        let pool = server.pool.clone();
        let mut rows =
            [("warm (page cache)", true), ("disk (cold cache)", false)].map(|(tier, warm)| Row {
                tier,
                warm,
                load_ms: Vec::new(),
                cached_fraction: Vec::new(),
                advised_mib: Vec::new(),
                huge_mib: Vec::new(),
            });
        for _ in 0..args.reps {
            for row in rows.iter_mut() {
                if row.warm {
                    pagecache::prefetch(&model)?;
                } else {
                    pagecache::drop_cached(&model)?;
                }
                let cached = pagecache::cached_bytes(&model).unwrap_or(0);
                row.cached_fraction.push(cached as f64 / bytes as f64);
                let started = Instant::now();
                let lease = pool.acquire("m", None).await?;
                row.load_ms.push(started.elapsed().as_secs_f64() * 1e3);
                let pid = lease.instance().pid().unwrap_or(0);
                let advised = modelpool_benches::huge_advised_bytes(pid).unwrap_or(0);
                row.advised_mib.push(mib(advised));
                row.huge_mib
                    .push(mib(modelpool_benches::anon_huge_bytes(pid)));
                drop(lease);
                let started = Instant::now();
                pool.unload("m").await?;
                evicts.push((model.clone(), started.elapsed().as_secs_f64() * 1e3));
            }
        }
        server.stop().await?;
        let name = model.file_name().unwrap_or_default().to_string_lossy();
        for row in &rows {
            let bps = if row.warm { cache_bps } else { disk_bps };
            let limit_ms = bytes as f64 / bps * 1e3;
            let p50 = median(&row.load_ms);
            let (min, max) = row
                .load_ms
                .iter()
                .fold((f64::MAX, 0f64), |(a, b), v| (a.min(*v), b.max(*v)));
            println!(
                "| {name} | {:.0} | {} | {p50:.0} ({min:.0}-{max:.0}) | {:.2} | {limit_ms:.0} ({:.2} GB/s) | {:.1}x | {:.0}% | {:.0} | {:.0} |",
                mib(bytes),
                row.tier,
                bytes as f64 / (p50 / 1e3) / 1e9,
                bps / 1e9,
                p50 / limit_ms,
                median(&row.cached_fraction) * 100.0,
                median(&row.advised_mib),
                median(&row.huge_mib)
            );
        }
    }
    println!();
    for model in &args.models {
        let ms: Vec<f64> = evicts
            .iter()
            .filter(|(m, _)| m.file_name() == model.file_name())
            .map(|(_, v)| *v)
            .collect();
        if !ms.is_empty() {
            println!(
                "evict (request to worker reaped), {}: p50 {:.1} ms, max {:.1} ms over {}",
                model.display(),
                median(&ms),
                ms.iter().copied().fold(0.0, f64::max),
                ms.len()
            );
        }
    }
    Ok(())
}
