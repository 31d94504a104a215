//! Pure admission and eviction decisions: given a budget, what is resident and a model
//! that wants in, which resident models (if any) must go. No I/O, no clocks, no tokio;
//! the pool feeds it a snapshot and acts on the answer.

use std::collections::BTreeMap;

use crate::{Charge, Device};

/// A resident model as the victim chooser sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resident {
    pub id: String,
    /// Bytes charged to the budgets for this model.
    pub charge: Charge,
    /// Requests holding or waiting for a lease on it right now.
    pub leases: u32,
    pub pinned: bool,
}

impl Resident {
    fn evictable(&self) -> bool {
        self.leases == 0 && !self.pinned
    }
}

/// One device's budget and the bytes charged to it outside the resident list: loads in
/// progress and workers still exiting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Room {
    /// What may be charged now: the configured budget, capped by what the machine can
    /// still give.
    pub budget_bytes: u64,
    pub reserved_bytes: u64,
    /// The budget as configured, for explaining a cap.
    pub configured_budget_bytes: u64,
}

impl Room {
    /// A room whose budget is the configured one.
    pub fn new(budget_bytes: u64, reserved_bytes: u64) -> Self {
        Self {
            budget_bytes,
            reserved_bytes,
            configured_budget_bytes: budget_bytes,
        }
    }
}

/// Why a model cannot be admitted even after evicting everything evictable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shortfall {
    pub device: Device,
    pub needed_bytes: u64,
    pub budget_bytes: u64,
    /// Above `budget_bytes` when the machine's available memory capped the budget.
    pub configured_budget_bytes: u64,
    pub pinned_bytes: u64,
    pub in_use_bytes: u64,
    pub reserved_bytes: u64,
}

impl std::fmt::Display for Shortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cap = if self.configured_budget_bytes > self.budget_bytes {
            format!(
                " ({} configured, capped by the memory the machine has available)",
                human_bytes(self.configured_budget_bytes)
            )
        } else {
            String::new()
        };
        write!(
            f,
            "model needs {} of {}, budget is {}{cap} with {} pinned, {} in use and {} reserved by loads in progress",
            human_bytes(self.needed_bytes),
            self.device,
            human_bytes(self.budget_bytes),
            human_bytes(self.pinned_bytes),
            human_bytes(self.in_use_bytes),
            human_bytes(self.reserved_bytes),
        )
    }
}

