//! Pool logic against a fake backend: no processes, no model.

use super::*;
use crate::ModelFormat;
use std::sync::atomic::{AtomicU32, Ordering};

#[derive(Default)]
struct FakeBackend {
    loads: AtomicU32,
    fail: bool,
}

struct FakeInstance;

impl Instance for FakeInstance {
    fn pid(&self) -> Option<u32> {
        Some(42)
    }
    fn resident_bytes(&self) -> u64 {
        1000
    }
    async fn shutdown(&self) {}
}

impl Backend for Arc<FakeBackend> {
    type Instance = FakeInstance;
    async fn load(&self, _spec: &ModelSpec) -> Result<FakeInstance, BackendError> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
        if self.fail {
            Err(BackendError::InvalidModel("not a gguf file".into()))
        } else {
            Ok(FakeInstance)
        }
    }
}

fn spec(id: &str) -> ModelSpec {
    ModelSpec {
        id: id.into(),
        source: format!("/models/{id}.gguf").into(),
        format: ModelFormat::Gguf,
        context_length: 2048,
        max_sequences: 4,
    }
}

#[tokio::test]
async fn concurrent_acquires_share_one_load() {
    let backend = Arc::new(FakeBackend::default());
    let pool = Pool::new(Arc::clone(&backend), [spec("a")]);
    let mut handles = Vec::new();
    for _ in 0..10 {
        let pool = pool.clone();
        handles.push(tokio::spawn(async move { pool.acquire("a").await }));
    }
    let mut leases = Vec::new();
    for h in handles {
        leases.push(h.await.unwrap().unwrap());
    }
    assert_eq!(backend.loads.load(Ordering::SeqCst), 1);
    assert!(leases.iter().all(|l| l.cold_start()));
    assert_eq!(pool.get("a").unwrap().in_flight, 10);
    drop(leases);
    let snap = pool.get("a").unwrap();
    assert_eq!(snap.in_flight, 0);
    assert_eq!(snap.state, SlotState::Ready);
    assert_eq!(snap.loads_started, 1);
    let warm = pool.acquire("a").await.unwrap();
    assert!(!warm.cold_start());
    assert_eq!(warm.load_wait(), Duration::ZERO);
}

#[tokio::test]
async fn unknown_model_names_the_known_ones() {
    let pool = Pool::new(Arc::new(FakeBackend::default()), [spec("a"), spec("b")]);
    let err = pool.acquire("zzz").await.err().unwrap();
    assert_eq!(
        err.to_string(),
        "model `zzz` is not registered (registered: a, b)"
    );
}

#[tokio::test]
async fn failed_load_reaches_every_waiter_and_is_retried_later() {
    let backend = Arc::new(FakeBackend {
        fail: true,
        ..Default::default()
    });
    let pool = Pool::new(Arc::clone(&backend), [spec("a")]);
    let (r1, r2) = tokio::join!(pool.acquire("a"), pool.acquire("a"));
    for r in [r1, r2] {
        let msg = r.err().unwrap().to_string();
        assert!(msg.contains("not a gguf file"), "{msg}");
    }
    assert_eq!(backend.loads.load(Ordering::SeqCst), 1);
    let snap = pool.get("a").unwrap();
    assert_eq!(snap.state, SlotState::Failed);
    assert!(pool.acquire("a").await.is_err());
    assert_eq!(backend.loads.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn shutdown_refuses_new_leases() {
    let pool = Pool::new(Arc::new(FakeBackend::default()), [spec("a")]);
    drop(pool.acquire("a").await.unwrap());
    pool.shutdown().await;
    assert_eq!(pool.get("a").unwrap().state, SlotState::Registered);
    assert!(matches!(
        pool.acquire("a").await,
        Err(PoolError::ShuttingDown)
    ));
}

#[tokio::test]
async fn unload_refuses_a_leased_model_and_stops_an_idle_one() {
    let backend = Arc::new(FakeBackend::default());
    let pool = Pool::new(Arc::clone(&backend), [spec("a")]);
    let lease = pool.acquire("a").await.unwrap();
    assert!(matches!(
        pool.unload("a").await,
        Err(PoolError::Busy { in_flight: 1, .. })
    ));
    drop(lease);
    assert!(pool.unload("a").await.unwrap());
    assert_eq!(pool.get("a").unwrap().state, SlotState::Registered);
    assert!(!pool.unload("a").await.unwrap());
    drop(pool.acquire("a").await.unwrap());
    assert_eq!(backend.loads.load(Ordering::SeqCst), 2);
}
