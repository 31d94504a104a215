//! The figures of one streamed generation, from the arrival times of its pieces: time to
//! first token and decode speed, measured the same way on every path a benchmark
//! compares.

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What a decode-speed comparison is run with.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// GGUF model.
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub model: PathBuf,
    /// Measured rounds per path.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Tokens generated per run.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: u32,
}

/// One generation's figures.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    pub ttft: Duration,
    pub decode_tok_s: f64,
    pub tokens: u32,
}

/// Figures of a stream started at `start` whose pieces arrived at `stamps`, `tokens`
/// generated in all; `None` when nothing arrived.
pub fn figures(start: Instant, stamps: &[Instant], tokens: u32) -> Option<Run> {
    let (first, last) = (*stamps.first()?, *stamps.last()?);
    let decode = last.duration_since(first).as_secs_f64();
    Some(Run {
        ttft: first - start,
        decode_tok_s: if decode > 0.0 {
            f64::from(tokens.saturating_sub(1)) / decode
        } else {
            0.0
        },
        tokens,
    })
}
