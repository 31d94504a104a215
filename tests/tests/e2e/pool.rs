//! The pool with the real model: budgets, LRU eviction, leases, single-flight loads,
//! and memory that returns after load/evict cycles. Budgets are sized from the pool's
//! own prediction for SmolLM2 so that exactly two instances fit: every id maps the one
//! GGUF, whose pages the pool charges once, so an instance more is its own bytes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use modelpool_proto::v1::pool_event::Kind;
use modelpool_proto::v1::{
    EvictModelRequest, GetModelRequest, LoadModelRequest, ModelState, PoolEvent, WatchEventsRequest,
};
use modelpool_tests::{
    chat, collect, eventually, greedy, model_path, model_toml, process_alive, register_huge,
    settings_toml, OneFileFootprint, TestServer,
};
use tonic::Code;

const CONTEXT: u32 = 1024;

/// A server with models `ids` (one sequence, 1024 tokens each, all on the one GGUF) and
/// a RAM budget of `instances` predicted SmolLM2 instances: the file's pages once and
/// each instance's own bytes; `None`, said as a skip, where the machine has too little
/// memory available for the pool to keep that budget.
async fn server(ids: &[&str], instances: f64) -> Option<TestServer> {
    let budget = OneFileFootprint::predict(CONTEXT).bytes_for(instances);
    if let Err(why) = modelpool_tests::memory_for_budget(budget) {
        modelpool_tests::skipped(&why);
        return None;
    }
    let models: String = ids
        .iter()
        .map(|id| {
            model_toml(
                id,
                &format!("context_length = {CONTEXT}\nmax_sequences = 1\n"),
            )
        })
        .collect();
    let pool = format!("ram_budget = \"{budget}\"\n");
    Some(TestServer::start_with(|runtime| settings_toml(&pool, &models, runtime)).await)
}

/// Collects the pool's events from now on, in the background.
async fn watch(t: &TestServer) -> Arc<Mutex<Vec<PoolEvent>>> {
    let mut stream = t
        .control()
        .watch_events(WatchEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let keep = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok(Some(ev)) = stream.message().await {
            keep.lock().unwrap().push(ev);
        }
    });
    seen
}

fn evictions(events: &Mutex<Vec<PoolEvent>>) -> Vec<(String, String, String)> {
    events
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match &e.kind {
            Some(Kind::Evicted(ev)) => {
                Some((e.model.clone(), ev.reason.clone(), ev.detail.clone()))
            }
            _ => None,
        })
        .collect()
}

fn loads_started(events: &Mutex<Vec<PoolEvent>>, model: &str) -> usize {
    let events = events.lock().unwrap();
    events
        .iter()
        .filter(|e| e.model == model && matches!(e.kind, Some(Kind::LoadStarted(_))))
        .count()
}

