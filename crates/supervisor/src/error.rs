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

/// The metadata key of an INVALID_ARGUMENT status that names the request field at
/// fault, so front ends read the field instead of parsing the message.
pub const FIELD_METADATA_KEY: &str = "modelpool-field";

/// INVALID_ARGUMENT with `message`, naming `field` in its metadata.
pub fn invalid_argument_status(field: &str, message: String) -> tonic::Status {
    let mut status = tonic::Status::invalid_argument(message);
    if let Ok(value) = field.parse() {
        status.metadata_mut().insert(FIELD_METADATA_KEY, value);
    }
    status
}

/// The gRPC status of an engine error, wherever it shows (worker, server).
pub fn engine_status(e: &EngineError) -> tonic::Status {
    match e {
        EngineError::InvalidArgument { field, .. } => invalid_argument_status(field, e.to_string()),
        EngineError::Load(_) => tonic::Status::failed_precondition(e.to_string()),
        EngineError::Generation(_) | EngineError::Io(_) => tonic::Status::internal(e.to_string()),
    }
}

impl From<EngineError> for tonic::Status {
    fn from(e: EngineError) -> Self {
        engine_status(&e)
    }
}
