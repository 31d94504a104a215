//! Errors the pool reports to its callers; the server maps each to a gRPC status.

use crate::BackendError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum PoolError {
    #[error("model `{id}` is not registered (registered: {known})")]
    NotFound { id: String, known: String },
    #[error("loading model `{id}` failed: {source}")]
    LoadFailed { id: String, source: BackendError },
    #[error("model `{id}` has {in_flight} requests in flight; it cannot be unloaded now")]
    Busy { id: String, in_flight: u32 },
    #[error("the pool is shutting down")]
    ShuttingDown,
}
