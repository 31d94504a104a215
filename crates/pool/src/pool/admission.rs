//! Admission: predicting what a load will cost at each precision it may use, and
//! admitting it at the first one that fits (evicting LRU victims, or swapping within
//! its group), then spawning the load.
//!
//! A model quantized at load lists precisions best first; when the best does not fit
//! even with every evictable model gone, the next one is tried, as an operator would
//! drop to 8-bit when memory is short. The chosen precision is reported in status and
//! in the load's events.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use std::sync::Arc;

use super::state::{Lifecycle, Loading, State};
use super::{launch, sharing, swap, tiers, LoadOutcome, Pool};
use crate::groups::SwapPlan;
use crate::memory::DeviceMemory;
use crate::sharing::FileId;
use crate::turns::{TurnPlan, Why};
use crate::{Backend, BackendError, Footprint, Instance, PoolError, Source};

/// A precision a load may use and what the load would cost at it.
pub(super) type Candidate = (Option<String>, Footprint);

/// What one look at a model gives a request waiting for it.
pub(super) enum Look<I> {
    /// Ready: its worker, with the request counted in flight.
    Ready(Arc<I>),
    Next(Admission),
}

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

    /// One look at `id` for a request of registration `epoch`: its worker when it is
    /// ready (the request is counted in flight), else what the request waits for,
    /// starting the load when the model is cold and its footprint is known.
    pub(super) fn look(
        &self,
        id: &str,
        epoch: u64,
        candidates: Option<Vec<Candidate>>,
        available: &[DeviceMemory],
    ) -> Result<Look<B::Instance>, PoolError> {
        let mut st = self.inner.lock();
        if st.shutting_down {
            return Err(PoolError::ShuttingDown);
        }
        let entry = st.entry(id)?;
        if entry.epoch != epoch {
            // Removed while this request waited, and registered anew since.
            return Err(PoolError::Retiring { id: id.to_owned() });
        }
        let next = match &entry.life {
            Lifecycle::Draining { incoming, .. } => {
                let incoming = incoming.clone();
                draining(&st, id, incoming)?
            }
            Lifecycle::Ready(worker) => {
                let instance = Arc::clone(&worker.instance);
                entry.in_flight += 1;
                entry.note_demand(true);
                st.lru.promote(id);
                return Ok(Look::Ready(instance));
            }
            Lifecycle::Loading(Loading { done, .. }) => Admission::Loading(done.clone()),
            Lifecycle::Registered | Lifecycle::Failed { .. } => match candidates {
                Some(candidates) => self.start_load(&mut st, id, candidates, available)?,
                // Predicted in the next round, outside the lock.
                None => Admission::Wait {
                    why: "predicting its footprint".into(),
                    retry_in: Some(Duration::ZERO),
                    eta: None,
                },
            },
            Lifecycle::Unloading { .. } => Admission::Wait {
                why: "its previous worker is still stopping".into(),
                retry_in: None,
                eta: None,
            },
        };
        Ok(Look::Next(next))
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
        let (chosen, decision) = self.choose(st, id, candidates, available)?;
        let Decision::Start {
            victims,
            forced,
            swapping,
        } = decision
        else {
            return Ok(self.defer(st, id, decision));
        };
        if let Some(group) = swapping {
            swap::start_swap(&self.inner, st, group, id);
        }
        launch::launch(&self.inner, st, id, chosen, victims, &forced)
    }

    /// The precision `id` loads at and what admitting it takes: a bigger KV budget
    /// when it may grow into spare room, else the first precision that fits now, else
    /// the first that fits once busy models stop. Refused while it is backed off after
    /// crashes, and when it fits at no precision.
    fn choose(
        &self,
        st: &mut State<B::Instance>,
        id: &str,
        candidates: Vec<Candidate>,
        available: &[DeviceMemory],
    ) -> Result<(launch::Chosen, Decision), PoolError> {
        let entry = st.entry(id)?;
        if let Some((failures, retry_in)) = entry.backoff() {
            return Err(PoolError::CrashLoop {
                id: id.to_owned(),
                failures,
                last_error: entry.life.last_error().unwrap_or_default().to_owned(),
                retry_in,
            });
        }
        if let Some((tokens, footprint, decision)) = self.grown_choice(st, id, available) {
            let precision = candidates.first().and_then(|(p, _)| p.clone());
            let chosen = launch::Chosen {
                precision,
                footprint,
                kv_grown: Some(tokens),
            };
            return Ok((chosen, decision));
        }
        let mut last_err = None;
        // A precision that fits now before waiting for room at a better one.
        for turns in [false, true] {
            for (precision, footprint) in &candidates {
                match self.decide(st, id, footprint, available, turns) {
                    Ok(decision) => {
                        let chosen = launch::Chosen {
                            precision: precision.clone(),
                            footprint: footprint.clone(),
                            kv_grown: None,
                        };
                        return Ok((chosen, decision));
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
        let mut err = last_err.unwrap_or(PoolError::ShuttingDown);
        if let PoolError::InsufficientMemory {
            precisions_tried, ..
        } = &mut err
        {
            *precisions_tried = candidates.iter().filter_map(|(p, _)| p.clone()).collect();
        }
        tracing::warn!(model = %id, precisions_tried = candidates.len(), error = %err, "model does not fit");
        Err(err)
    }

    /// Acts on a decision that does not start the load yet: drains group members or
    /// gives the model its turn, and tells its requests why they wait.
    fn defer(&self, st: &mut State<B::Instance>, id: &str, decision: Decision) -> Admission {
        match decision {
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
                waiting(st, id, why, None, None, false)
            }
            Decision::Turn { victims } => {
                swap::start_turn(&self.inner, st, id, victims.clone());
                let why = Why::Draining { victims }.to_string();
                let eta = st.models.get(id).and_then(|e| e.last_load);
                waiting(st, id, why, None, eta, true)
            }
            Decision::Wait {
                why,
                retry_in,
                eta,
                for_room,
            } => waiting(st, id, why, retry_in, eta, for_room),
            Decision::Start { .. } => unreachable!("a load that starts is not deferred"),
        }
    }
}

/// A request for a model draining for `incoming` waits for it to leave (a later round
/// loads it back), or is refused when its group says so.
fn draining<I: Instance>(
    st: &State<I>,
    id: &str,
    incoming: String,
) -> Result<Admission, PoolError> {
    let group = st.group_of(id);
    let refuse = group
        .is_some_and(|g| st.groups[g].spec.refuse_during_swap && st.group_of(&incoming) == Some(g));
    if refuse {
        return Err(PoolError::SwappingOut {
            id: id.to_owned(),
            incoming,
        });
    }
    Ok(Admission::Wait {
        why: format!("draining for model `{incoming}`"),
        retry_in: None,
        eta: None,
    })
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
