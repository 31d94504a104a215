//! Pure admission and eviction decisions: given a budget, what is resident and a model
//! that wants in, which resident models (if any) must go. No I/O, no clocks, no tokio;
//! the pool feeds it a snapshot and acts on the answer.

use std::collections::BTreeMap;

use crate::sharing::{mapped_bytes, released_bytes, Mapped};
use crate::{Charge, Device};
pub use modelpool_catalog::units::human_bytes;

/// A resident model as the victim chooser sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resident {
    pub id: String,
    /// Bytes charged to the budgets for this model alone: all but the pages of a file
    /// it maps.
    pub charge: Charge,
    /// Requests holding or waiting for a lease on it right now.
    pub leases: u32,
    pub pinned: bool,
    /// Pages of a file it maps (host memory): charged once with every other mapper of
    /// that file, and freed only when the last of them goes.
    pub mapped: Option<Mapped>,
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

/// What a model that wants in needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Need {
    /// Bytes of its own per device: all but the pages of the file it maps.
    pub charge: Charge,
    /// Pages of a file it maps: they cost nothing more while anything else maps that
    /// file.
    pub mapped: Option<Mapped>,
    /// Files that loads in progress and workers still exiting map (their own bytes
    /// are in [`Room::reserved_bytes`]): no eviction unmaps them.
    pub held: Vec<Mapped>,
}

