//! The one place where errors of the layers below become gRPC statuses.

use modelpool_pool::{BackendError, PoolError, StoreError};
use tonic::Status;

/// Errors of the server's own request handling.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Engine(#[from] modelpool_engine::EngineError),
    #[error("model `{model}`: worker stream failed: {status}")]
    Worker { model: String, status: Status },
}

impl ServerError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<ServerError> for Status {
    fn from(e: ServerError) -> Self {
        match &e {
            ServerError::InvalidArgument { .. } => Status::invalid_argument(e.to_string()),
            ServerError::Pool(p) => match p {
                PoolError::NotFound { .. } => Status::not_found(e.to_string()),
                PoolError::ShuttingDown
                | PoolError::Retiring { .. }
                | PoolError::SwappingOut { .. } => Status::unavailable(e.to_string()),
                PoolError::AlreadyExists { .. } => Status::already_exists(e.to_string()),
                PoolError::Busy { .. }
                | PoolError::Pinned { .. }
                | PoolError::CrashLoop { .. }
                | PoolError::GroupFull { .. } => Status::failed_precondition(e.to_string()),
                PoolError::InsufficientMemory { .. } | PoolError::QueueFull { .. } => {
                    Status::resource_exhausted(e.to_string())
                }
                // The client's own deadline, or the server giving up under load.
                PoolError::QueueTimeout {
                    by_client: true, ..
                } => Status::deadline_exceeded(e.to_string()),
                PoolError::QueueTimeout { .. } => Status::resource_exhausted(e.to_string()),
                PoolError::LoadFailed { source, .. } => match source {
                    BackendError::InvalidModel(_) => Status::failed_precondition(e.to_string()),
                    BackendError::Timeout(_) => Status::deadline_exceeded(e.to_string()),
                    BackendError::Failed(_) => Status::unavailable(e.to_string()),
                },
                PoolError::Storage { source, .. } => match source {
                    StoreError::NoSpace { .. } | StoreError::TooLarge { .. } => {
                        Status::resource_exhausted(e.to_string())
                    }
                    // The bytes arrived but are not the model that was asked for.
                    StoreError::Checksum { .. } => Status::data_loss(e.to_string()),
                    StoreError::Fetch { .. } => Status::unavailable(e.to_string()),
                    StoreError::Dir { .. } | StoreError::Io(_) => Status::internal(e.to_string()),
                },
            },
            ServerError::Engine(inner) => match inner {
                modelpool_engine::EngineError::InvalidArgument { .. } => {
                    Status::invalid_argument(e.to_string())
                }
                _ => Status::internal(e.to_string()),
            },
            ServerError::Worker { status, .. } => match status.code() {
                // The worker judged the request: pass its verdict through.
                tonic::Code::InvalidArgument
                | tonic::Code::FailedPrecondition
                | tonic::Code::ResourceExhausted
                | tonic::Code::Cancelled => Status::new(status.code(), e.to_string()),
                // Anything else means the worker or its socket broke.
                _ => Status::unavailable(e.to_string()),
            },
        }
    }
}
