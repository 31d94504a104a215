//! `modelpool plan`: capacity planning before anything runs. From the configuration and
//! the GGUF headers alone (no server, no worker, no weights read) it shows what each
//! model will be charged, the budgets the server would resolve on this machine, whether
//! everything fits at once, what fits if not, and what the largest model would evict.
//! The arithmetic is the pool's own: the same prediction, budgets and victim choice.

use std::collections::BTreeMap;
use std::path::Path;

use modelpool_pool::budget::{choose_victims, Need, Resident, Room, Shortfall};
use modelpool_pool::sharing::{self, FileId, Mapped};
use modelpool_pool::{
    Charge, Device, DeviceMemory, Footprint, MemoryProbe, ModelSpec, SystemProbe,
};
use serde_json::{json, Value};

use super::format::{bytes, mib, table, yes_no};
use super::{say, say_json, Failure, PlanArgs};
use modelpool_server::config::{BudgetSetting, PoolSettings};

/// A model that could be predicted, as the analysis sees it.
#[derive(Clone, Debug)]
pub(crate) struct Candidate {
    pub id: String,
    pub pinned: bool,
    /// All it is charged alone, mapped file pages included.
    pub charge: Charge,
    /// Pages of a file it maps (llama.cpp on the CPU): charged once however many
    /// models map that file, as the pool does.
    pub mapped: Option<Mapped>,
}

impl Candidate {
    /// Its bytes without the pages of the file it maps.
    fn own(&self) -> Charge {
        let mut own = self.charge.clone();
        if let Some(m) = self.mapped {
            own.0
                .insert(Device::Cpu, own.get(Device::Cpu).saturating_sub(m.bytes));
        }
        own
    }
}

/// What the candidates in `chosen` hold per device, each mapped file once.
fn used_by(
    cands: &[Candidate],
    chosen: impl Iterator<Item = usize> + Clone,
) -> BTreeMap<Device, u64> {
    let mut used: BTreeMap<Device, u64> = BTreeMap::new();
    for i in chosen.clone() {
        for (&d, &b) in &cands[i].own().0 {
            *used.entry(d).or_default() += b;
        }
    }
    let files = sharing::mapped_bytes(chosen.filter_map(|i| cands[i].mapped.as_ref()));
    if files > 0 {
        *used.entry(Device::Cpu).or_default() += files;
    }
    used
}

/// The largest model and what loading it would do with everything else resident.
#[derive(Debug)]
pub(crate) struct Largest {
    pub index: usize,
    /// The other models resident beforehand: those that fit, pinned first.
    pub others: Vec<usize>,
    /// Models evicted to make room (least recently used first, taking config order as
    /// the order of use), or why it cannot fit at all.
    pub outcome: Result<Vec<String>, Shortfall>,
}

/// What fits where; indices point into the candidates.
#[derive(Debug)]
pub(crate) struct Analysis {
    /// Bytes all candidates together need, per device.
    pub needed: BTreeMap<Device, u64>,
    pub all_fit: bool,
    /// The set that fits together (greedy: pinned first, then config order), in config
    /// order.
    pub fitting: Vec<usize>,
    pub left_out: Vec<usize>,
    /// Copies of each model alone that fit its budgets.
    pub copies: Vec<u64>,
    pub largest: Option<Largest>,
}

fn budget(budgets: &BTreeMap<Device, u64>, device: Device) -> u64 {
    budgets.get(&device).copied().unwrap_or(0)
}

/// Adds candidates in order (pinned first, then config order) while they fit, skipping
/// `skip`; returns the chosen indices in config order.
fn greedy(budgets: &BTreeMap<Device, u64>, cands: &[Candidate], skip: Option<usize>) -> Vec<usize> {
    let order = (0..cands.len())
        .filter(|&i| cands[i].pinned)
        .chain((0..cands.len()).filter(|&i| !cands[i].pinned))
        .filter(|&i| Some(i) != skip);
    let mut chosen = Vec::new();
    for i in order {
        let with = used_by(cands, chosen.iter().copied().chain([i]));
        if with.iter().all(|(&d, &b)| b <= budget(budgets, d)) {
            chosen.push(i);
        }
    }
    chosen.sort_unstable();
    chosen
}

