//! What the pool knows about a model, and the contract an inference engine fulfils to
//! make one resident.

use std::future::Future;
use std::path::PathBuf;

/// File format of a model's weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFormat {
    Gguf,
}

impl ModelFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelFormat::Gguf => "gguf",
        }
    }
}

/// A registered model: everything needed to load it.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    /// The id clients name in requests.
    pub id: String,
    /// Path of the weights file.
    pub source: PathBuf,
    pub format: ModelFormat,
    /// Tokens of context to allocate for.
    pub context_length: u32,
    /// Sequences the engine may batch at once.
    pub max_sequences: u32,
}

/// Why a backend could not make a model resident.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// The model's files are unusable (missing, not a model, unsupported); retrying
    /// will not help.
    #[error("{0}")]
    InvalidModel(String),
    /// The load did not finish in time.
    #[error("{0}")]
    Timeout(String),
    /// The worker failed for another reason (crashed, could not start).
    #[error("{0}")]
    Failed(String),
}

/// A resident model: one live worker.
pub trait Instance: Send + Sync + 'static {
    /// Operating-system process id of the worker, if it is a process.
    fn pid(&self) -> Option<u32>;
    /// Bytes of memory the worker holds right now.
    fn resident_bytes(&self) -> u64;
    /// Stops the worker and returns once its memory is released.
    fn shutdown(&self) -> impl Future<Output = ()> + Send;
}

/// Makes models resident. The server implements it with worker processes; tests with
/// fakes.
pub trait Backend: Send + Sync + 'static {
    type Instance: Instance;
    fn load(
        &self,
        spec: &ModelSpec,
    ) -> impl Future<Output = Result<Self::Instance, BackendError>> + Send;
}
