//! Writes a synthetic llama GGUF (random weights, real shapes, SmolLM2's tokenizer) for
//! benchmarks: `cargo run -p modelpool-benches --bin synth_gguf -- --shape 1b --out m.gguf`.
//! Its text output is meaningless; it exists to be loaded, measured and swapped.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use modelpool_benches::synth::{write_llama, Quant, Shape};

#[derive(Clone, Copy, ValueEnum)]
enum ShapeArg {
    /// Llama/Mistral 7B (hidden 4096, 32 layers, 32 heads, 8 KV heads, FFN 14336).
    #[value(name = "7b")]
    Llama7b,
    /// About 1B parameters (hidden 2048, 16 layers, 32 heads, 8 KV heads, FFN 8192).
    #[value(name = "1b")]
    Llama1b,
    /// SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads, 3 KV heads, FFN 1536).
    #[value(name = "135m")]
    Smol135m,
}

#[derive(Clone, Copy, ValueEnum)]
enum QuantArg {
    Q8_0,
    Q4_0,
}

#[derive(Parser)]
struct Args {
    #[arg(long, value_enum, default_value = "1b")]
    shape: ShapeArg,
    #[arg(long, value_enum, default_value = "q4-0")]
    quant: QuantArg,
    /// Output file (written to a temporary name, fsynced, then renamed).
    #[arg(long)]
    out: PathBuf,
    /// A GGUF whose tokenizer metadata is copied.
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    tokenizer_from: PathBuf,
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let shape = match args.shape {
        ShapeArg::Llama7b => Shape::LLAMA_7B,
        ShapeArg::Llama1b => Shape::LLAMA_1B,
        ShapeArg::Smol135m => Shape::SMOL_135M,
    };
    let quant = match args.quant {
        QuantArg::Q8_0 => Quant::Q8_0,
        QuantArg::Q4_0 => Quant::Q4_0,
    };
    let started = std::time::Instant::now();
    let bytes = write_llama(&args.out, shape, quant, &args.tokenizer_from, args.seed)?;
    println!(
        "wrote {} ({:.1} MiB) in {:.1} s; random weights: its text output is meaningless",
        args.out.display(),
        bytes as f64 / (1 << 20) as f64,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
