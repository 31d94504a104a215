//! Turns: when more models are wanted than fit, which waiting model goes next and
//! which resident model drains for it. Pure: no clocks, no tokio; the pool hands it a
//! snapshot (durations already measured) and acts on the answer.
//!
//! The rule: a model whose requests have waited for room longer than the fairness
//! window takes the next turn, the longest-waiting first, one turn at a time. Its
//! victims are the least recently used unpinned models resident at least
//! `min_residency`: they take no new requests, their running ones finish (or are cut
//! at `drain_timeout`), they are evicted and the waiting model loads. The same
//! residency rule keeps group swaps from thrashing ([`crate::groups::plan_swap`]
//! calls [`residency_left`]).
//!
//! Bounds (property-tested below): with `k` models wanted and room for `s` unpinned,
//! a model waits at most `fairness_window + (k - s) * (min_residency + drain_timeout
//! + load)`; a slot changes hands at most once per `min_residency`, so a minute sees at
//! most `s * (60 s / min_residency + 1)` turns; pinned models are never drained.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::budget::{choose_victims, Need, Resident, Room, Shortfall};
use crate::Device;

/// How turns are given; the server reads it from `[pool]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TurnPolicy {
    /// How long a model's requests wait for room before it takes a turn.
    pub fairness_window: Duration,
    /// A model is not drained for a turn before it has been resident this long.
    pub min_residency: Duration,
    /// How long a drained model's running requests may finish before they are cut.
    pub drain_timeout: Duration,
}

impl Default for TurnPolicy {
    fn default() -> Self {
        Self {
            fairness_window: Duration::from_secs(3),
            min_residency: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// A ready model as turn choice sees it; lists of them are least recently used first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// `leases` counts requests running on it and waiting for it.
    pub resident: Resident,
    /// How long it has been ready.
    pub resident_for: Duration,
    /// Being drained already, for this model.
    pub draining_for: Option<String>,
}

/// A model whose requests wait for room.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiter {
    pub id: String,
    /// Since its requests first found no room.
    pub waited: Duration,
    /// Its last load's duration (zero before its first): the forecast for the next.
    pub load_estimate: Duration,
    /// Its turn has begun: victims are draining for it.
    pub turn_started: bool,
    /// The models drained for its turn that are still draining or stopping.
    pub draining: Vec<String>,
}

/// Why a model waits, as status shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Why {
    /// Within its fairness window, or its turn is blocked by loads and stops under way.
    Room,
    /// Its turn has begun; these models are draining for it.
    Draining { victims: Vec<String> },
    /// Another model's turn comes first.
    Behind { model: String },
    /// Its turn is due, but what could make room has not been resident long enough.
    Residency { model: String, left: Duration },
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Why::Room => f.write_str("waiting for room"),
            Why::Draining { victims } => write!(
                f,
                "waiting for room: its turn has begun ({} draining for it)",
                quoted(victims)
            ),
            Why::Behind { model } => write!(f, "waiting for its turn: `{model}` goes first"),
            Why::Residency { model, left } => write!(
                f,
                "waiting for its turn: `{model}` stays resident {:.1}s more (min_residency)",
                left.as_secs_f64()
            ),
        }
    }
}

fn quoted(ids: &[String]) -> String {
    let q: Vec<String> = ids.iter().map(|i| format!("`{i}`")).collect();
    q.join(", ")
}

/// What a waiting model should do now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TurnPlan {
    /// Its turn: drain these models (least recently used first), then load.
    Drain(Vec<String>),
    /// Not yet. Plan again when the pool changes or after `retry_in`; `eta` is a lower
    /// bound on how long until it is served, when its turn order makes one known.
    Wait {
        why: Why,
        retry_in: Option<Duration>,
        eta: Option<Duration>,
    },
    /// It cannot fit even with every unpinned model gone.
    Never(Shortfall),
}

