//! Removal, cancellation and deadlines: callers that go away mid-operation, loads and
//! leases that outlive their model's registration, pins a failed load must not keep, and
//! requests that arrive too late.

use super::*;

/// A request for `id` on a task of its own, dropping its lease at once.
fn spawn_acquire(
    pool: &Pool<Arc<FakeBackend>>,
    id: &'static str,
) -> tokio::task::JoinHandle<Result<(), PoolError>> {
    let pool = pool.clone();
    tokio::spawn(async move { pool.acquire(id, None).await.map(drop) })
}

/// Starts loading `a`, then removes it with no drain while the (50 ms) load runs;
/// returns the load.
async fn retire_mid_load(
    pool: &Pool<Arc<FakeBackend>>,
) -> tokio::task::JoinHandle<Result<Duration, PoolError>> {
    let loading = spawn_load(pool, "a");
    tokio::time::sleep(Duration::from_millis(10)).await;
    pool.retire("a", Duration::ZERO).await.unwrap();
    loading
}

/// `LoadModel` for `id` on a task of its own.
fn spawn_load(
    pool: &Pool<Arc<FakeBackend>>,
    id: &'static str,
) -> tokio::task::JoinHandle<Result<Duration, PoolError>> {
    let pool = pool.clone();
    tokio::spawn(async move { pool.load(id, false, None).await })
}

/// An EvictModel whose client goes away while the worker stops: the stop still
/// completes, the bytes are released, and the model loads again on the next request.
#[tokio::test(start_paused = true)]
async fn a_cancelled_unload_still_releases_the_model() {
    let backend = FakeBackend::with(0, &[]);
    let pool = pool_with(&backend, 1000, &["a"]);
    pool.load("a", false, None).await.unwrap();
    // The fake takes 5 ms to stop; the caller gives up after 1.
    let cut = tokio::time::timeout(Duration::from_millis(1), pool.unload("a")).await;
    assert!(cut.is_err(), "the unload should have been cut short");
    settle().await;
    assert!(backend.live_ids().is_empty());
    let dev = &pool.status().devices[0];
    assert_eq!((dev.used_bytes, dev.reserved_bytes), (0, 0));
    pool.acquire("a", None).await.unwrap();
    assert_eq!(backend.loads.load(Ordering::SeqCst), 2);
}

/// A retire (UnregisterModel, ReloadConfig) whose caller goes away mid-drain still
/// removes the model once its requests finish, instead of leaving it refusing them.
#[tokio::test(start_paused = true)]
async fn a_cancelled_retire_still_removes_the_model() {
    let backend = FakeBackend::with(0, &[]);
    let pool = pool_with(&backend, 1000, &["a"]);
    let lease = pool.acquire("a", None).await.unwrap();
    let cut = tokio::time::timeout(
        Duration::from_millis(10),
        pool.retire("a", Duration::from_secs(5)),
    )
    .await;
    assert!(
        cut.is_err(),
        "the drain should still be waiting for the lease"
    );
    drop(lease);
    settle().await;
    assert!(backend.live_ids().is_empty());
    assert!(matches!(
        pool.acquire("a", None).await,
        Err(PoolError::NotFound { .. })
    ));
    assert_eq!(pool.status().devices[0].used_bytes, 0);
}

/// A load that outlives its model (retired past the drain, then forgotten) stops the
/// worker it started instead of leaving it running off the books.
#[tokio::test(start_paused = true)]
async fn a_load_that_outlives_its_model_stops_its_worker() {
    let backend = FakeBackend::with(0, &[]);
    let pool = pool_with(&backend, 1000, &["a"]);
    let loading = retire_mid_load(&pool).await;
    assert!(loading.await.unwrap().is_err());
    settle().await;
    assert!(
        backend.live_ids().is_empty(),
        "worker left: {:?}",
        backend.live_ids()
    );
}

/// `LoadModel(pin = true)` whose load fails leaves the model unpinned, as it was.
#[tokio::test(start_paused = true)]
async fn a_pin_with_a_failed_load_is_taken_back() {
    let backend = FakeBackend::with(0, &[]);
    let pool = pool_with(&backend, 1000, &["a", "b"]);
    backend.fail.store(true, Ordering::SeqCst);
    assert!(pool.load("a", true, None).await.is_err());
    assert!(!pool.get("a").unwrap().spec.pinned);
    // A pin that was there before the failed load stays.
    pool.set_pinned("b", true).unwrap();
    assert!(pool.load("b", true, None).await.is_err());
    assert!(pool.get("b").unwrap().spec.pinned);
}

/// A lease from before a removal does not touch the model registered anew under the
/// same id: dropping it leaves the new lease counted, so the new worker stays protected.
#[tokio::test(start_paused = true)]
async fn an_old_lease_leaves_a_new_registration_alone() {
    let backend = FakeBackend::with(0, &[]);
    let pool = pool_with(&backend, 1000, &["a"]);
    let old = pool.acquire("a", None).await.unwrap();
    // Past its (zero) drain the old registration is cut and forgotten.
    pool.retire("a", Duration::ZERO).await.unwrap();
    pool.register(spec("a")).unwrap();
    let new = pool.acquire("a", None).await.unwrap();
    drop(old);
    assert_eq!(pool.get("a").unwrap().in_flight, 1);
    assert!(matches!(
        pool.unload("a").await,
        Err(PoolError::Busy { .. })
    ));
    drop(new);
    assert!(pool.unload("a").await.unwrap());
}

