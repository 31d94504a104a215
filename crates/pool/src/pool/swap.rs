//! Groups inside the pool: which group a model belongs to, asking the pure planner
//! ([`plan_swap`](crate::groups::plan_swap)) what a load into it needs, draining an
//! outgoing model off the request path, and counting swaps for status and thrash
//! control.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::state::{Slot, State};
use super::Inner;
use crate::events::{EventKind, EvictReason};
use crate::groups::{plan_swap, GroupSpec, Member, SwapPlan};
use crate::{Backend, Instance};

/// A group's running state.
pub(super) struct GroupState {
    pub spec: GroupSpec,
    /// When recent swaps started (the last minute's, for the rate).
    pub recent: VecDeque<Instant>,
    pub swaps_total: u64,
}

impl GroupState {
    pub fn new(spec: GroupSpec) -> Self {
        Self {
            spec,
            recent: VecDeque::new(),
            swaps_total: 0,
        }
    }

    pub fn record_swap(&mut self) {
        let now = Instant::now();
        self.recent.push_back(now);
        self.swaps_total += 1;
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

    pub fn swaps_last_minute(&mut self) -> u64 {
        self.trim(Instant::now());
        self.recent.len() as u64
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
                let (transitional, bytes, resident_for) = match &e.slot {
                    Slot::Absent => return None,
                    Slot::Loading { charge, .. } | Slot::Unloading { charge } => {
                        (true, charge.total(), Duration::ZERO)
                    }
                    Slot::Ready {
                        charge, loaded_at, ..
                    } => (
                        e.swap_out.is_some(),
                        charge.total(),
                        SystemTime::now()
                            .duration_since(*loaded_at)
                            .unwrap_or_default(),
                    ),
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
                match self.models.get(m).map(|e| &e.slot) {
                    Some(Slot::Loading { charge, .. })
                    | Some(Slot::Ready { charge, .. })
                    | Some(Slot::Unloading { charge }) => {
                        resident.push(m.clone());
                        resident_bytes += charge.total();
                    }
                    _ => {}
                }
            }
            let gs = &mut self.groups[g];
            out.push(GroupStatus {
                spec,
                resident,
                resident_bytes,
                swaps_total: gs.swaps_total,
                swaps_last_minute: gs.swaps_last_minute(),
            });
        }
        out
    }
}

/// Marks `victims` as swapping out for `incoming` and drains each off the request
/// path: once it has no request in flight, or the group's drain timeout has passed
/// (its remaining requests then end with `UNAVAILABLE` and the reason), its worker
/// stops. The incoming load starts when the group has room.
pub(super) fn begin_drain<B: Backend>(
    inner: &Arc<Inner<B>>,
    st: &mut State<B::Instance>,
    group: usize,
    victims: Vec<String>,
    incoming: &str,
) {
    let drain_timeout = st.groups[group].spec.drain_timeout;
    let mut started = false;
    for victim in victims {
        let Some(e) = st.models.get_mut(&victim) else {
            continue;
        };
        if e.swap_out.is_some() {
            continue;
        }
        e.swap_out = Some(incoming.to_owned());
        started = true;
        tracing::info!(model = %victim, %incoming, ?drain_timeout, "draining for a swap");
        let inner = Arc::clone(inner);
        let incoming = incoming.to_owned();
        tokio::spawn(async move {
            let until = Instant::now() + drain_timeout;
            let instance = loop {
                {
                    let mut st = inner.lock();
                    let Some(e) = st.models.get_mut(&victim) else {
                        return;
                    };
                    if e.in_flight == 0 || Instant::now() >= until {
                        if e.in_flight > 0 {
                            e.cut_reason = Some(format!(
                                "model `{victim}` was swapped out for `{incoming}` after the group's drain timeout of {:.0}s",
                                drain_timeout.as_secs_f64()
                            ));
                        }
                        let taken = st.take_ready(&victim).map(|(i, _)| i);
                        if let Some(e) = st.models.get_mut(&victim) {
                            e.swap_out = None;
                        }
                        break taken;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            if let Some(instance) = instance {
                let reason = EvictReason::Swap {
                    for_model: incoming,
                };
                inner.stop_worker(&victim, &instance, reason).await;
            }
        });
    }
    if started {
        start_swap(inner, st, group, incoming);
    }
}

/// Counts a swap into `incoming` and reports its start.
pub(super) fn start_swap<B: Backend>(
    inner: &Inner<B>,
    st: &mut State<B::Instance>,
    group: usize,
    incoming: &str,
) {
    st.groups[group].record_swap();
    let group_name = st.groups[group].spec.name.clone();
    let outgoing: Vec<String> = st
        .models
        .iter()
        .filter(|(id, e)| {
            st.groups[group].spec.members.contains(id)
                && *id != incoming
                && matches!(e.slot, Slot::Ready { .. } | Slot::Unloading { .. })
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
