//! The pool's table of models and the bookkeeping that keeps budgets honest: what each
//! model is charged, what loads in progress reserve, and the inputs of victim choice.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use lru::LruCache;
use tokio::sync::Semaphore;
use tokio::time::Instant;

pub(super) use super::life::{Lifecycle, Loading, Worker};
use crate::budget::{choose_victims, Need, Resident, Room, Shortfall};
use crate::memory::{DeviceMemory, MemoryProbe};
use crate::sharing::{mapped_bytes, FileId, Mapped};
use crate::{Charge, Device, Footprint, Instance, ModelSpec, PoolError};

/// A turn given to a model that waited for room.
pub(super) struct Turn {
    pub started: Instant,
    /// How long its requests had waited for room when it began.
    pub waited: std::time::Duration,
    /// The models drained for it; while they stay they cover part of its reservation.
    pub victims: Vec<String>,
}

/// Source of registration epochs: one per `Entry`, never reused.
static NEXT_EPOCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

pub(super) struct Entry<I> {
    /// Which registration of its id this is. Leases, waiters and loads remember it, so
    /// after a removal and a new registration under the same id they leave the new
    /// entry alone.
    pub epoch: u64,
    pub spec: ModelSpec,
    pub life: Lifecycle<I>,
    pub loads_started: u64,
    pub last_used: Instant,
    pub last_used_at: SystemTime,
    /// Leases held.
    pub in_flight: u32,
    /// Requests waiting for a slot or a load; they protect the model from eviction.
    pub interest: u32,
    /// `max_concurrency` slots.
    pub permits: Arc<Semaphore>,
    /// The footprint of the precision last admitted (the first candidate before any
    /// load).
    pub prediction: Option<Footprint>,
    /// Footprints of every precision a load may use, best first.
    pub candidates: Vec<(Option<String>, Footprint)>,
    /// The precision of the current or last load, when the model is quantized at load.
    pub precision: Option<String>,
    /// The spill directory's key for the quantized weights of the current load.
    pub quantized_key: Option<String>,
    /// Bytes measured on the model's device right after its last load.
    pub base_measured_bytes: u64,
    /// Being removed: new requests are refused while the ones in flight finish.
    pub retiring: bool,
    /// Duration of the last successful load: the forecast for the next.
    pub last_load: Option<std::time::Duration>,
    /// When its worker recently crashed or failed to start (newest last).
    pub failures: Vec<Instant>,
    /// The file its last prediction and load used, and that file's tier.
    pub resolved: Option<super::tiers::Resolved>,
    /// That file as the kernel knows it, to find other models mapping it.
    pub file_id: Option<FileId>,
    /// When its current worker became ready (for `min_residency`).
    pub ready_since: Instant,
    /// Since its requests first found no room (cleared when its load starts).
    pub wanting_room_since: Option<Instant>,
    /// Why its requests wait, as status shows it.
    pub waiting_why: Option<String>,
    /// Its turn, from when its victims began draining until it is ready.
    pub turn: Option<Turn>,
    /// When the swap that is bringing this model in began.
    pub swap_in: Option<Instant>,
    /// Whether its current worker came in by a swap.
    pub swapped_in: bool,
    /// Why its worker was stopped under running requests, for those requests.
    pub cut_reason: Option<String>,
    /// Requests at once (waiting or running) at its busiest since its last load began:
    /// the demand its next load's KV budget grows by.
    pub demand_peak: u32,
    /// The footprint at `kv_budget_max` tokens, for a model whose KV budget may grow
    /// (predicted with the others).
    pub grown_candidate: Option<(u32, Footprint)>,
    /// The KV budget of the current or last load, and the configured one it grew
    /// from when it grew.
    pub kv_budget_tokens: Option<u32>,
    pub kv_grown_from: Option<u32>,
}

/// Worker failures within this window count towards a crash loop...
const FAILURE_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
/// ...this many of them stop further loads...
const FAILURES_TO_BACK_OFF: usize = 3;
/// ...until this long after the last one.
const BACKOFF: std::time::Duration = std::time::Duration::from_secs(30);

impl<I> Entry<I> {
    /// Records a crash or failed start.
    pub fn record_failure(&mut self) {
        let now = Instant::now();
        self.failures
            .retain(|t| now.duration_since(*t) < FAILURE_WINDOW);
        self.failures.push(now);
    }

    /// When the worker keeps failing, how long until the next load may start.
    pub fn backoff(&self) -> Option<(usize, std::time::Duration)> {
        let now = Instant::now();
        let recent = self
            .failures
            .iter()
            .filter(|t| now.duration_since(**t) < FAILURE_WINDOW)
            .count();
        let last = *self.failures.last()?;
        let wait = BACKOFF.saturating_sub(now.duration_since(last));
        (recent >= FAILURES_TO_BACK_OFF && !wait.is_zero()).then_some((recent, wait))
    }
}

