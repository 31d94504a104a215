//! A model's KV budget grows at a load when its requests outnumber what the budget holds
//! and the room is spare; never by stopping another model.

use super::*;
use tokio::sync::broadcast;

/// `a`: 100 bytes plus its KV (2048 tokens: +20; grown to 8192: +81), 1024-token
/// context, so 2048 cells hold two requests at full context.
fn growing(id: &str) -> ModelSpec {
    let mut s = spec(id);
    s.context_length = 1024;
    s.max_sequences = 8;
    s.max_concurrency = 8;
    s.engine.llama_cpp.kv_budget_tokens = Some(2048);
    s.engine.llama_cpp.kv_budget_max_tokens = Some(8192);
    s
}

/// Holds `n` requests on `a` at once, then lets them go.
async fn burst(pool: &Pool<Arc<FakeBackend>>, n: usize) {
    let mut leases = Vec::new();
    for _ in 0..n {
        leases.push(pool.acquire("a", None).await.unwrap());
    }
    drop(leases);
}

fn kv_of(events: &mut broadcast::Receiver<crate::PoolEvent>) -> Vec<(Option<u32>, Option<u32>)> {
    let mut out = Vec::new();
    while let Ok(ev) = events.try_recv() {
        if let EventKind::LoadStarted {
            kv_budget_tokens,
            kv_grown_from,
            ..
        } = ev.kind
        {
            out.push((kv_budget_tokens, kv_grown_from));
        }
    }
    out
}

#[tokio::test(start_paused = true)]
async fn a_busy_model_gets_its_bigger_budget_at_the_next_load_when_room_is_spare() {
    let backend = FakeBackend::with(1000, &[("a", 100)]);
    let config = PoolConfig {
        budgets: BTreeMap::from([(Device::Cpu, 1000)]),
        ..PoolConfig::default()
    };
    let pool = pool_of(&backend, config, [growing("a")]);
    let mut events = pool.subscribe();
    // First load: nothing known of its demand yet, so the configured budget.
    burst(&pool, 4).await;
    let snap = pool.get("a").unwrap();
    assert_eq!(
        (snap.kv_budget_tokens, snap.kv_grown_from),
        (Some(2048), None)
    );
    assert_eq!(snap.charged_bytes, 120);
    // Four at once is more than 2048 cells hold at full context: the next load grows.
    pool.unload("a").await.unwrap();
    drop(pool.acquire("a", None).await.unwrap());
    let snap = pool.get("a").unwrap();
    assert_eq!(
        (snap.kv_budget_tokens, snap.kv_grown_from),
        (Some(8192), Some(2048))
    );
    assert_eq!(snap.charged_bytes, 181);
    assert_eq!(
        kv_of(&mut events),
        [(Some(2048), None), (Some(8192), Some(2048))]
    );
    // A quiet residency (one request) brings it back at the next load.
    pool.unload("a").await.unwrap();
    drop(pool.acquire("a", None).await.unwrap());
    let snap = pool.get("a").unwrap();
    assert_eq!(
        (snap.kv_budget_tokens, snap.kv_grown_from),
        (Some(2048), None)
    );
    assert!(!backend.over_budget.load(Ordering::SeqCst));
}

#[tokio::test(start_paused = true)]
async fn a_bigger_budget_never_stops_another_model() {
    // 250 bytes: `b` (100) and `a` at its own budget (120) fit together; grown (181) it
    // would need `b` gone, so it loads at its own budget and `b` stays.
    let backend = FakeBackend::with(250, &[("a", 100), ("b", 100)]);
    let config = PoolConfig {
        budgets: BTreeMap::from([(Device::Cpu, 250)]),
        ..PoolConfig::default()
    };
    let pool = pool_of(&backend, config, [growing("a"), spec("b")]);
    burst(&pool, 4).await;
    pool.unload("a").await.unwrap();
    drop(pool.acquire("b", None).await.unwrap());
    drop(pool.acquire("a", None).await.unwrap());
    let snap = pool.get("a").unwrap();
    assert_eq!(
        (snap.kv_budget_tokens, snap.kv_grown_from),
        (Some(2048), None)
    );
    assert_eq!(pool.get("b").unwrap().state, SlotState::Ready);
    assert!(!backend.over_budget.load(Ordering::SeqCst));
}
