//! The pool: one owner of the table of models, budgets per device, LRU eviction,
//! single-flight loads, per-model concurrency and RAII leases.
//!
//! All state lives in one `State` behind one mutex that is never held across an
//! `.await`; loads run as their own tasks so a slow load never blocks requests to models
//! that are already resident. Which models to evict is decided by the pure
//! [`choose_victims`](crate::budget::choose_victims); this module gathers its inputs and
//! acts on its answer. A model with a lease, or with requests waiting for one, is never
//! evicted, and budget bytes are released only once a worker has exited.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use lru::LruCache;
use tokio::sync::{broadcast, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::events::{EventKind, EvictReason, PoolEvent};
use crate::memory::MemoryProbe;
use crate::store::Store;
use crate::{Backend, BackendError, Device, Instance, ModelSpec, PoolError};

mod admission;
mod launch;
mod life;
mod lifecycle;
mod sharing;
mod state;
mod status;
mod swap;
mod tiers;

pub use status::{DeviceStatus, ModelSnapshot, PoolStatus, SlotState};
pub use swap::GroupStatus;
pub use tiers::Tier;

use state::{Entry, State};

/// How the pool behaves; budgets are absolute bytes (the server resolves "auto").
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Bytes each device may hold for models. A device without a budget cannot be used.
    pub budgets: BTreeMap<Device, u64>,
    /// Bytes of each device left to everything else: admission never plans to use the
    /// machine's last `headroom_bytes` of available memory.
    pub headroom_bytes: u64,
    /// Requests that may wait per model (for a load or a concurrency slot).
    pub queue_depth: u32,
    /// Longest a request waits for its model when the client set no deadline.
    pub queue_timeout: Duration,
    /// The spill directory, when one is configured (URL sources need it).
    pub store: Option<Arc<Store>>,
    /// Groups of models with a cap on how many are resident (swap slots).
    pub groups: Vec<crate::GroupSpec>,
    /// Loads (worker starts) running at once; more wait their turn.
    pub max_loads_in_flight: usize,
    /// Turns for models that wait for room while busy models hold it.
    pub turns: crate::TurnPolicy,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            budgets: BTreeMap::from([(Device::Cpu, u64::MAX)]),
            headroom_bytes: 0,
            queue_depth: 64,
            queue_timeout: Duration::from_secs(60),
            store: None,
            groups: Vec::new(),
            max_loads_in_flight: 2,
            turns: crate::TurnPolicy::default(),
        }
    }
}

/// When a waiting request gives up, and whether that is the client's deadline (else
/// the pool's own `queue_timeout`).
#[derive(Clone, Copy, Debug)]
struct Deadline {
    at: Instant,
    by_client: bool,
}

/// Outcome of one load, broadcast to every request waiting for it.
type LoadOutcome = Option<Result<(), PoolError>>;

struct Inner<B: Backend> {
    backend: B,
    probe: Arc<dyn MemoryProbe>,
    config: PoolConfig,
    state: Mutex<State<B::Instance>>,
    events: broadcast::Sender<PoolEvent>,
    /// `max_loads_in_flight` permits.
    load_permits: Arc<Semaphore>,
    /// Bumped whenever room may have changed (a lease, a waiter, a worker or a budget
    /// came or went): requests waiting for room, and drains, wait on it.
    room: watch::Sender<u64>,
}

