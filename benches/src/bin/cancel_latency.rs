//! How soon a client that goes away stops its generation in the worker: from dropping
//! the stream to the worker listing no active sequence, and to the last token it counted
//! (the token being computed when the client left may still finish). The end-to-end
//! test `e2e::cancel` checks that both happen; this measures how fast.
//!
//! `cargo run -p modelpool-benches --bin cancel_latency -- --reps 10`

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use modelpool_benches::{median, percentile};
use modelpool_proto::v1::inference_client::InferenceClient;

#[derive(Parser)]
struct Args {
    /// GGUF model.
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// Cancelled generations.
    #[arg(long, default_value_t = 10)]
    reps: usize,
}

fn main() -> anyhow::Result<()> {
    modelpool_benches::run_as_worker_if_asked();
    let args = Args::parse();
    tokio::runtime::Runtime::new()?.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let runtime = tempfile::tempdir()?;
    let model = std::fs::canonicalize(&args.model)?;
    let server = modelpool_benches::start_server(&model, "m", runtime.path()).await?;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.local_addr))?
        .connect()
        .await?;
    let mut client = InferenceClient::new(channel);
    // A lease of our own keeps the worker resident and reaches its counters.
    let lease = server.pool.acquire("m", None).await?;
    let worker = lease.instance();
    let (mut to_idle_ms, mut to_last_token_ms) = (Vec::new(), Vec::new());
    for _ in 0..args.reps {
        let mut stream = client
            .generate(modelpool_benches::greedy_request(
                "m",
                "1, 2, 3, 4, 5, 6, 7, 8,",
                2000,
            ))
            .await?
            .into_inner();
        for _ in 0..5 {
            stream.message().await?;
        }
        let dropped = Instant::now();
        drop(stream);
        while worker.stats().await?.active_sequences != 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        to_idle_ms.push(dropped.elapsed().as_secs_f64() * 1e3);
        // The last token is the last change of the count before it holds still for 1 s.
        let mut count = worker.stats().await?.generated_tokens_total;
        let mut changed = dropped;
        while changed.elapsed() < Duration::from_secs(1) {
            tokio::time::sleep(Duration::from_millis(2)).await;
            let now = worker.stats().await?.generated_tokens_total;
            if now != count {
                (count, changed) = (now, Instant::now());
            }
        }
        to_last_token_ms.push(changed.duration_since(dropped).as_secs_f64() * 1e3);
    }
    drop(lease);
    server.stop().await?;
    for (what, ms) in [
        ("no active sequence", &to_idle_ms),
        ("last token counted", &to_last_token_ms),
    ] {
        println!(
            "client gone -> {what}: p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms over {}",
            median(ms),
            percentile(ms, 0.9),
            ms.iter().copied().fold(0.0, f64::max),
            ms.len()
        );
    }
    Ok(())
}
