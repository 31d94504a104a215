//! Admission: predicting what a load will cost at each precision it may use, and
//! admitting it at the first one that fits (evicting LRU victims, or swapping within
//! its group), then spawning the load.
//!
//! A model quantized at load lists precisions best first; when the best does not fit
//! even with every evictable model gone, the next one is tried, as an operator would
//! drop to 8-bit when memory is short. The chosen precision is reported in status and
//! in the load's events.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::state::{Loading, State};
use super::{lifecycle, sharing, swap, tiers, LoadOutcome, Pool};
use crate::events::EvictReason;
use crate::groups::SwapPlan;
use crate::memory::DeviceMemory;
use crate::sharing::FileId;
use crate::spec::NATIVE_PRECISION;
use crate::turns::{TurnPlan, Why};
use crate::{
    Backend, BackendError, Charge, Device, Footprint, Instance, PoolError, Quantized, Source,
};

/// A precision a load may use and what the load would cost at it.
pub(super) type Candidate = (Option<String>, Footprint);

/// What admitting a model comes to, for the requests waiting for it.
pub(super) enum Admission {
    /// Its load runs; every waiter hears the outcome here.
    Loading(watch::Receiver<LoadOutcome>),
    /// Not yet: look again when the pool's room changes, or after `retry_in`. `eta`
    /// bounds from below how long until it is served, when its turn order tells.
    Wait {
        why: String,
        retry_in: Option<Duration>,
        eta: Option<Duration>,
    },
}

/// What admission decided for one candidate.
enum Decision {
    /// Start now, after stopping these victims (`forced` ones make room in a group).
    Start {
        victims: Vec<String>,
        forced: Vec<String>,
        swapping: Option<usize>,
    },
    /// Drain these members of its group first.
    Drain { group: usize, victims: Vec<String> },
    /// Its turn in the pool: drain these models first.
    Turn { victims: Vec<String> },
    /// Not yet; `for_room` when it waits for room in the pool (not in its group).
    Wait {
        why: String,
        retry_in: Option<Duration>,
        eta: Option<Duration>,
        for_room: bool,
    },
}

impl<B: Backend> Pool<B> {
    /// The model's predicted footprint at each precision it may use (best first), read
    /// from the file its next load reads (found or fetched first) and cached per file;
    /// `None` when it is resident or loading (no prediction needed).
    pub(super) async fn prediction(&self, id: &str) -> Result<Option<Vec<Candidate>>, PoolError> {
        let spec = {
            let mut st = self.inner.lock();
            let entry = st.entry(id)?;
            if !entry.life.is_cold() {
                return Ok(None);
            }
            entry.spec.clone()
        };
        let resolved = tiers::resolve(&self.inner, &spec).await?;
        let file_id = FileId::of(&resolved.file);
        {
            let mut st = self.inner.lock();
            let entry = st.entry(id)?;
            if entry.spec == spec
                && entry.resolved.as_ref() == Some(&resolved)
                && !entry.candidates.is_empty()
            {
                return Ok(Some(entry.candidates.clone()));
            }
        }
        let precisions = spec.candidate_precisions();
        let mut local = spec.clone();
        local.source = Source::Path(resolved.file.clone());
        let predicted = self.inner.backend.footprints(&local, &precisions);
        let predicted = predicted.and_then(|footprints| {
            if footprints.len() == precisions.len() {
                Ok(footprints)
            } else {
                Err(BackendError::Failed(format!(
                    "the backend predicted {} footprints for {} precisions",
                    footprints.len(),
                    precisions.len()
                )))
            }
        });
        let footprints = predicted.map_err(|source| {
            let mut st = self.inner.lock();
            if let Ok(e) = st.entry(id) {
                // A model that got a worker meanwhile keeps it.
                let _ = e.life.fail(source.to_string());
            }
            PoolError::LoadFailed {
                id: id.to_owned(),
                source,
            }
        })?;
        let candidates: Vec<Candidate> = precisions.into_iter().zip(footprints).collect();
        let grown = self.grown_prediction(&local);
        let mut st = self.inner.lock();
        if let Ok(e) = st.entry(id) {
            if e.spec == spec {
                e.grown_candidate = grown;
                e.prediction = candidates.first().map(|(_, fp)| fp.clone());
                e.candidates = candidates.clone();
                e.resolved = Some(resolved);
                e.file_id = file_id;
            }
        }
        Ok(Some(candidates))
    }

