//! Fuzz target: arbitrary bytes into the GGUF header parser, which reads model files
//! before any load to predict their footprint. A hostile or truncated file must give an
//! error: no panic, no overflow, no allocation beyond the parser's bounds.
//!
//! Seeds (fuzz/seeds/gguf_header): the SmolLM2 header with its metadata arrays cut to
//! four elements (full tensor table, parses), the first 16 KiB of that file as shipped
//! (truncated inside the vocabulary), and a tiny header with one value of every type.

#![no_main]

use libfuzzer_sys::fuzz_target;
use modelpool_catalog::gguf;

fuzz_target!(|data: &[u8]| {
    // Keeping arrays (the safetensors converter's mode) must be as safe as skipping them.
    if let Ok(kept) = gguf::parse_with(data, gguf::Arrays::Keep) {
        let _ = kept.strings("tokenizer.ggml.tokens");
    }
    let Ok(info) = gguf::parse(data) else {
        return;
    };
    // What parsed is as hostile as the input: the footprint prediction reads the KV
    // shape from it and sizes a cache, so those must not panic either.
    let _ = info.arch_u64("context_length");
    if let Ok(shape) = info.kv_shape() {
        let _ = shape.kv_bytes(4096, 2);
    }
});
