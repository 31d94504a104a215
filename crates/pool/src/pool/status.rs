//! Point-in-time views of the pool for status RPCs: what is resident, what it costs,
//! and how much room each device has left. Figures that need `/proc` or NVML are read
//! outside the pool's lock.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::state::{effective_charge, Lifecycle};
use super::tiers::{self, Resolved, Tier};
use super::{Inner, Pool, State};
use crate::{Backend, Device, Footprint, Instance, ModelSpec, PoolError};

/// Where a model is in its life cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    Registered,
    Loading,
    Ready,
    Unloading,
    Failed,
}

/// One model, as status RPCs show it.
#[derive(Clone, Debug)]
pub struct ModelSnapshot {
    pub spec: ModelSpec,
    pub state: SlotState,
    pub worker_pid: Option<u32>,
    /// Bytes the worker holds now (RSS), and at its peak.
    pub resident_bytes: u64,
    pub peak_bytes: u64,
    /// Bytes measured on its device right after its last load.
    pub load_measured_bytes: u64,
    /// Bytes charged against budgets now (all devices).
    pub charged_bytes: u64,
    /// The prediction made before loading, once made.
    pub predicted: Option<Footprint>,
    pub in_flight: u32,
    /// Requests waiting for a slot or for the load.
    pub waiting: u32,
    pub last_error: Option<String>,
    pub last_used: SystemTime,
    pub idle_for: Duration,
    pub loaded_at: Option<SystemTime>,
    /// Loads started for this model since it was registered.
    pub loads_started: u64,
    /// Where it is now: resident, warm (page cache), spilled or only at its source.
    pub tier: Tier,
    /// The file its next load reads (the spilled copy when there is one); `None` for
    /// a URL source not downloaded yet.
    pub file: Option<std::path::PathBuf>,
    /// Bytes of that file in the page cache, and its length.
    pub page_cache_bytes: u64,
    pub file_bytes: u64,
    /// Bytes of its copy in the spill directory (zero when it has none).
    pub spilled_bytes: u64,
    /// The weight precision of its current or last load, for a model quantized at
    /// load (the first of its precisions that fitted).
    pub precision: Option<String>,
    /// The KV budget (tokens) of its current or last load, when it has one, and the
    /// configured budget it grew from when the pool gave it more.
    pub kv_budget_tokens: Option<u32>,
    pub kv_grown_from: Option<u32>,
    /// Why its requests wait, when they do: "waiting for room", "waiting for its
    /// turn: ...", "waiting for room: its turn has begun ...", or, for a model giving
    /// its turn, "draining for model `x`".
    pub waiting_reason: Option<String>,
    /// How long its requests have waited for room (zero when they do not).
    pub waiting_for: Duration,
}

impl ModelSnapshot {
    /// Signed error of the footprint predicted for right after the load (weights,
    /// overhead, and the KV cache where the engine allocates it at load) against the
    /// bytes measured then, in percent.
    pub fn prediction_error_pct(&self) -> Option<f64> {
        let fp = self.predicted.as_ref()?;
        (self.load_measured_bytes > 0)
            .then(|| super::state::error_pct(fp.at_load_bytes(), self.load_measured_bytes))
    }
}

/// One device's budget as the pool sees it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceStatus {
    pub device: Device,
    pub name: String,
    /// As the machine reports it (zero when the device was not found).
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub budget_bytes: u64,
    /// Charged by resident models.
    pub used_bytes: u64,
    /// Held by loads in progress and workers still exiting.
    pub reserved_bytes: u64,
    /// Room for a new model now: the budget left, capped by what the machine has.
    pub free_bytes: u64,
}

/// The whole pool.
#[derive(Clone, Debug)]
pub struct PoolStatus {
    pub devices: Vec<DeviceStatus>,
    pub models: Vec<ModelSnapshot>,
    /// Why there is no GPU tier, when there is none.
    pub gpu_absent_reason: Option<String>,
    pub groups: Vec<super::GroupStatus>,
    /// Turns given to models that waited for room: since start, and in the last
    /// minute.
    pub turns_total: u64,
    pub turns_last_minute: u64,
}

