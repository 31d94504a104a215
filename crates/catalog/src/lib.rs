//! The engine catalogue: what modelpool knows about its engines without running one.
//! Which engines exist and what each can run ([`EngineKind`]), the default engine of a
//! format, the GGUF header reader, and each engine's footprint prediction (the bytes a
//! worker will hold, from the model's headers and figures measured per engine).
//!
//! Configuration, the pool's callers, the server, the CLI and the worker all ask here.
//! This crate links no engine (neither llama.cpp nor mistral.rs) and starts nothing: it
//! reads model headers and answers questions, so config validation, the front ends and
//! their fuzz targets build without an engine.

mod engines;
pub mod footprint;
pub mod gguf;

pub use engines::{
    check_loadable, engine_of, EngineKind, LLAMA_CPP_ARCHITECTURES, MISTRAL_RS_ARCHITECTURES,
};
