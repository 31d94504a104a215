//! Dequantizes a llama GGUF into a Hugging Face style safetensors directory (BF16
//! weights, config, tokenizer, chat template) that mistral.rs loads with its normal
//! pipeline, with or without ISQ:
//! `cargo run -p modelpool-benches --bin gguf_to_safetensors -- --gguf M.gguf --out DIR`.

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use modelpool_benches::dequant::gguf_to_safetensors;

#[derive(Parser)]
struct Args {
    /// The GGUF file to convert (llama architecture; F32, F16, BF16, Q4_0, Q4_1, Q8_0).
    #[arg(long)]
    gguf: PathBuf,
    /// The directory to write into (created if missing; must hold no other weights).
    #[arg(long)]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let s = gguf_to_safetensors(&args.gguf, &args.out)?;
    let types = s
        .source_types
        .iter()
        .map(|(t, n)| format!("{n} {t}"))
        .collect::<Vec<_>>()
        .join(", ");
    println!(
        "wrote {}: {} tensors ({types}), {} parameters, model.safetensors {} bytes ({:.1} MiB), {:.1} s",
        args.out.display(),
        s.tensors,
        s.parameters,
        s.safetensors_bytes,
        modelpool_benches::mib(s.safetensors_bytes),
        started.elapsed().as_secs_f64()
    );
    for f in &s.files {
        println!("  {}", f.display());
    }
    Ok(())
}
