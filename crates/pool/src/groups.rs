//! Groups and swap slots: a set of models of which at most `max_resident` (and, when
//! the group has a byte share, at most that many bytes) are resident at once. A slot
//! of `max_resident = 1` holds one large model and swaps it for another on demand.
//!
//! [`plan_swap`] decides, purely, what a load into a group needs: nothing, idle
//! members to evict, busy members to drain first, a wait (a swap already running, or
//! the outgoing model not yet resident for `min_residency`, which is what keeps two
//! clients alternating between two large models from spending all the time loading),
//! or a refusal when the group can never hold the model.

use std::time::Duration;

use crate::budget::human_bytes;
use crate::turns::residency_left;

/// A group as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupSpec {
    pub name: String,
    pub members: Vec<String>,
    pub max_resident: u32,
    /// The group's own share of the budget, on top of the device budget.
    pub budget_bytes: Option<u64>,
    /// How long in-flight requests of an outgoing model may run before it is stopped.
    pub drain_timeout: Duration,
    /// A member is not swapped out before it has been resident this long.
    pub min_residency: Duration,
    /// New requests for an outgoing model are refused (`true`) or wait for it to come
    /// back (`false`).
    pub refuse_during_swap: bool,
}

/// A member of the group that is resident (or on its way in or out), as the planner
/// sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub id: String,
    /// Loading, or its worker still exiting: a swap is under way.
    pub transitional: bool,
    pub bytes: u64,
    /// Requests running on it now.
    pub in_flight: u32,
    /// Requests waiting for it (a slot or its load): they take a lease next.
    pub waiting: u32,
    pub pinned: bool,
    /// How long it has been ready.
    pub resident_for: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SwapPlan {
    /// Room in the group already.
    Fits,
    /// Stop these idle members first.
    Evict(Vec<String>),
    /// These members must go but serve requests: drain them, then stop them.
    Drain(Vec<String>),
    /// Not now (the reason is for status, logs and timeouts); plan again when the pool
    /// changes, or after `retry_in` when only time can help.
    Wait {
        reason: String,
        retry_in: Option<Duration>,
    },
    /// Never, with these members pinned or this budget.
    Never(String),
}

