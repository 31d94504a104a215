//! Turns: requests for a model that fits only once busy models stop wait instead of
//! being refused, and get a turn (a busy model drained for them) after the fairness
//! window; pinned models stay; deadlines the next turn cannot meet are told early.

use super::*;
use crate::turns::TurnPolicy;

/// Room for two of `ids` (100 bytes each), the default turn policy: fairness window
/// 3 s, min_residency 10 s, drain_timeout 30 s.
fn two_slots(backend: &Arc<FakeBackend>, ids: &[&str]) -> Pool<Arc<FakeBackend>> {
    let config = PoolConfig {
        budgets: BTreeMap::from([(Device::Cpu, 250)]),
        turns: TurnPolicy::default(),
        ..PoolConfig::default()
    };
    pool_of(backend, config, ids.iter().map(|i| spec(i)))
}

fn acquire_later(
    pool: &Pool<Arc<FakeBackend>>,
    id: &'static str,
) -> tokio::task::JoinHandle<Result<Lease<Arc<FakeBackend>>, PoolError>> {
    let pool = pool.clone();
    tokio::spawn(async move { pool.acquire(id, None).await })
}

fn reason(pool: &Pool<Arc<FakeBackend>>, id: &str) -> String {
    pool.get(id).unwrap().waiting_reason.unwrap_or_default()
}

/// Turn events as (model, "started"/"finished", outgoing).
fn turns(rx: &mut broadcast::Receiver<PoolEvent>) -> Vec<(String, &'static str, Vec<String>)> {
    let mut out = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        match ev.kind {
            EventKind::TurnStarted { outgoing, .. } => out.push((ev.model, "started", outgoing)),
            EventKind::TurnFinished { .. } => out.push((ev.model, "finished", vec![])),
            _ => {}
        }
    }
    out
}

#[tokio::test(start_paused = true)]
async fn a_model_that_fits_once_busy_models_stop_waits_for_its_turn() {
    let backend = FakeBackend::with(250, &[]);
    let pool = two_slots(&backend, &["a", "b", "c"]);
    let held_a = pool.acquire("a", None).await.unwrap();
    let held_b = pool.acquire("b", None).await.unwrap();
    let mut events = pool.subscribe();
    let c = acquire_later(&pool, "c");
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Within the fairness window: it waits, nothing is drained.
    assert!(!c.is_finished(), "refused at once");
    assert_eq!(reason(&pool, "c"), "waiting for room");
    // Past it, but `a` and `b` are younger than min_residency (10 s).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let why = reason(&pool, "c");
    assert!(
        why.starts_with("waiting for its turn: `a` stays resident"),
        "{why}"
    );
    assert!(turns(&mut events).is_empty());
    // At 10 s the least recently used (`a`) drains for `c`: it keeps its lease, and a
    // new request for it queues.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(reason(&pool, "a"), "draining for model `c`");
    let why = reason(&pool, "c");
    assert!(
        why.contains("its turn has begun (`a` draining for it)"),
        "{why}"
    );
    let a_again = acquire_later(&pool, "a");
    settle().await;
    assert!(!a_again.is_finished());
    assert_eq!(pool.get("a").unwrap().state, SlotState::Ready);
    // Its running request ends: it is evicted for `c`, which loads.
    drop(held_a);
    let lease_c = c.await.unwrap().unwrap();
    assert!(lease_c.cold_start());
    let seen = turns(&mut events);
    assert_eq!(
        seen,
        vec![
            ("c".to_string(), "started", vec!["a".to_string()]),
            ("c".to_string(), "finished", vec![])
        ]
    );
    assert!(!backend.over_budget.load(Ordering::SeqCst));
    assert_eq!(pool.status().turns_total, 1);
    // `a`'s queued request now waits for room with `b` and `c` busy; its turn drains
    // `b` (resident long enough, `c` is not), whose request still running is cut at
    // drain_timeout with the reason.
    let lease_a = a_again.await.unwrap().unwrap();
    assert_eq!(lease_a.model_id(), "a");
    let cut = held_b.cut_reason().expect("b's request was cut");
    assert!(
        cut.contains("gave its turn to `a`") && cut.contains("drain_timeout of 30s"),
        "{cut}"
    );
    assert_eq!(pool.get("c").unwrap().state, SlotState::Ready);
    assert!(!backend.over_budget.load(Ordering::SeqCst));
    drop((lease_a, lease_c));
}

