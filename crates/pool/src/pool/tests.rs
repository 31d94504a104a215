//! Pool logic against a fake backend and a fake machine: no processes, no model.

use super::*;
use crate::memory::DeviceMemory;
use crate::{Charge, Footprint};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use tokio::sync::watch;

mod kv_growth;
mod removal;
mod sharing;
mod turns;

/// Loads take 50 ms; each model's footprint is its entry in `sizes` (100 by default).
#[derive(Default)]
struct FakeBackend {
    loads: AtomicU32,
    fail: AtomicBool,
    sizes: HashMap<String, u64>,
    /// Bytes of a model's footprint that are pages of its file, mapped (none unless
    /// listed).
    mapped: HashMap<String, u64>,
    /// Instances alive now: (id, bytes).
    live: Arc<Mutex<Vec<(String, u64)>>>,
    /// Set when a load started while live bytes plus its own exceeded `budget`.
    over_budget: AtomicBool,
    budget: u64,
    /// Per live instance, a switch that makes it "crash".
    crash: Mutex<HashMap<String, watch::Sender<bool>>>,
}

impl FakeBackend {
    fn with(budget: u64, sizes: &[(&str, u64)]) -> Arc<Self> {
        Arc::new(Self {
            budget,
            sizes: sizes.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            ..Default::default()
        })
    }
    fn size(&self, id: &str) -> u64 {
        self.sizes.get(id).copied().unwrap_or(100)
    }
    /// Kills `id`'s instance as a signal would: it leaves the live list and its
    /// `exited` resolves.
    fn crash(&self, id: &str) {
        self.live.lock().unwrap().retain(|(i, _)| i != id);
        if let Some(tx) = self.crash.lock().unwrap().get(id) {
            let _ = tx.send(true);
        }
    }

    fn live_ids(&self) -> Vec<String> {
        self.live
            .lock()
            .unwrap()
            .iter()
            .map(|(i, _)| i.clone())
            .collect()
    }
}

struct FakeInstance {
    id: String,
    bytes: u64,
    /// The backend's live list, which shutting down leaves.
    live: Arc<Mutex<Vec<(String, u64)>>>,
    crashed: watch::Receiver<bool>,
}

impl Instance for FakeInstance {
    fn pid(&self) -> Option<u32> {
        Some(42)
    }
    fn resident_bytes(&self) -> u64 {
        self.bytes
    }
    async fn shutdown(&self) {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut live = self.live.lock().unwrap();
        let at = live
            .iter()
            .position(|(i, _)| *i == self.id)
            .expect("shut down twice");
        live.remove(at);
    }
    async fn exited(&self) -> String {
        let mut rx = self.crashed.clone();
        let _ = rx.wait_for(|c| *c).await;
        "killed by signal 9 (SIGKILL)".into()
    }
}

/// The fake's quantization: 8-bit halves a model, 4-bit quarters it.
fn precision_divisor(spec: &ModelSpec) -> u64 {
    match spec.precision.as_deref() {
        Some("q8_0") => 2,
        Some("q4_0") => 4,
        _ => 1,
    }
}