    /// The footprint at the KV budget's most, for a model whose budget may grow; `None`
    /// when it may not, or when that cannot be predicted (it then never grows).
    fn grown_prediction(&self, local: &crate::ModelSpec) -> Option<(u32, Footprint)> {
        let llama = &local.engine.llama_cpp;
        let max = llama.kv_budget_max_tokens?;
        if llama.kv_budget_tokens? >= max {
            return None;
        }
        let mut grown = local.clone();
        grown.engine.llama_cpp.kv_budget_tokens = Some(max);
        match self.inner.backend.footprint(&grown) {
            Ok(fp) => Some((max, fp)),
            Err(e) => {
                tracing::warn!(model = %local.id, error = %e, "no prediction at kv_budget_max: its KV budget stays");
                None
            }
        }
    }

    /// A bigger KV budget for this load, when the model's demand outgrows its own and
    /// the grown footprint fits in room that is spare: nothing stopped or drained for
    /// it, no group swap. Its tokens, footprint and decision.
    fn grown_choice(
        &self,
        st: &State<B::Instance>,
        id: &str,
        available: &[DeviceMemory],
    ) -> Option<(u32, Footprint, Decision)> {
        let entry = st.models.get(id)?;
        let (tokens, footprint) = entry.grown_candidate.clone()?;
        let llama = &entry.spec.engine.llama_cpp;
        let demand = (entry.interest + entry.in_flight).max(entry.demand_peak);
        crate::kv_growth::grown_budget(
            llama.kv_budget_tokens?,
            tokens,
            entry.spec.context_length,
            demand,
        )?;
        match self.decide(st, id, &footprint, available, false) {
            Ok(Decision::Start {
                victims,
                forced,
                swapping: None,
            }) if victims.is_empty() && forced.is_empty() => Some((
                tokens,
                footprint,
                Decision::Start {
                    victims,
                    forced,
                    swapping: None,
                },
            )),
            _ => None,
        }
    }

    /// What admitting `id` at `footprint` takes; an error when it cannot fit now, or
    /// with `turns`, when it cannot fit even with every unpinned model gone.
    fn decide(
        &self,
        st: &State<B::Instance>,
        id: &str,
        footprint: &Footprint,
        available: &[DeviceMemory],
        turns: bool,
    ) -> Result<Decision, PoolError> {
        let mut forced = Vec::new();
        let mut swapping = None;
        let file_id = st.models.get(id).and_then(|e| e.file_id);
        let (own, mapped) = sharing::split(footprint, file_id);
        // Pages of a file another model maps already cost the group nothing more.
        let shared = mapped.filter(|m| st.mapped_by_another(id, m.file));
        let group_bytes = footprint.total_bytes() - shared.map_or(0, |m| m.bytes);
        if let Some((group, plan)) = st.plan_in_group(id, group_bytes) {
            match plan {
                SwapPlan::Fits => {}
                SwapPlan::Evict(victims) => {
                    forced = victims;
                    swapping = Some(group);
                }
                SwapPlan::Drain(victims) => return Ok(Decision::Drain { group, victims }),
                SwapPlan::Wait { reason, retry_in } => {
                    tracing::trace!(model = %id, %reason, "waiting for the group");
                    return Ok(Decision::Wait {
                        why: format!("waiting for its turn in its group: {reason}"),
                        retry_in,
                        eta: None,
                        for_room: false,
                    });
                }
                SwapPlan::Never(reason) => {
                    return Err(PoolError::GroupFull {
                        id: id.to_owned(),
                        reason,
                    })
                }
            }
        }
        let headroom_bytes = self.inner.config.headroom_bytes;
        let shortfall = match st.admit(id, (&own, mapped), available, headroom_bytes, &forced) {
            Ok(victims) => {
                return Ok(Decision::Start {
                    victims,
                    forced,
                    swapping,
                })
            }
            Err(shortfall) => shortfall,
        };
        let refused = || PoolError::InsufficientMemory {
            id: id.to_owned(),
            shortfall: shortfall.clone(),
            precisions_tried: Vec::new(),
        };
        if !turns {
            return Err(refused());
        }
        let policy = &self.inner.config.turns;
        match st.plan_turn(id, (&own, mapped), available, headroom_bytes, policy) {
            TurnPlan::Never(_) => Err(refused()),
            TurnPlan::Drain(victims) => Ok(Decision::Turn { victims }),
            TurnPlan::Wait { why, retry_in, eta } => Ok(Decision::Wait {
                why: why.to_string(),
                retry_in,
                eta,
                for_room: true,
            }),
        }
    }