impl<B: Backend> Inner<B> {
    fn lock(&self) -> MutexGuard<'_, State<B::Instance>> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes everything waiting for room to plan again.
    fn kick(&self) {
        self.room.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn emit(&self, model: &str, kind: EventKind) {
        // No subscribers is fine: events are for whoever watches.
        let _ = self.events.send(PoolEvent::new(model, kind));
    }

    /// Stops a worker already moved to `Unloading`, releases its bytes once it has
    /// exited, and reports the eviction.
    async fn stop_worker(&self, id: &str, instance: &B::Instance, reason: EvictReason) {
        instance.shutdown().await;
        let (freed, resolved) = {
            let mut st = self.lock();
            let resolved = st
                .models
                .get(id)
                .map(|e| (e.resolved.clone(), e.quantized_key.clone()))
                .unwrap_or_default();
            (st.finish_unload(id), resolved)
        };
        tiers::stopped(self, resolved.0.as_ref(), resolved.1.as_deref(), &reason);
        self.kick();
        tracing::info!(model = %id, %reason, freed_bytes = freed, "evicted");
        let freed_bytes = freed;
        self.emit(
            id,
            EventKind::Evicted {
                reason,
                freed_bytes,
            },
        );
    }

    /// Stops a worker on a task of its own and waits for it. A caller that goes away
    /// meanwhile (a cancelled RPC) cannot leave the model half-stopped: `Unloading`
    /// forever, its bytes still charged.
    async fn stop_detached(
        self: &Arc<Self>,
        id: &str,
        instance: Arc<B::Instance>,
        reason: EvictReason,
    ) {
        let inner = Arc::clone(self);
        let id = id.to_owned();
        on_own_task(async move { inner.stop_worker(&id, &instance, reason).await }).await;
    }

    /// Forgets a model; requests still queued for one of its slots learn it is gone.
    fn forget(&self, id: &str) {
        let removed = self.lock().models.remove(id);
        if let Some(entry) = removed {
            entry.permits.close();
            self.kick();
            self.emit(id, EventKind::Unregistered);
        }
    }
}

/// The model pool. Cheap to clone; clones share state.
pub struct Pool<B: Backend> {
    inner: Arc<Inner<B>>,
}

impl<B: Backend> Clone for Pool<B> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<B: Backend> Pool<B> {
    /// Creates the pool and starts its idle-TTL reaper (which ends with the pool).
    pub fn new(
        backend: B,
        probe: Arc<dyn MemoryProbe>,
        config: PoolConfig,
        specs: impl IntoIterator<Item = ModelSpec>,
    ) -> Self {
        let (events, _) = broadcast::channel(1024);
        let mut models = BTreeMap::new();
        for spec in specs {
            models.insert(spec.id.clone(), Entry::new(spec));
        }
        let inner = Arc::new(Inner {
            backend,
            probe,
            state: Mutex::new(State {
                models,
                lru: LruCache::unbounded(),
                budgets: config.budgets.clone(),
                shutting_down: false,
                handoffs: BTreeMap::new(),
                groups: config
                    .groups
                    .iter()
                    .cloned()
                    .map(swap::GroupState::new)
                    .collect(),
                turns: swap::SwapRate::default(),
            }),
            room: watch::channel(0).0,
            load_permits: Arc::new(Semaphore::new(config.max_loads_in_flight.max(1))),
            config,
            events,
        });
        tokio::spawn(lifecycle::reap_idle(Arc::downgrade(&inner)));
        Self { inner }
    }

    /// Every event from now on. A receiver that falls more than 1024 events behind
    /// learns how many it missed.
    pub fn subscribe(&self) -> broadcast::Receiver<PoolEvent> {
        self.inner.events.subscribe()
    }

    /// Adds a model; it stays cold until first used or loaded.
    pub fn register(&self, spec: ModelSpec) -> Result<(), PoolError> {
        let id = spec.id.clone();
        {
            let mut st = self.inner.lock();
            if st.shutting_down {
                return Err(PoolError::ShuttingDown);
            }
            if st.models.contains_key(&id) {
                return Err(PoolError::AlreadyExists { id });
            }
            st.models.insert(id.clone(), Entry::new(spec));
        }
        self.inner.emit(&id, EventKind::Registered);
        Ok(())
    }

    /// Removes a model, stopping its worker first. Refused while requests use it or
    /// wait for it.
    pub async fn unregister(&self, id: &str) -> Result<(), PoolError> {
        self.stop(id, EvictReason::Requested, true).await?;
        {
            let st = self.inner.lock();
            match st.models.get(id) {
                Some(e) if e.life.is_cold() && e.interest == 0 => {}
                Some(e) => return Err(busy(id, e)),
                None => return Ok(()),
            }
        }
        self.inner.forget(id);
        Ok(())
    }