impl Backend for FakeBackend {
    type Instance = FakeInstance;
    fn footprint(&self, spec: &ModelSpec) -> Result<Footprint, BackendError> {
        let bytes = fake_bytes(self, spec);
        Ok(Footprint {
            weights_bytes: bytes,
            mapped_bytes: self.mapped.get(&spec.id).copied().unwrap_or(0),
            kv_bytes: 0,
            overhead_bytes: 0,
            activation_bytes: 0,
            charge: Charge::on(Device::Cpu, bytes),
            kv_resident_at_load: false,
        })
    }
    async fn load(
        &self,
        spec: &ModelSpec,
        progress: crate::Progress,
    ) -> Result<FakeInstance, BackendError> {
        progress("starting");
        self.loads.fetch_add(1, Ordering::SeqCst);
        let bytes = fake_bytes(self, spec);
        {
            let mut live = self.live.lock().unwrap();
            let total: u64 = live.iter().map(|(_, b)| b).sum::<u64>() + bytes;
            if self.budget > 0 && total > self.budget {
                self.over_budget.store(true, Ordering::SeqCst);
            }
            live.push((spec.id.clone(), bytes));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        if self.fail.load(Ordering::SeqCst) {
            self.live.lock().unwrap().retain(|(i, _)| *i != spec.id);
            return Err(BackendError::InvalidModel("not a gguf file".into()));
        }
        let (tx, crashed) = watch::channel(false);
        self.crash.lock().unwrap().insert(spec.id.clone(), tx);
        Ok(FakeInstance {
            id: spec.id.clone(),
            bytes,
            live: Arc::clone(&self.live),
            crashed,
        })
    }
}

/// A fake model's bytes: its size at its precision, plus a byte per 100 tokens of KV
/// budget (none without one).
fn fake_bytes(backend: &FakeBackend, spec: &ModelSpec) -> u64 {
    let kv = spec
        .engine
        .llama_cpp
        .kv_budget_tokens
        .map_or(0, |t| u64::from(t) / 100);
    backend.size(&spec.id) / precision_divisor(spec) + kv
}

/// A machine with `available` bytes of RAM free.
struct FakeProbe(AtomicU64);

impl MemoryProbe for FakeProbe {
    fn devices(&self) -> Vec<DeviceMemory> {
        vec![DeviceMemory {
            device: Device::Cpu,
            name: "fake RAM".into(),
            total_bytes: 1 << 40,
            available_bytes: self.0.load(Ordering::SeqCst),
        }]
    }
}

fn spec(id: &str) -> ModelSpec {
    ModelSpec::new(id, format!("/models/{id}.gguf"))
}

fn pool_with(backend: &Arc<FakeBackend>, budget: u64, ids: &[&str]) -> Pool<Arc<FakeBackend>> {
    let config = PoolConfig {
        budgets: BTreeMap::from([(Device::Cpu, budget)]),
        ..PoolConfig::default()
    };
    pool_of(backend, config, ids.iter().map(|i| spec(i)))
}

/// A pool on a machine with a terabyte free.
fn pool_of(
    backend: &Arc<FakeBackend>,
    config: PoolConfig,
    specs: impl IntoIterator<Item = ModelSpec>,
) -> Pool<Arc<FakeBackend>> {
    let probe = Arc::new(FakeProbe(AtomicU64::new(1 << 40)));
    Pool::new(Arc::clone(backend), probe, config, specs)
}

/// A pool of model `a` alone, taking `max_concurrency` requests at once.
fn one_model(backend: &Arc<FakeBackend>, max_concurrency: u32) -> Pool<Arc<FakeBackend>> {
    let mut a = spec("a");
    a.max_concurrency = max_concurrency;
    pool_of(backend, PoolConfig::default(), [a])
}

fn evictions(rx: &mut broadcast::Receiver<PoolEvent>) -> Vec<(String, EvictReason)> {
    let mut out = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        if let EventKind::Evicted { reason, .. } = ev.kind {
            out.push((ev.model, reason));
        }
    }
    out
}

