use super::*;
use crate::Charge;
use proptest::prelude::*;

fn s(secs: u64) -> Duration {
    Duration::from_secs(secs)
}

fn cpu(budget: u64) -> BTreeMap<Device, Room> {
    BTreeMap::from([(Device::Cpu, Room::new(budget, 0))])
}

fn holder(id: &str, bytes: u64, resident_s: u64) -> Holder {
    Holder {
        resident: Resident {
            id: id.into(),
            charge: Charge::on(Device::Cpu, bytes),
            leases: 2,
            pinned: false,
            mapped: None,
        },
        resident_for: s(resident_s),
        draining_for: None,
    }
}

fn waiter(id: &str, waited_s: u64) -> Waiter {
    Waiter {
        id: id.into(),
        waited: s(waited_s),
        load_estimate: s(1),
        turn_started: false,
        draining: vec![],
    }
}

fn policy() -> TurnPolicy {
    TurnPolicy {
        fairness_window: s(3),
        min_residency: s(10),
        drain_timeout: s(30),
    }
}

fn plan(holders: &[Holder], waiters: &[Waiter], id: &str) -> TurnPlan {
    plan_turn(
        &policy(),
        &cpu(200),
        holders,
        waiters,
        id,
        &Charge::on(Device::Cpu, 100).into(),
    )
}

#[test]
fn a_model_waits_for_room_through_its_fairness_window() {
    let busy = [holder("a", 100, 60), holder("b", 100, 60)];
    assert_eq!(
        plan(&busy, &[waiter("c", 1)], "c"),
        TurnPlan::Wait {
            why: Why::Room,
            retry_in: Some(s(2)),
            eta: None
        }
    );
}

#[test]
fn then_the_least_recently_used_busy_model_drains_for_it() {
    let busy = [holder("a", 100, 60), holder("b", 100, 60)];
    assert_eq!(
        plan(&busy, &[waiter("c", 3)], "c"),
        TurnPlan::Drain(vec!["a".into()])
    );
    let why = Why::Draining {
        victims: vec!["a".into()],
    };
    assert_eq!(
        why.to_string(),
        "waiting for room: its turn has begun (`a` draining for it)"
    );
}

#[test]
fn a_model_resident_under_min_residency_stays_and_the_wait_says_how_long() {
    let busy = [holder("a", 100, 4), holder("b", 100, 60)];
    // `b` is old enough: it goes although `a` is less recently used.
    assert_eq!(
        plan(&busy, &[waiter("c", 5)], "c"),
        TurnPlan::Drain(vec!["b".into()])
    );
    let young = [holder("a", 100, 4), holder("b", 100, 2)];
    let TurnPlan::Wait { why, retry_in, eta } = plan(&young, &[waiter("c", 5)], "c") else {
        panic!("a young model was drained");
    };
    assert_eq!((retry_in, eta), (Some(s(6)), Some(s(7))));
    assert!(
        why.to_string()
            .starts_with("waiting for its turn: `a` stays resident 6.0s"),
        "{why}"
    );
}

#[test]
fn the_longest_waiting_model_goes_first_and_one_turn_runs_at_a_time() {
    let busy = [holder("a", 100, 60), holder("b", 100, 60)];
    let waiters = [waiter("c", 5), waiter("d", 9)];
    assert_eq!(
        plan(&busy, &waiters, "d"),
        TurnPlan::Drain(vec!["a".into()])
    );
    let TurnPlan::Wait { why, eta, .. } = plan(&busy, &waiters, "c") else {
        panic!("two turns at once");
    };
    assert_eq!(why, Why::Behind { model: "d".into() });
    assert_eq!(eta, Some(s(2)), "d's load, then its own");
    // Once `d`'s turn runs, `c` waits behind it however long it has waited.
    let mut draining = busy.clone();
    draining[0].draining_for = Some("d".into());
    let d = Waiter {
        turn_started: true,
        draining: vec!["a".into()],
        ..waiter("d", 9)
    };
    let running = [waiter("c", 50), d];
    assert!(matches!(
        plan(&draining, &running, "c"),
        TurnPlan::Wait { why: Why::Behind { model }, .. } if model == "d"
    ));
    assert!(matches!(
        plan(&draining, &running, "d"),
        TurnPlan::Wait {
            why: Why::Draining { .. },
            ..
        }
    ));
}