/// Copies of `c` alone that fit its budgets: the file it maps once, its own bytes for
/// each copy.
fn copies_alone(budgets: &BTreeMap<Device, u64>, c: &Candidate) -> u64 {
    let file = |d: Device| match c.mapped {
        Some(m) if d == Device::Cpu => m.bytes,
        _ => 0,
    };
    c.own()
        .0
        .iter()
        .filter(|(_, &b)| b > 0)
        .map(|(&d, &b)| budget(budgets, d).saturating_sub(file(d)) / b)
        .min()
        .unwrap_or(0)
}

pub(crate) fn analyse(budgets: &BTreeMap<Device, u64>, cands: &[Candidate]) -> Analysis {
    let needed = used_by(cands, 0..cands.len());
    let all_fit = needed.iter().all(|(&d, &b)| b <= budget(budgets, d));
    let fitting = greedy(budgets, cands, None);
    let left_out = (0..cands.len()).filter(|i| !fitting.contains(i)).collect();
    let copies = cands.iter().map(|c| copies_alone(budgets, c)).collect();
    // The first of the largest, in config order.
    let largest = cands
        .iter()
        .enumerate()
        .fold(None::<(usize, u64)>, |best, (i, c)| match best {
            Some((_, b)) if b >= c.charge.total() => best,
            _ => Some((i, c.charge.total())),
        })
        .map(|(index, _)| {
            let others = greedy(budgets, cands, Some(index));
            let residents: Vec<Resident> = others
                .iter()
                .map(|&i| Resident {
                    id: cands[i].id.clone(),
                    charge: cands[i].own(),
                    leases: 0,
                    pinned: cands[i].pinned,
                    mapped: cands[i].mapped,
                })
                .collect();
            let rooms: BTreeMap<Device, Room> = cands[index]
                .charge
                .0
                .keys()
                .map(|&d| (d, Room::new(budget(budgets, d), 0)))
                .collect();
            let need = Need {
                charge: cands[index].own(),
                mapped: cands[index].mapped,
                held: Vec::new(),
            };
            let outcome = choose_victims(&rooms, &residents, &need);
            Largest {
                index,
                others,
                outcome,
            }
        });
    Analysis {
        needed,
        all_fit,
        fitting,
        left_out,
        copies,
        largest,
    }
}

/// Where a device's budget comes from, in words.
fn budget_source(device: Device, pool: &PoolSettings) -> String {
    let (key, setting) = match device {
        Device::Cpu => ("pool.ram_budget", pool.ram_budget),
        Device::Cuda(_) => ("pool.vram_budget", pool.vram_budget),
    };
    match setting {
        BudgetSetting::Bytes(_) => key.to_owned(),
        BudgetSetting::Auto => format!(
            "{key} = auto: {:.0}% of total less {} reserve",
            pool.auto_fraction * 100.0,
            bytes(pool.reserve_bytes)
        ),
    }
}

/// The model's prediction, at the first of its precisions that fits its budgets on its
/// own (the last when none does) for a model quantized at load, as the pool would choose
/// with nothing else resident.
fn at_planned_precision(
    spec: &ModelSpec,
    budgets: &BTreeMap<Device, u64>,
) -> (ModelSpec, Result<Footprint, String>) {
    let mut planned = spec.clone();
    let candidates = spec.candidate_precisions();
    let footprints = match modelpool_supervisor::footprint::predict_each(spec, &candidates) {
        Ok(footprints) => footprints,
        Err(e) => {
            planned.precision = candidates.into_iter().next().flatten();
            return (planned, Err(e.to_string()));
        }
    };
    let fits = |f: &Footprint| f.charge.0.iter().all(|(d, b)| *b <= budget(budgets, *d));
    let chosen = footprints
        .iter()
        .position(fits)
        .unwrap_or(footprints.len() - 1);
    planned.precision = candidates[chosen].clone();
    (planned, Ok(footprints[chosen].clone()))
}

