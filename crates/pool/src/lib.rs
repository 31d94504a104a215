//! The pool decides which models are resident and hands out leases on them.
//!
//! It knows nothing of gRPC or of the inference engine: an engine plugs in through the
//! [`Backend`] trait, the machine's memory through [`MemoryProbe`], and the server turns
//! [`PoolError`] into gRPC statuses. Keeping it free of both makes its logic testable
//! with a fake backend and no sockets.

pub mod budget;
mod error;
pub mod events;
pub mod groups;
pub mod kv_growth;
pub mod memory;
mod pool;
pub mod sharing;
pub mod turns;

pub use error::PoolError;
pub use events::{EventKind, EvictReason, PoolEvent};
pub use groups::GroupSpec;
pub use memory::{DeviceMemory, MemoryProbe, SystemProbe};
pub use modelpool_backend::{
    Backend, BackendError, Charge, Device, EngineKind, EngineOptions, Footprint, Instance,
    ModelFormat, ModelSpec, Progress, Quantized, Source, NATIVE_PRECISION, PRECISIONS,
};
pub use modelpool_store as store;
pub use modelpool_store::{Store, StoreError, StoreUsage};
pub use pool::{
    DeviceStatus, GroupStatus, Lease, ModelSnapshot, Pool, PoolConfig, PoolStatus, SlotState, Tier,
};
pub use turns::TurnPolicy;
