//! Errors the pool reports to its callers; the server maps each to a gRPC status.

use crate::BackendError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum PoolError {
    #[error("model `{id}` is not registered (registered: {known})")]
    NotFound { id: String, known: String },
    #[error("loading model `{id}` failed: {source}")]
    LoadFailed { id: String, source: BackendError },
    #[error("the pool is shutting down")]
    ShuttingDown,
}