/// What loading a model of `needed_bytes` into `group` takes. `members` are the other
/// resident members, least recently used first.
pub fn plan_swap(group: &GroupSpec, members: &[Member], needed_bytes: u64) -> SwapPlan {
    if let Some(budget) = group.budget_bytes {
        if needed_bytes > budget {
            return SwapPlan::Never(format!(
                "model needs {}, group `{}` has a budget of {}",
                human_bytes(needed_bytes),
                group.name,
                human_bytes(budget)
            ));
        }
    }
    let max = group.max_resident.max(1) as usize;
    let total: u64 = members.iter().map(|m| m.bytes).sum();
    let over = |gone: usize, freed: u64| {
        members.len() - gone >= max
            || group
                .budget_bytes
                .is_some_and(|b| total - freed + needed_bytes > b)
    };
    if !over(0, 0) {
        return SwapPlan::Fits;
    }
    if let Some(m) = members.iter().find(|m| m.transitional) {
        return SwapPlan::Wait {
            reason: format!(
                "group `{}` is swapping (`{}` is loading or stopping)",
                group.name, m.id
            ),
            retry_in: None,
        };
    }
    // Idle members nobody waits for first, least recently used first; then idle ones
    // with requests about to use them; busy ones only when needed.
    let free = |m: &&Member| !m.pinned && m.in_flight == 0;
    let candidates = members
        .iter()
        .filter(|m| free(m) && m.waiting == 0)
        .chain(members.iter().filter(|m| free(m) && m.waiting > 0))
        .chain(members.iter().filter(|m| !m.pinned && m.in_flight > 0));
    let mut victims: Vec<&Member> = Vec::new();
    let mut freed = 0;
    for m in candidates {
        if !over(victims.len(), freed) {
            break;
        }
        victims.push(m);
        freed += m.bytes;
    }
    if over(victims.len(), freed) {
        return SwapPlan::Never(format!(
            "group `{}` holds {} of at most {} models and the rest are pinned",
            group.name,
            members.len(),
            max
        ));
    }
    let young = victims
        .iter()
        .filter_map(|m| Some((m, residency_left(m.resident_for, group.min_residency)?)))
        .max_by_key(|(_, left)| *left);
    if let Some((young, left)) = young {
        return SwapPlan::Wait {
            reason: format!(
                "`{}` has been resident {:.1}s of the group's min_residency {:.1}s",
                young.id,
                young.resident_for.as_secs_f64(),
                group.min_residency.as_secs_f64()
            ),
            retry_in: Some(left),
        };
    }
    let ids = victims.iter().map(|m| m.id.clone()).collect();
    if victims.iter().any(|m| m.in_flight > 0) {
        SwapPlan::Drain(ids)
    } else {
        SwapPlan::Evict(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn slot(max: u32) -> GroupSpec {
        GroupSpec {
            name: "large".into(),
            members: vec![],
            max_resident: max,
            budget_bytes: None,
            drain_timeout: Duration::from_secs(30),
            min_residency: Duration::from_secs(10),
            refuse_during_swap: false,
        }
    }

    fn m(id: &str, bytes: u64, in_flight: u32, resident_s: u64) -> Member {
        Member {
            id: id.into(),
            transitional: false,
            bytes,
            in_flight,
            waiting: 0,
            pinned: false,
            resident_for: Duration::from_secs(resident_s),
        }
    }

    #[test]
    fn a_swap_slot_evicts_its_idle_model_and_drains_a_busy_one() {
        let g = slot(1);
        assert_eq!(plan_swap(&g, &[], 5), SwapPlan::Fits);
        assert_eq!(
            plan_swap(&g, &[m("a", 5, 0, 60)], 5),
            SwapPlan::Evict(vec!["a".into()])
        );
        assert_eq!(
            plan_swap(&g, &[m("a", 5, 2, 60)], 5),
            SwapPlan::Drain(vec!["a".into()])
        );
    }

    #[test]
    fn a_member_requests_wait_for_goes_after_one_nobody_wants() {
        // `a` is the least recently used, but requests are about to take it.
        let wanted = Member {
            waiting: 3,
            ..m("a", 5, 0, 60)
        };
        let idle = m("b", 5, 0, 60);
        assert_eq!(
            plan_swap(&slot(2), &[wanted.clone(), idle], 5),
            SwapPlan::Evict(vec!["b".into()])
        );
        // Alone, it still goes: the incoming request needs the slot too.
        assert_eq!(
            plan_swap(&slot(1), &[wanted], 5),
            SwapPlan::Evict(vec!["a".into()])
        );
    }

    #[test]
    fn thrash_control_and_running_swaps_make_a_load_wait() {
        let g = slot(1);
        assert!(
            matches!(plan_swap(&g, &[m("a", 5, 0, 3)], 5), SwapPlan::Wait { reason: r, retry_in: Some(_) } if r.contains("min_residency"))
        );
        let mut loading = m("a", 5, 0, 0);
        loading.transitional = true;
        assert!(
            matches!(plan_swap(&g, &[loading], 5), SwapPlan::Wait { reason: r, retry_in: None } if r.contains("swapping"))
        );
    }

    #[test]
    fn pinned_members_and_small_budgets_are_refused_for_good() {
        let mut pinned = m("a", 5, 0, 60);
        pinned.pinned = true;
        assert!(matches!(
            plan_swap(&slot(1), &[pinned], 5),
            SwapPlan::Never(_)
        ));
        let mut g = slot(3);
        g.budget_bytes = Some(10);
        assert!(matches!(plan_swap(&g, &[], 11), SwapPlan::Never(r) if r.contains("budget")));
        // Under the count, over the bytes: the LRU idle member goes.
        assert_eq!(
            plan_swap(&g, &[m("a", 4, 0, 60), m("b", 4, 0, 60)], 4),
            SwapPlan::Evict(vec!["a".into()])
        );
    }

    proptest! {
        /// Whatever the members, a plan that evicts or drains leaves the group within
        /// its count and bytes, never names a pinned member, and prefers idle ones.
        #[test]
        fn plans_keep_the_group_within_bounds(
            max in 1u32..4,
            budget in proptest::option::of(1u64..100),
            needed in 1u64..50,
            members in proptest::collection::vec((1u64..40, 0u32..3, any::<bool>()), 0..6),
        ) {
            let mut g = slot(max);
            g.budget_bytes = budget;
            g.min_residency = Duration::ZERO;
            let members: Vec<Member> = members
                .iter()
                .enumerate()
                .map(|(i, (b, f, p))| Member { pinned: *p, ..m(&format!("m{i}"), *b, *f, 60) })
                .collect();
            let plan = plan_swap(&g, &members, needed);
            if let SwapPlan::Evict(v) | SwapPlan::Drain(v) = &plan {
                let left: Vec<&Member> = members.iter().filter(|m| !v.contains(&m.id)).collect();
                prop_assert!(left.len() < max as usize);
                if let Some(b) = budget {
                    prop_assert!(left.iter().map(|m| m.bytes).sum::<u64>() + needed <= b);
                }
                for id in v {
                    let victim = members.iter().find(|m| &m.id == id).unwrap();
                    prop_assert!(!victim.pinned);
                }
                if matches!(plan, SwapPlan::Evict(_)) {
                    prop_assert!(v.iter().all(|id| members.iter().any(|m| &m.id == id && m.in_flight == 0)));
                }
            }
            if plan == SwapPlan::Fits {
                prop_assert!(members.len() < max as usize);
            }
        }
    }
}