type Row<I> = (ModelSnapshot, Option<Arc<I>>, Option<Resolved>);

fn waiting_reason<I>(e: &super::state::Entry<I>) -> Option<String> {
    if let Some(incoming) = e.life.draining_for() {
        return Some(format!("draining for model `{incoming}`"));
    }
    if e.interest == 0 || !e.life.is_cold() {
        return None;
    }
    e.waiting_why.clone()
}

fn snapshot_row<I: Instance>(st: &State<I>, id: &str) -> Option<Row<I>> {
    let e = st.models.get(id)?;
    // A shared file's pages show on one of the models mapping it (see `sharing`).
    let file_bytes = st.file_bytes_shown_on(id);
    let (state, charge, instance, loaded_at) = match &e.life {
        Lifecycle::Failed { .. } => (SlotState::Failed, None, None, None),
        Lifecycle::Registered => (SlotState::Registered, None, None, None),
        Lifecycle::Loading(l) => (SlotState::Loading, Some(l.charge.clone()), None, None),
        // A draining model still serves; status says what it drains for.
        Lifecycle::Ready(w) | Lifecycle::Draining { worker: w, .. } => (
            SlotState::Ready,
            Some(effective_charge(
                &w.charge,
                w.instance.as_ref(),
                e.spec.device,
                &w.mapped,
            )),
            Some(Arc::clone(&w.instance)),
            Some(w.loaded_at),
        ),
        Lifecycle::Unloading { charge, .. } => {
            (SlotState::Unloading, Some(charge.clone()), None, None)
        }
    };
    let snap = ModelSnapshot {
        spec: e.spec.clone(),
        state,
        worker_pid: None,
        resident_bytes: 0,
        peak_bytes: 0,
        load_measured_bytes: if instance.is_some() {
            e.base_measured_bytes
        } else {
            0
        },
        charged_bytes: charge.map_or(0, |c| c.total() + file_bytes),
        predicted: e.prediction.clone(),
        in_flight: e.in_flight,
        waiting: e.interest,
        last_error: e.life.last_error().map(str::to_owned),
        last_used: e.last_used_at,
        idle_for: e.last_used.elapsed(),
        loaded_at,
        loads_started: e.loads_started,
        tier: Tier::Source,
        file: None,
        page_cache_bytes: 0,
        file_bytes: 0,
        spilled_bytes: 0,
        precision: e.precision.clone(),
        kv_budget_tokens: e
            .kv_budget_tokens
            .or(e.spec.engine.llama_cpp.kv_budget_tokens),
        kv_grown_from: e.kv_grown_from,
        waiting_reason: waiting_reason(e),
        waiting_for: e
            .wanting_room_since
            .filter(|_| e.interest > 0)
            .map_or(Duration::ZERO, |t| t.elapsed()),
    };
    Some((snap, instance, e.resolved.clone()))
}

/// Fills in what needs `/proc`, `mincore` or the spill index, outside the lock.
fn finish_row<B: Backend>(
    inner: &Inner<B>,
    (mut snap, instance, resolved): Row<B::Instance>,
) -> ModelSnapshot {
    if let Some(inst) = instance {
        snap.worker_pid = inst.pid();
        snap.resident_bytes = inst.resident_bytes();
        snap.peak_bytes = inst.peak_bytes();
    }
    let view = tiers::view(inner, &snap.spec, resolved.as_ref());
    if let Some(file) = &view.file {
        (snap.page_cache_bytes, snap.file_bytes) = tiers::cache_residency(file);
    }
    snap.spilled_bytes = view.spilled_bytes;
    snap.file = view.file;
    let resident = matches!(
        snap.state,
        SlotState::Ready | SlotState::Loading | SlotState::Unloading
    );
    // "Warm": at least 90% of the file is in the page cache.
    let warm = snap.file_bytes > 0 && snap.page_cache_bytes * 10 >= snap.file_bytes * 9;
    snap.tier = if resident {
        Tier::Resident
    } else if warm {
        Tier::Warm
    } else if snap.spilled_bytes > 0 {
        Tier::Spilled
    } else {
        Tier::Source
    };
    snap
}

