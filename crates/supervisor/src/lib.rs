//! The supervisor of worker processes: each resident model lives in its own worker
//! process (`modelpool worker ...`, the `modelpool-worker` crate) that owns one model in
//! one engine and serves the private `modelpool.worker.v1` protocol on a Unix socket.
//! This crate starts workers ([`WorkerBackend`], the pool's `Backend`), talks to them,
//! and reaps them; it also holds what both sides of the protocol share: the worker's
//! command line and ready line ([`protocol`]), engine errors and their gRPC statuses,
//! request checks that need no engine ([`sampling`]), and each
//! engine's [`footprint`] prediction (the bytes a worker will hold, from the model's
//! headers and figures measured per engine), which the pool budgets by.
//!
//! It links no engine: the server and its front ends depend on it, never on the worker.
//!
//! Why processes: dropping a mistral.rs model inside a long-lived process leaks memory
//! and threads (measured: ~50 MB RSS and one thread per load/drop cycle). Ending the
//! process returns every byte to the operating system, so eviction is honest.

mod error;
pub mod footprint;
pub mod process;
pub mod protocol;
pub mod sampling;

/// Whether this build's workers can put a llama.cpp model on a GPU: the CUDA backend
/// compiled in (`cuda`), or llama.cpp linked as shared libraries (`llama-shared`), whose
/// libggml may carry one; the worker's load then says whether it does.
pub const LLAMA_GPU_BUILD: bool = cfg!(any(feature = "cuda", feature = "llama-shared"));

/// Whether this build's workers have mistral.rs' CUDA kernels (`cuda-mistralrs`).
pub const MISTRALRS_GPU_BUILD: bool = cfg!(feature = "cuda-mistralrs");

pub use error::{engine_status, invalid_argument_status, EngineError, FIELD_METADATA_KEY};
pub use modelpool_catalog::EngineKind;
pub use process::{check_loadable, engine_of, WorkerBackend, WorkerBackendConfig, WorkerProcess};
pub use protocol::WorkerArgs;

/// A protobuf duration from a std one.
pub fn duration(d: std::time::Duration) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    })
}