/// Chooses the fewest least-recently-used idle, unpinned models whose eviction makes
/// room for `needed` on every device it charges.
///
/// `lru_order` lists the resident models from least to most recently used; `rooms`
/// gives each device's budget and the bytes held by loads in progress. Returns the
/// victims in eviction order (empty when the model fits already), or the first
/// device's shortfall when it cannot fit.
pub fn choose_victims(
    rooms: &BTreeMap<Device, Room>,
    lru_order: &[Resident],
    needed: &Charge,
) -> Result<Vec<String>, Shortfall> {
    // Memory can exceed the budget (a model measured bigger than predicted), so work
    // with what stays in use after evictions rather than with a running "free" figure.
    let mut used: BTreeMap<Device, u64> = BTreeMap::new();
    for (&device, &bytes) in &needed.0 {
        let room = rooms.get(&device).copied().unwrap_or_default();
        let resident: u64 = lru_order.iter().map(|r| r.charge.get(device)).sum();
        used.insert(device, resident + room.reserved_bytes);
        let evictable: u64 = lru_order
            .iter()
            .filter(|r| r.evictable())
            .map(|r| r.charge.get(device))
            .sum();
        if room
            .budget_bytes
            .saturating_sub(resident + room.reserved_bytes - evictable)
            < bytes
        {
            let sum = |f: &dyn Fn(&Resident) -> bool| {
                lru_order
                    .iter()
                    .filter(|r| f(r))
                    .map(|r| r.charge.get(device))
                    .sum()
            };
            return Err(Shortfall {
                device,
                needed_bytes: bytes,
                budget_bytes: room.budget_bytes,
                configured_budget_bytes: room.configured_budget_bytes,
                pinned_bytes: sum(&|r| r.pinned),
                in_use_bytes: sum(&|r| !r.pinned && r.leases > 0),
                reserved_bytes: room.reserved_bytes,
            });
        }
    }
    let short = |used: &BTreeMap<Device, u64>, device: &Device| {
        let budget = rooms.get(device).map_or(0, |r| r.budget_bytes);
        budget.saturating_sub(used[device]) < needed.get(*device)
    };
    let mut victims = Vec::new();
    for r in lru_order.iter().filter(|r| r.evictable()) {
        let helps = used.keys().any(|d| short(&used, d) && r.charge.get(*d) > 0);
        if !helps {
            if used.keys().all(|d| !short(&used, d)) {
                break;
            }
            continue;
        }
        for (d, u) in used.iter_mut() {
            *u -= r.charge.get(*d);
        }
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

/// Parses a byte size as people write it in config: "6GiB", "512 MiB", "2.5G", "1000".
/// Binary and decimal suffixes both mean powers of 1024, as memory is sold in them.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("not a size like \"6GiB\" or \"512MiB\": {text:?}"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}; use B, KiB, MiB, GiB or TiB"
            ))
        }
    };
    let bytes = value * scale as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("{text:?} is too large"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(id: &str, bytes: u64, leases: u32, pinned: bool) -> Resident {
        Resident {
            id: id.into(),
            charge: Charge::on(Device::Cpu, bytes),
            leases,
            pinned,
        }
    }

    fn cpu(budget: u64, reserved: u64) -> BTreeMap<Device, Room> {
        BTreeMap::from([(Device::Cpu, Room::new(budget, reserved))])
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("6GiB"), Ok(6 << 30));
        assert_eq!(parse_bytes("512 MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("1.5g"), Ok(3 << 29));
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert!(parse_bytes("6 parsecs").unwrap_err().contains("parsecs"));
        assert!(parse_bytes("lots").is_err());
    }

    #[test]
    fn fits_without_eviction() {
        let need = Charge::on(Device::Cpu, 50);
        assert_eq!(
            choose_victims(&cpu(100, 0), &[r("a", 50, 0, false)], &need),
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
        let v = |n| choose_victims(&cpu(100, 0), &lru, &Charge::on(Device::Cpu, n));
        assert_eq!(v(40), Ok(vec!["old".to_string()]));
        assert_eq!(v(70), Ok(vec!["old".to_string(), "new".to_string()]));
    }

    #[test]
    fn only_models_on_the_short_device_are_evicted() {
        let gpu = Resident {
            id: "gpu".into(),
            charge: Charge::on(Device::Cuda(0), 80),
            leases: 0,
            pinned: false,
        };
        let lru = [gpu, r("cpu", 50, 0, false)];
        let mut rooms = cpu(100, 0);
        rooms.insert(Device::Cuda(0), Room::new(100, 0));
        // Needs RAM only: the GPU model, though least recently used, frees no RAM.
        let need = Charge::on(Device::Cpu, 60);
        assert_eq!(
            choose_victims(&rooms, &lru, &need),
            Ok(vec!["cpu".to_string()])
        );
        let need = Charge::on(Device::Cuda(0), 50);
        assert_eq!(
            choose_victims(&rooms, &lru, &need),
            Ok(vec!["gpu".to_string()])
        );
        let err = choose_victims(&rooms, &lru, &Charge::on(Device::Cuda(1), 1)).unwrap_err();
        assert_eq!((err.device, err.budget_bytes), (Device::Cuda(1), 0));
    }

    #[test]
    fn shortfall_explains_itself() {
        let lru = [r("pinned", 60, 0, true), r("busy", 30, 2, false)];
        let err = choose_victims(&cpu(100, 5), &lru, &Charge::on(Device::Cpu, 20)).unwrap_err();
        assert_eq!(err.pinned_bytes, 60);
        assert_eq!(err.in_use_bytes, 30);
        let s = Shortfall {
            device: Device::Cpu,
            needed_bytes: 4_402_341_478,
            budget_bytes: 2 << 30,
            configured_budget_bytes: 2 << 30,
            pinned_bytes: 1 << 30,
            in_use_bytes: 0,
            reserved_bytes: 0,
        };
        assert_eq!(
            s.to_string(),
            "model needs 4.1 GiB of cpu, budget is 2.0 GiB with 1.0 GiB pinned, 0 B in use and 0 B reserved by loads in progress"
        );
        let capped = Shortfall {
            configured_budget_bytes: 6 << 30,
            ..s
        };
        assert!(capped.to_string().contains(
            "budget is 2.0 GiB (6.0 GiB configured, capped by the memory the machine has available) with"
        ));
    }

    fn resident() -> impl Strategy<Value = Resident> {
        ("[a-z]{1,3}", 1u64..1000, 0u32..3, any::<bool>())
            .prop_map(|(id, bytes, leases, pinned)| r(&id, bytes, leases, pinned))
    }

    proptest! {
        #[test]
        fn victims_are_idle_unpinned_lru_prefix_and_make_room(
            lru in proptest::collection::vec(resident(), 0..8),
            budget in 0u64..5000,
            reserved in 0u64..500,
            needed in 0u64..3000,
        ) {
            let used: u64 = lru.iter().map(|r| r.charge.total()).sum::<u64>() + reserved;
            match choose_victims(&cpu(budget, reserved), &lru, &Charge::on(Device::Cpu, needed)) {
                Ok(victims) => {
                    let evictable: Vec<&Resident> = lru.iter().filter(|r| r.leases == 0 && !r.pinned).collect();
                    // Victims are exactly the first k evictable models in LRU order.
                    prop_assert!(victims.len() <= evictable.len());
                    for (v, e) in victims.iter().zip(&evictable) {
                        prop_assert_eq!(v, &e.id);
                    }
                    let freed: u64 = evictable[..victims.len()].iter().map(|r| r.charge.total()).sum();
                    // After eviction the model fits the budget...
                    prop_assert!(budget.saturating_sub(used - freed) >= needed);
                    // ...and one victim fewer would not have been enough.
                    if let Some(last) = victims.len().checked_sub(1) {
                        let freed_less = freed - evictable[last].charge.total();
                        prop_assert!(budget.saturating_sub(used - freed_less) < needed);
                    }
                }
                Err(s) => {
                    let evictable: u64 = lru.iter().filter(|r| r.leases == 0 && !r.pinned).map(|r| r.charge.total()).sum();
                    prop_assert!(budget.saturating_sub(used - evictable) < needed);
                    prop_assert_eq!(s.needed_bytes, needed);
                }
            }
        }
    }
}
