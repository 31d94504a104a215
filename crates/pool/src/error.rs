//! Errors the pool reports to its callers; the server maps each to a gRPC status.

use std::time::Duration;

use crate::budget::Shortfall;
use crate::BackendError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum PoolError {
    #[error("model `{id}` is not registered (registered: {known})")]
    NotFound { id: String, known: String },
    #[error("model `{id}` is already registered")]
    AlreadyExists { id: String },
    #[error("loading model `{id}` failed: {source}")]
    LoadFailed { id: String, source: BackendError },
    #[error("model `{id}` does not fit{}: {shortfall}", tried_at(precisions_tried))]
    InsufficientMemory {
        id: String,
        shortfall: Shortfall,
        /// The precisions tried, best first, when it may load at several; the numbers
        /// are for the last.
        precisions_tried: Vec<String>,
    },
    #[error("model `{id}` is busy: {in_flight} requests in flight, {waiting} waiting{}", if *.loading { ", load in progress" } else { "" })]
    Busy {
        id: String,
        in_flight: u32,
        waiting: u32,
        loading: bool,
    },
    #[error("model `{id}` is pinned; unpin it first")]
    Pinned { id: String },
    #[error("model `{id}` has {waiting} requests waiting already; try again later")]
    QueueFull { id: String, waiting: u32 },
    #[error("gave up on model `{id}` after {:.1}s ({}): {reason}", waited.as_secs_f64(), if *by_client { "the request's deadline" } else { "pool.queue_timeout" })]
    QueueTimeout {
        id: String,
        /// The client's deadline ran out (else the pool's own queue timeout).
        by_client: bool,
        waited: Duration,
        reason: String,
    },
    #[error("model `{id}` cannot be served within {} ({:.1}s left): {why}; the next turn serves it in {:.1}s at the earliest", if *by_client { "the request's deadline" } else { "pool.queue_timeout" }, left.as_secs_f64(), eta.as_secs_f64())]
    TurnTooLate {
        id: String,
        /// The client's deadline (else the pool's own queue timeout).
        by_client: bool,
        /// Time the request had left.
        left: Duration,
        /// The earliest the next turn could serve it.
        eta: Duration,
        why: String,
    },
    #[error("model `{id}` is being removed; it takes no new requests")]
    Retiring { id: String },
    #[error("model `{id}` is not loaded again yet: its worker failed {failures} times in the last minute (last: {last_error}); next try in {}s", retry_in.as_secs().max(1))]
    CrashLoop {
        id: String,
        failures: usize,
        last_error: String,
        retry_in: Duration,
    },
    #[error("model `{id}`: {source}")]
    Storage {
        id: String,
        source: crate::store::StoreError,
    },
    #[error("model `{id}` is being swapped out of its group for `{incoming}`; it takes no new requests until it is back")]
    SwappingOut { id: String, incoming: String },
    #[error("model `{id}` cannot be loaded: {reason}")]
    GroupFull { id: String, reason: String },
    #[error("the pool is shutting down")]
    ShuttingDown,
}

fn tried_at(precisions: &[String]) -> String {
    match precisions {
        [] => String::new(),
        [one] => format!(" at {one}"),
        [.., last] => format!(
            " at any of its precisions ({}; the numbers are for {last})",
            precisions.join(", ")
        ),
    }
}