    /// Returns a lease on a resident `id`, loading it first when needed. Concurrent
    /// callers for the same cold model share one load. Waits at most until `deadline`
    /// (or the pool's queue timeout) for a concurrency slot and the load together.
    pub async fn acquire(
        &self,
        id: &str,
        deadline: Option<Instant>,
    ) -> Result<Lease<B>, PoolError> {
        let started = Instant::now();
        let deadline = self.deadline(started, deadline);
        let (interest, permits) = self.enter_queue(id)?;
        let permit = match tokio::time::timeout_at(deadline.at, permits.acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            // Closed by `forget`: the model was removed while this request waited.
            Ok(Err(_)) => return Err(PoolError::Retiring { id: id.to_owned() }),
            Err(_) => {
                return Err(PoolError::QueueTimeout {
                    id: id.to_owned(),
                    by_client: deadline.by_client,
                    waited: started.elapsed(),
                    reason: format!(
                        "all {} concurrency slots stayed busy",
                        permits_total(&self.inner, id)
                    ),
                })
            }
        };
        let lease = self
            .ready(id, interest.epoch, started, deadline, Some(permit))
            .await;
        drop(interest);
        lease
    }

    /// Removes a model gracefully: refuses its new requests at once, lets those in
    /// flight or queued finish for up to `drain`, then stops its worker (cutting what is
    /// still running) and forgets it.
    ///
    /// It runs on a task of its own: a caller that goes away mid-drain (a cancelled
    /// RPC) cannot leave the model refusing requests without ever being removed.
    pub async fn retire(&self, id: &str, drain: Duration) -> Result<(), PoolError> {
        let pool = self.clone();
        let id = id.to_owned();
        on_own_task(async move { pool.retire_attached(&id, drain).await })
            .await
            .unwrap_or(Err(PoolError::ShuttingDown))
    }

    async fn retire_attached(&self, id: &str, drain: Duration) -> Result<(), PoolError> {
        // Subscribed before the first look: a change after it wakes the wait below.
        let mut changes = self.inner.room.subscribe();
        self.inner.lock().entry(id)?.retiring = true;
        let until = Instant::now() + drain;
        loop {
            let idle = {
                let mut st = self.inner.lock();
                let e = st.entry(id)?;
                e.in_flight == 0 && e.interest == 0 && !e.life.is_loading()
            };
            if idle || Instant::now() >= until {
                if !idle {
                    tracing::warn!(model = %id, ?drain, "drain timeout: cutting requests still running");
                }
                break;
            }
            // A lease or a waiter going, or a load ending, kicks the room watch.
            let _ = tokio::time::timeout_at(until, changes.changed()).await;
        }
        let instance = self.inner.lock().take_ready(id).map(|(inst, _)| inst);
        if let Some(instance) = instance {
            self.inner
                .stop_detached(id, instance, EvictReason::Requested)
                .await;
        }
        // A worker stopping on another task (evicted for room or swapped out just
        // before) keeps its bytes charged until it has exited: forget the entry only
        // then, so the books never drop bytes a live process still holds.
        let mut changes = self.inner.room.subscribe();
        while self
            .inner
            .lock()
            .models
            .get(id)
            .is_some_and(|e| e.life.is_unloading())
        {
            // `stop_worker` kicks once the worker has exited and its bytes are released.
            if changes.changed().await.is_err() {
                break;
            }
        }
        // A load still running past the drain finishes into a removed entry and is
        // stopped by its own task (see `run_load`).
        self.inner.forget(id);
        Ok(())
    }