async fn state(t: &TestServer, id: &str) -> (ModelState, u32) {
    let m = t
        .control()
        .get_model(GetModelRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner();
    (m.state(), m.worker_pid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn third_model_evicts_the_least_recently_used() {
    let Some(t) = server(&["a", "b", "c"], 2.5).await else {
        return;
    };
    let events = watch(&t).await;
    t.ask_capital("a").await;
    t.ask_capital("b").await;
    let (_, pid_b) = state(&t, "b").await;
    t.ask_capital("a").await; // b is now the least recently used
    assert!(t.ask_capital("c").await.contains("Paris"));
    assert!(eventually(Duration::from_secs(30), || !evictions(&events).is_empty()).await);
    assert_eq!(
        evictions(&events),
        vec![(
            "b".to_string(),
            "lru".to_string(),
            "making room for `c`".to_string()
        )]
    );
    assert_eq!(state(&t, "b").await.0, ModelState::Registered);
    assert!(!process_alive(pid_b), "the evicted worker is gone");
    assert_eq!(state(&t, "a").await.0, ModelState::Ready);
    // The budget still holds: two residents, nothing reserved.
    let status = t.pool_status().await;
    let ram = &status.devices[0];
    assert_eq!(ram.device, "cpu");
    assert!(ram.used_bytes <= ram.budget_bytes, "{ram:?}");
    assert_eq!(ram.reserved_bytes, 0);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_generating_is_never_the_victim() {
    let Some(t) = server(&["a", "b", "c"], 2.5).await else {
        return;
    };
    let events = watch(&t).await;
    // a starts a long generation and is the least recently used when c arrives.
    let long = || {
        chat(
            "a",
            "Write a long story about a dragon and a knight.",
            greedy(300),
        )
    };
    let mut a_stream = t.inference().chat(long()).await.unwrap().into_inner();
    a_stream.message().await.unwrap().expect("a is generating");
    t.ask_capital("b").await;
    t.ask_capital("c").await;
    assert!(eventually(Duration::from_secs(30), || !evictions(&events).is_empty()).await);
    assert_eq!(
        evictions(&events)[0].0,
        "b",
        "a holds a lease: b goes instead"
    );
    assert_eq!(state(&t, "a").await.0, ModelState::Ready);
    collect(a_stream).await.expect("a's generation completes");

    // Both residents busy: b waits for room (it would fit once they stop), here
    // until its 1 s deadline, within the fairness window: nothing is drained for it.
    let mut a_busy = t.inference().chat(long()).await.unwrap().into_inner();
    let c_long = chat(
        "c",
        "Write a long story about a dragon and a knight.",
        greedy(300),
    );
    let mut c_busy = t.inference().chat(c_long).await.unwrap().into_inner();
    a_busy.message().await.unwrap().expect("a generating");
    c_busy.message().await.unwrap().expect("c generating");
    let mut b = tonic::Request::new(chat("b", "Hi", greedy(4)));
    b.set_timeout(Duration::from_secs(1));
    let err = t.inference().chat(b).await.expect_err("no room for b");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        err.message().contains("waiting for room"),
        "{}",
        err.message()
    );
    assert_eq!(evictions(&events).len(), 1, "nothing else was evicted");
    drop((a_busy, c_busy));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_concurrent_requests_start_one_load() {
    let Some(t) = server(&["cold"], 2.5).await else {
        return;
    };
    let events = watch(&t).await;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let mut client = t.inference();
        tasks.push(tokio::spawn(async move {
            let stream = client
                .chat(chat("cold", "Hi", greedy(4)))
                .await?
                .into_inner();
            collect(stream).await
        }));
    }
    for task in tasks {
        let chunks = task.await.unwrap().expect("every request is served");
        assert!(chunks.last().unwrap().usage.is_some());
    }
    assert_eq!(loads_started(&events, "cold"), 1);
    // The load reported its stages as it went.
    let stages: Vec<String> = events
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match &e.kind {
            Some(Kind::LoadProgress(p)) => Some(p.stage.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        stages,
        [
            "starting worker process",
            "loading weights, tokenizer and chat template",
            "weights loaded; releasing load buffers",
            "connecting to the worker"
        ],
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_bigger_than_the_budget_fails_at_once() {
    let Some(t) = server(&["a"], 2.5).await else {
        return;
    };
    let events = watch(&t).await;
    t.ask_capital("a").await;
    register_huge(&t).await;
    let err = t
        .control()
        .load_model(LoadModelRequest {
            id: "huge".into(),
            ..Default::default()
        })
        .await
        .expect_err("huge does not fit");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains("needs") && err.message().contains("budget is"),
        "{}",
        err.message()
    );
    assert_eq!(loads_started(&events, "huge"), 0, "no worker was started");
    assert!(evictions(&events).is_empty(), "nothing was evicted for it");
    assert_eq!(state(&t, "a").await.0, ModelState::Ready);
    t.stop().await;
}

fn self_rss_and_threads() -> (u64, usize) {
    let rss = modelpool_pool::memory::process_rss(std::process::id()).0;
    let threads = std::fs::read_dir("/proc/self/task").unwrap().count();
    (rss, threads)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_load_evict_cycles_return_memory() {
    let Some(t) = server(&["m"], 2.5).await else {
        return;
    };
    let mut control = t.control();
    let load = LoadModelRequest {
        id: "m".into(),
        ..Default::default()
    };
    // One warm-up cycle so lazily initialised client and server state exists.
    control.load_model(load.clone()).await.unwrap();
    control
        .evict_model(EvictModelRequest { id: "m".into() })
        .await
        .unwrap();
    let (rss_before, threads_before) = self_rss_and_threads();
    let mut pids = Vec::new();
    for _ in 0..20 {
        let loaded = control.load_model(load.clone()).await.unwrap().into_inner();
        pids.push(loaded.model.unwrap().worker_pid);
        let evicted = control
            .evict_model(EvictModelRequest { id: "m".into() })
            .await
            .unwrap();
        assert!(evicted.into_inner().evicted);
    }
    let (rss_after, threads_after) = self_rss_and_threads();
    let drift = rss_after as i64 - rss_before as i64;
    assert!(
        drift.abs() < 10 << 20,
        "server RSS moved {drift} bytes over 20 cycles"
    );
    // A thread left per cycle would be 20 more; the test harness's own threads (other
    // tests starting and ending in this process) move the count by a few.
    assert!(
        threads_after <= threads_before + 4,
        "threads {threads_before} -> {threads_after} over 20 cycles"
    );
    assert!(
        pids.iter().all(|&p| p != 0 && !process_alive(p)),
        "a worker was left behind"
    );
    t.assert_nothing_charged().await;
    t.stop().await;
}

/// Two ids on the one GGUF, both on llama.cpp, which maps its tensors: the file's pages
/// are charged once, in a budget two full charges would overflow; they stay charged
/// while either id is resident, and nothing is charged once both are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ids_mapping_one_file_are_charged_its_weights_once() {
    let mut spec = modelpool_pool::ModelSpec::new("probe", model_path());
    spec.engine.kind = Some(modelpool_pool::EngineKind::LlamaCpp);
    (spec.context_length, spec.max_sequences) = (CONTEXT, 1);
    let predicted = modelpool_supervisor::footprint::predict(&spec).expect("the header reads");
    let weights = predicted.mapped_bytes;
    assert!(weights > 0, "llama.cpp maps the tensors: {predicted:?}");
    // One full charge and the other's own bytes fit; two full charges do not.
    let budget = 2 * predicted.total_bytes() - weights / 2;
    if let Err(why) = modelpool_tests::memory_for_budget(budget) {
        modelpool_tests::skipped(&why);
        return;
    }
    let t = TestServer::start_with(|runtime| {
        let extra =
            format!("engine = \"llama.cpp\"\ncontext_length = {CONTEXT}\nmax_sequences = 1\n");
        let models = model_toml("one", &extra) + &model_toml("two", &extra);
        settings_toml(&format!("ram_budget = \"{budget}\"\n"), &models, runtime)
    })
    .await;
    let events = watch(&t).await;
    let mut control = t.control();
    for id in ["one", "two"] {
        let load = LoadModelRequest {
            id: id.into(),
            ..Default::default()
        };
        control.load_model(load).await.unwrap();
    }
    let (one, two) = (t.model("one").await, t.model("two").await);
    assert_eq!(
        (one.state(), two.state()),
        (ModelState::Ready, ModelState::Ready)
    );
    assert_ne!(one.worker_pid, two.worker_pid);
    assert!(evictions(&events).is_empty(), "{:?}", evictions(&events));
    let used_both = t.pool_status().await.devices[0].used_bytes;
    // The first to map the file shows its pages, the second only its own bytes, and
    // the device counts the file once.
    assert_eq!(used_both, one.charged_bytes + two.charged_bytes);
    let near = |a: u64, b: u64| a.abs_diff(b) <= 8 << 20;
    assert!(
        near(one.charged_bytes, two.charged_bytes + weights),
        "one {} two {} weights {weights}",
        one.charged_bytes,
        two.charged_bytes
    );
    // Charged twice, the pages would not have fitted beside each other.
    assert!(
        used_both + weights > budget,
        "{used_both} + {weights} of {budget}"
    );

    // Evicting one keeps the pages charged, now on the other.
    control
        .evict_model(EvictModelRequest { id: "one".into() })
        .await
        .unwrap();
    let two_alone = t.model("two").await.charged_bytes;
    assert!(
        near(two_alone, two.charged_bytes + weights),
        "two alone {two_alone}, beside one {} weights {weights}",
        two.charged_bytes
    );
    let ram = &t.pool_status().await.devices[0];
    assert_eq!((ram.used_bytes, ram.reserved_bytes), (two_alone, 0));

    control
        .evict_model(EvictModelRequest { id: "two".into() })
        .await
        .unwrap();
    t.assert_nothing_charged().await;
    t.stop().await;
}