/// What model `id`, needing `needed`, should do when it does not fit now.
///
/// `rooms` are the devices' budgets and reserved bytes, `holders` the ready models
/// least recently used first, `waiters` every model waiting for room (`id` among
/// them). Whether it could fit is judged with every unpinned model gone and nothing
/// reserved: loads and stops under way end.
pub fn plan_turn(
    policy: &TurnPolicy,
    rooms: &BTreeMap<Device, Room>,
    holders: &[Holder],
    waiters: &[Waiter],
    id: &str,
    needed: &Need,
) -> TurnPlan {
    if let Err(shortfall) = fits_when_all_unpinned_gone(rooms, holders, needed) {
        return TurnPlan::Never(shortfall);
    }
    let me = waiters.iter().find(|w| w.id == id);
    let waited = me.map_or(Duration::ZERO, |w| w.waited);
    let own_load = me.map_or(Duration::ZERO, |w| w.load_estimate);
    let wait = |why, retry_in, eta| TurnPlan::Wait { why, retry_in, eta };
    // One turn at a time.
    if let Some(running) = waiters.iter().find(|w| w.turn_started && w.id != id) {
        let eta = running.load_estimate + own_load;
        let why = Why::Behind {
            model: running.id.clone(),
        };
        return wait(why, None, Some(eta));
    }
    // Its own turn runs while what it drains is still going.
    if let Some(draining) = me.map(|w| &w.draining).filter(|d| !d.is_empty()) {
        let why = Why::Draining {
            victims: draining.clone(),
        };
        return wait(why, None, Some(own_load));
    }
    if waited < policy.fairness_window {
        return wait(Why::Room, Some(policy.fairness_window - waited), None);
    }
    // The longest-waiting first; ties by id.
    let order = |waited: Duration, id: &str| (waited, std::cmp::Reverse(id.to_owned()));
    let ahead: Vec<&Waiter> = waiters
        .iter()
        .filter(|w| w.waited >= policy.fairness_window)
        .filter(|w| order(w.waited, &w.id) > order(waited, id))
        .collect();
    if let Some(first) = ahead.iter().max_by_key(|w| order(w.waited, &w.id)) {
        let eta = ahead.iter().map(|w| w.load_estimate).sum::<Duration>() + own_load;
        let why = Why::Behind {
            model: first.id.clone(),
        };
        return wait(why, None, Some(eta));
    }
    drain_for_turn(policy, rooms, holders, needed, own_load)
}

/// Its turn: the holders to drain for it (unpinned, not draining for another, resident
/// for at least `min_residency`), or how long until enough of them are old enough.
fn drain_for_turn(
    policy: &TurnPolicy,
    rooms: &BTreeMap<Device, Room>,
    holders: &[Holder],
    needed: &Need,
    own_load: Duration,
) -> TurnPlan {
    let wait = |why, retry_in, eta| TurnPlan::Wait { why, retry_in, eta };
    let old_enough = |h: &Holder| residency_left(h.resident_for, policy.min_residency).is_none();
    let candidates = |residency_counts: bool| -> Vec<Resident> {
        holders
            .iter()
            .map(|h| {
                let mut r = h.resident.clone();
                let free =
                    !r.pinned && h.draining_for.is_none() && (!residency_counts || old_enough(h));
                r.leases = if free { 0 } else { r.leases.max(1) };
                r
            })
            .collect()
    };
    match choose_victims(rooms, &candidates(true), needed) {
        Ok(victims) if !victims.is_empty() => return TurnPlan::Drain(victims),
        Ok(_) => return wait(Why::Room, None, None),
        Err(_) => {}
    }
    // Not with what is old enough: when would it be?
    let Ok(victims) = choose_victims(rooms, &candidates(false), needed) else {
        return wait(Why::Room, None, None);
    };
    let young = holders
        .iter()
        .filter(|h| victims.contains(&h.resident.id))
        .filter_map(|h| Some((h, residency_left(h.resident_for, policy.min_residency)?)))
        .min_by_key(|(_, left)| *left);
    match young {
        Some((h, left)) => {
            let why = Why::Residency {
                model: h.resident.id.clone(),
                left,
            };
            wait(why, Some(left), Some(left + own_load))
        }
        None => wait(Why::Room, None, None),
    }
}

/// How much longer a model resident for `resident_for` must stay before it may be
/// drained or swapped out; `None` when it may go now.
pub fn residency_left(resident_for: Duration, min_residency: Duration) -> Option<Duration> {
    (resident_for < min_residency).then(|| min_residency - resident_for)
}

fn fits_when_all_unpinned_gone(
    rooms: &BTreeMap<Device, Room>,
    holders: &[Holder],
    needed: &Need,
) -> Result<(), Shortfall> {
    let empty: BTreeMap<Device, Room> = rooms
        .iter()
        .map(|(d, r)| {
            let room = Room {
                reserved_bytes: 0,
                ..*r
            };
            (*d, room)
        })
        .collect();
    let gone: Vec<Resident> = holders
        .iter()
        .map(|h| Resident {
            leases: 0,
            ..h.resident.clone()
        })
        .collect();
    // Files that loads and exiting workers map are unmapped when they end, too.
    let needed = Need {
        held: Vec::new(),
        ..needed.clone()
    };
    choose_victims(&empty, &gone, &needed).map(|_| ())
}

#[cfg(test)]
mod tests;