#[tokio::test(start_paused = true)]
async fn turns_evict_with_the_turn_reason_and_idle_models_make_room_first() {
    let backend = FakeBackend::with(250, &[]);
    let pool = two_slots(&backend, &["a", "b", "c"]);
    let mut events = pool.subscribe();
    let held_a = pool.acquire("a", None).await.unwrap();
    drop(pool.acquire("b", None).await.unwrap());
    // `b` is idle: it goes at once for `c`, no turn needed.
    drop(pool.acquire("c", None).await.unwrap());
    let make_room = EvictReason::MakeRoom {
        for_model: "c".into(),
    };
    settle().await;
    assert_eq!(evictions(&mut events), vec![("b".to_string(), make_room)]);
    // `c` idle again, `a` busy: `b` takes `c`'s place without a turn.
    drop(pool.acquire("b", None).await.unwrap());
    settle().await;
    assert_eq!(evictions(&mut events).len(), 1);
    assert_eq!(pool.status().turns_total, 0);
    // Now `b` is held too; `c` gets a turn, and `a` (least recently used) goes with
    // the turn's reason.
    let held_b = pool.acquire("b", None).await.unwrap();
    let c = acquire_later(&pool, "c");
    tokio::time::sleep(Duration::from_secs(11)).await;
    drop(held_a);
    drop(c.await.unwrap().unwrap());
    settle().await;
    let turn = EvictReason::Turn {
        for_model: "c".into(),
    };
    assert_eq!(evictions(&mut events), vec![("a".to_string(), turn)]);
    drop(held_b);
}

#[tokio::test(start_paused = true)]
async fn pinned_models_are_never_drained_and_what_fits_only_without_them_is_refused() {
    let backend = FakeBackend::with(0, &[("big", 200)]);
    let pool = two_slots(&backend, &["big", "c", "d"]);
    pool.load("big", true, None).await.unwrap();
    let held_big = pool.acquire("big", None).await.unwrap();
    // 200 pinned of 250: `c` (100) can never fit; refused at once.
    let started = Instant::now();
    let err = pool.acquire("c", None).await.err().unwrap();
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert!(matches!(err, PoolError::InsufficientMemory { .. }), "{err}");
    // Unpinned, it could go: `c` waits and gets its turn.
    pool.set_pinned("big", false).unwrap();
    let c = acquire_later(&pool, "c");
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(reason(&pool, "big"), "draining for model `c`");
    drop(held_big);
    drop(c.await.unwrap().unwrap());
}

#[tokio::test(start_paused = true)]
async fn a_deadline_the_next_turn_cannot_meet_is_told_early_with_the_estimate() {
    let backend = FakeBackend::with(250, &[]);
    let pool = two_slots(&backend, &["a", "b", "c"]);
    let _held_a = pool.acquire("a", None).await.unwrap();
    let _held_b = pool.acquire("b", None).await.unwrap();
    // `c` may get its turn only when `a` has been resident 10 s; the request allows 6.
    let started = Instant::now();
    let err = pool
        .acquire("c", Some(started + Duration::from_secs(6)))
        .await
        .err()
        .unwrap();
    // Told at the end of its fairness window (3 s), not at its deadline.
    assert_eq!(started.elapsed().as_secs(), 3, "{err}");
    let PoolError::TurnTooLate {
        by_client,
        left,
        eta,
        ..
    } = &err
    else {
        panic!("{err}");
    };
    assert!(*by_client);
    assert!(*eta > *left && *eta <= Duration::from_secs(7), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("waiting for its turn: `a` stays resident"),
        "{text}"
    );
    assert!(text.contains("the next turn serves it in"), "{text}");
    // Nobody waits now: no turn was started, nothing drained.
    assert_eq!(pool.status().turns_total, 0);
    assert_eq!(pool.get("c").unwrap().waiting_reason, None);
}