async fn settle() {
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[tokio::test(start_paused = true)]
async fn concurrent_acquires_share_one_load() {
    let backend = FakeBackend::with(0, &[]);
    let pool = one_model(&backend, 10);
    let mut handles = Vec::new();
    for _ in 0..10 {
        let pool = pool.clone();
        handles.push(tokio::spawn(async move {
            pool.acquire("a", None).await.map(|l| l.cold_start())
        }));
    }
    for h in handles {
        assert!(
            h.await.unwrap().unwrap(),
            "every request waited for the one load"
        );
    }
    assert_eq!(backend.loads.load(Ordering::SeqCst), 1);
    let snap = pool.get("a").unwrap();
    assert_eq!(
        (snap.state, snap.in_flight, snap.loads_started),
        (SlotState::Ready, 0, 1)
    );
    let warm = pool.acquire("a", None).await.unwrap();
    assert!(!warm.cold_start());
    assert_eq!(warm.load_wait(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_crashed_worker_frees_its_bytes_and_repeated_crashes_back_off() {
    let backend = FakeBackend::with(0, &[]);
    let pool = pool_with(&backend, 1000, &["a"]);
    let mut events = pool.subscribe();
    for round in 1..=3 {
        drop(pool.acquire("a", None).await.unwrap());
        backend.crash("a");
        settle().await;
        let snap = pool.get("a").unwrap();
        assert_eq!(snap.state, SlotState::Failed, "round {round}");
        assert!(snap.last_error.unwrap().contains("SIGKILL"));
        assert_eq!(pool.status().devices[0].used_bytes, 0);
    }
    let crashed = evictions(&mut events)
        .into_iter()
        .filter(|(_, r)| matches!(r, EvictReason::Crashed { .. }))
        .count();
    assert_eq!(crashed, 3);
    // Three crashes within a minute: no fourth load for now, and the reason says why.
    let err = pool.acquire("a", None).await.err().unwrap();
    assert!(
        matches!(err, PoolError::CrashLoop { failures: 3, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("SIGKILL"), "{err}");
    assert_eq!(backend.loads.load(Ordering::SeqCst), 3);
    // After the back-off the model loads again.
    tokio::time::sleep(Duration::from_secs(31)).await;
    drop(pool.acquire("a", None).await.unwrap());
    assert_eq!(backend.loads.load(Ordering::SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn loads_report_stages_and_forecast_from_the_last_load() {
    let backend = FakeBackend::with(0, &[]);
    let pool = pool_with(&backend, 1000, &["a"]);
    let mut events = pool.subscribe();
    drop(pool.acquire("a", None).await.unwrap());
    pool.unload("a").await.unwrap();
    drop(pool.acquire("a", None).await.unwrap());
    let mut seen = Vec::new();
    while let Ok(ev) = events.try_recv() {
        match ev.kind {
            EventKind::LoadStarted { expected, .. } => seen.push(("started", expected)),
            EventKind::LoadProgress {
                stage, expected, ..
            } => {
                assert_eq!(stage, "starting");
                seen.push(("progress", expected));
            }
            _ => {}
        }
    }
    let last = Some(Duration::from_millis(50));
    assert_eq!(
        seen,
        vec![
            ("started", None),
            ("progress", None),
            ("started", last),
            ("progress", last)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn failed_load_reaches_every_waiter_and_can_be_retried() {
    let backend = FakeBackend::with(0, &[]);
    backend.fail.store(true, Ordering::SeqCst);
    let pool = pool_with(&backend, 1000, &["a"]);
    let (r1, r2) = tokio::join!(pool.acquire("a", None), pool.acquire("a", None));
    assert!(matches!(r1, Err(PoolError::LoadFailed { .. })));
    assert!(matches!(r2, Err(PoolError::LoadFailed { .. })));
    assert_eq!(pool.get("a").unwrap().state, SlotState::Failed);
    assert_eq!(
        pool.status().devices[0].reserved_bytes,
        0,
        "a failed load releases its reservation"
    );
    backend.fail.store(false, Ordering::SeqCst);
    pool.acquire("a", None).await.unwrap();
    assert_eq!(backend.loads.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn least_recently_used_idle_model_makes_room() {
    let backend = FakeBackend::with(250, &[]);
    let pool = pool_with(&backend, 250, &["a", "b", "c"]);
    let mut events = pool.subscribe();
    drop(pool.acquire("a", None).await.unwrap());
    drop(pool.acquire("b", None).await.unwrap());
    drop(pool.acquire("a", None).await.unwrap()); // b is now least recently used
    drop(pool.acquire("c", None).await.unwrap());
    settle().await;
    let reason = EvictReason::MakeRoom {
        for_model: "c".into(),
    };
    assert_eq!(evictions(&mut events), vec![("b".to_string(), reason)]);
    assert_eq!(pool.get("b").unwrap().state, SlotState::Registered);
    assert!(!backend.over_budget.load(Ordering::SeqCst));
    let dev = &pool.status().devices[0];
    assert_eq!(
        (dev.used_bytes, dev.reserved_bytes, dev.free_bytes),
        (200, 0, 50)
    );
}

#[tokio::test(start_paused = true)]
async fn leased_model_is_never_a_victim() {
    let backend = FakeBackend::with(250, &[]);
    let pool = pool_with(&backend, 250, &["a", "b", "c"]);
    let held_a = pool.acquire("a", None).await.unwrap();
    drop(pool.acquire("b", None).await.unwrap());
    // a is least recently used but leased: b goes.
    let _c = pool.acquire("c", None).await.unwrap();
    assert_eq!(pool.get("a").unwrap().state, SlotState::Ready);
    assert_eq!(pool.get("b").unwrap().state, SlotState::Registered);
    // Now a and c are both leased: b waits for room (until its 1 s deadline, within
    // the fairness window), and nothing is evicted.
    let mut events = pool.subscribe();
    let deadline = Instant::now() + Duration::from_secs(1);
    match pool.acquire("b", Some(deadline)).await {
        Err(PoolError::QueueTimeout { reason, .. }) => {
            assert!(reason.contains("waiting for room"), "{reason}");
        }
        other => panic!("expected QueueTimeout, got {:?}", other.err()),
    }
    assert!(evictions(&mut events).is_empty());
    drop(held_a);
    assert_eq!(pool.get("b").unwrap().state, SlotState::Registered);
}

#[tokio::test(start_paused = true)]
async fn too_big_for_the_whole_budget_fails_at_once_evicting_nothing() {
    let backend = FakeBackend::with(0, &[("huge", 10_000)]);
    let pool = pool_with(&backend, 250, &["a", "huge"]);
    drop(pool.acquire("a", None).await.unwrap());
    let mut events = pool.subscribe();
    let started = Instant::now();
    let err = pool.acquire("huge", None).await.err().unwrap();
    assert!(started.elapsed() < Duration::from_millis(1));
    assert!(
        err.to_string()
            .contains("needs 9.8 KiB of cpu, budget is 250 B"),
        "{err}"
    );
    assert!(evictions(&mut events).is_empty());
    assert_eq!(pool.get("a").unwrap().state, SlotState::Ready);
    assert_eq!(backend.loads.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn pinned_model_stays() {
    let backend = FakeBackend::with(0, &[]);
    let pool = pool_with(&backend, 250, &["a", "b", "c"]);
    pool.load("a", true, None).await.unwrap();
    drop(pool.acquire("b", None).await.unwrap());
    drop(pool.acquire("c", None).await.unwrap());
    assert_eq!(pool.get("a").unwrap().state, SlotState::Ready);
    assert!(matches!(
        pool.unload("a").await,
        Err(PoolError::Pinned { .. })
    ));
    pool.set_pinned("a", false).unwrap();
    assert!(pool.unload("a").await.unwrap());
}

#[tokio::test(start_paused = true)]
async fn idle_ttl_unloads() {
    let backend = FakeBackend::with(0, &[]);
    let mut s = spec("a");
    s.idle_ttl = Some(Duration::from_secs(2));
    let pool = pool_of(&backend, PoolConfig::default(), [s]);
    let mut events = pool.subscribe();
    let lease = pool.acquire("a", None).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        pool.get("a").unwrap().state,
        SlotState::Ready,
        "leased models never expire"
    );
    drop(lease);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(pool.get("a").unwrap().state, SlotState::Ready);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(pool.get("a").unwrap().state, SlotState::Registered);
    assert!(matches!(
        evictions(&mut events)[..],
        [(_, EvictReason::IdleTtl { .. })]
    ));
    assert!(backend.live_ids().is_empty());
}

#[tokio::test(start_paused = true)]
async fn concurrency_slots_queue_and_time_out() {
    let backend = FakeBackend::with(0, &[]);
    let mut s = spec("a");
    s.max_concurrency = 2;
    let config = PoolConfig {
        queue_depth: 3,
        ..PoolConfig::default()
    };
    let pool = pool_of(&backend, config, [s]);
    let l1 = pool.acquire("a", None).await.unwrap();
    let _l2 = pool.acquire("a", None).await.unwrap();
    // The third waits for a slot; it gets one when the first lease is dropped.
    let waiter = tokio::spawn({
        let pool = pool.clone();
        async move { pool.acquire("a", None).await.map(|_| ()) }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(pool.get("a").unwrap().waiting, 1);
    drop(l1);
    waiter.await.unwrap().unwrap();
    // With both slots held, a deadline ends the wait with the reason.
    let _l3 = pool.acquire("a", None).await.unwrap();
    let deadline = Instant::now() + Duration::from_millis(200);
    let err = pool.acquire("a", Some(deadline)).await.err().unwrap();
    assert!(
        matches!(
            err,
            PoolError::QueueTimeout {
                by_client: true,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("all 2 concurrency slots"), "{err}");
    // Without a deadline of its own, the pool's queue timeout (60 s) ends the wait.
    let err = pool.acquire("a", None).await.err().unwrap();
    assert!(
        matches!(
            err,
            PoolError::QueueTimeout {
                by_client: false,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("pool.queue_timeout"), "{err}");
    // A full queue refuses at once.
    let mut waiting = Vec::new();
    for _ in 0..3 {
        let pool = pool.clone();
        waiting.push(tokio::spawn(async move {
            pool.acquire("a", None).await.map(|_| ())
        }));
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(matches!(
        pool.acquire("a", None).await,
        Err(PoolError::QueueFull { waiting: 3, .. })
    ));
    for w in waiting {
        w.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn memory_used_by_other_processes_counts() {
    let backend = FakeBackend::with(0, &[]);
    let probe = Arc::new(FakeProbe(AtomicU64::new(150)));
    let config = PoolConfig {
        budgets: BTreeMap::from([(Device::Cpu, 1000)]),
        headroom_bytes: 40,
        ..PoolConfig::default()
    };
    let pool = Pool::new(
        Arc::clone(&backend),
        probe.clone(),
        config,
        [spec("a"), spec("b")],
    );
    // 150 available less 40 headroom leaves 110: one 100-byte model fits.
    drop(pool.acquire("a", None).await.unwrap());
    probe.0.store(50, Ordering::SeqCst); // a took its 100
                                         // b fits only by evicting a, whose 100 bytes return to the machine.
    drop(pool.acquire("b", None).await.unwrap());
    assert_eq!(pool.get("a").unwrap().state, SlotState::Registered);
    assert!(pool.unload("b").await.unwrap());
    probe.0.store(60, Ordering::SeqCst); // b's memory went to another process
    let err = pool.acquire("a", None).await.err().unwrap();
    assert!(matches!(err, PoolError::InsufficientMemory { .. }), "{err}");
    // The message says the configured budget was capped by the machine: 60 available
    // less 40 headroom.
    assert!(
        err.to_string().contains(
            "budget is 20 B (1000 B configured, capped by the memory the machine has available)"
        ),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn register_and_unregister() {
    let backend = FakeBackend::with(0, &[]);
    let pool = pool_with(&backend, 1000, &["a"]);
    assert!(matches!(
        pool.register(spec("a")),
        Err(PoolError::AlreadyExists { .. })
    ));
    pool.register(spec("b")).unwrap();
    let lease = pool.acquire("b", None).await.unwrap();
    assert!(matches!(
        pool.unregister("b").await,
        Err(PoolError::Busy { in_flight: 1, .. })
    ));
    drop(lease);
    pool.unregister("b").await.unwrap();
    assert!(backend.live_ids().is_empty());
    assert!(matches!(
        pool.acquire("b", None).await,
        Err(PoolError::NotFound { .. })
    ));
}

mod sequences {
    //! Random sequences of acquire/release/pin/unpin/evict, crashes and failing loads
    //! against the invariants.
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Acquire(usize),
        Release(usize),
        Pin(usize),
        Unpin(usize),
        Evict(usize),
        /// The model's worker dies (its leases are released first).
        Crash(usize),
        /// Loads fail from now on, or succeed again.
        FailLoads(bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..4usize).prop_map(Op::Acquire),
            3 => (0..4usize).prop_map(Op::Release),
            1 => (0..4usize).prop_map(Op::Pin),
            1 => (0..4usize).prop_map(Op::Unpin),
            1 => (0..4usize).prop_map(Op::Evict),
            1 => (0..4usize).prop_map(Op::Crash),
            1 => any::<bool>().prop_map(Op::FailLoads),
        ]
    }

    const IDS: [&str; 4] = ["m0", "m1", "m2", "m3"];

    async fn run(sizes: Vec<u64>, budget: u64, ops: Vec<Op>) -> Result<(), TestCaseError> {
        let table: Vec<(&str, u64)> = IDS.iter().copied().zip(sizes.iter().copied()).collect();
        let backend = FakeBackend::with(budget, &table);
        let pool = pool_with(&backend, budget, &IDS);
        let mut events = pool.subscribe();
        let mut leases: Vec<Vec<Lease<Arc<FakeBackend>>>> = (0..4).map(|_| Vec::new()).collect();
        // Our own model of recency: least recently used first.
        let mut recency: Vec<usize> = Vec::new();
        for op in ops {
            let before: Vec<SlotState> = IDS.iter().map(|i| pool.get(i).unwrap().state).collect();
            let pinned: Vec<bool> = IDS
                .iter()
                .map(|i| pool.get(i).unwrap().spec.pinned)
                .collect();
            match op.clone() {
                Op::Acquire(i) if leases[i].len() >= 4 => {}
                Op::Acquire(i) => {
                    // Who may go, in LRU order, if room is needed for i.
                    let candidates: Vec<String> = recency
                        .iter()
                        .filter(|&&m| {
                            m != i
                                && before[m] == SlotState::Ready
                                && leases[m].is_empty()
                                && !pinned[m]
                        })
                        .map(|&m| IDS[m].to_string())
                        .collect();
                    // Within the fairness window: a model that does not fit waits,
                    // then gives up, and no leased model is drained for it.
                    let deadline = Instant::now() + Duration::from_secs(1);
                    let result = pool.acquire(IDS[i], Some(deadline)).await;
                    settle().await;
                    let evicted: Vec<String> =
                        evictions(&mut events).into_iter().map(|(m, _)| m).collect();
                    prop_assert!(
                        candidates.starts_with(&evicted),
                        "evicted {:?}, LRU order {:?}",
                        evicted,
                        candidates
                    );
                    match result {
                        Ok(lease) => {
                            leases[i].push(lease);
                            recency.retain(|&m| m != i);
                            recency.push(i);
                        }
                        Err(PoolError::InsufficientMemory { .. })
                        | Err(PoolError::QueueTimeout { .. })
                        | Err(PoolError::CrashLoop { .. }) => {
                            prop_assert!(evicted.is_empty())
                        }
                        // The victims made room for a load that then failed.
                        Err(PoolError::LoadFailed { .. }) => {
                            prop_assert_eq!(pool.get(IDS[i]).unwrap().state, SlotState::Failed)
                        }
                        Err(e) => prop_assert!(false, "unexpected {}", e),
                    }
                }
                Op::Release(i) => {
                    leases[i].pop();
                }
                Op::Pin(i) => drop(pool.set_pinned(IDS[i], true).unwrap()),
                Op::Unpin(i) => drop(pool.set_pinned(IDS[i], false).unwrap()),
                Op::Evict(i) => {
                    let r = pool.unload(IDS[i]).await;
                    if !leases[i].is_empty() {
                        let busy = matches!(r, Err(PoolError::Busy { .. }));
                        prop_assert!(busy);
                    }
                    let _ = evictions(&mut events);
                }
                Op::Crash(i) => {
                    leases[i].clear();
                    backend.crash(IDS[i]);
                    settle().await;
                    let _ = evictions(&mut events);
                    if before[i] == SlotState::Ready {
                        let after = pool.get(IDS[i]).unwrap();
                        prop_assert_eq!(after.state, SlotState::Failed);
                        prop_assert!(after.charged_bytes == 0, "{:?}", after.charged_bytes);
                    }
                }
                Op::FailLoads(fail) => backend.fail.store(fail, Ordering::SeqCst),
            }
            let wrong = pool.inner.lock().inconsistencies();
            prop_assert!(wrong.is_empty(), "{:?}", wrong);
            prop_assert!(
                !backend.over_budget.load(Ordering::SeqCst),
                "a load started over budget"
            );
            let status = pool.status();
            let dev = &status.devices[0];
            prop_assert!(dev.used_bytes + dev.reserved_bytes <= budget);
            for (m, held) in leases.iter().enumerate() {
                if !held.is_empty() {
                    prop_assert_eq!(pool.get(IDS[m]).unwrap().state, SlotState::Ready);
                }
                // A pin keeps a model from eviction, not its worker from dying.
                let crashed = matches!(op, Op::Crash(c) if c == m);
                if pinned[m] && before[m] == SlotState::Ready && !crashed {
                    prop_assert_eq!(pool.get(IDS[m]).unwrap().state, SlotState::Ready);
                }
            }
            recency.retain(|&m| pool.get(IDS[m]).unwrap().state == SlotState::Ready);
        }
        drop(leases);
        pool.shutdown().await;
        prop_assert!(backend.live_ids().is_empty());
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn budget_leases_pins_and_lru_hold(
            sizes in proptest::collection::vec(50u64..200, 4),
            budget in 150u64..500,
            ops in proptest::collection::vec(op(), 1..40),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(run(sizes, budget, ops))?;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_model_that_does_not_fit_at_its_best_precision_loads_at_the_next_that_fits() {
    // 400 bytes at full precision, 200 at 8-bit, 100 at 4-bit; the budget is 250 and
    // `small` (100) is pinned, so 150 is the most room there can be.
    let backend = FakeBackend::with(250, &[("big", 400), ("small", 100)]);
    let mut big = spec("big");
    big.format = crate::ModelFormat::Safetensors;
    big.precisions = vec!["none".into(), "q8_0".into(), "q4_0".into()];
    let mut small = spec("small");
    small.pinned = true;
    let config = PoolConfig {
        budgets: BTreeMap::from([(Device::Cpu, 250)]),
        ..PoolConfig::default()
    };
    let pool = pool_of(&backend, config, [big, small]);
    let mut events = pool.subscribe();
    drop(pool.acquire("small", None).await.unwrap());
    drop(pool.acquire("big", None).await.unwrap());
    let snap = pool.get("big").unwrap();
    assert_eq!(snap.precision.as_deref(), Some("q4_0"));
    assert_eq!(snap.predicted.unwrap().total_bytes(), 100);
    assert_eq!(pool.get("small").unwrap().state, SlotState::Ready);
    assert!(!backend.over_budget.load(Ordering::SeqCst));
    let mut started = None;
    while let Ok(ev) = events.try_recv() {
        if let EventKind::LoadStarted { precision, .. } = ev.kind {
            if ev.model == "big" {
                started = precision;
            }
        }
    }
    assert_eq!(started.as_deref(), Some("q4_0"));

    // With the pin gone, 8-bit fits by evicting `small`: the best precision that can
    // fit is preferred over keeping an idle model.
    pool.set_pinned("small", false).unwrap();
    pool.unload("big").await.unwrap();
    drop(pool.acquire("big", None).await.unwrap());
    assert_eq!(pool.get("big").unwrap().precision.as_deref(), Some("q8_0"));
    assert_eq!(pool.get("small").unwrap().state, SlotState::Registered);
}

#[tokio::test(start_paused = true)]
async fn a_model_that_fits_at_no_precision_is_refused_with_the_smallest_numbers() {
    let backend = FakeBackend::with(250, &[("big", 2000)]);
    let mut big = spec("big");
    big.format = crate::ModelFormat::Safetensors;
    big.precisions = vec!["none".into(), "q8_0".into(), "q4_0".into()];
    let config = PoolConfig {
        budgets: BTreeMap::from([(Device::Cpu, 250)]),
        ..PoolConfig::default()
    };
    let pool = pool_of(&backend, config, [big]);
    let err = pool.acquire("big", None).await.err().unwrap();
    assert!(matches!(err, PoolError::InsufficientMemory { .. }), "{err}");
    // The last (smallest) precision's need is what is reported: 500 bytes, and the
    // message names every precision tried.
    assert!(err.to_string().contains("500 B"), "{err}");
    assert!(
        err.to_string().contains(
            "does not fit at any of its precisions (none, q8_0, q4_0; the numbers are for q4_0)"
        ),
        "{err}"
    );
    assert_eq!(backend.loads.load(Ordering::SeqCst), 0);
}

/// A retire waits for its model's last request by notification: it goes on the moment
/// the lease is dropped, not at the next tick of a timer (paused clock: the only time
/// that passes is the fake worker's shutdown).
#[tokio::test(start_paused = true)]
async fn a_retire_goes_on_when_its_last_request_ends() {
    let backend = FakeBackend::with(0, &[]);
    let pool = pool_with(&backend, 1000, &["a"]);
    let lease = pool.acquire("a", None).await.unwrap();
    let retiring = tokio::spawn({
        let pool = pool.clone();
        async move { pool.retire("a", Duration::from_secs(60)).await }
    });
    tokio::time::sleep(Duration::from_millis(1234)).await;
    let dropped_at = tokio::time::Instant::now();
    drop(lease);
    retiring.await.unwrap().unwrap();
    assert_eq!(dropped_at.elapsed(), Duration::from_millis(5));
    assert!(backend.live_ids().is_empty());
}