/// The device, and the precision of a model quantized at load.
fn placement(s: &ModelSpec) -> String {
    match &s.precision {
        Some(p) => format!("{} {p}", s.device),
        None => s.device.to_string(),
    }
}

pub(super) fn run(args: &PlanArgs) -> Result<(), Failure> {
    let settings = modelpool_server::Settings::load(args.config.as_deref())
        .map_err(|e| Failure::Config(e.to_string()))?;
    let probe = SystemProbe::new();
    let machine = probe.devices();
    let budgets = modelpool_server::app::pool_config(&settings.pool, &probe).budgets;
    let gpu_absent = probe.gpu_absent_reason();

    let planned: Vec<(ModelSpec, Result<Footprint, String>)> = settings
        .models
        .iter()
        .map(|spec| at_planned_precision(spec, &budgets))
        .collect();
    let predictions: Vec<(&ModelSpec, Result<Footprint, String>)> =
        planned.iter().map(|(s, f)| (s, f.clone())).collect();
    let ok: Vec<(&ModelSpec, &Footprint)> = predictions
        .iter()
        .filter_map(|(s, f)| f.as_ref().ok().map(|f| (*s, f)))
        .collect();
    let cands: Vec<Candidate> = ok
        .iter()
        .map(|(s, f)| Candidate {
            id: s.id.clone(),
            pinned: s.pinned,
            charge: f.charge.clone(),
            mapped: sharing::split(f, s.local_file().ok().and_then(FileId::of)).1,
        })
        .collect();
    let analysis = analyse(&budgets, &cands);
    let failed: Vec<(&ModelSpec, &String)> = predictions
        .iter()
        .filter_map(|(s, f)| f.as_ref().err().map(|e| (*s, e)))
        .collect();

    let view = View {
        config: args.config.as_deref(),
        pool: &settings.pool,
        machine: &machine,
        budgets: &budgets,
        gpu_absent: gpu_absent.as_deref(),
        ok: &ok,
        cands: &cands,
        failed: &failed,
        analysis: &analysis,
    };
    if args.json {
        say_json(&view.json())?;
    } else {
        view.human()?;
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Failure::Message(format!(
            "{} model(s) could not be predicted: {}",
            failed.len(),
            failed
                .iter()
                .map(|(s, _)| s.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }
}

/// Everything the output needs, borrowed.
struct View<'a> {
    config: Option<&'a Path>,
    pool: &'a PoolSettings,
    machine: &'a [DeviceMemory],
    budgets: &'a BTreeMap<Device, u64>,
    gpu_absent: Option<&'a str>,
    ok: &'a [(&'a ModelSpec, &'a Footprint)],
    cands: &'a [Candidate],
    failed: &'a [(&'a ModelSpec, &'a String)],
    analysis: &'a Analysis,
}

impl View<'_> {
    /// Every device with a budget or wanted by a model.
    fn devices(&self) -> Vec<Device> {
        let mut out: Vec<Device> = self.budgets.keys().copied().collect();
        for d in self.analysis.needed.keys() {
            if !out.contains(d) {
                out.push(*d);
            }
        }
        out.sort();
        out
    }

    fn ids(&self, indices: &[usize]) -> Vec<&str> {
        indices.iter().map(|&i| self.cands[i].id.as_str()).collect()
    }

    fn json(&self) -> Value {
        let devices: Vec<Value> = self
            .devices()
            .into_iter()
            .map(|d| {
                let mem = self.machine.iter().find(|m| m.device == d);
                json!({
                    "device": d.to_string(),
                    "name": mem.map(|m| m.name.clone()),
                    "total_bytes": mem.map(|m| m.total_bytes),
                    "available_bytes": mem.map(|m| m.available_bytes),
                    "budget_bytes": budget(self.budgets, d),
                    "budget_source": budget_source(d, self.pool),
                    "needed_bytes": self.analysis.needed.get(&d).copied().unwrap_or(0),
                })
            })
            .collect();
        let mut models: Vec<Value> = self
            .ok
            .iter()
            .zip(&self.analysis.copies)
            .map(|((s, f), copies)| {
                let charge: serde_json::Map<String, Value> = f
                    .charge
                    .0
                    .iter()
                    .map(|(d, b)| (d.to_string(), json!(b)))
                    .collect();
                json!({
                    "id": s.id,
                    "path": s.source.to_string(),
                    "device": s.device.to_string(),
                    "precision": s.precision,
                    "pinned": s.pinned,
                    "context_length": s.context_length,
                    "max_sequences": s.max_sequences,
                    "predicted": {
                        "weights_bytes": f.weights_bytes,
                        "kv_cache_bytes": f.kv_bytes,
                        "activation_bytes": f.activation_bytes,
                        "overhead_bytes": f.overhead_bytes,
                        "total_bytes": f.total_bytes(),
                        "charge": charge,
                    },
                    "copies_alone": copies,
                    "error": null,
                })
            })
            .collect();
        models.extend(self.failed.iter().map(|(s, e)| {
            json!({
                "id": s.id,
                "path": s.source.to_string(),
                "device": s.device.to_string(),
                "pinned": s.pinned,
                "error": e,
            })
        }));
        let largest = self.analysis.largest.as_ref().map(|l| {
            let c = &self.cands[l.index];
            json!({
                "id": c.id,
                "total_bytes": c.charge.total(),
                "others_resident": self.ids(&l.others),
                "fits": l.outcome.is_ok(),
                "evicts": l.outcome.as_ref().ok(),
                "shortfall": l.outcome.as_ref().err().map(|s| s.to_string()),
            })
        });
        json!({
            "config": self.config.map(|p| p.display().to_string()),
            "devices": devices,
            "gpu_absent_reason": self.gpu_absent,
            "models": models,
            "all_fit": self.analysis.all_fit,
            "fits": self.ids(&self.analysis.fitting),
            "left_out": self.ids(&self.analysis.left_out),
            "largest": largest,
        })
    }

    fn human(&self) -> Result<(), Failure> {
        let source = self.config.map_or_else(
            || "the environment (no --config)".to_owned(),
            |p| p.display().to_string(),
        );
        say(format!(
            "plan for {} model(s) from {source}; predicted from the GGUF headers, nothing loaded",
            self.ok.len() + self.failed.len()
        ))?;
        say("")?;
        self.say_devices()?;
        if self.ok.is_empty() && self.failed.is_empty() {
            return say("no models configured");
        }
        say("")?;
        self.say_models()?;
        say("")?;
        if self.cands.is_empty() {
            return Ok(());
        }
        self.say_fit()?;
        self.say_largest()?;
        self.say_memory_notes()
    }

    /// The device table: memory, budget and what all models need; and why there is
    /// no GPU tier, if there is none.
    fn say_devices(&self) -> Result<(), Failure> {
        let a = self.analysis;
        let rows: Vec<Vec<String>> = self
            .devices()
            .into_iter()
            .map(|d| {
                let mem = self.machine.iter().find(|m| m.device == d);
                let has_budget = self.budgets.contains_key(&d);
                vec![
                    d.to_string(),
                    mem.map_or_else(|| "not on this machine".into(), |m| m.name.clone()),
                    mem.map_or_else(|| "-".into(), |m| bytes(m.total_bytes)),
                    mem.map_or_else(|| "-".into(), |m| bytes(m.available_bytes)),
                    bytes(budget(self.budgets, d)),
                    if has_budget {
                        budget_source(d, self.pool)
                    } else {
                        "none".into()
                    },
                    bytes(a.needed.get(&d).copied().unwrap_or(0)),
                ]
            })
            .collect();
        say(table(
            &[
                "DEVICE",
                "NAME",
                "TOTAL",
                "AVAILABLE",
                "BUDGET",
                "FROM",
                "ALL MODELS NEED",
            ],
            &[false, false, true, true, true, false, true],
            &rows,
        ))?;
        if let Some(reason) = self.gpu_absent {
            say(format!("no GPU tier: {reason}"))?;
        }
        Ok(())
    }

    /// The model table (a row of "?" for a model that cannot be predicted), then why
    /// each such model cannot be.
    fn say_models(&self) -> Result<(), Failure> {
        let a = self.analysis;
        let mut rows: Vec<Vec<String>> = self
            .ok
            .iter()
            .zip(&a.copies)
            .map(|((s, f), copies)| {
                vec![
                    s.id.clone(),
                    placement(s),
                    yes_no(s.pinned).into(),
                    s.context_length.to_string(),
                    mib(f.weights_bytes),
                    mib(f.kv_bytes),
                    mib(f.activation_bytes),
                    mib(f.overhead_bytes),
                    mib(f.total_bytes()),
                    copies.to_string(),
                ]
            })
            .collect();
        rows.extend(self.failed.iter().map(|(s, _)| {
            let mut row = vec![s.id.clone(), s.device.to_string(), yes_no(s.pinned).into()];
            row.extend(std::iter::repeat_n("?".to_owned(), 7));
            row
        }));
        say(table(
            &[
                "MODEL",
                "DEVICE",
                "PINNED",
                "CONTEXT",
                "WEIGHTS MiB",
                "KV CACHE MiB",
                "SCRATCH MiB",
                "OVERHEAD MiB",
                "PREDICTED MiB",
                "COPIES ALONE",
            ],
            &[
                false, false, false, true, true, true, true, true, true, true,
            ],
            &rows,
        ))?;
        for (s, e) in self.failed {
            say(format!("cannot predict {}: {e}", s.id))?;
        }
        Ok(())
    }

    /// Whether all models fit together; if not, which devices are over budget and which
    /// models fit.
    fn say_fit(&self) -> Result<(), Failure> {
        let a = self.analysis;
        if a.all_fit {
            say(format!("all {} model(s) fit together", self.cands.len()))?;
        } else {
            let over: Vec<String> = a
                .needed
                .iter()
                .filter(|(&d, &b)| b > budget(self.budgets, d))
                .map(|(&d, &b)| {
                    format!(
                        "{d} needs {} of a {} budget",
                        bytes(b),
                        bytes(budget(self.budgets, d))
                    )
                })
                .collect();
            say(format!("not all models fit together: {}", over.join("; ")))?;
            say(format!(
                "fits together (pinned first, then config order): {}",
                list(&self.ids(&a.fitting))
            ))?;
            say(format!("left out: {}", list(&self.ids(&a.left_out))))?;
        }
        Ok(())
    }

    /// What loading the largest model would evict.
    fn say_largest(&self) -> Result<(), Failure> {
        let a = self.analysis;
        if let Some(l) = &a.largest {
            let c = &self.cands[l.index];
            let head = format!("largest model: {} ({})", c.id, bytes(c.charge.total()));
            let line = match &l.outcome {
                Ok(v) if v.is_empty() => {
                    format!("{head}: fits with {} resident; nothing is evicted", list(&self.ids(&l.others)))
                }
                Ok(v) => format!(
                    "{head}: with {} resident, loading it evicts {} (taking config order as the order of last use)",
                    list(&self.ids(&l.others)),
                    v.join(", ")
                ),
                Err(short) => format!("{head}: cannot be loaded even after evicting every unpinned model: {short}"),
            };
            say(line)?;
        }
        Ok(())
    }

    /// A note for each device whose free memory, less the reserve, is below what the
    /// fitting models need.
    fn say_memory_notes(&self) -> Result<(), Failure> {
        let a = self.analysis;
        // The server also keeps `pool.reserve` of what the machine has free right now.
        for m in self.machine {
            let fitting: u64 = a
                .fitting
                .iter()
                .map(|&i| self.cands[i].charge.get(m.device))
                .sum();
            let room = m.available_bytes.saturating_sub(self.pool.reserve_bytes);
            if fitting > room {
                say(format!(
                    "note: {} has {} available right now, less the {} reserve: until memory frees up, fewer models fit than the budget allows",
                    m.device,
                    bytes(m.available_bytes),
                    bytes(self.pool.reserve_bytes)
                ))?;
            }
        }
        Ok(())
    }
}

fn list(ids: &[&str]) -> String {
    if ids.is_empty() {
        "none".into()
    } else {
        ids.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(id: &str, mib: u64, pinned: bool) -> Candidate {
        Candidate {
            id: id.into(),
            pinned,
            charge: Charge::on(Device::Cpu, mib << 20),
            mapped: None,
        }
    }

    /// A model charged `mib`, `file_mib` of it pages of file number `file`.
    fn mapping(id: &str, mib: u64, file: u64, file_mib: u64) -> Candidate {
        Candidate {
            mapped: Some(Mapped {
                file: FileId { dev: 1, ino: file },
                bytes: file_mib << 20,
            }),
            ..cand(id, mib, false)
        }
    }

    #[test]
    fn models_mapping_one_file_count_it_once() {
        // Two models of 300 MiB on one file of 200 MiB: 200 + 2 x 100 together.
        let cands = [mapping("a", 300, 7, 200), mapping("b", 300, 7, 200)];
        let a = analyse(&cpu(450), &cands);
        assert!(a.all_fit, "{a:?}");
        assert_eq!(a.needed[&Device::Cpu], 400 << 20);
        assert_eq!((a.fitting, a.copies), (vec![0, 1], vec![2, 2]));
        // Evicting b would free only its own 100 MiB: not enough for another file's
        // 300 MiB model, so both go.
        let c = mapping("c", 310, 8, 200);
        let a = analyse(&cpu(450), &[cands[0].clone(), cands[1].clone(), c]);
        let l = a.largest.unwrap();
        assert_eq!(l.index, 2);
        assert_eq!(l.outcome, Ok(vec!["a".to_string(), "b".to_string()]));
        // Two files are two charges.
        let apart = [mapping("a", 300, 7, 200), mapping("b", 300, 9, 200)];
        assert!(!analyse(&cpu(450), &apart).all_fit);
    }

    fn cpu(mib: u64) -> BTreeMap<Device, u64> {
        BTreeMap::from([(Device::Cpu, mib << 20)])
    }

    #[test]
    fn all_fit() {
        let a = analyse(&cpu(1000), &[cand("a", 300, false), cand("b", 400, false)]);
        assert!(a.all_fit);
        assert_eq!((a.fitting, a.left_out), (vec![0, 1], vec![]));
        assert_eq!(a.copies, vec![3, 2]);
        let l = a.largest.unwrap();
        assert_eq!((l.index, l.others), (1, vec![0]));
        assert_eq!(l.outcome, Ok(vec![]));
    }

    #[test]
    fn pinned_first_then_config_order_and_the_largest_evicts() {
        let cands = [
            cand("a", 400, false),
            cand("b", 300, false),
            cand("c", 500, true),
        ];
        let a = analyse(&cpu(1000), &cands);
        assert!(!a.all_fit);
        // c (pinned) first, then a; b no longer fits.
        assert_eq!((a.fitting, a.left_out), (vec![0, 2], vec![1]));
        let l = a.largest.unwrap();
        assert_eq!(l.index, 2);
        // Without c: a and b fit (700); c needs 500 more of 1000: evict a (first).
        assert_eq!(l.others, vec![0, 1]);
        assert_eq!(l.outcome, Ok(vec!["a".to_string()]));
    }

    #[test]
    fn a_model_bigger_than_its_budget_never_fits() {
        let a = analyse(&cpu(100), &[cand("big", 300, false)]);
        assert_eq!(a.copies, vec![0]);
        assert!(a.fitting.is_empty());
        assert!(a.largest.unwrap().outcome.is_err());
        // A GPU model on a machine without that GPU has no budget.
        let gpu = Candidate {
            id: "g".into(),
            pinned: false,
            charge: Charge::on(Device::Cuda(0), 1 << 20),
            mapped: None,
        };
        assert_eq!(analyse(&cpu(100), &[gpu]).copies, vec![0]);
    }
}
