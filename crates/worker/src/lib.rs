//! The worker process (`modelpool worker ...`): one model in one engine, llama.cpp or
//! mistral.rs behind the [`Engine`] trait, served on the private `modelpool.worker.v1`
//! protocol over a Unix socket. Sampling parameters become engine types here.
//!
//! This is the only crate that links an engine. It must not touch the pool's state, the
//! server or the public front ends: what it shares with the server (its command line,
//! ready line, errors and saved-prefix files) lives in `modelpool-supervisor`, and what
//! is known of engines without running one in `modelpool-catalog`.

pub mod engine;
pub mod llamacpp;
pub mod llm;
pub mod sampling;
pub mod text;
pub mod worker;

pub use engine::Engine;
pub use llm::LoadedModel;
pub use modelpool_supervisor::{EngineError, WorkerArgs};
