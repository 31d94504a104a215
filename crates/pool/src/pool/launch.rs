//! Starting an admitted load: stopping its victims, passing their bytes to it, marking
//! it loading, and running it on a task of its own.
//!
//! Admission (`admission.rs`) decides; this module only carries a decision out. It does
//! not choose victims or precisions.

use std::sync::Arc;

use tokio::sync::watch;

use super::admission::Admission;
use super::state::{Entry, Loading, State};
use super::tiers::{self, Resolved};
use super::{lifecycle, sharing, Inner};
use crate::events::EvictReason;
use crate::sharing::Mapped;
use crate::store::Store;
use crate::NATIVE_PRECISION;
use crate::{Backend, Charge, Device, Footprint, ModelSpec, PoolError, Quantized, Source};

/// What admission chose for a load: its precision, its footprint there, and the KV
/// budget it grew to, when it grew.
pub(super) struct Chosen {
    pub precision: Option<String>,
    pub footprint: Footprint,
    pub kv_grown: Option<u32>,
}

/// A victim taken off the ready list for a load: its id, its worker, why it goes and
/// the bytes it still holds.
type Evicted<I> = (String, Arc<I>, EvictReason, Charge);

/// A load marked in the table, ready to run.
struct Job {
    spec: ModelSpec,
    epoch: u64,
    footprint: Footprint,
    resolved: Option<Resolved>,
    /// Spill-directory keys held for the load (released when it fails).
    protected: Vec<String>,
}

/// Stops `victims` (`forced` ones for a group swap) for `id`, marks `id` loading with
/// the bytes its victims do not cover, and spawns the load.
pub(super) fn launch<B: Backend>(
    inner: &Arc<Inner<B>>,
    st: &mut State<B::Instance>,
    id: &str,
    chosen: Chosen,
    victims: Vec<String>,
    forced: &[String],
) -> Result<Admission, PoolError> {
    // Drains for this model that this load does not need stop: those models stay.
    for (m, e) in st.models.iter_mut() {
        if !victims.contains(m) {
            let _ = e.life.call_off_drain(Some(id));
        }
    }
    let evicted = take_victims(st, id, victims, forced);
    let (charge, mapped, file_pending) = reserve(st, id, &chosen.footprint, &evicted);
    let (tx, rx) = watch::channel(None);
    let loading = Loading {
        done: rx.clone(),
        charge,
        mapped,
        file_pending,
        retrying: None,
    };
    let store = inner.config.store.clone();
    let job = mark_loading(st.entry(id)?, chosen, loading, store.as_ref());
    let evicted = evicted
        .into_iter()
        .map(|(v, instance, reason, _)| (v, instance, reason))
        .collect();
    spawn_load(Arc::clone(inner), job, evicted, store, tx);
    Ok(Admission::Loading(rx))
}

/// Takes each victim off the ready list (its bytes stay charged until it exits), with
/// why it goes: a group swap, a turn it drained for, or room.
fn take_victims<I: crate::Instance>(
    st: &mut State<I>,
    id: &str,
    victims: Vec<String>,
    forced: &[String],
) -> Vec<Evicted<I>> {
    victims
        .into_iter()
        .filter_map(|v| {
            let drained = st.models.get(&v).and_then(|e| e.life.draining_for());
            let for_model = id.to_owned();
            let reason = if forced.contains(&v) {
                EvictReason::Swap { for_model }
            } else if drained == Some(id) {
                EvictReason::Turn { for_model }
            } else {
                EvictReason::MakeRoom { for_model }
            };
            st.take_ready(&v)
                .map(|(inst, charge)| (v, inst, reason, charge))
        })
        .collect()
}

/// What the load is charged now, the file it maps, and whether that file's pages are
/// still being handed over.
///
/// The victims stay charged until their workers exit; the load is charged only what
/// they do not cover, and takes over their bytes as each exits (see `finish_unload`), so
/// the books never count the same room twice. Its file's pages are charged apart, once
/// with the other models mapping that file.
fn reserve<I: crate::Instance>(
    st: &mut State<I>,
    id: &str,
    footprint: &Footprint,
    evicted: &[Evicted<I>],
) -> (Charge, Option<Mapped>, bool) {
    let file_id = st.models.get(id).and_then(|e| e.file_id);
    let (own, mapped) = sharing::split(footprint, file_id);
    let victim_ids: Vec<String> = evicted.iter().map(|(v, ..)| v.clone()).collect();
    // A file nobody staying maps is handed over like the rest: charged in `target` as
    // the victims free room, counted as mapped once the last one has exited.
    let file_pending = !victim_ids.is_empty()
        && mapped.is_some_and(|m| !st.mapped_by_staying(id, m.file, &victim_ids));
    let (target, freed_files) = if file_pending {
        let mut target = own.clone();
        target.add(&Charge::on(Device::Cpu, mapped.map_or(0, |m| m.bytes)));
        (target, st.files_freed_by(&victim_ids, None))
    } else {
        (own, st.files_freed_by(&victim_ids, mapped.as_ref()))
    };
    let mut covered = Charge::on(Device::Cpu, freed_files);
    for (victim, _, _, charge) in evicted {
        covered.add(charge);
        st.handoffs
            .insert(victim.clone(), (id.to_owned(), target.clone()));
    }
    (target.saturating_sub(&covered), mapped, file_pending)
}

