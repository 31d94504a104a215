//! Request sampling parameters, engine-free: validation (with the public field names
//! in every message), the `max_tokens` default and cap, and the seeded generator both
//! the worker's samplers and the server's request ids draw from.

use modelpool_proto::v1::SamplingParams;

use crate::EngineError;

/// Tokens generated when a request sets no `max_tokens`.
pub const DEFAULT_MAX_TOKENS: u32 = 256;
const MAX_STOP_STRINGS: usize = 8;
const MAX_STOP_BYTES: usize = 256;

/// Checks every field of `p` and returns the first violation, named as in the API.
pub fn validate(p: &SamplingParams) -> Result<(), EngineError> {
    if let Some(t) = p.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(EngineError::invalid(
                "sampling.temperature",
                format!("must be between 0 and 2, got {t}"),
            ));
        }
    }
    if let Some(top_p) = p.top_p {
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(EngineError::invalid(
                "sampling.top_p",
                format!("must be in (0, 1], got {top_p}"),
            ));
        }
    }
    if p.stop.len() > MAX_STOP_STRINGS {
        return Err(EngineError::invalid(
            "sampling.stop",
            format!(
                "at most {MAX_STOP_STRINGS} stop strings, got {}",
                p.stop.len()
            ),
        ));
    }
    if let Some(s) = p
        .stop
        .iter()
        .find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
    {
        return Err(EngineError::invalid(
            "sampling.stop",
            format!(
                "each stop string must be 1..={MAX_STOP_BYTES} bytes, got {} bytes",
                s.len()
            ),
        ));
    }
    Ok(())
}

/// Tokens to generate at most: the request's `max_tokens` (0 or unset: the default),
/// never more than the context.
pub fn max_tokens(p: &SamplingParams, context_length: u32) -> u32 {
    let asked = p
        .max_tokens
        .filter(|&n| n > 0)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    asked.min(context_length.max(1))
}

/// A tiny, well-mixed deterministic generator (SplitMix64): enough for sampling, and
/// used elsewhere for request ids and synthetic weights.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        let bad = SamplingParams {
            temperature: Some(-1.0),
            ..Default::default()
        };
        let msg = validate(&bad).unwrap_err().to_string();
        assert!(msg.starts_with("sampling.temperature:"), "{msg}");
        let bad = SamplingParams {
            top_p: Some(1.5),
            ..Default::default()
        };
        assert!(validate(&bad)
            .unwrap_err()
            .to_string()
            .starts_with("sampling.top_p:"));
        assert!(validate(&SamplingParams::default()).is_ok());
    }

    #[test]
    fn max_tokens_defaults_and_caps() {
        let p = SamplingParams::default();
        assert_eq!(max_tokens(&p, 8192), DEFAULT_MAX_TOKENS);
        let p = SamplingParams {
            max_tokens: Some(10_000),
            ..Default::default()
        };
        assert_eq!(max_tokens(&p, 2048), 2048);
    }
}