#[tokio::test(start_paused = true)]
async fn the_longest_waiting_model_goes_first() {
    let backend = FakeBackend::with(250, &[]);
    let pool = two_slots(&backend, &["a", "b", "c", "d"]);
    let held_a = pool.acquire("a", None).await.unwrap();
    let held_b = pool.acquire("b", None).await.unwrap();
    let mut events = pool.subscribe();
    let d = acquire_later(&pool, "d");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let c = acquire_later(&pool, "c");
    tokio::time::sleep(Duration::from_secs(9)).await;
    // `d` waited longer: its turn runs, `c` waits behind it.
    let why = reason(&pool, "c");
    assert!(
        why.starts_with("waiting for its turn: `d` goes first"),
        "{why}"
    );
    drop(held_a);
    let lease_d = d.await.unwrap().unwrap();
    // Then `c`: `b` drains for it.
    drop(held_b);
    let lease_c = c.await.unwrap().unwrap();
    let order: Vec<String> = turns(&mut events)
        .into_iter()
        .filter(|(_, what, _)| *what == "started")
        .map(|(m, _, _)| m)
        .collect();
    assert_eq!(order, ["d", "c"]);
    drop((lease_c, lease_d));
    assert!(!backend.over_budget.load(Ordering::SeqCst));
}

/// Three models wanted all the time, room for two: every model is served, the budget
/// holds, and turns stay within what min_residency allows.
#[tokio::test(start_paused = true)]
async fn three_models_wanted_with_room_for_two_are_all_served() {
    let backend = FakeBackend::with(250, &[]);
    let pool = two_slots(&backend, &["a", "b", "c"]);
    let served: Arc<Mutex<HashMap<&'static str, u32>>> = Arc::default();
    let mut clients = Vec::new();
    for i in 0..6 {
        let id = ["a", "b", "c"][i % 3];
        let pool = pool.clone();
        let served = Arc::clone(&served);
        clients.push(tokio::spawn(async move {
            let until = Instant::now() + Duration::from_secs(120);
            while Instant::now() < until {
                let lease = pool.acquire(id, None).await.expect("served in time");
                *served.lock().unwrap().entry(id).or_default() += 1;
                tokio::time::sleep(Duration::from_millis(700)).await;
                drop(lease);
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    let served = served.lock().unwrap().clone();
    for id in ["a", "b", "c"] {
        assert!(served.get(id).copied().unwrap_or(0) > 10, "{served:?}");
    }
    assert!(!backend.over_budget.load(Ordering::SeqCst));
    let status = pool.status();
    // Two slots, min_residency 10 s: at most 2 * (60 / 10 + 1) turns a minute.
    assert!(
        status.turns_last_minute <= 14,
        "{}",
        status.turns_last_minute
    );
    assert!(status.turns_total >= 2, "{}", status.turns_total);
}

#[tokio::test(start_paused = true)]
async fn a_turn_its_requests_give_up_on_leaves_its_victim_serving() {
    let backend = FakeBackend::with(250, &[]);
    let pool = two_slots(&backend, &["a", "b", "c"]);
    let held_a = pool.acquire("a", None).await.unwrap();
    let _held_b = pool.acquire("b", None).await.unwrap();
    let mut events = pool.subscribe();
    // `a` drains for `c` at 10 s; `c`'s only request gives up at 12 s.
    let err = pool
        .acquire("c", Some(Instant::now() + Duration::from_secs(12)))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, PoolError::QueueTimeout { .. }), "{err}");
    assert!(err.to_string().contains("its turn has begun"), "{err}");
    assert_eq!(turns(&mut events).len(), 1, "the turn had started");
    // `a` stays, no longer draining, and serves at once.
    settle().await;
    assert_eq!(pool.get("a").unwrap().waiting_reason, None);
    drop(pool.acquire("a", None).await.unwrap());
    drop(held_a);
    settle().await;
    assert_eq!(pool.get("a").unwrap().state, SlotState::Ready);
    assert!(evictions(&mut events).is_empty());
}