/// Moves the entry to `Loading` and notes what this load is: its precision, its KV
/// budget, the quantized weights it reuses or writes, and the spill files it holds.
fn mark_loading<I>(
    entry: &mut Entry<I>,
    chosen: Chosen,
    loading: Loading,
    store: Option<&Arc<Store>>,
) -> Job {
    let id = entry.spec.id.clone();
    if let Err(refused) = entry.life.begin_load(loading) {
        tracing::error!(model = %id, %refused, "load started out of turn");
    }
    entry.wanting_room_since = None;
    entry.waiting_why = None;
    entry.loads_started += 1;
    entry.cut_reason = None;
    entry.demand_peak = 0;
    entry.note_demand(false);
    let configured_kv = entry.spec.engine.llama_cpp.kv_budget_tokens;
    entry.kv_budget_tokens = chosen.kv_grown.or(configured_kv);
    entry.kv_grown_from = chosen.kv_grown.and(configured_kv);
    entry.prediction = Some(chosen.footprint.clone());
    entry.precision = chosen.precision.clone();
    let mut spec = entry.spec.clone();
    let resolved = entry.resolved.clone();
    if let Some(r) = &resolved {
        spec.source = Source::Path(r.file.clone());
    }
    spec.precision = chosen.precision;
    spec.engine.llama_cpp.kv_budget_tokens = entry.kv_budget_tokens;
    let quantized = quantized_weights(store, resolved.as_ref(), &spec);
    entry.quantized_key = quantized.as_ref().map(|(k, _)| k.clone());
    spec.quantized = quantized.map(|(_, q)| q);
    // The files this load reads stay in the spill directory from now on, not only once
    // it is resident: a spill committing meanwhile must not evict them from under the
    // starting worker. Released when the load fails, else when the worker stops
    // (`tiers::stopped`).
    let protected: Vec<String> = match store {
        Some(store) => {
            let keys: Vec<String> = [
                resolved.as_ref().and_then(|r| r.key.clone()),
                entry.quantized_key.clone(),
            ]
            .into_iter()
            .flatten()
            .collect();
            keys.iter().for_each(|k| store.protect(k));
            keys
        }
        None => Vec::new(),
    };
    Job {
        spec,
        epoch: entry.epoch,
        footprint: chosen.footprint,
        resolved,
        protected,
    }
}

/// For a model quantized at load: the spill key of its quantized weights, and whether
/// a previous load left them there to reuse or this one writes them for the next.
fn quantized_weights(
    store: Option<&Arc<Store>>,
    resolved: Option<&Resolved>,
    spec: &ModelSpec,
) -> Option<(String, Quantized)> {
    let (store, source_key, precision) = (
        store?,
        resolved?.key.as_deref()?,
        spec.precision.as_deref()?,
    );
    if !spec.format.quantized_at_load() || precision == NATIVE_PRECISION {
        return None;
    }
    let key = crate::store::quantized_key(source_key, precision);
    let quantized = match store.lookup(&key) {
        Some(art) => Quantized::Reuse(art.path.clone()),
        None => Quantized::Write(store.scratch_path(&key)),
    };
    Some((key, quantized))
}

/// Runs the load on a task of its own: stops the victims (reading the model's file
/// meanwhile), waits for a load permit, loads, and tells every waiter the outcome.
fn spawn_load<B: Backend>(
    inner: Arc<Inner<B>>,
    job: Job,
    evicted: Vec<(String, Arc<B::Instance>, EvictReason)>,
    store: Option<Arc<Store>>,
    tx: watch::Sender<super::LoadOutcome>,
) {
    tokio::spawn(async move {
        // The model is expected next: read its file while the victims stop.
        let warming = match (&job.resolved, evicted.is_empty()) {
            (Some(r), false) => Some(tokio::spawn(tiers::warm(r.file.clone()))),
            _ => None,
        };
        for (victim, instance, reason) in evicted {
            inner.stop_worker(&victim, &instance, reason).await;
        }
        if let Some(w) = warming {
            let _ = w.await;
        }
        // At most `max_loads_in_flight` workers start at once; the semaphore lives as
        // long as the pool.
        let _permit = Arc::clone(&inner.load_permits).acquire_owned().await;
        let Job {
            spec,
            epoch,
            footprint,
            resolved,
            protected,
        } = job;
        let outcome = lifecycle::run_load(&inner, &spec, epoch, footprint, resolved).await;
        if let (Err(_), Some(store)) = (&outcome, &store) {
            protected.iter().for_each(|k| store.release(k));
        }
        let _ = tx.send(Some(outcome));
        inner.kick();
    });
}