impl<I> Entry<I> {
    pub fn new(spec: ModelSpec) -> Self {
        let permits = Arc::new(Semaphore::new(spec.max_concurrency.max(1) as usize));
        Self {
            epoch: NEXT_EPOCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            spec,
            life: Lifecycle::Registered,
            loads_started: 0,
            last_used: Instant::now(),
            last_used_at: SystemTime::now(),
            in_flight: 0,
            interest: 0,
            permits,
            prediction: None,
            candidates: Vec::new(),
            precision: None,
            quantized_key: None,
            base_measured_bytes: 0,
            retiring: false,
            last_load: None,
            failures: Vec::new(),
            resolved: None,
            file_id: None,
            ready_since: Instant::now(),
            wanting_room_since: None,
            waiting_why: None,
            turn: None,
            swap_in: None,
            swapped_in: false,
            cut_reason: None,
            demand_peak: 0,
            grown_candidate: None,
            kv_budget_tokens: None,
            kv_grown_from: None,
        }
    }

    /// Notes the requests at once now, for the KV budget's growth. `granting`: a lease
    /// is being handed out, and its request still counts in `interest` as well.
    pub fn note_demand(&mut self, granting: bool) {
        let waiting = self.interest.saturating_sub(u32::from(granting));
        self.demand_peak = self.demand_peak.max(waiting + self.in_flight);
    }

    pub fn touch(&mut self) {
        self.last_used = Instant::now();
        self.last_used_at = SystemTime::now();
    }
}

pub(super) struct State<I> {
    pub models: BTreeMap<String, Entry<I>>,
    /// Ready models; the least recently used at the back.
    pub lru: LruCache<String, ()>,
    pub budgets: BTreeMap<Device, u64>,
    pub shutting_down: bool,
    pub groups: Vec<super::swap::GroupState>,
    /// Turns given to models that waited for room.
    pub turns: super::swap::SwapRate,
    /// A stopping victim's bytes pass to the load it made room for: victim id ->
    /// (loading model, the load's full charge).
    pub handoffs: BTreeMap<String, (String, Charge)>,
}

impl<I: Instance> State<I> {
    pub fn entry(&mut self, id: &str) -> Result<&mut Entry<I>, PoolError> {
        if !self.models.contains_key(id) {
            return Err(PoolError::NotFound {
                id: id.to_owned(),
                known: self.known_ids(),
            });
        }
        Ok(self.models.get_mut(id).expect("checked above"))
    }

    /// The entry of `id` if it is still registration `epoch`.
    pub fn entry_at(&mut self, id: &str, epoch: u64) -> Option<&mut Entry<I>> {
        self.models.get_mut(id).filter(|e| e.epoch == epoch)
    }

    pub fn known_ids(&self) -> String {
        if self.models.is_empty() {
            return "none".into();
        }
        self.models.keys().cloned().collect::<Vec<_>>().join(", ")
    }

    /// Where the table disagrees with itself, said in words; empty when it agrees. The
    /// lifecycle's own states cannot disagree (see [`Lifecycle`]); these are the
    /// bookkeeping kept beside them.
    #[cfg(test)]
    pub fn inconsistencies(&self) -> Vec<String> {
        use super::life::Phase;
        let mut out = Vec::new();
        for (id, e) in &self.models {
            let phase = e.life.phase();
            if self.lru.contains(id) != e.life.worker().is_some() {
                out.push(format!(
                    "`{id}` is {phase:?} but in the LRU list: {}",
                    self.lru.contains(id)
                ));
            }
            if let Some(incoming) = e.life.draining_for() {
                if !self.models.contains_key(incoming) {
                    out.push(format!(
                        "`{id}` drains for `{incoming}`, which is not registered"
                    ));
                }
            }
            if e.turn.is_some() && !(e.life.is_cold() || e.life.is_loading()) {
                out.push(format!("`{id}` is {phase:?} with a turn still running"));
            }
            if let Some((incoming, _)) = self.handoffs.get(id) {
                let to = self.models.get(incoming).map(|e| e.life.phase());
                if phase != Phase::Unloading || to != Some(Phase::Loading) {
                    out.push(format!(
                        "`{id}` ({phase:?}) hands its bytes to `{incoming}` ({to:?})"
                    ));
                }
            }
        }
        for id in self.handoffs.keys() {
            if !self.models.contains_key(id) {
                out.push(format!("a handoff from `{id}`, which is not registered"));
            }
        }
        out
    }