impl From<Charge> for Need {
    fn from(charge: Charge) -> Self {
        Self {
            charge,
            ..Self::default()
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
///
/// A file's mapped pages count once, whoever maps them: evicting one of two models
/// mapping a file frees only its own bytes, and a model that maps a file a staying
/// model maps needs only its own. A model is evicted for its file's pages alone only
/// when a later victim maps that file too and the pages are needed.
pub fn choose_victims(
    rooms: &BTreeMap<Device, Room>,
    lru_order: &[Resident],
    needed: &Need,
) -> Result<Vec<String>, Shortfall> {
    let books = Books {
        rooms,
        lru_order,
        need: needed,
    };
    let mut devices: Vec<Device> = needed.charge.0.keys().copied().collect();
    if needed.mapped.is_some() && !devices.contains(&Device::Cpu) {
        devices.push(Device::Cpu);
    }
    // Memory can exceed the budget (a model measured bigger than predicted), so work
    // with what stays in use after evictions rather than with a running "free" figure.
    let everything: Vec<bool> = lru_order.iter().map(Resident::evictable).collect();
    if let Some(&device) = devices.iter().find(|d| books.short(**d, &everything)) {
        return Err(books.shortfall(device));
    }
    let mut gone = vec![false; lru_order.len()];
    let mut for_file_only = vec![false; lru_order.len()];
    for (i, r) in lru_order.iter().enumerate() {
        if !r.evictable() {
            continue;
        }
        let short: Vec<Device> = devices
            .iter()
            .copied()
            .filter(|d| books.short(*d, &gone))
            .collect();
        if short.is_empty() {
            break;
        }
        let mut without = gone.clone();
        without[i] = true;
        let cost = |d: Device, gone: &[bool]| books.used(d, gone) + books.needed(d, gone);
        let frees = short.iter().any(|d| cost(*d, &without) < cost(*d, &gone));
        // One of several idle mappers of a file frees its pages only with the last.
        let shares = !frees
            && short.contains(&Device::Cpu)
            && r.mapped
                .is_some_and(|m| books.evictable_mapper(&m, i, &gone));
        if frees || shares {
            gone[i] = true;
            for_file_only[i] = shares;
        }
    }
    // A model taken for its file's pages alone stays when they were not needed.
    for i in 0..gone.len() {
        if for_file_only[i] {
            let mut back = gone.clone();
            back[i] = false;
            if devices.iter().all(|d| !books.short(*d, &back)) {
                gone = back;
            }
        }
    }
    Ok(lru_order
        .iter()
        .zip(&gone)
        .filter(|(_, g)| **g)
        .map(|(r, _)| r.id.clone())
        .collect())
}

/// The bytes in use on each device with some residents evicted.
struct Books<'a> {
    rooms: &'a BTreeMap<Device, Room>,
    lru_order: &'a [Resident],
    need: &'a Need,
}

impl Books<'_> {
    fn room(&self, device: Device) -> Room {
        self.rooms.get(&device).copied().unwrap_or_default()
    }

    fn mappers<'s>(&'s self, gone: &'s [bool]) -> impl Iterator<Item = &'s Mapped> + Clone {
        let kept = self.lru_order.iter().zip(gone).filter(|(_, g)| !**g);
        kept.filter_map(|(r, _)| r.mapped.as_ref())
            .chain(&self.need.held)
    }

    /// Bytes charged on `device` with the residents marked in `gone` evicted: each
    /// mapped file once.
    fn used(&self, device: Device, gone: &[bool]) -> u64 {
        let kept = self.lru_order.iter().zip(gone).filter(|(_, g)| !**g);
        let own: u64 = kept.map(|(r, _)| r.charge.get(device)).sum();
        let files = if device == Device::Cpu {
            mapped_bytes(self.mappers(gone))
        } else {
            0
        };
        own + files + self.room(device).reserved_bytes
    }

    /// What the model that wants in adds on `device` then: its own bytes, and its
    /// file's pages unless something that stays maps them.
    fn needed(&self, device: Device, gone: &[bool]) -> u64 {
        let own = self.need.charge.get(device);
        if device != Device::Cpu {
            return own;
        }
        own + released_bytes(&self.need.mapped, self.mappers(gone))
    }

    fn short(&self, device: Device, gone: &[bool]) -> bool {
        let budget = self.room(device).budget_bytes;
        budget.saturating_sub(self.used(device, gone)) < self.needed(device, gone)
    }

    /// Whether another evictable resident not yet evicted maps `m`'s file.
    fn evictable_mapper(&self, m: &Mapped, me: usize, gone: &[bool]) -> bool {
        self.lru_order.iter().enumerate().any(|(j, o)| {
            j != me && !gone[j] && o.evictable() && o.mapped.is_some_and(|om| om.file == m.file)
        })
    }

    /// Bytes on `device` of the residents `keep` selects, each mapped file once.
    fn held_by(&self, device: Device, keep: impl Fn(&Resident) -> bool) -> u64 {
        let gone: Vec<bool> = self.lru_order.iter().map(|r| !keep(r)).collect();
        let (none, no_rooms) = (Need::default(), BTreeMap::new());
        let books = Books {
            rooms: &no_rooms,
            lru_order: self.lru_order,
            need: &none,
        };
        books.used(device, &gone)
    }

    /// Why the model does not fit on `device` even with every evictable model gone.
    fn shortfall(&self, device: Device) -> Shortfall {
        let room = self.room(device);
        let pinned_bytes = self.held_by(device, |r| r.pinned);
        let in_use_bytes = self.held_by(device, |r| r.pinned || r.leases > 0) - pinned_bytes;
        let everything: Vec<bool> = self.lru_order.iter().map(Resident::evictable).collect();
        // Pages of files only loads and exiting workers map count as theirs.
        let held = self.used(device, &everything) - pinned_bytes - in_use_bytes;
        Shortfall {
            device,
            needed_bytes: self.needed(device, &everything),
            budget_bytes: room.budget_bytes,
            configured_budget_bytes: room.configured_budget_bytes,
            pinned_bytes,
            in_use_bytes,
            reserved_bytes: held,
        }
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
            mapped: None,
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
            choose_victims(&cpu(100, 0), &[r("a", 50, 0, false)], &need.into()),
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
        let v = |n| choose_victims(&cpu(100, 0), &lru, &Charge::on(Device::Cpu, n).into());
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
            mapped: None,
        };
        let lru = [gpu, r("cpu", 50, 0, false)];
        let mut rooms = cpu(100, 0);
        rooms.insert(Device::Cuda(0), Room::new(100, 0));
        // Needs RAM only: the GPU model, though least recently used, frees no RAM.
        let need = Charge::on(Device::Cpu, 60);
        assert_eq!(
            choose_victims(&rooms, &lru, &need.clone().into()),
            Ok(vec!["cpu".to_string()])
        );
        let need = Charge::on(Device::Cuda(0), 50);
        assert_eq!(
            choose_victims(&rooms, &lru, &need.clone().into()),
            Ok(vec!["gpu".to_string()])
        );
        let err = choose_victims(&rooms, &lru, &Charge::on(Device::Cuda(1), 1).into()).unwrap_err();
        assert_eq!((err.device, err.budget_bytes), (Device::Cuda(1), 0));
    }