impl<B: Backend> Pool<B> {
    /// Every registered model, sorted by id.
    pub fn snapshot(&self) -> Vec<ModelSnapshot> {
        let rows: Vec<_> = {
            let st = self.inner.lock();
            st.models
                .keys()
                .filter_map(|id| snapshot_row(&st, id))
                .collect()
        };
        rows.into_iter()
            .map(|row| finish_row(&self.inner, row))
            .collect()
    }

    /// One model by id.
    pub fn get(&self, id: &str) -> Result<ModelSnapshot, PoolError> {
        let row = {
            let st = self.inner.lock();
            snapshot_row(&st, id).ok_or_else(|| PoolError::NotFound {
                id: id.to_owned(),
                known: st.known_ids(),
            })?
        };
        Ok(finish_row(&self.inner, row))
    }

    /// The worker of `id` when it is ready, to ask it about itself. Holding it takes no
    /// lease: the model may be evicted meanwhile, and the worker then answers with an
    /// error.
    pub fn ready_instance(&self, id: &str) -> Option<Arc<B::Instance>> {
        let st = self.inner.lock();
        st.models
            .get(id)?
            .life
            .worker()
            .map(|w| Arc::clone(&w.instance))
    }

    /// Whether `id` is registered (reads only the table).
    pub fn is_registered(&self, id: &str) -> bool {
        self.inner.lock().models.contains_key(id)
    }

    /// Whether any request holds or waits for a model: what a drain waits for. Reads only
    /// the table, unlike [`snapshot`](Self::snapshot), which also reads `/proc`, the
    /// page cache and the spill index.
    pub fn has_requests(&self) -> bool {
        let st = self.inner.lock();
        st.models
            .values()
            .any(|e| e.in_flight > 0 || e.interest > 0)
    }

    /// Returns once no request holds or waits for a model (see
    /// [`has_requests`](Self::has_requests)), woken by the leases and waiters that go.
    pub async fn requests_done(&self) {
        let mut changes = self.inner.room.subscribe();
        while self.has_requests() {
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    /// Budgets, usage and free room per device, and every model.
    pub fn status(&self) -> PoolStatus {
        let machine = self.inner.probe.devices();
        let devices = {
            let st = self.inner.lock();
            let residents = st.residents();
            let rooms = st.rooms(&residents, &machine, self.inner.config.headroom_bytes, "");
            // Shared files' pages: used when a ready model shows them, else reserved.
            let ready_files: u64 = residents
                .iter()
                .map(|r| st.file_bytes_shown_on(&r.id))
                .sum();
            let all_files = crate::sharing::mapped_bytes(
                residents
                    .iter()
                    .filter_map(|r| r.mapped.as_ref())
                    .chain(&st.held_files("")),
            );
            let files_on =
                |device: Device, bytes: u64| if device == Device::Cpu { bytes } else { 0 };
            st.budgets
                .iter()
                .map(|(&device, &budget_bytes)| {
                    let mem = machine.iter().find(|m| m.device == device);
                    let room = rooms.get(&device).copied().unwrap_or_default();
                    let used_bytes: u64 =
                        residents.iter().map(|r| r.charge.get(device)).sum::<u64>()
                            + files_on(device, ready_files);
                    let reserved_bytes =
                        room.reserved_bytes + files_on(device, all_files - ready_files);
                    DeviceStatus {
                        device,
                        name: mem.map_or_else(|| "not found".into(), |m| m.name.clone()),
                        total_bytes: mem.map_or(0, |m| m.total_bytes),
                        available_bytes: mem.map_or(0, |m| m.available_bytes),
                        budget_bytes,
                        used_bytes,
                        reserved_bytes,
                        free_bytes: room
                            .budget_bytes
                            .saturating_sub(used_bytes + reserved_bytes),
                    }
                })
                .collect()
        };
        let (groups, turns_total, turns_last_minute) = {
            let mut st = self.inner.lock();
            let turns = (st.turns.total, st.turns.last_minute());
            (st.group_status(), turns.0, turns.1)
        };
        PoolStatus {
            groups,
            turns_total,
            turns_last_minute,
            devices,
            models: self.snapshot(),
            gpu_absent_reason: self.inner.probe.gpu_absent_reason(),
        }
    }
}
