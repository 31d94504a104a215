//! The server's one error type, and the one place where it and the errors of the
//! layers below become gRPC statuses (and, through them, HTTP statuses).

use std::net::SocketAddr;
use std::path::PathBuf;

use modelpool_pool::{BackendError, PoolError, StoreError};
use tonic::Status;

/// Everything the server refuses or fails at: requests, its configuration, reloads and
/// its own start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    // A request.
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Engine(#[from] modelpool_supervisor::EngineError),
    #[error("model `{model}`: worker stream failed: {status}")]
    Worker { model: String, status: Status },

    // The configuration.
    #[error("cannot read configuration: {0}")]
    ConfigRead(String),
    #[error("invalid configuration: `{key}`: {reason}")]
    Config { key: String, reason: String },

    // A reload.
    #[error("the server was started without a configuration file; nothing to reload")]
    NoConfigFile,
    #[error("new configuration rejected, the old one keeps serving: {0}")]
    ReloadRejected(#[source] Box<ServerError>),
    #[error("new configuration rejected, the old one keeps serving: `models`: id {id:?} is already registered through the API; unregister it first")]
    ReloadConflict { id: String },
    #[error("applying the new configuration failed for model `{id}`: {source}")]
    ReloadApply {
        id: String,
        #[source]
        source: Box<PoolError>,
    },

    // Starting.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot prepare runtime directory {path}: {source}")]
    RuntimeDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot find the modelpool executable for workers: {0}")]
    WorkerExe(#[source] std::io::Error),
    #[error("reflection service: {0}")]
    Reflection(String),
    #[error(transparent)]
    Spill(#[from] StoreError),
    #[error("tls: {0}")]
    Tls(String),
    #[error("grpc server: {0}")]
    Serve(String),
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
            ServerError::InvalidArgument { field, .. } => {
                modelpool_supervisor::invalid_argument_status(field, e.to_string())
            }
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
                // Told early: the next turn comes after the deadline.
                PoolError::TurnTooLate {
                    by_client: true, ..
                } => Status::deadline_exceeded(e.to_string()),
                PoolError::TurnTooLate { .. } => Status::resource_exhausted(e.to_string()),
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
                    // A saved prefix that cannot be used is dropped where it is read; one
                    // that shows here is the server's own fault.
                    StoreError::Dir { .. }
                    | StoreError::Io(_)
                    | StoreError::NotSavedPrefix
                    | StoreError::ForeignPrefix
                    | StoreError::PrefixTooLong { .. }
                    | StoreError::PrefixCorrupt => Status::internal(e.to_string()),
                },
            },
            // The engine's own table: one mapping for an engine error wherever it shows.
            ServerError::Engine(inner) => modelpool_supervisor::engine_status(inner),
            ServerError::NoConfigFile => Status::failed_precondition(e.to_string()),
            // The operator's file is at fault; nothing changed.
            ServerError::ReloadRejected(_)
            | ServerError::ReloadConflict { .. }
            | ServerError::ConfigRead(_)
            | ServerError::Config { .. } => Status::invalid_argument(e.to_string()),
            // Starting errors never answer a request; should one, the server is at fault.
            ServerError::ReloadApply { .. }
            | ServerError::Bind { .. }
            | ServerError::RuntimeDir { .. }
            | ServerError::WorkerExe(_)
            | ServerError::Reflection(_)
            | ServerError::Spill(_)
            | ServerError::Tls(_)
            | ServerError::Serve(_) => Status::internal(e.to_string()),
            ServerError::Worker { status, .. } => match status.code() {
                // The worker judged the request: pass its verdict (and the field it
                // names) through.
                tonic::Code::InvalidArgument
                | tonic::Code::FailedPrecondition
                | tonic::Code::ResourceExhausted
                | tonic::Code::Cancelled => {
                    Status::with_metadata(status.code(), e.to_string(), status.metadata().clone())
                }
                // Anything else means the worker or its socket broke.
                _ => Status::unavailable(e.to_string()),
            },
        }
    }
}

/// How a gRPC status reads over HTTP: the status code and the OpenAI error `type`
/// (`invalid_request_error`, ...). The codes follow Google's published mapping of gRPC
/// codes onto HTTP; every HTTP front end answers errors through this one table.
pub fn http_status(code: tonic::Code) -> (u16, &'static str) {
    use tonic::Code;
    match code {
        Code::Ok => (200, ""),
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
            (400, "invalid_request_error")
        }
        Code::Unauthenticated => (401, "authentication_error"),
        Code::PermissionDenied => (403, "permission_error"),
        Code::NotFound => (404, "not_found_error"),
        Code::AlreadyExists | Code::Aborted => (409, "conflict_error"),
        Code::ResourceExhausted => (429, "rate_limit_error"),
        // nginx's "client closed request": the client went away first.
        Code::Cancelled => (499, "cancelled_error"),
        Code::Unimplemented => (501, "not_implemented_error"),
        Code::Unavailable => (503, "service_unavailable_error"),
        Code::DeadlineExceeded => (504, "timeout_error"),
        Code::Unknown | Code::Internal | Code::DataLoss => (500, "server_error"),
    }
}

