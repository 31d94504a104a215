//! Repeats of a cached prompt. A slot remembers the logits its last prompt's final
//! token produced; a new sequence whose prompt is exactly those cached tokens samples
//! its first token from them instead of decoding the final token again. Decoding it
//! again would run it in a batch of another shape than the prefill did, and llama.cpp's
//! CPU kernels are not bit-identical across batch shapes: a repeated request with the
//! same seed would not repeat its answer.

use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::LlamaToken;

/// The logits after a slot's prompt of `len` tokens.
pub(super) struct EndLogits {
    pub len: usize,
    pub logits: Vec<f32>,
}

/// Samples from `logits` exactly as `LlamaSampler::sample` samples from a context's:
/// every token with its logit, unsorted, the sampler applied, its choice accepted.
pub(super) fn sample_from(sampler: &mut LlamaSampler, logits: &[f32]) -> LlamaToken {
    let data = logits
        .iter()
        .enumerate()
        .map(|(id, &logit)| LlamaTokenData::new(LlamaToken(id as i32), logit, 0.0));
    let mut candidates = LlamaTokenDataArray::from_iter(data, false);
    candidates.apply_sampler(sampler);
    let token = candidates
        .selected_token()
        .expect("a sampler chain ends with a selecting sampler");
    sampler.accept(token);
    token
}
