//! Weights mapped from one file by several models: the file's pages are charged once,
//! stay charged while any of its mappers is resident, and leave no bytes behind.

use super::*;
use crate::GroupSpec;

/// Models of 100 bytes, 70 of them pages of their file, and a model `c` of `c_bytes`
/// that maps nothing.
fn mapping_backend(c_bytes: u64) -> Arc<FakeBackend> {
    backend_of(
        &[("a", 100), ("b", 100), ("c", c_bytes)],
        &[("a", 70), ("b", 70)],
    )
}

/// A fake backend with these model sizes, `mapped` bytes of which are file pages.
fn backend_of(sizes: &[(&str, u64)], mapped: &[(&str, u64)]) -> Arc<FakeBackend> {
    let owned = |kv: &[(&str, u64)]| kv.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    Arc::new(FakeBackend {
        sizes: owned(sizes),
        mapped: owned(mapped),
        ..Default::default()
    })
}

/// Specs of `a` and `b` on one file, spelled two ways (the file and a symlink to it),
/// and `c` on a file of its own. Keep the directory alive while the pool runs.
fn specs_on_one_file() -> (tempfile::TempDir, Vec<ModelSpec>) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.gguf");
    std::fs::write(&file, b"GGUF").unwrap();
    let link = dir.path().join("alias.gguf");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    let other = dir.path().join("other.gguf");
    std::fs::write(&other, b"GGUF").unwrap();
    let specs = vec![
        ModelSpec::new("a", file),
        ModelSpec::new("b", link),
        ModelSpec::new("c", other),
    ];
    (dir, specs)
}

fn pool_on_one_file(
    backend: &Arc<FakeBackend>,
    budget: u64,
    groups: Vec<GroupSpec>,
) -> (tempfile::TempDir, Pool<Arc<FakeBackend>>) {
    let (dir, specs) = specs_on_one_file();
    let config = PoolConfig {
        budgets: BTreeMap::from([(Device::Cpu, budget)]),
        groups,
        ..PoolConfig::default()
    };
    (dir, pool_of(backend, config, specs))
}

fn charged(pool: &Pool<Arc<FakeBackend>>) -> Vec<(String, u64)> {
    pool.snapshot()
        .into_iter()
        .map(|s| (s.spec.id, s.charged_bytes))
        .collect()
}

fn used_and_reserved(pool: &Pool<Arc<FakeBackend>>) -> (u64, u64) {
    let dev = &pool.status().devices[0];
    (dev.used_bytes, dev.reserved_bytes)
}

fn freed(rx: &mut broadcast::Receiver<PoolEvent>) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        if let EventKind::Evicted { freed_bytes, .. } = ev.kind {
            out.push((ev.model, freed_bytes));
        }
    }
    out
}

#[tokio::test(start_paused = true)]
async fn two_models_mapping_one_file_are_charged_its_pages_once() {
    let backend = mapping_backend(50);
    // Room for one copy of the file's pages, not two: 100 + 30 <= 150 < 200.
    let (_dir, pool) = pool_on_one_file(&backend, 150, Vec::new());
    let mut events = pool.subscribe();
    pool.load("a", false, None).await.unwrap();
    pool.load("b", false, None).await.unwrap();
    assert_eq!(backend.live_ids(), ["a", "b"], "b loaded beside a");
    assert_eq!(used_and_reserved(&pool), (130, 0));
    // The first to map the file shows its pages; the other only its own bytes.
    let c = ("c".to_owned(), 0);
    assert_eq!(
        charged(&pool),
        [("a".into(), 100), ("b".into(), 30), c.clone()]
    );

    // Removing one keeps the pages charged, now to the other.
    assert!(pool.unload("a").await.unwrap());
    assert_eq!(used_and_reserved(&pool), (100, 0));
    assert_eq!(charged(&pool), [("a".into(), 0), ("b".into(), 100), c]);
    assert!(pool.unload("b").await.unwrap());
    assert_eq!(used_and_reserved(&pool), (0, 0), "no byte left behind");
    assert_eq!(freed(&mut events), [("a".into(), 30), ("b".into(), 100)]);
}

