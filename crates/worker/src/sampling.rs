//! Sampling in the engines: a per-request logits processor for mistral.rs that counts
//! tokens and, when a seed is given, samples with its own seeded generator so results
//! repeat, and the stop-string matcher both engines stream through. Validation and
//! defaults are engine-free and live in `modelpool_supervisor::sampling`.
//!
//! mistral.rs samples with one engine-wide generator, so a per-request `seed` cannot be
//! passed through. Instead the processor draws the token itself and masks every other
//! logit to -inf; mistral.rs then runs greedy and picks exactly that token.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use mistralrs::{CustomLogitsProcessor, Tensor};
use modelpool_proto::v1::SamplingParams;
pub use modelpool_supervisor::sampling::{max_tokens, validate, SplitMix64, DEFAULT_MAX_TOKENS};

/// Maps validated parameters to mistral.rs'. With a seed and a temperature above zero the
/// returned processor samples; mistral.rs is then told to decode greedily.
pub fn to_mistral(
    p: &SamplingParams,
    context_length: u32,
    tokens_total: Arc<AtomicU64>,
) -> (mistralrs::SamplingParams, Arc<TokenCounter>) {
    let mut out = mistralrs::SamplingParams::neutral();
    out.max_len = Some(max_tokens(p, context_length) as usize);
    // Stop strings are matched on the text stream by `StopMatcher`, not by mistral.rs,
    // which would stream the matching text before noticing it.
    // mistral.rs reads an unset temperature as 1.0; greedy decoding is top_k = 1. The
    // seeded sampler leaves one finite logit, which top_k = 1 then picks.
    out.top_k = Some(1);
    let temperature = p.temperature.unwrap_or(0.0);
    let sampler = match (temperature > 0.0, p.seed) {
        (true, Some(seed)) => Some(Mutex::new(SeededSampler {
            rng: SplitMix64(seed),
            temperature,
            top_p: p.top_p.unwrap_or(1.0),
            top_k: p.top_k.unwrap_or(0) as usize,
        })),
        (true, None) => {
            out.temperature = Some(f64::from(temperature));
            out.top_p = p.top_p.map(f64::from);
            out.top_k = p.top_k.filter(|&k| k > 0).map(|k| k as usize);
            None
        }
        (false, _) => None,
    };
    let counter = Arc::new(TokenCounter {
        prompt_tokens: AtomicU32::new(0),
        completion_tokens: AtomicU32::new(0),
        tokens_total,
        sampler,
    });
    (out, counter)
}

/// Runs once per generated token: counts it, and samples when seeded.
pub struct TokenCounter {
    prompt_tokens: AtomicU32,
    completion_tokens: AtomicU32,
    tokens_total: Arc<AtomicU64>,
    sampler: Option<Mutex<SeededSampler>>,
}

impl TokenCounter {
    pub fn prompt_tokens(&self) -> u32 {
        self.prompt_tokens.load(Ordering::Relaxed)
    }
    pub fn completion_tokens(&self) -> u32 {
        self.completion_tokens.load(Ordering::Relaxed)
    }
}

impl CustomLogitsProcessor for TokenCounter {
    fn apply(&self, logits: &Tensor, context: &[u32]) -> mistralrs::Result<Tensor> {
        // The context holds the prompt plus everything generated so far.
        let generated = self.completion_tokens.fetch_add(1, Ordering::Relaxed);
        if generated == 0 {
            self.prompt_tokens
                .store(context.len() as u32, Ordering::Relaxed);
        }
        self.tokens_total.fetch_add(1, Ordering::Relaxed);
        let Some(sampler) = &self.sampler else {
            return Ok(logits.clone());
        };
        let values = logits.flatten_all()?.to_vec1::<f32>()?;
        let pick = sampler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sample(&values);
        let mut masked = vec![f32::NEG_INFINITY; values.len()];
        masked[pick] = 0.0;
        Tensor::from_vec(masked, logits.shape(), logits.device())?.to_dtype(logits.dtype())
    }
}

struct SeededSampler {
    rng: SplitMix64,
    temperature: f32,
    top_p: f32,
    top_k: usize,
}

impl SeededSampler {
    /// Temperature, then top-k, then top-p, then one draw.
    fn sample(&mut self, logits: &[f32]) -> usize {
        let mut idx: Vec<usize> = (0..logits.len())
            .filter(|&i| logits[i].is_finite())
            .collect();
        if idx.is_empty() {
            return 0;
        }
        idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if self.top_k > 0 {
            idx.truncate(self.top_k);
        }
        let max = logits[idx[0]];
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| f64::from((logits[i] - max) / self.temperature).exp())
            .collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        let mut kept = 0;
        let mut cumulative = 0.0;
        for p in &probs {
            kept += 1;
            cumulative += p;
            if cumulative >= f64::from(self.top_p) {
                break;
            }
        }
        let draw = self.rng.next_f64() * probs[..kept].iter().sum::<f64>();
        let mut acc = 0.0;
        for (k, p) in probs[..kept].iter().enumerate() {
            acc += p;
            if draw < acc {
                return idx[k];
            }
        }
        idx[kept - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_sampler_repeats_and_respects_top_k() {
        let logits: Vec<f32> = (0..100).map(|i| (i % 7) as f32).collect();
        let draw = |seed| {
            let mut s = SeededSampler {
                rng: SplitMix64(seed),
                temperature: 1.0,
                top_p: 1.0,
                top_k: 3,
            };
            (0..20).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        // top_k = 3 keeps only the three largest logits (value 6: indices 6, 13, 20).
        assert!(draw(7).iter().all(|i| logits[*i] == 6.0));
    }
}

/// Finds stop strings in streamed text. Text that could still become a stop string is
/// held back until it either completes one (then it is dropped and generation ends) or
/// cannot anymore (then it is released).
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            held: String::new(),
        }
    }

    /// Feeds a piece of text; returns the text safe to emit and whether a stop string
    /// was reached (everything from it on is discarded).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (text.to_owned(), false);
        }
        self.held.push_str(text);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = self.held[..at].to_owned();
            self.held.clear();
            return (out, true);
        }
        // Hold back the longest tail that is a prefix of some stop string.
        let keep = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let out = self.held[..keep].to_owned();
        self.held.drain(..keep);
        (out, false)
    }

    /// Releases what is held when generation ends without a stop string.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod stop_tests {
    use super::StopMatcher;

    #[test]
    fn holds_back_partial_matches_and_cuts_at_the_stop() {
        let mut m = StopMatcher::new(vec!["Paris".into(), "\n\n".into()]);
        assert_eq!(
            m.push("The capital is Pa"),
            ("The capital is ".into(), false)
        );
        assert_eq!(m.push("ris."), (String::new(), true));
        let mut m = StopMatcher::new(vec!["Paris".into()]);
        assert_eq!(m.push("Pa"), (String::new(), false));
        assert_eq!(m.push("ndas"), ("Pandas".into(), false));
        assert_eq!(m.push(" P"), (" ".into(), false));
        assert_eq!(m.finish(), "P");
        let mut none = StopMatcher::new(vec![]);
        assert_eq!(none.push("x"), ("x".into(), false));
    }
}
