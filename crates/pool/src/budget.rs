//! Pure admission and eviction decisions: given a budget, what is resident and a model
//! that wants in, which resident models (if any) must go. No I/O, no clocks, no tokio;
//! the pool feeds it a snapshot and acts on the answer.

/// A resident model as the victim chooser sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resident {
    pub id: String,
    /// Bytes charged to the budget for this model.
    pub bytes: u64,
    /// Requests holding a lease on it right now.
    pub leases: u32,
    pub pinned: bool,
}

impl Resident {
    fn evictable(&self) -> bool {
        self.leases == 0 && !self.pinned
    }
}

/// Why a model cannot be admitted even after evicting everything evictable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shortfall {
    pub needed_bytes: u64,
    pub budget_bytes: u64,
    pub pinned_bytes: u64,
    pub in_use_bytes: u64,
    pub reserved_bytes: u64,
}

impl std::fmt::Display for Shortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "model needs {}, budget is {} with {} pinned, {} in use and {} reserved by loads in progress",
            human_bytes(self.needed_bytes),
            human_bytes(self.budget_bytes),
            human_bytes(self.pinned_bytes),
            human_bytes(self.in_use_bytes),
            human_bytes(self.reserved_bytes),
        )
    }
}

/// Chooses the fewest least-recently-used idle, unpinned models whose eviction makes
/// room for `needed_bytes`.
///
/// `lru_order` lists the resident models from least to most recently used;
/// `reserved_bytes` are held by loads in progress. Returns the victims in eviction
/// order (empty when the model fits already), or the shortfall when it cannot fit.
pub fn choose_victims(
    budget_bytes: u64,
    reserved_bytes: u64,
    lru_order: &[Resident],
    needed_bytes: u64,
) -> Result<Vec<String>, Shortfall> {
    // Memory can exceed the budget (a model measured bigger than predicted), so work
    // with what stays in use after evictions rather than with a running "free" figure.
    let mut used: u64 = lru_order.iter().map(|r| r.bytes).sum::<u64>() + reserved_bytes;
    let fits = |used: u64| budget_bytes.saturating_sub(used) >= needed_bytes;
    let evictable: u64 = lru_order
        .iter()
        .filter(|r| r.evictable())
        .map(|r| r.bytes)
        .sum();
    if !fits(used - evictable) {
        let sum =
            |f: fn(&Resident) -> bool| lru_order.iter().filter(|r| f(r)).map(|r| r.bytes).sum();
        return Err(Shortfall {
            needed_bytes,
            budget_bytes,
            pinned_bytes: sum(|r| r.pinned),
            in_use_bytes: sum(|r| !r.pinned && r.leases > 0),
            reserved_bytes,
        });
    }
    let mut victims = Vec::new();
    for r in lru_order.iter().filter(|r| r.evictable()) {
        if fits(used) {
            break;
        }
        used -= r.bytes;
        victims.push(r.id.clone());
    }
    Ok(victims)
}

/// Bytes as people read them: "4.1 GiB", "512.0 MiB", "100 B".
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(id: &str, bytes: u64, leases: u32, pinned: bool) -> Resident {
        Resident {
            id: id.into(),
            bytes,
            leases,
            pinned,
        }
    }

    #[test]
    fn fits_without_eviction() {
        assert_eq!(
            choose_victims(100, 0, &[r("a", 50, 0, false)], 50),
            Ok(vec![])
        );
    }

    #[test]
    fn evicts_least_recently_used_idle_first() {
        let lru = [
            r("old", 40, 0, false),
            r("busy", 30, 1, false),
            r("new", 30, 0, false),
        ];
        assert_eq!(
            choose_victims(100, 0, &lru, 40),
            Ok(vec!["old".to_string()])
        );
        assert_eq!(
            choose_victims(100, 0, &lru, 70),
            Ok(vec!["old".to_string(), "new".to_string()])
        );
    }

    #[test]
    fn shortfall_explains_itself() {
        let lru = [r("pinned", 60, 0, true), r("busy", 30, 2, false)];
        let err = choose_victims(100, 5, &lru, 20).unwrap_err();
        assert_eq!(err.pinned_bytes, 60);
        assert_eq!(err.in_use_bytes, 30);
        assert_eq!(
            Shortfall { needed_bytes: 4_402_341_478, budget_bytes: 2 << 30, pinned_bytes: 1 << 30, in_use_bytes: 0, reserved_bytes: 0 }.to_string(),
            "model needs 4.1 GiB, budget is 2.0 GiB with 1.0 GiB pinned, 0 B in use and 0 B reserved by loads in progress"
        );
    }

    fn resident() -> impl Strategy<Value = Resident> {
        ("[a-z]{1,3}", 1u64..1000, 0u32..3, any::<bool>()).prop_map(
            |(id, bytes, leases, pinned)| Resident {
                id,
                bytes,
                leases,
                pinned,
            },
        )
    }

    proptest! {
        #[test]
        fn victims_are_idle_unpinned_lru_prefix_and_make_room(
            lru in proptest::collection::vec(resident(), 0..8),
            budget in 0u64..5000,
            reserved in 0u64..500,
            needed in 0u64..3000,
        ) {
            let used: u64 = lru.iter().map(|r| r.bytes).sum::<u64>() + reserved;
            match choose_victims(budget, reserved, &lru, needed) {
                Ok(victims) => {
                    let evictable: Vec<&Resident> = lru.iter().filter(|r| r.leases == 0 && !r.pinned).collect();
                    // Victims are exactly the first k evictable models in LRU order.
                    prop_assert!(victims.len() <= evictable.len());
                    for (v, e) in victims.iter().zip(&evictable) {
                        prop_assert_eq!(v, &e.id);
                    }
                    let freed: u64 = evictable[..victims.len()].iter().map(|r| r.bytes).sum();
                    // After eviction the model fits the budget...
                    prop_assert!(budget.saturating_sub(used - freed) >= needed);
                    // ...and one victim fewer would not have been enough.
                    if let Some(last) = victims.len().checked_sub(1) {
                        let freed_less = freed - evictable[last].bytes;
                        prop_assert!(budget.saturating_sub(used - freed_less) < needed);
                    }
                }
                Err(s) => {
                    let evictable: u64 = lru.iter().filter(|r| r.leases == 0 && !r.pinned).map(|r| r.bytes).sum();
                    prop_assert!(budget.saturating_sub(used - evictable) < needed);
                    prop_assert_eq!(s.needed_bytes, needed);
                }
            }
        }
    }
}