#[tokio::test(start_paused = true)]
async fn evicting_one_of_two_mappers_frees_only_its_own_bytes() {
    // `c` needs 80 of 160 with `a` and `b` holding 130: `a` alone frees 30, too few.
    let backend = mapping_backend(80);
    let (_dir, pool) = pool_on_one_file(&backend, 160, Vec::new());
    pool.load("a", false, None).await.unwrap();
    pool.load("b", false, None).await.unwrap();
    let mut events = pool.subscribe();
    pool.load("c", false, None).await.unwrap();
    assert_eq!(backend.live_ids(), ["c"]);
    assert_eq!(freed(&mut events), [("a".into(), 30), ("b".into(), 100)]);
    assert_eq!(used_and_reserved(&pool), (80, 0));

    // Needing 50, evicting the least recently used mapper is enough: the other keeps
    // the file.
    let backend = mapping_backend(50);
    let (_dir, pool) = pool_on_one_file(&backend, 160, Vec::new());
    pool.load("a", false, None).await.unwrap();
    pool.load("b", false, None).await.unwrap();
    pool.load("c", false, None).await.unwrap();
    assert_eq!(backend.live_ids(), ["b", "c"]);
    assert_eq!(used_and_reserved(&pool), (150, 0));
    assert_eq!(charged(&pool)[1], ("b".into(), 100));
}

#[tokio::test(start_paused = true)]
async fn a_crashed_mapper_leaves_the_pages_to_the_other_until_it_goes_too() {
    let backend = mapping_backend(50);
    let (_dir, pool) = pool_on_one_file(&backend, 1000, Vec::new());
    pool.load("a", false, None).await.unwrap();
    pool.load("b", false, None).await.unwrap();
    let mut events = pool.subscribe();
    backend.crash("a");
    settle().await;
    assert_eq!(used_and_reserved(&pool), (100, 0));
    backend.crash("b");
    settle().await;
    assert_eq!(used_and_reserved(&pool), (0, 0));
    assert_eq!(freed(&mut events), [("a".into(), 30), ("b".into(), 100)]);
}

#[tokio::test(start_paused = true)]
async fn swap_slot_members_on_one_file_share_the_group_share() {
    let backend = mapping_backend(50);
    // A group share of 150 bytes holds both only when the file counts once.
    let group = GroupSpec {
        name: "slot".into(),
        members: vec!["a".into(), "b".into()],
        max_resident: 2,
        budget_bytes: Some(150),
        drain_timeout: Duration::from_secs(1),
        min_residency: Duration::ZERO,
        refuse_during_swap: false,
    };
    let (_dir, pool) = pool_on_one_file(&backend, 1000, vec![group]);
    pool.load("a", false, None).await.unwrap();
    pool.load("b", false, None).await.unwrap();
    assert_eq!(backend.live_ids(), ["a", "b"]);
    let status = pool.status();
    assert_eq!(status.groups[0].resident_bytes, 130);
    assert_eq!(status.devices[0].used_bytes, 130);
}

#[tokio::test(start_paused = true)]
async fn a_load_making_room_is_charged_its_file_only_as_its_victim_frees_it() {
    // `a` and `c` map 70 of their 100 bytes each, from two files; room for one.
    let backend = backend_of(&[("a", 100), ("c", 100)], &[("a", 70), ("c", 70)]);
    let (_dir, pool) = pool_on_one_file(&backend, 110, Vec::new());
    pool.load("a", false, None).await.unwrap();
    let loading = tokio::spawn({
        let pool = pool.clone();
        async move { pool.load("c", false, None).await }
    });
    // While `a`'s worker stops (5 ms, and the clock stands still here), the books hold
    // its bytes and `c`'s reservation: never more than the budget, in total or as
    // status shows it per model.
    let mut seen_handover = false;
    for _ in 0..50 {
        tokio::task::yield_now().await;
        let (used, reserved) = used_and_reserved(&pool);
        let shown: u64 = charged(&pool).iter().map(|(_, b)| b).sum();
        assert!(used + reserved <= 110, "used {used} + reserved {reserved}");
        assert!(shown <= 110, "{:?}", charged(&pool));
        let states: Vec<SlotState> = pool.snapshot().into_iter().map(|s| s.state).collect();
        seen_handover |=
            states.contains(&SlotState::Loading) && states.contains(&SlotState::Unloading);
    }
    assert!(seen_handover, "the test saw `c` loading while `a` stopped");
    loading.await.unwrap().unwrap();
    assert_eq!(backend.live_ids(), ["c"]);
    assert_eq!(used_and_reserved(&pool), (100, 0));
    assert_eq!(charged(&pool).iter().map(|(_, b)| b).sum::<u64>(), 100);
}