/// The field an INVALID_ARGUMENT status names in its metadata (set by
/// [`ServerError::InvalidArgument`] and the engine's own), without the `sampling.`
/// prefix of the gRPC message layout; `None` for other codes.
pub fn invalid_field(status: &Status) -> Option<&str> {
    if status.code() != tonic::Code::InvalidArgument {
        return None;
    }
    let field = status
        .metadata()
        .get(modelpool_supervisor::FIELD_METADATA_KEY)?
        .to_str()
        .ok()?;
    Some(field.strip_prefix("sampling.").unwrap_or(field))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    /// Every error the pool reports, with the gRPC code and HTTP status a client sees:
    /// the one table, read in one place.
    #[test]
    fn every_pool_error_has_one_grpc_code_and_http_status() {
        use modelpool_pool::budget::Shortfall;
        use modelpool_pool::Device;
        use std::time::Duration;
        let id = || "m".to_string();
        let shortfall = Shortfall {
            device: Device::Cpu,
            needed_bytes: 2,
            budget_bytes: 1,
            configured_budget_bytes: 1,
            pinned_bytes: 0,
            in_use_bytes: 0,
            reserved_bytes: 0,
        };
        let timeout = |by_client| PoolError::QueueTimeout {
            id: id(),
            by_client,
            waited: Duration::from_secs(1),
            reason: "r".into(),
        };
        let late = |by_client| PoolError::TurnTooLate {
            id: id(),
            by_client,
            left: Duration::from_secs(1),
            eta: Duration::from_secs(2),
            why: "w".into(),
        };
        let load = |source| PoolError::LoadFailed { id: id(), source };
        let store = |source| PoolError::Storage { id: id(), source };
        let table = [
            (
                PoolError::NotFound {
                    id: id(),
                    known: "a".into(),
                },
                Code::NotFound,
                404,
            ),
            (
                PoolError::AlreadyExists { id: id() },
                Code::AlreadyExists,
                409,
            ),
            (
                load(BackendError::InvalidModel("x".into())),
                Code::FailedPrecondition,
                400,
            ),
            (
                load(BackendError::Timeout("x".into())),
                Code::DeadlineExceeded,
                504,
            ),
            (
                load(BackendError::Failed("x".into())),
                Code::Unavailable,
                503,
            ),
            (
                PoolError::InsufficientMemory {
                    id: id(),
                    shortfall,
                    precisions_tried: vec![],
                },
                Code::ResourceExhausted,
                429,
            ),
            (
                PoolError::Busy {
                    id: id(),
                    in_flight: 1,
                    waiting: 0,
                    loading: false,
                },
                Code::FailedPrecondition,
                400,
            ),
            (
                PoolError::Pinned { id: id() },
                Code::FailedPrecondition,
                400,
            ),
            (
                PoolError::QueueFull {
                    id: id(),
                    waiting: 9,
                },
                Code::ResourceExhausted,
                429,
            ),
            (timeout(true), Code::DeadlineExceeded, 504),
            (timeout(false), Code::ResourceExhausted, 429),
            (late(true), Code::DeadlineExceeded, 504),
            (late(false), Code::ResourceExhausted, 429),
            (PoolError::Retiring { id: id() }, Code::Unavailable, 503),
            (
                PoolError::CrashLoop {
                    id: id(),
                    failures: 3,
                    last_error: "e".into(),
                    retry_in: Duration::from_secs(5),
                },
                Code::FailedPrecondition,
                400,
            ),
            (
                store(StoreError::NoSpace {
                    dir: "d".into(),
                    written_bytes: 1,
                    total_bytes: 2,
                }),
                Code::ResourceExhausted,
                429,
            ),
            (
                store(StoreError::TooLarge {
                    what: "w".into(),
                    size_bytes: 2,
                    budget_bytes: 1,
                }),
                Code::ResourceExhausted,
                429,
            ),
            (
                store(StoreError::Checksum {
                    url: "u".into(),
                    expected: "a".into(),
                    actual: "b".into(),
                }),
                Code::DataLoss,
                500,
            ),
            (
                store(StoreError::Fetch {
                    url: "u".into(),
                    reason: "r".into(),
                }),
                Code::Unavailable,
                503,
            ),
            (store(StoreError::Io("e".into())), Code::Internal, 500),
            (store(StoreError::PrefixCorrupt), Code::Internal, 500),
            (
                PoolError::SwappingOut {
                    id: id(),
                    incoming: "n".into(),
                },
                Code::Unavailable,
                503,
            ),
            (
                PoolError::GroupFull {
                    id: id(),
                    reason: "r".into(),
                },
                Code::FailedPrecondition,
                400,
            ),
            (PoolError::ShuttingDown, Code::Unavailable, 503),
        ];
        for (error, code, http) in table {
            let said = error.to_string();
            let status = Status::from(ServerError::from(error));
            assert_eq!(status.code(), code, "{said}");
            assert_eq!(status.message(), said, "the message is the error's own");
            assert_eq!(http_status(code).0, http, "{said}");
        }
    }

    /// The server's own errors beyond the pool's: configuration, reload and start.
    #[test]
    fn every_server_error_has_one_grpc_code_and_http_status() {
        let io = || std::io::Error::other("e");
        let config = || ServerError::Config {
            key: "pool.ram_budget".into(),
            reason: "r".into(),
        };
        let table = [
            (ServerError::invalid("f", "r"), Code::InvalidArgument, 400),
            (config(), Code::InvalidArgument, 400),
            (
                ServerError::ConfigRead("r".into()),
                Code::InvalidArgument,
                400,
            ),
            (ServerError::NoConfigFile, Code::FailedPrecondition, 400),
            (
                ServerError::ReloadRejected(Box::new(config())),
                Code::InvalidArgument,
                400,
            ),
            (
                ServerError::ReloadConflict { id: "m".into() },
                Code::InvalidArgument,
                400,
            ),
            (
                ServerError::ReloadApply {
                    id: "m".into(),
                    source: Box::new(PoolError::ShuttingDown),
                },
                Code::Internal,
                500,
            ),
            (
                ServerError::Bind {
                    addr: "127.0.0.1:1".parse().unwrap(),
                    source: io(),
                },
                Code::Internal,
                500,
            ),
            (
                ServerError::RuntimeDir {
                    path: "/r".into(),
                    source: io(),
                },
                Code::Internal,
                500,
            ),
            (ServerError::WorkerExe(io()), Code::Internal, 500),
            (ServerError::Reflection("r".into()), Code::Internal, 500),
            (
                ServerError::Spill(StoreError::Io("e".into())),
                Code::Internal,
                500,
            ),
            (ServerError::Tls("r".into()), Code::Internal, 500),
            (ServerError::Serve("r".into()), Code::Internal, 500),
        ];
        for (error, code, http) in table {
            let said = error.to_string();
            let status = Status::from(error);
            assert_eq!(status.code(), code, "{said}");
            assert_eq!(status.message(), said, "the message is the error's own");
            assert_eq!(http_status(code).0, http, "{said}");
        }
        // A rejected reload says why, with the key, and keeps the cause as its source.
        let rejected = ServerError::ReloadRejected(Box::new(config()));
        assert!(
            rejected.to_string().contains("`pool.ram_budget`"),
            "{rejected}"
        );
        let source = std::error::Error::source(&rejected).map(ToString::to_string);
        assert_eq!(source, Some(config().to_string()));
    }

    #[test]
    fn every_grpc_code_has_one_http_status() {
        let table = [
            (Code::Ok, 200),
            (Code::Cancelled, 499),
            (Code::Unknown, 500),
            (Code::InvalidArgument, 400),
            (Code::DeadlineExceeded, 504),
            (Code::NotFound, 404),
            (Code::AlreadyExists, 409),
            (Code::PermissionDenied, 403),
            (Code::ResourceExhausted, 429),
            (Code::FailedPrecondition, 400),
            (Code::Aborted, 409),
            (Code::OutOfRange, 400),
            (Code::Unimplemented, 501),
            (Code::Internal, 500),
            (Code::Unavailable, 503),
            (Code::DataLoss, 500),
            (Code::Unauthenticated, 401),
        ];
        for (code, http) in table {
            let (got, kind) = http_status(code);
            assert_eq!(got, http, "{code:?}");
            assert_eq!(kind.is_empty(), code == Code::Ok, "{code:?}");
        }
        // The table covers all 17 codes.
        assert_eq!(table.len(), 17);
    }

    #[test]
    fn pool_errors_reach_http_with_their_numbers() {
        let not_found = Status::from(ServerError::Pool(PoolError::NotFound {
            id: "nope".into(),
            known: "a, b".into(),
        }));
        assert_eq!(http_status(not_found.code()).0, 404);
        assert!(not_found.message().contains("a, b"), "{not_found:?}");
        let full = Status::from(ServerError::Pool(PoolError::QueueFull {
            id: "a".into(),
            waiting: 64,
        }));
        assert_eq!(http_status(full.code()).0, 429);
        assert!(full.message().contains("64"), "{full:?}");
        let retiring = Status::from(ServerError::Pool(PoolError::Retiring { id: "a".into() }));
        assert_eq!(http_status(retiring.code()).0, 503);
    }

    #[test]
    fn invalid_field_names_the_field() {
        let s = Status::from(ServerError::invalid("messages[1].role", "bad"));
        assert_eq!(invalid_field(&s), Some("messages[1].role"));
        let engine =
            modelpool_supervisor::EngineError::invalid("sampling.temperature", "must be 0..=2");
        let s = Status::from(ServerError::from(engine));
        assert_eq!(invalid_field(&s), Some("temperature"));
        // A worker's verdict keeps the field it names.
        let worker = ServerError::Worker {
            model: "m".into(),
            status: s,
        };
        assert_eq!(invalid_field(&Status::from(worker)), Some("temperature"));
        // The message is not parsed.
        let bare = Status::invalid_argument("temperature: must be 0..=2");
        assert_eq!(invalid_field(&bare), None);
        assert_eq!(
            invalid_field(&Status::invalid_argument("no field here")),
            None
        );
        assert_eq!(invalid_field(&Status::not_found("model: x")), None);
    }
}
