//! The pool decides which models are resident and hands out leases on them.
//!
//! It knows nothing of gRPC or of the inference engine: an engine plugs in through the
//! [`Backend`] trait, and the server turns [`PoolError`] into gRPC statuses. Keeping it
//! free of both makes its logic testable with a fake backend and no sockets.

pub mod budget;
mod error;
pub mod gguf;
mod pool;
mod spec;

pub use error::PoolError;
pub use pool::{Lease, ModelSnapshot, Pool, SlotState};
pub use spec::{Backend, BackendError, Instance, ModelFormat, ModelSpec};