    /// Moves a ready model to `Unloading` (its bytes stay charged) and hands back its
    /// worker; any other slot is left as it is.
    pub fn take_ready(&mut self, id: &str) -> Option<(Arc<I>, Charge)> {
        let entry = self.models.get_mut(id)?;
        let taken = entry.life.begin_unload().ok()?;
        self.lru.pop(id);
        Some(taken)
    }

    /// The worker has exited: release its bytes (to the load it made room for, if
    /// any), with its file's pages when nothing else maps that file. Returns how many
    /// were released.
    pub fn finish_unload(&mut self, id: &str) -> u64 {
        let Some(entry) = self.models.get_mut(id) else {
            return 0;
        };
        let Ok((mut released, mapped)) = entry.life.finish_unload() else {
            return 0;
        };
        let unmapped = self.unmapped_bytes(mapped.as_ref());
        if unmapped > 0 {
            released.add(&Charge::on(Device::Cpu, unmapped));
        }
        if let Some((incoming, target)) = self.handoffs.remove(id) {
            let last = !self.handoffs.values().any(|(i, _)| *i == incoming);
            if let Some(Lifecycle::Loading(Loading {
                charge,
                mapped,
                file_pending,
                ..
            })) = self.models.get_mut(&incoming).map(|e| &mut e.life)
            {
                for (device, want) in &target.0 {
                    let now = charge.0.entry(*device).or_default();
                    *now = (*now + released.get(*device)).min(*want);
                }
                // Handed over in full: its file counts as mapped from now on.
                if last && *file_pending {
                    let file = mapped.map_or(0, |m| m.bytes);
                    let ram = charge.0.entry(Device::Cpu).or_default();
                    *ram = ram.saturating_sub(file);
                    *file_pending = false;
                }
            }
        }
        released.total()
    }

    /// Bytes charged per device by models that are not candidates for eviction: loads
    /// in progress, workers still exiting, and the room a running turn is freeing for
    /// its model (all but `except`'s own: the model being admitted).
    fn reserved(&self, except: &str) -> Charge {
        let mut total = Charge::default();
        for (id, e) in &self.models {
            match &e.life {
                Lifecycle::Loading(Loading { charge, .. })
                | Lifecycle::Unloading { charge, .. } => total.add(charge),
                life if life.is_cold() && id != except => {
                    if let Some(held) = self.held_for_turn(e) {
                        total.add(&held);
                    }
                }
                _ => {}
            }
        }
        total
    }

    /// What a model whose turn is running needs beyond what its victims still hold:
    /// room nobody else may take meanwhile.
    fn held_for_turn(&self, e: &Entry<I>) -> Option<Charge> {
        let turn = e.turn.as_ref()?;
        // Its file's pages are held apart (see `held_files`).
        let (needed, _) = super::sharing::split(e.prediction.as_ref()?, e.file_id);
        let mut covered = Charge::default();
        for v in &turn.victims {
            let life = self.models.get(v).map(|v| &v.life);
            if let Some(charge) = life.filter(|l| !l.is_loading()).and_then(|l| l.charge()) {
                covered.add(charge)
            }
        }
        Some(needed.saturating_sub(&covered))
    }

    /// Ready models from least to most recently used, with their current charge.
    pub fn residents(&self) -> Vec<Resident> {
        self.lru
            .iter()
            .rev()
            .filter_map(|(id, ())| {
                let e = self.models.get(id)?;
                let w = e.life.worker()?;
                Some(Resident {
                    id: id.clone(),
                    charge: effective_charge(
                        &w.charge,
                        w.instance.as_ref(),
                        e.spec.device,
                        &w.mapped,
                    ),
                    mapped: w.mapped,
                    // Requests queued for a model being drained do not hold it.
                    leases: e.in_flight
                        + if e.life.draining_for().is_some() {
                            0
                        } else {
                            e.interest
                        },
                    pinned: e.spec.pinned,
                })
            })
            .collect()
    }

    /// Per device: the budget, capped by what the machine can still give, and the bytes
    /// reserved outside the resident list.
    ///
    /// The machine cap makes memory that other processes use count: free room is at
    /// most what is available now, less the headroom, less the growth our models were
    /// promised but have not allocated yet (charged bytes above measured bytes).
    pub fn rooms(
        &self,
        residents: &[Resident],
        available: &[DeviceMemory],
        headroom_bytes: u64,
        except: &str,
    ) -> BTreeMap<Device, Room> {
        let reserved = self.reserved(except);
        let held = self.held_files(except);
        let files = mapped_bytes(
            residents
                .iter()
                .filter_map(|r| r.mapped.as_ref())
                .chain(&held),
        );
        self.budgets
            .iter()
            .map(|(&device, &budget)| {
                let mut budget_bytes = budget;
                if let Some(mem) = available.iter().find(|m| m.device == device) {
                    let promised = residents.iter().map(|r| r.charge.get(device)).sum::<u64>()
                        + reserved.get(device)
                        + if device == Device::Cpu { files } else { 0 };
                    let cap = promised.min(self.measured_on(device))
                        + mem.available_bytes.saturating_sub(headroom_bytes);
                    budget_bytes = budget_bytes.min(cap);
                }
                let room = Room {
                    budget_bytes,
                    reserved_bytes: reserved.get(device),
                    configured_budget_bytes: budget,
                };
                (device, room)
            })
            .collect()
    }

