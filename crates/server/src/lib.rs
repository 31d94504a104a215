//! The modelpool server: configuration, the tonic services of the public API, and the
//! start-up and shutdown sequence. `main.rs` is a thin command-line shell over this, and
//! the integration tests start the same server in-process.

pub mod app;
pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub mod control;
pub mod error;
pub mod inference;
pub mod kserve;
pub mod metrics;
pub mod modelmesh;
pub mod openai;
pub mod reload;

/// Whether this build has mistral.rs' CUDA kernels (the `cuda` feature).
pub const CUDA_BUILD: bool = cfg!(feature = "cuda");

pub use app::{start, RunningServer, StartError};
pub use config::{ConfigError, Settings, EXIT_CONFIG};