    /// Makes `id` resident without holding it (the `LoadModel` RPC); `pin` also pins it.
    /// Returns how long the load took, or zero when it was resident already.
    pub async fn load(
        &self,
        id: &str,
        pin: bool,
        deadline: Option<Instant>,
    ) -> Result<Duration, PoolError> {
        let started = Instant::now();
        let deadline = self.deadline(started, deadline);
        // A pin this call adds is taken back when the load fails: a model that never
        // loaded must not stay pinned.
        let pinned_here = pin && self.set_pinned(id, true)?;
        let (interest, _) = self.enter_queue(id)?;
        let lease = self
            .ready(id, interest.epoch, started, deadline, None)
            .await;
        drop(interest);
        if lease.is_err() && pinned_here {
            let _ = self.set_pinned(id, false);
        }
        Ok(lease?.load_wait)
    }

    /// Stops the worker of an idle model and waits until it is gone. Returns whether a
    /// worker was stopped. Refused for a pinned model and one in use.
    pub async fn unload(&self, id: &str) -> Result<bool, PoolError> {
        self.stop(id, EvictReason::Requested, false).await
    }

    /// Marks a model pinned (never evicted) or not; returns whether that changed it.
    pub fn set_pinned(&self, id: &str, pinned: bool) -> Result<bool, PoolError> {
        let changed = {
            let mut st = self.inner.lock();
            let entry = st.entry(id)?;
            std::mem::replace(&mut entry.spec.pinned, pinned) != pinned
        };
        if changed {
            self.inner.kick();
            let kind = if pinned {
                EventKind::Pinned
            } else {
                EventKind::Unpinned
            };
            self.inner.emit(id, kind);
        }
        Ok(changed)
    }

    /// Changes a device's budget. Resident models over a smaller budget stay until they
    /// are evicted for room or idleness.
    pub fn set_budget(&self, device: Device, budget_bytes: u64) {
        let old = self.inner.lock().budgets.insert(device, budget_bytes);
        if old != Some(budget_bytes) {
            self.inner.kick();
            tracing::info!(%device, budget_bytes, "budget changed");
            self.inner.emit(
                "",
                EventKind::BudgetChanged {
                    device,
                    budget_bytes,
                },
            );
        }
    }

    /// Stops every worker. Requests still holding leases lose their worker; call after
    /// draining.
    pub async fn shutdown(&self) {
        let victims: Vec<_> = {
            let mut st = self.inner.lock();
            st.shutting_down = true;
            let ids: Vec<String> = st.models.keys().cloned().collect();
            ids.into_iter()
                .filter_map(|id| st.take_ready(&id).map(|(inst, _)| (id, inst)))
                .collect()
        };
        for (id, instance) in victims {
            self.inner
                .stop_detached(&id, instance, EvictReason::Shutdown)
                .await;
        }
    }

    fn deadline(&self, started: Instant, deadline: Option<Instant>) -> Deadline {
        let own = started + self.inner.config.queue_timeout;
        match deadline {
            Some(d) if d < own => Deadline {
                at: d,
                by_client: true,
            },
            _ => Deadline {
                at: own,
                by_client: false,
            },
        }
    }

    /// Counts the caller as waiting for `id` (which protects the model from eviction)
    /// or refuses when the model's queue is full.
    fn enter_queue(&self, id: &str) -> Result<(Interest<B>, Arc<Semaphore>), PoolError> {
        let mut st = self.inner.lock();
        if st.shutting_down {
            return Err(PoolError::ShuttingDown);
        }
        let depth = self.inner.config.queue_depth;
        let entry = st.entry(id)?;
        if entry.retiring {
            return Err(PoolError::Retiring { id: id.to_owned() });
        }
        if entry.interest >= depth {
            return Err(PoolError::QueueFull {
                id: id.to_owned(),
                waiting: entry.interest,
            });
        }
        entry.interest += 1;
        entry.note_demand(false);
        let interest = Interest {
            pool: Arc::clone(&self.inner),
            id: id.to_owned(),
            epoch: entry.epoch,
        };
        Ok((interest, Arc::clone(&entry.permits)))
    }