/// A load of a removed registration finishing after the id was registered anew stops
/// its own worker and leaves the new registration's load alone: one worker at the end,
/// charged once.
#[tokio::test(start_paused = true)]
async fn an_old_load_leaves_a_new_registration_alone() {
    let backend = FakeBackend::with(0, &[]);
    let pool = pool_with(&backend, 1000, &["a"]);
    let old = retire_mid_load(&pool).await;
    pool.register(spec("a")).unwrap();
    let new = spawn_load(&pool, "a");
    assert!(old.await.unwrap().is_err());
    new.await.unwrap().unwrap();
    settle().await;
    assert_eq!(backend.live_ids(), ["a"]);
    assert_eq!(backend.loads.load(Ordering::SeqCst), 2);
    assert_eq!(pool.status().devices[0].used_bytes, 100);
}

/// A request whose deadline has already passed is refused as a timeout that says so,
/// not as a busy group slot.
#[tokio::test(start_paused = true)]
async fn a_request_past_its_deadline_is_told_so() {
    let backend = FakeBackend::with(0, &[]);
    let pool = pool_with(&backend, 1000, &["a"]);
    let past = Instant::now() - Duration::from_millis(1);
    match pool.acquire("a", Some(past)).await {
        Err(PoolError::QueueTimeout {
            by_client, reason, ..
        }) => {
            assert!(by_client);
            assert!(
                reason.contains("before the model could be checked"),
                "{reason}"
            );
        }
        other => panic!("expected a timeout, got {:?}", other.err()),
    }
    assert_eq!(backend.loads.load(Ordering::SeqCst), 0);
}

/// Removing a model whose worker is being evicted for room returns only once that
/// worker has exited: its bytes never leave the books while the process lives.
#[tokio::test(start_paused = true)]
async fn removing_a_model_mid_eviction_waits_for_its_worker() {
    let backend = FakeBackend::with(0, &[]);
    let pool = pool_with(&backend, 150, &["a", "b"]);
    drop(pool.acquire("a", None).await.unwrap());
    let b = spawn_acquire(&pool, "b");
    // b's load evicts a, whose worker takes 5 ms to stop.
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(pool.get("a").unwrap().state, SlotState::Unloading);
    pool.retire("a", Duration::ZERO).await.unwrap();
    assert!(!backend.live_ids().contains(&"a".to_owned()));
    b.await.unwrap().unwrap();
}

/// The spilled copy a load reads is protected from the load's start: a spill that
/// overflows the spill budget while the worker starts evicts another artifact, not it.
#[tokio::test]
async fn a_loading_model_keeps_its_spilled_copy() {
    use crate::store::{path_key, Store};
    let root = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(&root.path().join("spill"), 25 << 10).unwrap();
    let store = Arc::new(store);
    let source = |name: &str| {
        let path = root.path().join(format!("{name}.gguf"));
        std::fs::write(&path, vec![name.len() as u8; 10 << 10]).unwrap();
        let key = path_key(&path).unwrap();
        (path, key)
    };
    let (a, a_key) = source("a");
    let (b, b_key) = source("bb");
    let (c, c_key) = source("ccc");
    store.spill_file(&a_key, &a).unwrap();
    store.spill_file(&b_key, &b).unwrap();
    let backend = FakeBackend::with(0, &[]);
    let config = PoolConfig {
        budgets: BTreeMap::from([(Device::Cpu, 1000)]),
        store: Some(Arc::clone(&store)),
        ..PoolConfig::default()
    };
    let pool = pool_of(&backend, config, [ModelSpec::new("a", &a)]);
    let loading = spawn_load(&pool, "a");
    // The load has started (its files protected) once `a` leaves Registered; the real
    // clock runs here, so wait for that rather than for a guess at how long it takes.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while pool.get("a").unwrap().state == SlotState::Registered {
        assert!(
            std::time::Instant::now() < deadline,
            "the load never started"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // `a` is now the least recently used artifact, and a third one overflows the budget.
    assert!(store.lookup(&b_key).is_some());
    store.spill_file(&c_key, &c).unwrap();
    loading.await.unwrap().unwrap();
    assert!(
        store.lookup(&a_key).is_some(),
        "the loading model's copy was evicted"
    );
    assert!(store.lookup(&b_key).is_none());
    // Once its worker stops, the copy competes again (released exactly once).
    assert!(pool.unload("a").await.unwrap());
    assert_eq!(store.usage().held_bytes, 0);
    assert!(store.lookup(&a_key).is_some());
}

/// A request waiting for a concurrency slot of a model that is removed meanwhile is told
/// the model is being removed (UNAVAILABLE at the edge), not that it was never there.
#[tokio::test(start_paused = true)]
async fn a_request_queued_for_a_removed_model_hears_it_is_removed() {
    let backend = FakeBackend::with(0, &[]);
    let pool = one_model(&backend, 1);
    let held = pool.acquire("a", None).await.unwrap();
    let queued = spawn_acquire(&pool, "a");
    tokio::time::sleep(Duration::from_millis(10)).await;
    pool.retire("a", Duration::ZERO).await.unwrap();
    assert!(matches!(
        queued.await.unwrap(),
        Err(PoolError::Retiring { .. })
    ));
    drop(held);
}
