//! Errors of the engine layer.

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A request parameter is out of range; `field` is its name in the public API.
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("loading the model failed: {0}")]
    Load(String),
    #[error("generation failed: {0}")]
    Generation(String),
    #[error("worker i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl EngineError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }
}

impl From<EngineError> for tonic::Status {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::InvalidArgument { .. } => tonic::Status::invalid_argument(e.to_string()),
            EngineError::Load(_) => tonic::Status::failed_precondition(e.to_string()),
            EngineError::Generation(_) | EngineError::Io(_) => {
                tonic::Status::internal(e.to_string())
            }
        }
    }
}