    /// Admits `id` at the first precision that fits now (evicting idle LRU victims if
    /// needed), marks it loading and spawns the load. When none fits now, the first
    /// that fits once busy unpinned models stop waits for room (and takes a turn when
    /// it has waited long enough). Fails at once, evicting nothing, when the model
    /// cannot fit at any precision even with every unpinned model gone.
    pub(super) fn start_load(
        &self,
        st: &mut State<B::Instance>,
        id: &str,
        candidates: Vec<Candidate>,
        available: &[DeviceMemory],
    ) -> Result<Admission, PoolError> {
        let entry = st.entry(id)?;
        if let Some((failures, retry_in)) = entry.backoff() {
            return Err(PoolError::CrashLoop {
                id: id.to_owned(),
                failures,
                last_error: entry.life.last_error().unwrap_or_default().to_owned(),
                retry_in,
            });
        }
        let tried = candidates.len();
        let tried_precisions: Vec<String> =
            candidates.iter().filter_map(|(p, _)| p.clone()).collect();
        let mut last_err = None;
        let mut chosen = None;
        let grown = self.grown_choice(st, id, available);
        let kv_grown = grown.as_ref().map(|(tokens, ..)| *tokens);
        if let Some((_, footprint, decision)) = grown {
            chosen = candidates
                .first()
                .map(|(precision, _)| (precision.clone(), footprint, decision));
        }
        // A precision that fits now before waiting for room at a better one.
        'passes: for turns in [false, true] {
            if chosen.is_some() {
                break;
            }
            for (precision, footprint) in &candidates {
                match self.decide(st, id, footprint, available, turns) {
                    Ok(decision) => {
                        chosen = Some((precision.clone(), footprint.clone(), decision));
                        break 'passes;
                    }
                    Err(e) => {
                        if let (Some(p), true) = (precision, turns) {
                            tracing::info!(model = %id, precision = %p, error = %e, "does not fit at this precision");
                        }
                        last_err = Some(e);
                    }
                }
            }
        }
        let Some((precision, footprint, decision)) = chosen else {
            let mut err = last_err.unwrap_or(PoolError::ShuttingDown);
            if let PoolError::InsufficientMemory {
                precisions_tried, ..
            } = &mut err
            {
                *precisions_tried = tried_precisions;
            }
            tracing::warn!(model = %id, precisions_tried = tried, error = %err, "model does not fit");
            return Err(err);
        };
        let (victims, forced, swapping) = match decision {
            Decision::Start {
                victims,
                forced,
                swapping,
            } => (victims, forced, swapping),
            Decision::Drain { group, victims } => {
                let spec = &st.groups[group].spec;
                let why = swap::DrainFor::Swap {
                    group: spec.name.clone(),
                };
                let timeout = spec.drain_timeout;
                if swap::begin_drain(&self.inner, st, &victims, id, timeout, why) {
                    swap::start_swap(&self.inner, st, group, id);
                }
                let why = format!(
                    "waiting for its turn in its group: {} draining for it",
                    victims.join(", ")
                );
                return Ok(waiting(st, id, why, None, None, false));
            }
            Decision::Turn { victims } => {
                swap::start_turn(&self.inner, st, id, victims.clone());
                let why = Why::Draining { victims }.to_string();
                let eta = st.models.get(id).and_then(|e| e.last_load);
                return Ok(waiting(st, id, why, None, eta, true));
            }
            Decision::Wait {
                why,
                retry_in,
                eta,
                for_room,
            } => return Ok(waiting(st, id, why, retry_in, eta, for_room)),
        };
        if let Some(group) = swapping {
            swap::start_swap(&self.inner, st, group, id);
        }
        // Drains for this model that this load does not need stop: those models stay.
        for (m, e) in st.models.iter_mut() {
            if !victims.contains(m) {
                let _ = e.life.call_off_drain(Some(id));
            }
        }
        let evicted: Vec<_> = victims
            .into_iter()
            .filter_map(|v| {
                let drained = st
                    .models
                    .get(&v)
                    .and_then(|e| e.life.draining_for().map(str::to_owned));
                let for_model = id.to_owned();
                let reason = if forced.contains(&v) {
                    EvictReason::Swap { for_model }
                } else if drained.as_deref() == Some(id) {
                    EvictReason::Turn { for_model }
                } else {
                    EvictReason::MakeRoom { for_model }
                };
                st.take_ready(&v)
                    .map(|(inst, charge)| (v, inst, reason, charge))
            })
            .collect();
        // The victims stay charged until their workers exit; the load is charged only
        // what they do not cover, and takes over their bytes as each exits (see
        // `finish_unload`), so the books never count the same room twice. Its file's
        // pages are charged apart, once with the other models mapping that file.
        let file_id = st.models.get(id).and_then(|e| e.file_id);
        let (own, mapped) = sharing::split(&footprint, file_id);
        let victim_ids: Vec<String> = evicted.iter().map(|(v, ..)| v.clone()).collect();
        // A file nobody staying maps is handed over like the rest: charged in `target`
        // as the victims free room, counted as mapped once the last one has exited.
        let file_pending = !victim_ids.is_empty()
            && mapped.is_some_and(|m| !st.mapped_by_staying(id, m.file, &victim_ids));
        let (target, freed_files) = if file_pending {
            let mut target = own.clone();
            target.add(&Charge::on(Device::Cpu, mapped.map_or(0, |m| m.bytes)));
            (target, st.files_freed_by(&victim_ids, None))
        } else {
            (own.clone(), st.files_freed_by(&victim_ids, mapped.as_ref()))
        };
        let mut covered = Charge::on(Device::Cpu, freed_files);
        for (victim, _, _, charge) in &evicted {
            covered.add(charge);
            st.handoffs
                .insert(victim.clone(), (id.to_owned(), target.clone()));
        }
        let evicted: Vec<_> = evicted
            .into_iter()
            .map(|(v, inst, reason, _)| (v, inst, reason))
            .collect();
        let store = self.inner.config.store.clone();
        let (tx, rx) = watch::channel(None);
        let entry = st.entry(id)?;
        entry.wanting_room_since = None;
        entry.waiting_why = None;
        let loading = Loading {
            done: rx.clone(),
            charge: target.saturating_sub(&covered),
            mapped,
            file_pending,
            retrying: None,
        };
        if let Err(refused) = entry.life.begin_load(loading) {
            tracing::error!(model = %id, %refused, "load started out of turn");
        }
        entry.loads_started += 1;
        entry.cut_reason = None;
        entry.demand_peak = 0;
        entry.note_demand(false);
        let configured_kv = entry.spec.engine.llama_cpp.kv_budget_tokens;
        entry.kv_budget_tokens = kv_grown.or(configured_kv);
        entry.kv_grown_from = kv_grown.and(configured_kv);
        entry.prediction = Some(footprint.clone());
        entry.precision = precision.clone();
        let mut spec = entry.spec.clone();
        let resolved = entry.resolved.clone();
        if let Some(r) = &resolved {
            spec.source = Source::Path(r.file.clone());
        }
        spec.precision = precision;
        spec.engine.llama_cpp.kv_budget_tokens = entry.kv_budget_tokens;
        // A model quantized at load reuses the quantized weights a previous load left in
        // the spill directory, or leaves them there for the next.
        let quantized = match (&store, &resolved, &spec.precision) {
            (Some(store), Some(r), Some(p))
                if spec.format.quantized_at_load() && p != NATIVE_PRECISION =>
            {
                r.key.as_deref().map(|source_key| {
                    let key = crate::store::quantized_key(source_key, p);
                    let q = match store.lookup(&key) {
                        Some(art) => Quantized::Reuse(art.path.clone()),
                        None => Quantized::Write(store.scratch_path(&key)),
                    };
                    (key, q)
                })
            }
            _ => None,
        };
        entry.quantized_key = quantized.as_ref().map(|(k, _)| k.clone());
        spec.quantized = quantized.map(|(_, q)| q);
        let epoch = entry.epoch;
        // The files this load reads stay in the spill directory from now on, not only
        // once it is resident: a spill committing meanwhile must not evict them from
        // under the starting worker. Released when the load fails, else when the worker
        // stops (`tiers::stopped`).
        let protected: Vec<String> = match &store {
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
        let inner = Arc::clone(&self.inner);
        tokio::spawn(async move {
            // The model is expected next: read its file while the victims stop.
            let warming = match (&resolved, evicted.is_empty()) {
                (Some(r), false) => Some(tokio::spawn(tiers::warm(r.file.clone()))),
                _ => None,
            };
            for (victim, instance, reason) in evicted {
                inner.stop_worker(&victim, &instance, reason).await;
            }
            if let Some(w) = warming {
                let _ = w.await;
            }
            // At most `max_loads_in_flight` workers start at once; the semaphore
            // lives as long as the pool.
            let _permit = Arc::clone(&inner.load_permits).acquire_owned().await;
            let outcome = lifecycle::run_load(&inner, &spec, epoch, footprint, resolved).await;
            if let (Err(_), Some(store)) = (&outcome, &store) {
                protected.iter().for_each(|k| store.release(k));
            }
            let _ = tx.send(Some(outcome));
            inner.kick();
        });
        Ok(Admission::Loading(rx))
    }
}

/// Records why `id`'s requests wait (and since when they want room) and tells them.
fn waiting<I: Instance>(
    st: &mut State<I>,
    id: &str,
    why: String,
    retry_in: Option<Duration>,
    eta: Option<Duration>,
    for_room: bool,
) -> Admission {
    if let Some(e) = st.models.get_mut(id) {
        if for_room {
            e.wanting_room_since.get_or_insert_with(Instant::now);
        }
        e.waiting_why = Some(why.clone());
    }
    Admission::Wait { why, retry_in, eta }
}
