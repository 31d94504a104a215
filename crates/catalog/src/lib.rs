//! The engine catalogue: what modelpool knows about its engines without running one.
//! Which engines exist and what each can run ([`EngineKind`]), the engine a model runs
//! in when its configuration names none ([`EngineKind::resolve`]), model formats and
//! the precisions and quantized-weight files of loads quantized at load ([`formats`]),
//! and the GGUF header reader ([`gguf`]).
//!
//! Configuration, the pool, the server, the supervisor and the worker all ask here. It
//! is the bottom of the workspace: it links no engine, depends on no other modelpool
//! crate, holds no state and starts nothing.

mod engines;
pub mod formats;
pub mod gguf;
pub mod units;

pub use engines::{
    EngineKind, EngineOptions, LlamaCppOptions, LLAMA_CPP_ARCHITECTURES, MISTRAL_RS_ARCHITECTURES,
};
pub use formats::{
    quantized_weights_shards, ModelFormat, NATIVE_PRECISION, PRECISIONS, QUANTIZED_WEIGHTS_EXT,
};
