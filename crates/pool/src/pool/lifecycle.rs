//! The life of a worker after admission: loading it (with progress events), noticing
//! when it dies on its own, and unloading it when it has been idle past its TTL.

use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::state::{self, Lifecycle, Loading, State, Worker};
use super::tiers;
use super::{Inner, Pool};
use crate::events::{EventKind, EvictReason};
use crate::{Backend, BackendError, Charge, Device, Footprint, Instance, ModelSpec, PoolError};

/// Runs one load and records its result; returns what waiters should see.
pub(super) async fn run_load<B: Backend>(
    inner: &Arc<Inner<B>>,
    spec: &ModelSpec,
    epoch: u64,
    footprint: Footprint,
    resolved: Option<tiers::Resolved>,
) -> Result<(), PoolError> {
    let started = Instant::now();
    let progress = announce(inner, spec, &footprint, started);
    let result = inner.backend.load(spec, progress).await;
    let duration = started.elapsed();
    let recorded = {
        let mut st = inner.lock();
        record(inner, &mut st, spec, epoch, &footprint, result, duration)
    };
    if let Some(instance) = recorded.orphan {
        instance.shutdown().await;
    }
    if recorded.gone {
        tiers::discard_scratch(spec);
        return recorded.outcome;
    }
    let loaded = recorded.watched.is_some();
    if let Some(instance) = recorded.watched {
        if let Some(resolved) = &resolved {
            tiers::loaded(inner, &spec.id, resolved);
        }
        watch_worker(inner, spec.id.clone(), instance);
    }
    tiers::after_quantized_load(inner, spec, loaded);
    recorded.outcome
}

/// Logs and reports a load's start; returns where the backend reports its stages.
fn announce<B: Backend>(
    inner: &Arc<Inner<B>>,
    spec: &ModelSpec,
    footprint: &Footprint,
    started: Instant,
) -> crate::Progress {
    let predicted_bytes = footprint.total_bytes();
    let (expected, kv_grown_from) = inner
        .lock()
        .entry(&spec.id)
        .map_or((None, None), |e| (e.last_load, e.kv_grown_from));
    let kv_budget_tokens = spec.engine.llama_cpp.kv_budget_tokens;
    tracing::info!(model = %spec.id, predicted_bytes, ?expected, precision = ?spec.precision, ?kv_budget_tokens, ?kv_grown_from, "load started");
    inner.emit(
        &spec.id,
        EventKind::LoadStarted {
            predicted_bytes,
            precision: spec.precision.clone(),
            expected,
            kv_budget_tokens,
            kv_grown_from,
        },
    );
    let inner = Arc::downgrade(inner);
    let id = spec.id.clone();
    Arc::new(move |stage: &str| {
        if let Some(inner) = inner.upgrade() {
            tracing::debug!(model = %id, stage, "load progress");
            let kind = EventKind::LoadProgress {
                stage: stage.to_owned(),
                elapsed: started.elapsed(),
                expected,
            };
            inner.emit(&id, kind);
        }
    })
}

/// What a finished load left to do outside the lock.
struct Recorded<I> {
    outcome: Result<(), PoolError>,
    /// A worker nothing will serve (the pool is shutting down, or the model is gone).
    orphan: Option<I>,
    /// The new worker, to watch for crashes.
    watched: Option<Arc<I>>,
    /// The model was removed while it loaded.
    gone: bool,
}

/// Records a load's result in the table: the model becomes ready, or failed.
fn record<B: Backend>(
    inner: &Arc<Inner<B>>,
    st: &mut State<B::Instance>,
    spec: &ModelSpec,
    epoch: u64,
    footprint: &Footprint,
    result: Result<B::Instance, BackendError>,
    duration: Duration,
) -> Recorded<B::Instance> {
    let shutting_down = st.shutting_down;
    let mut recorded = Recorded {
        outcome: Ok(()),
        orphan: None,
        watched: None,
        gone: false,
    };
    let Some(entry) = st.entry_at(&spec.id, epoch) else {
        // Retired and forgotten while it loaded (perhaps registered anew since):
        // nothing will serve this worker.
        recorded.gone = true;
        recorded.orphan = result.ok();
        recorded.outcome = Err(PoolError::NotFound {
            id: spec.id.clone(),
            known: String::new(),
        });
        return recorded;
    };
    match result {
        Ok(instance) if !shutting_down => {
            let instance = Arc::new(instance);
            recorded.watched = Some(Arc::clone(&instance));
            become_ready(inner, st, spec, footprint, instance, duration);
        }
        Ok(instance) => {
            recorded.orphan = Some(instance);
            let _ = entry.life.abandon_load();
            recorded.outcome = Err(PoolError::ShuttingDown);
        }
        Err(source) => {
            tracing::warn!(model = %spec.id, error = %source, "load failed");
            if !matches!(source, BackendError::InvalidModel(_)) {
                entry.record_failure();
            }
            let _ = entry.life.fail(source.to_string());
            entry.swap_in = None;
            entry.turn = None;
            inner.emit(
                &spec.id,
                EventKind::LoadFailed {
                    duration,
                    error: source.to_string(),
                },
            );
            recorded.outcome = Err(PoolError::LoadFailed {
                id: spec.id.clone(),
                source,
            });
        }
    }
    recorded
}