    /// Bytes our ready workers hold on `device`: live RSS for RAM (a file several of
    /// them map counted once), the figure measured at load for a GPU.
    fn measured_on(&self, device: Device) -> u64 {
        let own: u64 = self
            .models
            .values()
            .filter_map(|e| e.life.worker())
            .map(|w| {
                if device == Device::Cpu {
                    let file = w.mapped.map_or(0, |m| m.bytes);
                    w.instance.resident_bytes().saturating_sub(file)
                } else {
                    w.measured.get(device)
                }
            })
            .sum();
        let ready = self.models.values().filter(|e| e.life.worker().is_some());
        let files = mapped_bytes(ready.filter_map(|e| e.life.mapped()));
        own + if device == Device::Cpu { files } else { 0 }
    }

    /// Decides whether `id`, needing `needed` and mapping `mapped`, fits once `forced`
    /// (victims chosen by the model's group) are gone, returning every victim to evict
    /// first, `forced` leading.
    pub fn admit(
        &self,
        id: &str,
        (needed, mapped): (&Charge, Option<Mapped>),
        available: &[DeviceMemory],
        headroom_bytes: u64,
        forced: &[String],
    ) -> Result<Vec<String>, Shortfall> {
        let mut residents = self.residents();
        let rooms = self.rooms(&residents, available, headroom_bytes, id);
        // A model draining for another is that model's room: nobody else evicts it.
        for r in residents.iter_mut() {
            let draining = self.models.get(&r.id).and_then(|e| e.life.draining_for());
            if draining.is_some_and(|d| d != id) {
                r.leases = r.leases.max(1);
            }
        }
        let rest: Vec<Resident> = residents
            .into_iter()
            .filter(|r| !forced.contains(&r.id))
            .collect();
        // Victims' bytes, their files' pages among them, pass to this load as their
        // workers exit (see `finish_unload`): they count as freed.
        let need = Need {
            charge: needed.clone(),
            mapped,
            held: self.held_files(id),
        };
        let mut victims = forced.to_vec();
        victims.extend(choose_victims(&rooms, &rest, &need)?);
        Ok(victims)
    }
}

/// A ready model's charge: the larger of its charge at load and what its worker holds
/// now (a model can outgrow its prediction), less the file pages it maps.
pub(super) fn effective_charge<I: Instance>(
    charge: &Charge,
    instance: &I,
    device: Device,
    mapped: &Option<Mapped>,
) -> Charge {
    let mut out = charge.clone();
    if device == Device::Cpu {
        let file = mapped.map_or(0, |m| m.bytes);
        let now = instance.resident_bytes().saturating_sub(file);
        let e = out.0.entry(Device::Cpu).or_default();
        *e = (*e).max(now);
    }
    out
}

/// What a fresh worker holds per device: RSS for RAM, NVML's per-process figure for
/// GPUs.
pub(super) fn measure<I: Instance>(
    probe: &dyn MemoryProbe,
    instance: &I,
    device: Device,
) -> Charge {
    let mut out = Charge::on(Device::Cpu, instance.resident_bytes());
    if device != Device::Cpu {
        if let Some(pid) = instance.pid() {
            for (d, b) in probe.process_vram(pid) {
                out.0.insert(d, b);
            }
        }
    }
    out
}

/// After a load the measured bytes replace the prediction, plus what the engine grows
/// lazily up to the configured context: the KV cache and a full prompt's scratch
/// memory (so generation cannot run the machine out of memory later). A device the probe could not measure keeps its
/// prediction.
pub(super) fn charge_after_load(
    footprint: &Footprint,
    measured: &Charge,
    device: Device,
) -> Charge {
    let mut out = footprint.charge.clone();
    for (d, predicted) in out.0.iter_mut() {
        let m = measured.get(*d);
        if m == 0 {
            continue;
        }
        *predicted = if *d == device {
            m + footprint.growth_bytes()
        } else {
            m
        };
    }
    out
}

/// Signed error of a prediction against a measurement, in percent of the measurement.
pub(super) fn error_pct(predicted: u64, measured: u64) -> f64 {
    if measured == 0 {
        return 0.0;
    }
    (predicted as f64 - measured as f64) * 100.0 / measured as f64
}
