//! Swaps and turns inside the pool: which group a model belongs to, asking the pure
//! planners ([`plan_swap`](crate::groups::plan_swap) for a group,
//! [`plan_turn`](crate::turns::plan_turn) for the whole pool) what a load needs,
//! draining an outgoing model off the request path (one mechanism for both), and
//! counting swaps and turns for status and thrash control.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::life::Phase;
use super::state::{State, Turn};
use super::Inner;
use crate::budget::Need;
use crate::events::{EventKind, EvictReason};
use crate::groups::{plan_swap, GroupSpec, Member, SwapPlan};
use crate::memory::DeviceMemory;
use crate::sharing::Mapped;
use crate::turns::{plan_turn, Holder, TurnPlan, TurnPolicy, Waiter};
use crate::{Backend, Charge, Instance};

/// When recent swaps or turns started (the last minute's, for the rate), and how many
/// there have been.
#[derive(Default)]
pub(super) struct SwapRate {
    recent: VecDeque<Instant>,
    pub total: u64,
}

impl SwapRate {
    pub fn record(&mut self) {
        let now = Instant::now();
        self.recent.push_back(now);
        self.total += 1;
        self.trim(now);
    }

    fn trim(&mut self, now: Instant) {
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(60))
        {
            self.recent.pop_front();
        }
    }

    pub fn last_minute(&mut self) -> u64 {
        self.trim(Instant::now());
        self.recent.len() as u64
    }
}

/// A group's running state.
pub(super) struct GroupState {
    pub spec: GroupSpec,
    pub swaps: SwapRate,
}

impl GroupState {
    pub fn new(spec: GroupSpec) -> Self {
        Self {
            spec,
            swaps: SwapRate::default(),
        }
    }
}

/// A group as status shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupStatus {
    pub spec: GroupSpec,
    /// Members ready, loading or stopping.
    pub resident: Vec<String>,
    pub resident_bytes: u64,
    pub swaps_total: u64,
    pub swaps_last_minute: u64,
}

impl<I: Instance> State<I> {
    /// The index of `id`'s group, if it has one.
    pub fn group_of(&self, id: &str) -> Option<usize> {
        self.groups
            .iter()
            .position(|g| g.spec.members.iter().any(|m| m == id))
    }

    /// What loading `id` (needing `needed_bytes`) takes in its group.
    pub fn plan_in_group(&self, id: &str, needed_bytes: u64) -> Option<(usize, SwapPlan)> {
        let g = self.group_of(id)?;
        let spec = &self.groups[g].spec;
        // Least recently used first: ready members in LRU order, then the rest.
        let mut order: Vec<&String> = self.lru.iter().rev().map(|(k, ())| k).collect();
        order.extend(self.models.keys().filter(|k| !self.lru.contains(*k)));
        let members: Vec<Member> = order
            .into_iter()
            .filter(|m| *m != id && spec.members.contains(m))
            .filter_map(|m| {
                let e = self.models.get(m)?;
                let shared = self.file_bytes_shown_on(m);
                let bytes = e.life.charge()?.total() + shared;
                let (transitional, resident_for) = match e.life.phase() {
                    Phase::Ready => (false, e.ready_since.elapsed()),
                    Phase::Draining => (true, e.ready_since.elapsed()),
                    _ => (true, Duration::ZERO),
                };
                Some(Member {
                    id: m.clone(),
                    transitional,
                    bytes,
                    in_flight: e.in_flight,
                    waiting: e.interest,
                    pinned: e.spec.pinned,
                    resident_for,
                })
            })
            .collect();
        Some((g, plan_swap(spec, &members, needed_bytes)))
    }

    pub fn group_status(&mut self) -> Vec<GroupStatus> {
        let mut out = Vec::with_capacity(self.groups.len());
        for g in 0..self.groups.len() {
            let spec = self.groups[g].spec.clone();
            let mut resident = Vec::new();
            let mut resident_bytes = 0;
            for m in &spec.members {
                if let Some(charge) = self.models.get(m).and_then(|e| e.life.charge()) {
                    resident.push(m.clone());
                    resident_bytes += charge.total() + self.file_bytes_shown_on(m);
                }
            }
            let gs = &mut self.groups[g];
            out.push(GroupStatus {
                spec,
                resident,
                resident_bytes,
                swaps_total: gs.swaps.total,
                swaps_last_minute: gs.swaps.last_minute(),
            });
        }
        out
    }
}

impl<I: Instance> State<I> {
    /// What a turn for `id`, needing `needed` and mapping `mapped`, would do now (see
    /// [`plan_turn`]).
    pub fn plan_turn(
        &self,
        id: &str,
        (needed, mapped): (&Charge, Option<Mapped>),
        available: &[DeviceMemory],
        headroom_bytes: u64,
        policy: &TurnPolicy,
    ) -> TurnPlan {
        let residents = self.residents();
        let rooms = self.rooms(&residents, available, headroom_bytes, id);
        let holders: Vec<Holder> = residents
            .into_iter()
            .filter_map(|resident| {
                let e = self.models.get(&resident.id)?;
                Some(Holder {
                    resident,
                    resident_for: e.ready_since.elapsed(),
                    draining_for: e.life.draining_for().map(str::to_owned),
                })
            })
            .collect();
        let waiters: Vec<Waiter> = self
            .models
            .iter()
            .filter(|(_, e)| e.life.is_cold() && e.interest > 0)
            .filter_map(|(m, e)| {
                Some(Waiter {
                    id: m.clone(),
                    waited: e.wanting_room_since?.elapsed(),
                    load_estimate: e.last_load.unwrap_or_default(),
                    turn_started: e.turn.is_some(),
                    draining: self.still_draining_for(m),
                })
            })
            .collect();
        let need = Need {
            charge: needed.clone(),
            mapped,
            held: self.held_files(id),
        };
        plan_turn(policy, &rooms, &holders, &waiters, id, &need)
    }
}