/// A loaded worker becomes the model's: its measured bytes replace the prediction,
/// it joins the LRU list, and the turn or swap that brought it in is reported done.
fn become_ready<B: Backend>(
    inner: &Arc<Inner<B>>,
    st: &mut State<B::Instance>,
    spec: &ModelSpec,
    footprint: &Footprint,
    instance: Arc<B::Instance>,
    duration: Duration,
) {
    let Ok(entry) = st.entry(&spec.id) else {
        return;
    };
    let measured = state::measure(inner.probe.as_ref(), instance.as_ref(), spec.device);
    // The file it maps, handed over or not (its victims have exited).
    let mapped = match &entry.life {
        Lifecycle::Loading(Loading { mapped, .. }) => *mapped,
        other => other.mapped().copied(),
    };
    let mut charge = state::charge_after_load(footprint, &measured, spec.device);
    // Its file's pages are charged apart (see `sharing`).
    if let Some(m) = mapped {
        let ram = charge.0.entry(Device::Cpu).or_default();
        *ram = ram.saturating_sub(m.bytes);
    }
    let base_predicted = footprint.at_load_bytes();
    let base_measured = measured.get(spec.device);
    let error_pct = state::error_pct(base_predicted, base_measured);
    tracing::info!(model = %spec.id, pid = ?instance.pid(),
        elapsed_ms = duration.as_millis() as u64, base_predicted, base_measured,
        prediction_error_pct = format!("{error_pct:+.1}"), "load finished");
    let worker = Worker {
        instance,
        charge,
        measured,
        loaded_at: SystemTime::now(),
        mapped,
    };
    if let Err(refused) = entry.life.finish_load(worker) {
        tracing::error!(model = %spec.id, %refused, "load finished out of turn");
    }
    entry.base_measured_bytes = base_measured;
    entry.ready_since = Instant::now();
    let turn = entry.turn.take();
    let swap = entry.swap_in.take();
    entry.swapped_in = swap.is_some();
    entry.last_load = Some(duration);
    entry.touch();
    st.lru.put(spec.id.clone(), ());
    if let Some(turn) = turn {
        let duration = turn.started.elapsed();
        tracing::info!(model = %spec.id, ?duration, waited = ?turn.waited, "turn finished");
        let waited = turn.waited;
        inner.emit(&spec.id, EventKind::TurnFinished { duration, waited });
    }
    if let (Some(since), Some(g)) = (swap, st.group_of(&spec.id)) {
        let group = st.groups[g].spec.name.clone();
        let duration = since.elapsed();
        let bytes = base_measured;
        inner.emit(
            &spec.id,
            EventKind::SwapFinished {
                group,
                duration,
                bytes,
            },
        );
    }
    let predicted_bytes = footprint.total_bytes();
    inner.emit(
        &spec.id,
        EventKind::LoadFinished {
            duration,
            predicted_bytes,
            measured_bytes: base_measured,
        },
    );
}

/// Notices a worker that dies on its own: its model becomes cold (the next request
/// loads it afresh), its bytes are released, and the crash is recorded for back-off.
fn watch_worker<B: Backend>(inner: &Arc<Inner<B>>, id: String, instance: Arc<B::Instance>) {
    let inner = Arc::downgrade(inner);
    tokio::spawn(async move {
        let how = instance.exited().await;
        let Some(inner) = inner.upgrade() else { return };
        let (freed_bytes, resolved) = {
            let mut st = inner.lock();
            let Ok(entry) = st.entry(&id) else { return };
            let same = entry
                .life
                .worker()
                .is_some_and(|w| Arc::ptr_eq(&w.instance, &instance));
            if !same {
                // Stopped by the pool (eviction, shutdown): not a crash.
                return;
            }
            let error = format!("worker exited unexpectedly: {how}");
            let Ok(Worker {
                mut charge, mapped, ..
            }) = entry.life.crash(error)
            else {
                return;
            };
            entry.record_failure();
            let resolved = (entry.resolved.clone(), entry.quantized_key.clone());
            st.lru.pop(&id);
            charge.add(&Charge::on(Device::Cpu, st.unmapped_bytes(mapped.as_ref())));
            (charge.total(), resolved)
        };
        inner.kick();
        tracing::warn!(model = %id, pid = ?instance.pid(), %how, "worker died; model is cold again");
        let reason = EvictReason::Crashed { detail: how };
        tiers::stopped(&inner, resolved.0.as_ref(), resolved.1.as_deref(), &reason);
        inner.emit(
            &id,
            EventKind::Evicted {
                reason,
                freed_bytes,
            },
        );
    });
}

/// Every 250 ms, evicts models idle past their TTL. Ends when the pool is dropped or
/// shuts down.
pub(super) async fn reap_idle<B: Backend>(inner: Weak<Inner<B>>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let expired: Vec<(String, Duration)> = {
            let st = inner.lock();
            if st.shutting_down {
                return;
            }
            st.models
                .iter()
                .filter_map(|(id, e)| {
                    let ttl = e.spec.idle_ttl?;
                    let idle = e.last_used.elapsed();
                    let idle_ready = e.life.worker().is_some()
                        && e.in_flight == 0
                        && e.interest == 0
                        && !e.spec.pinned;
                    (idle_ready && idle >= ttl).then(|| (id.clone(), idle))
                })
                .collect()
        };
        let pool = Pool { inner };
        for (id, idle) in expired {
            // A request may have arrived since; then `stop` refuses and that is right.
            let _ = pool.stop(&id, EvictReason::IdleTtl { idle }, false).await;
        }
    }
}
