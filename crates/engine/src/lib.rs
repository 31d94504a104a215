//! The inference engine layer: each resident model lives in its own worker process
//! (`modelpool worker ...`) that owns one model in one engine (llama.cpp or mistral.rs,
//! behind the [`Engine`] trait) and serves the private `modelpool.worker.v1` protocol on
//! a Unix socket.
//!
//! Why processes: dropping a mistral.rs model inside a long-lived process leaks memory
//! and threads (measured: ~50 MB RSS and one thread per load/drop cycle). Ending the
//! process returns every byte to the operating system, so eviction is honest.

pub mod engine;
mod error;
pub mod footprint;
pub mod hf;
pub mod llamacpp;
pub mod llm;
pub mod process;
pub mod sampling;
pub mod saved_index;
pub mod text;
pub mod worker;

pub use engine::Engine;

/// Whether this build can put a llama.cpp model on a GPU: the CUDA backend compiled in
/// (`cuda`), or llama.cpp linked as shared libraries (`llama-shared`), whose libggml may
/// carry one; the worker's load then says whether it does.
pub const LLAMA_GPU_BUILD: bool = cfg!(any(feature = "cuda", feature = "llama-shared"));

/// Whether this build has mistral.rs' CUDA kernels (`cuda-mistralrs`).
pub const MISTRALRS_GPU_BUILD: bool = cfg!(feature = "cuda-mistralrs");
pub use error::{engine_status, invalid_argument_status, EngineError, FIELD_METADATA_KEY};
pub use llm::LoadedModel;
pub use modelpool_engines::EngineKind;
pub use process::{WorkerBackend, WorkerBackendConfig, WorkerProcess};
pub use worker::WorkerArgs;