impl<I> State<I> {
    /// The models drained for `id`'s turn that have not stopped yet.
    fn still_draining_for(&self, id: &str) -> Vec<String> {
        let Some(turn) = self.models.get(id).and_then(|e| e.turn.as_ref()) else {
            return Vec::new();
        };
        let going = |v: &&String| match self.models.get(*v) {
            Some(e) => e.life.draining_for() == Some(id) || e.life.is_unloading(),
            None => false,
        };
        turn.victims.iter().filter(going).cloned().collect()
    }
}

/// What a drain makes room for.
pub(super) enum DrainFor {
    /// A swap into the model's group.
    Swap { group: String },
    /// The model's turn in the pool.
    Turn,
}

/// Marks `victims` as draining for `incoming` and drains each off the request path:
/// new requests for it queue (or, in a group that says so, are refused), and once it
/// has no request in flight, or `drain_timeout` has passed (its remaining requests then
/// end with `UNAVAILABLE` and the reason), its worker stops. The incoming load starts
/// when there is room. Returns whether any began draining now.
pub(super) fn begin_drain<B: Backend>(
    inner: &Arc<Inner<B>>,
    st: &mut State<B::Instance>,
    victims: &[String],
    incoming: &str,
    drain_timeout: Duration,
    why: DrainFor,
) -> bool {
    let mut started = false;
    for victim in victims {
        let Some(e) = st.models.get_mut(victim) else {
            continue;
        };
        if e.life.begin_drain(incoming).is_err() {
            // Draining for another model already, or not ready.
            continue;
        }
        started = true;
        let (cut, reason) = match &why {
            DrainFor::Swap { group } => (
                format!(
                    "model `{victim}` was swapped out of group `{group}` for `{incoming}` after the group's drain timeout of {:.0}s",
                    drain_timeout.as_secs_f64()
                ),
                EvictReason::Swap {
                    for_model: incoming.to_owned(),
                },
            ),
            DrainFor::Turn => (
                format!(
                    "model `{victim}` gave its turn to `{incoming}`, which waited for room, after pool.drain_timeout of {:.0}s",
                    drain_timeout.as_secs_f64()
                ),
                EvictReason::Turn {
                    for_model: incoming.to_owned(),
                },
            ),
        };
        tracing::info!(model = %victim, %incoming, ?drain_timeout, %reason, "draining");
        tokio::spawn(drain(
            Arc::clone(inner),
            victim.clone(),
            e.epoch,
            drain_timeout,
            cut,
            reason,
        ));
    }
    started
}

/// Waits (by notification) until `victim` has no request in flight or `drain_timeout`
/// has passed, then stops its worker.
async fn drain<B: Backend>(
    inner: Arc<Inner<B>>,
    victim: String,
    epoch: u64,
    drain_timeout: Duration,
    cut: String,
    reason: EvictReason,
) {
    let until = Instant::now() + drain_timeout;
    let mut changes = inner.room.subscribe();
    let instance = loop {
        changes.borrow_and_update();
        {
            let mut st = inner.lock();
            let Some(e) = st.entry_at(&victim, epoch) else {
                return;
            };
            if e.life.draining_for().is_none() {
                // Called off (the model it drained for found room elsewhere), or its
                // worker is gone already.
                return;
            }
            if e.in_flight == 0 || Instant::now() >= until {
                if e.in_flight > 0 {
                    tracing::warn!(model = %victim, in_flight = e.in_flight, "drain timeout: cutting requests still running");
                    e.cut_reason = Some(cut);
                }
                break st.take_ready(&victim).map(|(i, _)| i);
            }
        }
        let _ = tokio::time::timeout_at(until, changes.changed()).await;
    };
    if let Some(instance) = instance {
        inner.stop_worker(&victim, &instance, reason).await;
    }
}

/// Gives `incoming` its turn: counts it, drains `victims` for it and reports it.
pub(super) fn start_turn<B: Backend>(
    inner: &Arc<Inner<B>>,
    st: &mut State<B::Instance>,
    incoming: &str,
    victims: Vec<String>,
) {
    let policy = inner.config.turns;
    if !begin_drain(
        inner,
        st,
        &victims,
        incoming,
        policy.drain_timeout,
        DrainFor::Turn,
    ) {
        return;
    }
    st.turns.record();
    let Some(e) = st.models.get_mut(incoming) else {
        return;
    };
    let waited = e.wanting_room_since.map_or(Duration::ZERO, |t| t.elapsed());
    e.turn = Some(Turn {
        started: Instant::now(),
        waited,
        victims: victims.clone(),
    });
    tracing::info!(model = %incoming, outgoing = ?victims, ?waited, "turn started");
    inner.emit(
        incoming,
        EventKind::TurnStarted {
            outgoing: victims,
            waited,
        },
    );
}

/// Counts a swap into `incoming` and reports its start.
pub(super) fn start_swap<B: Backend>(
    inner: &Inner<B>,
    st: &mut State<B::Instance>,
    group: usize,
    incoming: &str,
) {
    st.groups[group].swaps.record();
    let group_name = st.groups[group].spec.name.clone();
    let outgoing: Vec<String> = st
        .models
        .iter()
        .filter(|(id, e)| {
            st.groups[group].spec.members.contains(id)
                && *id != incoming
                && (e.life.worker().is_some() || e.life.is_unloading())
        })
        .map(|(id, _)| id.clone())
        .collect();
    if let Some(e) = st.models.get_mut(incoming) {
        e.swap_in = Some(Instant::now());
    }
    inner.emit(
        incoming,
        EventKind::SwapStarted {
            group: group_name,
            outgoing,
        },
    );
}
