//! Load/unload cycles through the real pool and real worker processes. Proves that
//! memory returns when a model is unloaded (this process's RSS and thread count, and
//! the machine's available memory, at start and end) and times loads and unloads.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use modelpool_benches::{mem_available_bytes, meminfo_bytes, mib, percentile, thread_count};
use modelpool_pool::store::pagecache;
use modelpool_pool::Instance;
use modelpool_supervisor::process::rss_bytes;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// Measured load/unload cycles (after one warm-up cycle).
    #[arg(long, default_value_t = 20)]
    cycles: usize,
    /// The engine the model loads on.
    #[arg(long, default_value = "llama.cpp")]
    engine: String,
}

fn main() -> anyhow::Result<()> {
    modelpool_benches::run_as_worker_if_asked();
    let args = Args::parse();
    tokio::runtime::Runtime::new()?.block_on(cycles(args))
}

async fn cycles(args: Args) -> anyhow::Result<()> {
    let model = std::fs::canonicalize(&args.model)
        .with_context(|| format!("{} (run `just fetch-models`)", args.model.display()))?;
    let runtime = tempfile::tempdir()?;
    let keys = format!(
        "context_length = 4096\nmax_sequences = 1\nengine = \"{}\"\n",
        args.engine
    );
    let server = modelpool_benches::start_server_with(&model, "m", runtime.path(), &keys).await?;
    let pool = server.pool.clone();
    let me = std::process::id();

    // One warm-up cycle: first use allocates the runtime's and tonic's own buffers.
    drop(pool.acquire("m", None).await?);
    pool.unload("m").await?;

    let rss_start = rss_bytes(me).unwrap_or(0);
    let threads_start = thread_count();
    let avail_start = mem_available_bytes();
    let other = [
        "MemFree",
        "Cached",
        "Shmem",
        "SReclaimable",
        "SUnreclaim",
        "AnonPages",
    ];
    let other_start: Vec<u64> = other.iter().map(|f| meminfo_bytes(f)).collect();
    let file_bytes = std::fs::metadata(&model)?.len();
    let cached_start = pagecache::cached_bytes(&model)?;
    let mut load_ms = Vec::new();
    let mut unload_ms = Vec::new();
    let mut worker_rss = Vec::new();
    for _ in 0..args.cycles {
        let t0 = Instant::now();
        let lease = pool.acquire("m", None).await?;
        load_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        worker_rss.push(lease.instance().resident_bytes());
        let pid = lease.instance().pid().unwrap_or(0);
        drop(lease);
        let t1 = Instant::now();
        pool.unload("m").await?;
        unload_ms.push(t1.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(
            rss_bytes(pid).is_none(),
            "worker {pid} still exists after unload"
        );
    }
    let rss_end = rss_bytes(me).unwrap_or(0);
    let threads_end = thread_count();
    let avail_end = mem_available_bytes();
    let other_end: Vec<u64> = other.iter().map(|f| meminfo_bytes(f)).collect();
    let cached_end = pagecache::cached_bytes(&model)?;
    server.stop().await?;

    println!(
        "model {} on {}, {} load/unload cycles after one warm-up\n",
        model.file_name().unwrap_or_default().to_string_lossy(),
        args.engine,
        args.cycles
    );
    println!("| figure | start | end | drift |");
    println!("|---|---|---|---|");
    println!(
        "| server RSS MiB | {:.1} | {:.1} | {:+.1} |",
        mib(rss_start),
        mib(rss_end),
        mib(rss_end) - mib(rss_start)
    );
    println!(
        "| server threads | {threads_start} | {threads_end} | {:+} |",
        threads_end as i64 - threads_start as i64
    );
    println!(
        "| machine MemAvailable MiB | {:.1} | {:.1} | {:+.1} |",
        mib(avail_start),
        mib(avail_end),
        mib(avail_end) - mib(avail_start)
    );
    for (i, field) in other.iter().enumerate() {
        println!(
            "| machine {field} MiB | {:.1} | {:.1} | {:+.1} |",
            mib(other_start[i]),
            mib(other_end[i]),
            mib(other_end[i]) - mib(other_start[i])
        );
    }
    // The warm tier: an unloaded model's file stays in the page cache.
    println!(
        "| model file in the page cache % | {:.1} | {:.1} | {:+.1} |",
        100.0 * cached_start as f64 / file_bytes as f64,
        100.0 * cached_end as f64 / file_bytes as f64,
        100.0 * (cached_end as f64 - cached_start as f64) / file_bytes as f64
    );
    let worker: Vec<f64> = worker_rss.iter().map(|&b| mib(b)).collect();
    println!(
        "\nworker RSS while loaded: median {:.1} MiB",
        percentile(&worker, 0.5)
    );
    println!(
        "load (request to ready) ms: p50 {:.0}, p90 {:.0}, p99 {:.0}",
        percentile(&load_ms, 0.5),
        percentile(&load_ms, 0.9),
        percentile(&load_ms, 0.99)
    );
    println!(
        "unload (request to process reaped) ms: p50 {:.1}, p90 {:.1}, p99 {:.1}",
        percentile(&unload_ms, 0.5),
        percentile(&unload_ms, 0.9),
        percentile(&unload_ms, 0.99)
    );
    Ok(())
}
