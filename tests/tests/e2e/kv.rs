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