    #[test]
    fn shortfall_explains_itself() {
        let lru = [r("pinned", 60, 0, true), r("busy", 30, 2, false)];
        let err =
            choose_victims(&cpu(100, 5), &lru, &Charge::on(Device::Cpu, 20).into()).unwrap_err();
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

    fn on_file(file: u64, bytes: u64) -> Mapped {
        Mapped {
            file: crate::sharing::FileId { dev: 1, ino: file },
            bytes,
        }
    }

    /// `id` of `own` bytes besides `file_bytes` pages of file `file`.
    fn mapper(id: &str, own: u64, file: u64, file_bytes: u64, leases: u32) -> Resident {
        Resident {
            mapped: Some(on_file(file, file_bytes)),
            ..r(id, own, leases, false)
        }
    }

    fn need(own: u64, mapped: Option<Mapped>) -> Need {
        Need {
            charge: Charge::on(Device::Cpu, own),
            mapped,
            held: Vec::new(),
        }
    }

    #[test]
    fn a_model_mapping_a_resident_file_needs_only_its_own_bytes() {
        // 30 own + 70 of file 1 resident; a second mapper of file 1 needs 30 more.
        let lru = [mapper("a", 30, 1, 70, 1)];
        assert_eq!(
            choose_victims(&cpu(130, 0), &lru, &need(30, Some(on_file(1, 70)))),
            Ok(vec![])
        );
        // Another file's pages are its own to bring.
        let err = choose_victims(&cpu(130, 0), &lru, &need(30, Some(on_file(2, 70))));
        assert_eq!(err.unwrap_err().needed_bytes, 100);
    }

    #[test]
    fn evicting_one_of_two_mappers_frees_only_its_own_bytes() {
        let lru = [mapper("a", 30, 1, 70, 0), mapper("b", 30, 1, 70, 0)];
        // 130 used of 160: 30 free. Needing 60, `a` alone (30 more) is enough.
        let v = |own| choose_victims(&cpu(160, 0), &lru, &need(own, None));
        assert_eq!(v(60), Ok(vec!["a".to_string()]));
        // Needing 80, the file's pages must go too: both.
        assert_eq!(v(80), Ok(vec!["a".to_string(), "b".to_string()]));
        // With `b` busy its file stays: `a` frees 30 at most.
        let busy = [mapper("a", 30, 1, 70, 0), mapper("b", 30, 1, 70, 1)];
        let err = choose_victims(&cpu(160, 0), &busy, &need(80, None)).unwrap_err();
        assert_eq!((err.needed_bytes, err.in_use_bytes), (80, 100));
    }

    #[test]
    fn a_mapper_is_evicted_for_its_file_only_when_the_pages_are_needed() {
        // `a` has no bytes of its own: evicting it frees nothing unless `c` goes too.
        let lru = [
            mapper("a", 0, 1, 70, 0),
            r("b", 40, 0, false),
            mapper("c", 10, 1, 70, 0),
        ];
        let v = |own| choose_victims(&cpu(120, 0), &lru, &need(own, None));
        // 120 used of 120: `b` makes room for 40 on its own; `a` stays.
        assert_eq!(v(40), Ok(vec!["b".to_string()]));
        assert_eq!(
            v(120),
            Ok(vec!["a".to_string(), "b".to_string(), "c".to_string()])
        );
    }

    #[test]
    fn files_that_loads_in_progress_map_stay_charged() {
        // A load maps file 1: the last resident mapper leaving frees only its own.
        let lru = [mapper("a", 30, 1, 70, 0)];
        let mut held = need(80, None);
        held.held = vec![on_file(1, 70)];
        // 100 charged + 0 reserved of 110: room for 80 only if the pages went.
        let err = choose_victims(&cpu(110, 0), &lru, &held).unwrap_err();
        assert_eq!(err.reserved_bytes, 70);
        assert_eq!(
            choose_victims(&cpu(110, 0), &lru, &need(80, None)),
            Ok(vec!["a".to_string()])
        );
    }

    /// Bytes in use with `victims` gone (each file once), and what the incoming
    /// model adds: its own bytes and its file's pages when nothing left maps them.
    fn after(lru: &[Resident], victims: &[String], need: &Need, reserved: u64) -> (u64, u64) {
        let kept: Vec<&Resident> = lru.iter().filter(|r| !victims.contains(&r.id)).collect();
        let own: u64 = kept.iter().map(|r| r.charge.total()).sum();
        let mappers: Vec<&Mapped> = kept
            .iter()
            .filter_map(|r| r.mapped.as_ref())
            .chain(&need.held)
            .collect();
        let with: Vec<&Mapped> = mappers.iter().copied().chain(&need.mapped).collect();
        let files = mapped_bytes(mappers.iter().copied());
        let added = mapped_bytes(with) - files;
        (own + files + reserved, need.charge.total() + added)
    }

    fn fits(budget: u64, (used, needed): (u64, u64)) -> bool {
        budget.saturating_sub(used) >= needed
    }

    fn mapping_resident() -> impl Strategy<Value = Resident> {
        // Some own nothing besides their file's pages; most are idle.
        let own = prop_oneof![Just(0u64), 1u64..1000];
        let leases = prop_oneof![3 => Just(0u32), 1 => 1u32..3];
        let file = proptest::option::of((0u64..3, 1u64..500));
        (
            "[a-z]{1,3}",
            own,
            leases,
            proptest::bool::weighted(0.2),
            file,
        )
            .prop_map(|(id, own, leases, pinned, file)| Resident {
                mapped: file.map(|(f, b)| on_file(f, b)),
                ..r(&id, own, leases, pinned)
            })
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
            match choose_victims(&cpu(budget, reserved), &lru, &Charge::on(Device::Cpu, needed).into()) {
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

    proptest! {
        // The cases that matter (two idle mappers of one file whose pages are needed)
        // are a few in a hundred.
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// With models mapping shared files: victims are idle and unpinned, in LRU
        /// order, and make room counting each file once; the last is needed; and a
        /// refusal means even every idle model gone leaves no room.
        #[test]
        fn victims_make_room_counting_each_mapped_file_once(
            mut lru in proptest::collection::vec(mapping_resident(), 0..8),
            budget in 0u64..5000,
            reserved in 0u64..500,
            own in 0u64..2000,
            mapped in proptest::option::of((0u64..3, 1u64..500)),
            held in proptest::option::of((0u64..3, 1u64..500)),
        ) {
            for (i, r) in lru.iter_mut().enumerate() {
                r.id = format!("m{i}");
            }
            let need = Need {
                charge: Charge::on(Device::Cpu, own),
                mapped: mapped.map(|(f, b)| on_file(f, b)),
                held: held.map(|(f, b)| on_file(f, b)).into_iter().collect(),
            };
            let idle: Vec<String> = lru.iter().filter(|r| r.evictable()).map(|r| r.id.clone()).collect();
            match choose_victims(&cpu(budget, reserved), &lru, &need) {
                Ok(victims) => {
                    let order: Vec<&String> = idle.iter().filter(|i| victims.contains(i)).collect();
                    prop_assert_eq!(order, victims.iter().collect::<Vec<_>>());
                    prop_assert!(fits(budget, after(&lru, &victims, &need, reserved)));
                    if let Some((_, fewer)) = victims.split_last() {
                        prop_assert!(!fits(budget, after(&lru, fewer, &need, reserved)));
                    }
                }
                Err(s) => {
                    let (used, needed) = after(&lru, &idle, &need, reserved);
                    prop_assert!(!fits(budget, (used, needed)));
                    // The explanation adds up to what would be in use.
                    prop_assert_eq!(s.pinned_bytes + s.in_use_bytes + s.reserved_bytes, used);
                    prop_assert_eq!(s.needed_bytes, needed);
                }
            }
        }
    }
}
