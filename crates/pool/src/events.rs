//! What the pool did and why, as a stream: loads, evictions, budget changes. The
//! `WatchEvents` RPC forwards it; tests count loads with it.

use std::time::{Duration, SystemTime};

use crate::Device;

/// Why a resident model was stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EvictReason {
    /// Its memory was needed to load `for_model`.
    MakeRoom { for_model: String },
    /// Unused for longer than its idle TTL.
    IdleTtl { idle: Duration },
    /// An `EvictModel` (or unregister) asked for it.
    Requested,
    /// The server is stopping.
    Shutdown,
    /// The worker died on its own (killed, crashed); its memory is gone with it.
    Crashed { detail: String },
    /// Its group's slot was given to `for_model`.
    Swap { for_model: String },
    /// Drained and stopped to give `for_model`, which waited for room, its turn.
    Turn { for_model: String },
}

impl std::fmt::Display for EvictReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EvictReason::MakeRoom { for_model } => write!(f, "making room for `{for_model}`"),
            EvictReason::IdleTtl { idle } => write!(f, "idle for {}s", idle.as_secs()),
            EvictReason::Requested => f.write_str("requested"),
            EvictReason::Shutdown => f.write_str("shutdown"),
            EvictReason::Crashed { detail } => write!(f, "worker crashed: {detail}"),
            EvictReason::Swap { for_model } => write!(f, "swapped out for `{for_model}`"),
            EvictReason::Turn { for_model } => write!(f, "drained for `{for_model}`'s turn"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    Registered,
    Unregistered,
    LoadStarted {
        predicted_bytes: u64,
        /// The weight precision chosen, for a model quantized at load.
        precision: Option<String>,
        /// How long the model's last successful load took, as a forecast.
        expected: Option<Duration>,
        /// The KV budget (tokens) this load asks for, when the model has one, and the
        /// configured budget it grew from when it grew (see [`crate::kv_growth`]).
        kv_budget_tokens: Option<u32>,
        kv_grown_from: Option<u32>,
    },
    /// A stage of a load in progress, as the backend reports it.
    LoadProgress {
        stage: String,
        elapsed: Duration,
        expected: Option<Duration>,
    },
    LoadFinished {
        duration: Duration,
        predicted_bytes: u64,
        measured_bytes: u64,
    },
    LoadFailed {
        duration: Duration,
        error: String,
    },
    Evicted {
        reason: EvictReason,
        freed_bytes: u64,
    },
    Pinned,
    Unpinned,
    /// A URL source was downloaded into the spill directory.
    Fetched {
        bytes: u64,
        duration: Duration,
    },
    /// The model's file now has a ready-to-load copy in the spill directory
    /// (`how`: linked, copied or downloaded).
    Spilled {
        bytes: u64,
        duration: Duration,
        how: &'static str,
    },
    /// A swap into this model began in `group`; `outgoing` leave (or are leaving).
    SwapStarted {
        group: String,
        outgoing: Vec<String>,
    },
    /// The swap into this model finished: it is ready, `duration` after the swap began.
    SwapFinished {
        group: String,
        duration: Duration,
        bytes: u64,
    },
    /// This model, whose requests waited `waited` for room, got its turn: `outgoing`
    /// drain and are evicted for it.
    TurnStarted {
        outgoing: Vec<String>,
        waited: Duration,
    },
    /// Its turn ended with the model ready, `duration` after the turn began.
    TurnFinished {
        duration: Duration,
        waited: Duration,
    },
    /// Spilling failed; the model keeps loading from its source.
    SpillFailed {
        error: String,
    },
    BudgetChanged {
        device: Device,
        budget_bytes: u64,
    },
}

/// One event. `model` is empty for pool-wide events (budget changes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolEvent {
    pub at: SystemTime,
    pub model: String,
    pub kind: EventKind,
}

impl PoolEvent {
    pub fn new(model: impl Into<String>, kind: EventKind) -> Self {
        Self {
            at: SystemTime::now(),
            model: model.into(),
            kind,
        }
    }
}
