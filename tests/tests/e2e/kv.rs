//! Admission by KV room (llama.cpp): a model's sequences share one KV cache of
//! `kv_budget` cells, and a request starts once its prompt and answer fit the cells
//! free; short requests run side by side, long ones wait their turn instead of running
//! the cache out mid-generation.

use std::time::Duration;

use modelpool_proto::v1::{GetModelRequest, KvCache};
use modelpool_tests::{chat, collect, greedy, model_toml, settings_toml, TestServer};

/// Two models alike: 512 tokens of context, 4 sequences, 1024 cells shared.
async fn server() -> TestServer {
    TestServer::start_with(|runtime| {
        let extra = "engine = \"llama.cpp\"\ncontext_length = 512\nmax_sequences = 4\n\
                     max_concurrency = 4\nkv_budget = 1024\nprefix_cache = false\n";
        settings_toml(
            "",
            &(model_toml("long", extra) + &model_toml("short", extra)),
            runtime,
        )
    })
    .await
}

/// The model's KV cache, once it is ready.
async fn kv_cache_now(t: &TestServer, id: &str) -> Option<KvCache> {
    t.control()
        .get_model(GetModelRequest { id: id.into() })
        .await
        .expect("get model")
        .into_inner()
        .kv_cache
}

async fn kv_cache(t: &TestServer, id: &str) -> KvCache {
    kv_cache_now(t, id).await.expect("a ready llama.cpp model")
}

/// Four requests at once on `id`, each answering up to `max_tokens`; returns the most
/// requests seen waiting for room and the most cells seen taken, while they ran.
async fn four_at_once(t: &TestServer, id: &str, max_tokens: u32) -> (u32, u64) {
    let requests: Vec<_> = (0..4)
        .map(|i| {
            let mut client = t.inference();
            let request = chat(
                id,
                &format!("Count from {i} upwards, one number a line."),
                greedy(max_tokens),
            );
            tokio::spawn(async move {
                let stream = client
                    .chat(request)
                    .await
                    .expect("chat starts")
                    .into_inner();
                collect(stream).await.expect("chat completes")
            })
        })
        .collect();
    let (mut waiting, mut taken) = (0, 0);
    while !requests.iter().all(|r| r.is_finished()) {
        if let Some(kv) = kv_cache_now(t, id).await {
            assert!(kv.cells_reserved <= u64::from(kv.cells), "{kv:?}");
            waiting = waiting.max(kv.waiting_for_room);
            taken = taken.max(kv.cells_reserved);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for r in requests {
        let chunks = r.await.expect("request task");
        let usage = chunks.last().and_then(|c| c.usage).expect("usage");
        assert!(usage.completion_tokens > 0 && usage.completion_tokens <= max_tokens);
    }
    (waiting, taken)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_run_as_their_prompts_and_answers_fit_the_shared_cells() {
    let t = server().await;
    // Each long request may take ~440 cells: two fit in 1024, never three.
    let (waited, taken) = four_at_once(&t, "long", 400).await;
    let kv = kv_cache(&t, "long").await;
    assert_eq!(kv.cells, 1024, "{kv:?}");
    assert!(kv.peak_running <= 2, "{kv:?}");
    println!(
        "long: peak running {}, most waiting {waited}, most cells taken {taken}",
        kv.peak_running
    );
    // Short ones (~100 cells each) all fit at once: none waits for room.
    let (waited, _) = four_at_once(&t, "short", 48).await;
    let kv = kv_cache(&t, "short").await;
    assert_eq!(waited, 0, "{kv:?}");
    println!("short: peak running {}", kv.peak_running);
    assert_eq!(kv.waiting_for_room, 0);
    t.stop().await;
}

/// One short chat on `id`, to its end.
async fn one_request(t: &TestServer, id: &str) {
    let stream = t
        .inference()
        .chat(chat(id, "Say hi.", greedy(8)))
        .await
        .expect("chat starts")
        .into_inner();
    collect(stream).await.expect("chat completes");
}

/// A model whose requests outnumbered its KV budget gets `kv_budget_max` at its next
/// load when the pool has room to spare: the worker really has the grown cells, status
/// and the load's event say from what it grew, and a quiet residency brings it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_models_kv_budget_grows_at_its_next_load() {
    let t = TestServer::start_with(|runtime| {
        // 512 cells hold one request at full context; four come at once.
        let extra = "engine = \"llama.cpp\"\ncontext_length = 512\nmax_sequences = 4\n\
                     max_concurrency = 4\nkv_budget = 512\nkv_budget_max = 2048\n\
                     prefix_cache = false\n";
        settings_toml("", &model_toml("grows", extra), runtime)
    })
    .await;
    let mut events = t.events().await;
    // Loaded by one request: its own budget.
    one_request(&t, "grows").await;
    let info = t.model("grows").await;
    assert_eq!((info.kv_budget_tokens, info.kv_budget_grown_from), (512, 0));
    assert_eq!(kv_cache(&t, "grows").await.cells, 512);
    // Then four at once, more than 512 cells hold at full context.
    four_at_once(&t, "grows", 16).await;
    let evict = || async {
        t.control()
            .evict_model(modelpool_proto::v1::EvictModelRequest { id: "grows".into() })
            .await
            .expect("evicts");
    };
    evict().await;
    // One request now: the load it starts grows, for the four before.
    one_request(&t, "grows").await;
    let info = t.model("grows").await;
    assert_eq!(
        (info.kv_budget_tokens, info.kv_budget_grown_from),
        (2048, 512)
    );
    assert_eq!(kv_cache(&t, "grows").await.cells, 2048);
    // That residency had one request: the next load is back at 512.
    evict().await;
    one_request(&t, "grows").await;
    assert_eq!(kv_cache(&t, "grows").await.cells, 512);
    let mut started = Vec::new();
    while started.len() < 3 {
        let ev = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .expect("events keep coming")
            .expect("event stream")
            .expect("an event");
        if let Some(modelpool_proto::v1::pool_event::Kind::LoadStarted(s)) = ev.kind {
            started.push((s.kv_budget_tokens, s.kv_budget_grown_from));
        }
    }
    assert_eq!(started, [(512, 0), (2048, 512), (512, 0)]);
    t.stop().await;
}