#[test]
fn pinned_models_never_drain_and_what_fits_only_without_them_is_refused() {
    let mut pinned = holder("a", 150, 600);
    pinned.resident.pinned = true;
    match plan(&[pinned.clone()], &[waiter("c", 60)], "c") {
        TurnPlan::Never(shortfall) => assert_eq!(shortfall.pinned_bytes, 150),
        other => panic!("{other:?}"),
    }
    let mut small = pinned;
    small.resident.charge = Charge::on(Device::Cpu, 100);
    let both = [small, holder("b", 100, 600)];
    assert_eq!(
        plan(&both, &[waiter("c", 60)], "c"),
        TurnPlan::Drain(vec!["b".into()])
    );
}

/// Room for `slots` of the unpinned models; every model is wanted all the time.
#[derive(Clone, Debug)]
struct Scenario {
    models: usize,
    pinned: usize,
    slots: usize,
    load_s: u64,
    request_s: u64,
    policy: TurnPolicy,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Sim {
    Out {
        since: u64,
        turn: bool,
    },
    Loading {
        done: u64,
    },
    Ready {
        since: u64,
        drained_at: Option<u64>,
        pinned: bool,
    },
}

struct Outcome {
    /// Longest wait from leaving (or arriving) to loading, seconds.
    longest_wait_s: u64,
    turn_starts: Vec<u64>,
    served: Vec<bool>,
    pinned_drained: bool,
}

fn simulate(sc: &Scenario, seconds: u64) -> Outcome {
    let ids: Vec<String> = (0..sc.models).map(|i| format!("m{i}")).collect();
    let mut sim: Vec<Sim> = (0..sc.models)
        .map(|i| {
            if i < sc.pinned + sc.slots {
                let pinned = i < sc.pinned;
                Sim::Ready {
                    since: 0,
                    drained_at: None,
                    pinned,
                }
            } else {
                Sim::Out {
                    since: 0,
                    turn: false,
                }
            }
        })
        .collect();
    let mut draining_for: Vec<Option<usize>> = vec![None; sc.models];
    let mut lru: Vec<usize> = (0..sc.models).collect();
    let drain_s = sc.request_s.min(sc.policy.drain_timeout.as_secs());
    let budget = (sc.pinned + sc.slots) as u64;
    let mut out = Outcome {
        longest_wait_s: 0,
        turn_starts: Vec::new(),
        // Those resident from the start count as served.
        served: (0..sc.models).map(|i| i < sc.pinned + sc.slots).collect(),
        pinned_drained: false,
    };
    for t in 0..seconds {
        for (i, m) in sim.iter_mut().enumerate() {
            match *m {
                Sim::Loading { done } if done <= t => {
                    *m = Sim::Ready {
                        since: t,
                        drained_at: None,
                        pinned: false,
                    };
                    out.served[i] = true;
                    lru.retain(|&x| x != i);
                    lru.push(i);
                }
                Sim::Ready {
                    drained_at: Some(at),
                    ..
                } if at <= t => {
                    *m = Sim::Out {
                        since: t,
                        turn: false,
                    };
                    draining_for[i] = None;
                }
                _ => {}
            }
        }
        let holders: Vec<Holder> = lru
            .iter()
            .filter_map(|&i| match sim[i] {
                Sim::Ready { since, pinned, .. } => Some(Holder {
                    resident: Resident {
                        id: ids[i].clone(),
                        charge: Charge::on(Device::Cpu, 1),
                        leases: 1,
                        pinned,
                        mapped: None,
                    },
                    resident_for: s(t - since),
                    draining_for: draining_for[i].map(|w| ids[w].clone()),
                }),
                _ => None,
            })
            .collect();
        let waiters: Vec<Waiter> = (0..sc.models)
            .filter_map(|i| match sim[i] {
                Sim::Out { since, turn } => Some(Waiter {
                    id: ids[i].clone(),
                    waited: s(t - since),
                    load_estimate: s(sc.load_s),
                    turn_started: turn,
                    draining: (0..sc.models)
                        .filter(|v| draining_for[*v] == Some(i))
                        .map(|v| ids[v].clone())
                        .collect(),
                }),
                _ => None,
            })
            .collect();
        let used = sim.iter().filter(|m| !matches!(m, Sim::Out { .. })).count() as u64;
        let mut free = budget - used;
        let running = sim
            .iter()
            .position(|m| matches!(m, Sim::Out { turn: true, .. }));
        for i in 0..sc.models {
            let Sim::Out { since, turn } = sim[i] else {
                continue;
            };
            if running.is_some_and(|r| r != i) {
                continue;
            }
            if free > 0 {
                free -= 1;
                out.longest_wait_s = out.longest_wait_s.max(t - since);
                sim[i] = Sim::Loading {
                    done: t + sc.load_s,
                };
                continue;
            }
            if turn {
                continue;
            }
            let plan = plan_turn(
                &sc.policy,
                &cpu(budget),
                &holders,
                &waiters,
                &ids[i],
                &Charge::on(Device::Cpu, 1).into(),
            );
            if let TurnPlan::Drain(victims) = plan {
                out.turn_starts.push(t);
                sim[i] = Sim::Out { since, turn: true };
                for v in victims {
                    let vi = ids.iter().position(|x| *x == v).unwrap();
                    if let Sim::Ready {
                        drained_at, pinned, ..
                    } = &mut sim[vi]
                    {
                        out.pinned_drained |= *pinned;
                        *drained_at = Some(t + drain_s);
                    }
                    draining_for[vi] = Some(i);
                }
                break;
            }
        }
    }
    out
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        2usize..7,
        0usize..2,
        1u64..5,
        1u64..20,
        0u64..8,
        1u64..30,
        1u64..40,
    )
        .prop_flat_map(
            |(models, pinned, load_s, request_s, window_s, min_res_s, drain_s)| {
                let pinned = pinned.min(models - 2);
                (1..models - pinned).prop_map(move |slots| Scenario {
                    models,
                    pinned,
                    slots,
                    load_s,
                    request_s,
                    policy: TurnPolicy {
                        fairness_window: s(window_s),
                        min_residency: s(min_res_s),
                        drain_timeout: s(drain_s),
                    },
                })
            },
        )
}