    /// Waits until `id` is ready, starting its load when nobody has, and returns a lease.
    /// Waits by notification: a load's outcome, or a change in the pool's room.
    async fn ready(
        &self,
        id: &str,
        epoch: u64,
        started: Instant,
        deadline: Deadline,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Result<Lease<B>, PoolError> {
        let mut waited = false;
        let mut first_round = true;
        let mut changes = self.inner.room.subscribe();
        let mut why = String::new();
        loop {
            if Instant::now() >= deadline.at {
                let reason = if first_round {
                    "the deadline ran out before the model could be checked (waiting for a concurrency slot, or already past on arrival)".to_owned()
                } else {
                    format!("there was no room yet ({why})")
                };
                return Err(PoolError::QueueTimeout {
                    id: id.to_owned(),
                    by_client: deadline.by_client,
                    waited: started.elapsed(),
                    reason,
                });
            }
            first_round = false;
            let candidates = self.prediction(id).await?;
            let available = match candidates {
                Some(_) => self.inner.probe.devices(),
                None => Vec::new(),
            };
            // Seen before the table is read: any change from here on wakes the wait.
            changes.borrow_and_update();
            let next = match self.look(id, epoch, candidates, &available)? {
                admission::Look::Ready(instance) => {
                    return Ok(Lease {
                        pool: Arc::clone(&self.inner),
                        id: id.to_owned(),
                        epoch,
                        instance,
                        load_wait: if waited {
                            started.elapsed()
                        } else {
                            Duration::ZERO
                        },
                        cold_start: waited,
                        _permit: permit,
                    });
                }
                admission::Look::Next(next) => next,
            };
            waited = true;
            match next {
                admission::Admission::Loading(done) => {
                    self.load_outcome(id, started, deadline, done).await?
                }
                admission::Admission::Wait {
                    why: now_why,
                    retry_in,
                    eta,
                } => {
                    let left = deadline.at.saturating_duration_since(Instant::now());
                    if let Some(eta) = eta.filter(|eta| *eta > left) {
                        return Err(PoolError::TurnTooLate {
                            id: id.to_owned(),
                            by_client: deadline.by_client,
                            left,
                            eta,
                            why: now_why,
                        });
                    }
                    why = now_why;
                    let until =
                        retry_in.map_or(deadline.at, |r| (Instant::now() + r).min(deadline.at));
                    let _ = tokio::time::timeout_at(until, changes.changed()).await;
                }
            }
        }
    }

    /// Waits for the outcome of a load this request waits for.
    async fn load_outcome(
        &self,
        id: &str,
        started: Instant,
        deadline: Deadline,
        mut done: watch::Receiver<LoadOutcome>,
    ) -> Result<(), PoolError> {
        // The load task always sends an outcome before dropping its sender.
        loop {
            if let Some(outcome) = done.borrow_and_update().clone() {
                return outcome;
            }
            match tokio::time::timeout_at(deadline.at, done.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    return Err(PoolError::LoadFailed {
                        id: id.to_owned(),
                        source: BackendError::Failed("load task ended unexpectedly".into()),
                    })
                }
                Err(_) => {
                    return Err(PoolError::QueueTimeout {
                        id: id.to_owned(),
                        by_client: deadline.by_client,
                        waited: started.elapsed(),
                        reason: "the model was still loading".into(),
                    })
                }
            }
        }
    }

