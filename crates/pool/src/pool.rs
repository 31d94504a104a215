//! The pool: one owner of the table of models, single-flight loads, RAII leases.
//!
//! All state lives in one `State` behind one mutex that is never held across an
//! `.await`; loads run as their own tasks so a slow load never blocks requests to models
//! that are already resident. Every request holds a [`Lease`] while it uses a model; a
//! leased model is never unloaded.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::{Backend, BackendError, Instance, ModelSpec, PoolError};

/// Where a model is in its life cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    Registered,
    Loading,
    Ready,
    Unloading,
    Failed,
}

/// Outcome of one load, broadcast to every request waiting for it.
type LoadOutcome = Option<Result<(), BackendError>>;

enum Slot<I> {
    Absent { last_error: Option<String> },
    Loading { done: watch::Receiver<LoadOutcome> },
    Ready { instance: Arc<I>, in_flight: u32 },
    Unloading,
}

impl<I> Slot<I> {
    /// Moves a ready slot to `Unloading` and hands back its worker; any other slot is
    /// left as it is.
    fn take_ready(&mut self) -> Option<Arc<I>> {
        if !matches!(self, Slot::Ready { .. }) {
            return None;
        }
        match std::mem::replace(self, Slot::Unloading) {
            Slot::Ready { instance, .. } => Some(instance),
            _ => None,
        }
    }
}

struct Entry<I> {
    spec: ModelSpec,
    slot: Slot<I>,
    loads_started: u64,
}

struct State<I> {
    models: BTreeMap<String, Entry<I>>,
    shutting_down: bool,
}

struct Inner<B: Backend> {
    backend: B,
    state: Mutex<State<B::Instance>>,
}

impl<B: Backend> Inner<B> {
    fn lock(&self) -> MutexGuard<'_, State<B::Instance>> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A point-in-time view of one model, for status RPCs.
#[derive(Clone, Debug)]
pub struct ModelSnapshot {
    pub spec: ModelSpec,
    pub state: SlotState,
    pub worker_pid: Option<u32>,
    pub resident_bytes: u64,
    pub in_flight: u32,
    pub last_error: Option<String>,
    /// Loads started for this model since it was registered.
    pub loads_started: u64,
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
    pub fn new(backend: B, specs: impl IntoIterator<Item = ModelSpec>) -> Self {
        let models = specs
            .into_iter()
            .map(|spec| {
                let entry = Entry {
                    spec: spec.clone(),
                    slot: Slot::Absent { last_error: None },
                    loads_started: 0,
                };
                (spec.id, entry)
            })
            .collect();
        Self {
            inner: Arc::new(Inner {
                backend,
                state: Mutex::new(State {
                    models,
                    shutting_down: false,
                }),
            }),
        }
    }

    /// Returns a lease on a resident `id`, loading it first when needed. Concurrent
    /// callers for the same cold model share one load.
    pub async fn acquire(&self, id: &str) -> Result<Lease<B>, PoolError> {
        let started = Instant::now();
        let mut waited = false;
        loop {
            let mut done = {
                let mut st = self.inner.lock();
                if st.shutting_down {
                    return Err(PoolError::ShuttingDown);
                }
                let known = known_ids(&st);
                let entry = st.models.get_mut(id).ok_or_else(|| PoolError::NotFound {
                    id: id.to_owned(),
                    known,
                })?;
                match &mut entry.slot {
                    Slot::Ready {
                        instance,
                        in_flight,
                    } => {
                        *in_flight += 1;
                        return Ok(Lease {
                            pool: Arc::clone(&self.inner),
                            id: id.to_owned(),
                            instance: Arc::clone(instance),
                            load_wait: if waited {
                                started.elapsed()
                            } else {
                                Duration::ZERO
                            },
                            cold_start: waited,
                        });
                    }
                    Slot::Loading { done } => Some(done.clone()),
                    Slot::Absent { .. } => Some(self.start_load(entry)),
                    // The old worker is still stopping; its unload wakes nobody, so
                    // poll until it is gone, then load afresh.
                    Slot::Unloading => None,
                }
            };
            waited = true;
            let Some(done) = done.as_mut() else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            // The load task always sends an outcome before dropping its sender.
            let outcome = loop {
                if let Some(outcome) = done.borrow_and_update().clone() {
                    break outcome;
                }
                if done.changed().await.is_err() {
                    break Err(BackendError::Failed("load task ended unexpectedly".into()));
                }
            };
            if let Err(source) = outcome {
                return Err(PoolError::LoadFailed {
                    id: id.to_owned(),
                    source,
                });
            }
        }
    }

    /// Marks `entry` loading and spawns its load; returns the receiver to wait on.
    fn start_load(&self, entry: &mut Entry<B::Instance>) -> watch::Receiver<LoadOutcome> {
        let (tx, rx) = watch::channel(None);
        entry.slot = Slot::Loading { done: rx.clone() };
        entry.loads_started += 1;
        let spec = entry.spec.clone();
        let inner = Arc::clone(&self.inner);
        tokio::spawn(async move {
            let started = Instant::now();
            tracing::info!(model = %spec.id, "load started");
            let result = inner.backend.load(&spec).await;
            let mut orphan = None;
            let outcome = {
                let mut st = inner.lock();
                let shutting_down = st.shutting_down;
                let Some(entry) = st.models.get_mut(&spec.id) else {
                    return;
                };
                match result {
                    Ok(instance) if !shutting_down => {
                        tracing::info!(model = %spec.id, pid = ?instance.pid(),
                            elapsed_ms = started.elapsed().as_millis() as u64, "load finished");
                        entry.slot = Slot::Ready {
                            instance: Arc::new(instance),
                            in_flight: 0,
                        };
                        Ok(())
                    }
                    Ok(instance) => {
                        orphan = Some(instance);
                        entry.slot = Slot::Absent { last_error: None };
                        Err(BackendError::Failed("the pool is shutting down".into()))
                    }
                    Err(e) => {
                        tracing::warn!(model = %spec.id, error = %e, "load failed");
                        entry.slot = Slot::Absent {
                            last_error: Some(e.to_string()),
                        };
                        Err(e)
                    }
                }
            };
            let _ = tx.send(Some(outcome));
            if let Some(instance) = orphan {
                instance.shutdown().await;
            }
        });
        rx
    }