proptest! {
    /// However many models are wanted, each is served within the bound, turns per
    /// minute stay within what min_residency allows, and pinned models stay.
    #[test]
    fn every_waiting_model_is_served_within_the_bound(sc in scenario()) {
        let r = simulate(&sc, 900);
        let p = &sc.policy;
        let drain_s = sc.request_s.min(p.drain_timeout.as_secs());
        let contenders = (sc.models - sc.pinned - sc.slots) as u64;
        // Plus one second per turn for the simulation's step.
        let per_turn = p.min_residency.as_secs() + drain_s + sc.load_s + 1;
        let bound = p.fairness_window.as_secs() + contenders * per_turn;
        prop_assert!(r.longest_wait_s <= bound, "waited {}s, bound {}s", r.longest_wait_s, bound);
        prop_assert!(r.served.iter().all(|s| *s) || sc.slots + sc.pinned == sc.models);
        prop_assert!(!r.pinned_drained);
        let per_minute = sc.slots as u64 * (60 / p.min_residency.as_secs() + 1);
        for (i, start) in r.turn_starts.iter().enumerate() {
            let in_minute = r.turn_starts[i..].iter().take_while(|t| **t < start + 60).count();
            prop_assert!(in_minute as u64 <= per_minute, "{in_minute} turns in a minute, bound {per_minute}");
        }
    }

    /// A drain names only unpinned models resident at least min_residency and frees
    /// enough; a refusal means the model cannot fit even with every unpinned one gone.
    #[test]
    fn plans_drain_only_what_may_go_and_refuse_only_what_never_fits(
        budget in 50u64..400,
        needed in 1u64..300,
        holders in proptest::collection::vec((1u64..150, 0u64..30, any::<bool>(), 0u32..3), 0..6),
        waited in 0u64..10,
    ) {
        let holders: Vec<Holder> = holders
            .iter()
            .enumerate()
            .map(|(i, (bytes, res, pinned, leases))| {
                let mut h = holder(&format!("m{i}"), *bytes, *res);
                h.resident.pinned = *pinned;
                h.resident.leases = *leases;
                h
            })
            .collect();
        let total: u64 = holders.iter().map(|h| h.resident.charge.get(Device::Cpu)).sum();
        let pinned: u64 = holders
            .iter()
            .filter(|h| h.resident.pinned)
            .map(|h| h.resident.charge.get(Device::Cpu))
            .sum();
        let plan = plan_turn(
            &policy(),
            &cpu(budget),
            &holders,
            &[waiter("x", waited)],
            "x",
            &Charge::on(Device::Cpu, needed).into(),
        );
        match plan {
            TurnPlan::Never(_) => prop_assert!(pinned + needed > budget),
            TurnPlan::Drain(victims) => {
                prop_assert!(pinned + needed <= budget);
                prop_assert!(waited >= 3);
                let mut freed = 0;
                for v in &victims {
                    let h = holders.iter().find(|h| &h.resident.id == v).unwrap();
                    prop_assert!(!h.resident.pinned);
                    prop_assert!(h.resident_for >= policy().min_residency);
                    freed += h.resident.charge.get(Device::Cpu);
                }
                prop_assert!(total - freed + needed <= budget);
            }
            TurnPlan::Wait { .. } => prop_assert!(pinned + needed <= budget),
        }
    }
}