    /// Stops a ready model unless something holds it; `force_pinned` lets unregister
    /// stop a pinned model.
    async fn stop(
        &self,
        id: &str,
        reason: EvictReason,
        force_pinned: bool,
    ) -> Result<bool, PoolError> {
        let instance = {
            let mut st = self.inner.lock();
            let entry = st.entry(id)?;
            if entry.in_flight > 0 || entry.interest > 0 || entry.life.is_loading() {
                return Err(busy(id, entry));
            }
            if entry.spec.pinned && !force_pinned && entry.life.worker().is_some() {
                return Err(PoolError::Pinned { id: id.to_owned() });
            }
            match st.take_ready(id) {
                Some((instance, _)) => instance,
                None => return Ok(false),
            }
        };
        self.inner.stop_detached(id, instance, reason).await;
        Ok(true)
    }
}

/// Runs `work` on a task of its own and waits for it, so the caller going away (a
/// cancelled RPC) cannot cut it halfway. A panic in it resumes in the caller; `None`
/// when the runtime cancelled the task (it is shutting down).
async fn on_own_task<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> Option<T> {
    match tokio::spawn(work).await {
        Ok(out) => Some(out),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => None,
    }
}

fn busy<I>(id: &str, entry: &Entry<I>) -> PoolError {
    PoolError::Busy {
        id: id.to_owned(),
        in_flight: entry.in_flight,
        waiting: entry.interest,
        loading: entry.life.is_loading(),
    }
}

fn permits_total<B: Backend>(inner: &Inner<B>, id: &str) -> u32 {
    let mut st = inner.lock();
    st.entry(id).map_or(0, |e| e.spec.max_concurrency)
}

/// A caller waiting for a model. While it exists the model is not evicted, so a load
/// started for waiting requests always serves them.
struct Interest<B: Backend> {
    pool: Arc<Inner<B>>,
    id: String,
    epoch: u64,
}

impl<B: Backend> Drop for Interest<B> {
    fn drop(&mut self) {
        {
            let mut st = self.pool.lock();
            let mut given_up = None;
            if let Some(e) = st.entry_at(&self.id, self.epoch) {
                e.interest = e.interest.saturating_sub(1);
                if e.interest == 0 {
                    // Nobody waits any more: no room wanted, and a turn not yet loading
                    // is given up.
                    e.wanting_room_since = None;
                    e.waiting_why = None;
                    if e.life.is_cold() {
                        given_up = e.turn.take();
                    }
                }
            }
            // Its victims still draining stay, serving their queued requests again.
            for v in given_up.map(|t| t.victims).unwrap_or_default() {
                if let Some(e) = st.models.get_mut(&v) {
                    // Refused when it drains for another model by now, or has gone.
                    let _ = e.life.call_off_drain(Some(&self.id));
                }
            }
        }
        self.pool.kick();
    }
}

/// A request's claim on a resident model. While any lease on a model exists, the pool
/// does not unload it. Dropping the lease releases the claim and its concurrency slot.
pub struct Lease<B: Backend> {
    pool: Arc<Inner<B>>,
    id: String,
    epoch: u64,
    instance: Arc<B::Instance>,
    load_wait: Duration,
    cold_start: bool,
    _permit: Option<OwnedSemaphorePermit>,
}

impl<B: Backend> Lease<B> {
    pub fn instance(&self) -> &B::Instance {
        &self.instance
    }
    pub fn model_id(&self) -> &str {
        &self.id
    }
    /// How long `acquire` waited for a load; zero when the model was resident.
    pub fn load_wait(&self) -> Duration {
        self.load_wait
    }
    /// True when this request found its model cold and waited for a load.
    pub fn cold_start(&self) -> bool {
        self.cold_start
    }
    /// How long this request waited for its group's slot to swap its model in; zero
    /// when no swap was involved.
    pub fn swap_wait(&self) -> Duration {
        let swapped = self.cold_start && {
            let mut st = self.pool.lock();
            st.entry_at(&self.id, self.epoch)
                .is_some_and(|e| e.swapped_in)
        };
        if swapped {
            self.load_wait
        } else {
            Duration::ZERO
        }
    }
    /// Why the pool stopped this model's worker under running requests (a swap past
    /// its drain timeout), for the error those requests get.
    pub fn cut_reason(&self) -> Option<String> {
        let mut st = self.pool.lock();
        st.entry_at(&self.id, self.epoch)
            .and_then(|e| e.cut_reason.clone())
    }
}

impl<B: Backend> Drop for Lease<B> {
    fn drop(&mut self) {
        {
            let mut st = self.pool.lock();
            if let Some(e) = st.entry_at(&self.id, self.epoch) {
                e.in_flight = e.in_flight.saturating_sub(1);
                e.touch();
            }
        }
        // A drain may be waiting for this one.
        self.pool.kick();
    }
}

#[cfg(test)]
mod tests;