    /// Stops the worker of an idle model and waits until it is gone. Returns whether a
    /// worker was stopped; a model with requests in flight is refused.
    pub async fn unload(&self, id: &str) -> Result<bool, PoolError> {
        let instance = {
            let mut st = self.inner.lock();
            let known = known_ids(&st);
            let entry = st.models.get_mut(id).ok_or_else(|| PoolError::NotFound {
                id: id.to_owned(),
                known,
            })?;
            match &entry.slot {
                Slot::Ready { in_flight, .. } if *in_flight > 0 => {
                    return Err(PoolError::Busy {
                        id: id.to_owned(),
                        in_flight: *in_flight,
                    })
                }
                _ => {}
            }
            match entry.slot.take_ready() {
                Some(instance) => instance,
                None => return Ok(false),
            }
        };
        instance.shutdown().await;
        let mut st = self.inner.lock();
        if let Some(entry) = st.models.get_mut(id) {
            entry.slot = Slot::Absent { last_error: None };
        }
        Ok(true)
    }

    /// Stops every worker. Requests still holding leases lose their worker; call after
    /// draining.
    pub async fn shutdown(&self) {
        let instances: Vec<_> = {
            let mut st = self.inner.lock();
            st.shutting_down = true;
            st.models
                .values_mut()
                .filter_map(|e| e.slot.take_ready())
                .collect()
        };
        for instance in instances {
            instance.shutdown().await;
        }
        let mut st = self.inner.lock();
        for e in st.models.values_mut() {
            if matches!(e.slot, Slot::Unloading) {
                e.slot = Slot::Absent { last_error: None };
            }
        }
    }

    /// Every registered model, sorted by id.
    pub fn snapshot(&self) -> Vec<ModelSnapshot> {
        let rows: Vec<_> = {
            let st = self.inner.lock();
            st.models.values().map(snapshot_row).collect()
        };
        // Reading /proc for the memory figures happens outside the lock.
        rows.into_iter()
            .map(|(snap, inst)| finish_row(snap, inst))
            .collect()
    }

    /// One model by id.
    pub fn get(&self, id: &str) -> Result<ModelSnapshot, PoolError> {
        let row = {
            let st = self.inner.lock();
            match st.models.get(id) {
                Some(e) => snapshot_row(e),
                None => {
                    return Err(PoolError::NotFound {
                        id: id.to_owned(),
                        known: known_ids(&st),
                    })
                }
            }
        };
        Ok(finish_row(row.0, row.1))
    }
}

fn known_ids<I>(st: &State<I>) -> String {
    if st.models.is_empty() {
        return "none".into();
    }
    st.models.keys().cloned().collect::<Vec<_>>().join(", ")
}

fn snapshot_row<I: Instance>(e: &Entry<I>) -> (ModelSnapshot, Option<Arc<I>>) {
    let (state, in_flight, last_error, instance) = match &e.slot {
        Slot::Absent { last_error: None } => (SlotState::Registered, 0, None, None),
        Slot::Absent {
            last_error: Some(err),
        } => (SlotState::Failed, 0, Some(err.clone()), None),
        Slot::Loading { .. } => (SlotState::Loading, 0, None, None),
        Slot::Ready {
            instance,
            in_flight,
        } => (
            SlotState::Ready,
            *in_flight,
            None,
            Some(Arc::clone(instance)),
        ),
        Slot::Unloading => (SlotState::Unloading, 0, None, None),
    };
    let snap = ModelSnapshot {
        spec: e.spec.clone(),
        state,
        worker_pid: None,
        resident_bytes: 0,
        in_flight,
        last_error,
        loads_started: e.loads_started,
    };
    (snap, instance)
}

fn finish_row<I: Instance>(mut snap: ModelSnapshot, instance: Option<Arc<I>>) -> ModelSnapshot {
    if let Some(inst) = instance {
        snap.worker_pid = inst.pid();
        snap.resident_bytes = inst.resident_bytes();
    }
    snap
}

/// A request's claim on a resident model. While any lease on a model exists, the pool
/// does not unload it. Dropping the lease releases the claim.
pub struct Lease<B: Backend> {
    pool: Arc<Inner<B>>,
    id: String,
    instance: Arc<B::Instance>,
    load_wait: Duration,
    cold_start: bool,
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
}

impl<B: Backend> Drop for Lease<B> {
    fn drop(&mut self) {
        let mut st = self.pool.lock();
        if let Some(Entry {
            slot: Slot::Ready { in_flight, .. },
            ..
        }) = st.models.get_mut(&self.id)
        {
            *in_flight = in_flight.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests;
