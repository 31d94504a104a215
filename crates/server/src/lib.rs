//! The modelpool server: configuration, the tonic services of the public API, and the
//! start-up and shutdown sequence. The `modelpool` binary (`modelpool-cli`) is a thin
//! command-line shell over this, and the integration tests start the same server
//! in-process. It links no engine: workers are other processes, started through
//! `modelpool-supervisor`, and engine facts come from `modelpool-catalog`.

pub mod app;
pub mod auth;
pub mod config;
pub mod control;
pub mod error;
pub mod inference;
pub mod kserve;
pub mod metrics;
pub mod modelmesh;
pub mod openai;
pub mod reload;

/// Whether this build can put a model on a GPU at all (llama.cpp's CUDA backend, compiled
/// in or found in a shared libggml; mistral.rs' CUDA kernels).
pub const CUDA_BUILD: bool =
    modelpool_supervisor::LLAMA_GPU_BUILD || modelpool_supervisor::MISTRALRS_GPU_BUILD;

pub use app::{start, RunningServer};
pub use config::{Settings, EXIT_CONFIG};
pub use error::ServerError;
