//! Groups and swap slots: small models keep serving while a one-model slot swaps
//! between large ones; a swap waits for (or, past the drain timeout, cuts) the
//! outgoing model's generation; `min_residency` bounds swaps per minute.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use modelpool_fixtures::synth::{write_llama, Quant, Shape};
use modelpool_proto::v1::pool_event::Kind;
use modelpool_proto::v1::{GenerateRequest, ModelState, PoolEvent};
use modelpool_tests::{
    chat, collect, greedy, model_path, model_toml, next_event, settings_toml, TestServer,
};
use tonic::Code;

/// A synthetic llama a few times SmolLM2's resident size (random weights: its text
/// means nothing, only that it loads and streams).
fn synthetic_large(dir: &Path, name: &str, seed: u64) -> String {
    let file = dir.join(format!("{name}.gguf"));
    let shape = Shape {
        hidden: 1024,
        layers: 8,
        heads: 16,
        kv_heads: 4,
        ffn: 2816,
        context: 1024,
    };
    write_llama(&file, shape, Quant::Q4_0, &model_path(), seed).unwrap();
    format!(
        "[[models]]\nid = \"{name}\"\npath = \"{}\"\ncontext_length = 512\n",
        file.display()
    )
}

fn group(members: &[&str], extra: &str) -> String {
    let list: Vec<String> = members.iter().map(|m| format!("\"{m}\"")).collect();
    format!(
        "[[groups]]\nname = \"large\"\nmembers = [{}]\nmax_resident = 1\n{extra}\n",
        list.join(", ")
    )
}

async fn generate(
    t: &TestServer,
    model: &str,
    tokens: u32,
) -> Result<Vec<modelpool_proto::v1::GenerateChunk>, tonic::Status> {
    let stream = t
        .inference()
        .generate(GenerateRequest {
            model: model.into(),
            prompt: "Once upon a time".into(),
            sampling: Some(greedy(tokens)),
        })
        .await?
        .into_inner();
    collect(stream).await
}

/// Starts generating `tokens` tokens from `model` and returns once its first chunk came
/// (so the model is busy now, however slow the machine), with a task that reads the rest.
async fn generating(
    t: &Arc<TestServer>,
    model: &str,
    tokens: u32,
) -> tokio::task::JoinHandle<Result<Vec<modelpool_proto::v1::GenerateChunk>, tonic::Status>> {
    let mut stream = t
        .inference()
        .generate(GenerateRequest {
            model: model.into(),
            prompt: "Once upon a time".into(),
            sampling: Some(greedy(tokens)),
        })
        .await
        .expect("the generation starts")
        .into_inner();
    let first = stream
        .message()
        .await
        .expect("a first chunk")
        .expect("the stream is open");
    tokio::spawn(async move {
        let mut chunks = vec![first];
        chunks.extend(collect(stream).await?);
        Ok(chunks)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_models_keep_serving_while_the_large_slot_swaps() {
    let dir = tempfile::tempdir().unwrap();
    let mut models = String::new();
    for id in ["s1", "s2", "s3"] {
        models += &model_toml(id, "context_length = 1024\n");
    }
    models += &synthetic_large(dir.path(), "big-a", 1);
    models += &synthetic_large(dir.path(), "big-b", 2);
    models += &group(&["big-a", "big-b"], "min_residency = \"0s\"");
    let t = Arc::new(TestServer::start_with(|rt| settings_toml("", &models, rt)).await);
    let mut events = t.events().await;
    for id in ["s1", "s2", "s3"] {
        generate(&t, id, 2).await.unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let small_ok = Arc::new(AtomicUsize::new(0));
    let small_client = tokio::spawn({
        let (t, stop, ok) = (Arc::clone(&t), Arc::clone(&stop), Arc::clone(&small_ok));
        async move {
            let mut failures = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let id = ["s1", "s2", "s3"][i % 3];
                i += 1;
                match generate(&t, id, 4).await {
                    Ok(_) => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => failures.push(format!("{id}: {e}")),
                }
            }
            failures
        }
    });
    let sampler = tokio::spawn({
        let (t, stop) = (Arc::clone(&t), Arc::clone(&stop));
        async move {
            let mut worst_ready = 0;
            let mut over_budget = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let s = t.pool_status().await;
                let ready = s
                    .models
                    .iter()
                    .filter(|m| m.id.starts_with("big-") && m.state() == ModelState::Ready)
                    .count();
                worst_ready = worst_ready.max(ready);
                for d in &s.devices {
                    if d.used_bytes + d.reserved_bytes > d.budget_bytes {
                        over_budget.push(format!("{d:?}"));
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (worst_ready, over_budget)
        }
    });
    let mut swap_waits = Vec::new();
    for round in 0..4 {
        let id = if round % 2 == 0 { "big-a" } else { "big-b" };
        let chunks = generate(&t, id, 4).await.expect("large request");
        swap_waits.push(
            chunks
                .last()
                .unwrap()
                .usage
                .unwrap()
                .swap_wait
                .unwrap_or_default(),
        );
    }
    stop.store(true, Ordering::SeqCst);
    let failures = small_client.await.unwrap();
    let (worst_ready, over_budget) = sampler.await.unwrap();
    assert!(failures.is_empty(), "small requests failed: {failures:?}");
    assert!(
        small_ok.load(Ordering::SeqCst) >= 3,
        "small models kept serving"
    );
    assert_eq!(worst_ready, 1, "the slot held one large model at a time");
    assert!(over_budget.is_empty(), "{over_budget:?}");
    // Every large request after the first swapped the other one out.
    assert!(
        swap_waits[1..].iter().all(|d| d.seconds > 0 || d.nanos > 0),
        "{swap_waits:?}"
    );
    let status = t.pool_status().await;
    let g = &status.groups[0];
    assert_eq!(
        (g.name.as_str(), g.swaps_total, g.resident.len()),
        ("large", 3, 1)
    );
    let mut finished = 0;
    while finished < 3 {
        let e = next_event(&mut events, Duration::from_secs(30)).await;
        match e.kind {
            Some(Kind::SwapFinished(f)) => {
                assert_eq!(f.group, "large");
                assert!(f.bytes > 0);
                finished += 1;
            }
            Some(Kind::Evicted(ev)) if e.model.starts_with('s') => {
                panic!("small model {} evicted: {ev:?}", e.model)
            }
            _ => {}
        }
    }
    Arc::into_inner(t).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_waits_for_the_outgoing_generation_to_finish() {
    let models = model_toml("a", "context_length = 1024\n")
        + &model_toml("b", "context_length = 1024\n")
        + &group(
            &["a", "b"],
            "min_residency = \"0s\"\ndrain_timeout = \"600s\"",
        );
    let t = Arc::new(TestServer::start_with(|rt| settings_toml("", &models, rt)).await);
    generate(&t, "a", 1).await.unwrap();
    // b is asked for while a generates: the swap waits for a's generation to end (the
    // drain timeout is far off, however slow a loaded machine makes it) instead of
    // cutting it.
    let long = generating(&t, "a", 120).await;
    let b = generate(&t, "b", 4).await.expect("b after the drain");
    let a = long
        .await
        .unwrap()
        .expect("the outgoing generation finished, not cut");
    let a_usage = a.last().unwrap().usage.unwrap();
    assert_eq!(a_usage.completion_tokens, 120, "{a_usage:?}");
    let swap_wait = b.last().unwrap().usage.unwrap().swap_wait.unwrap();
    assert!(
        swap_wait.seconds > 0 || swap_wait.nanos > 0,
        "b waited for the swap: {swap_wait:?}"
    );
    Arc::into_inner(t).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_drain_timeout_the_outgoing_generation_ends_with_the_reason() {
    let models = model_toml("a", "context_length = 1024\n")
        + &model_toml("b", "context_length = 1024\n")
        + &group(
            &["a", "b"],
            "min_residency = \"0s\"\ndrain_timeout = \"1s\"\non_swap = \"refuse\"",
        );
    let t = Arc::new(TestServer::start_with(|rt| settings_toml("", &models, rt)).await);
    generate(&t, "a", 1).await.unwrap();
    let mut events = t.events().await;
    let long = generating(&t, "a", 1000).await;
    let b = tokio::spawn({
        let t = Arc::clone(&t);
        async move { generate(&t, "b", 4).await }
    });
    // Once b's request has started the swap (however long a busy machine takes to get
    // there), `a` drains and its new requests are refused (on_swap = "refuse").
    while !matches!(
        next_event(&mut events, Duration::from_secs(60)).await,
        PoolEvent { model, kind: Some(Kind::SwapStarted(_)), .. } if model == "b"
    ) {}
    let refused = t
        .inference()
        .chat(chat("a", "Hi", greedy(2)))
        .await
        .expect_err("a is being swapped out");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("swapped out"),
        "{}",
        refused.message()
    );
    let cut = long.await.unwrap().expect_err("cut at the drain timeout");
    assert_eq!(cut.code(), Code::Unavailable);
    assert!(
        cut.message()
            .contains("for `b` after the group's drain timeout of 1s"),
        "{}",
        cut.message()
    );
    b.await.unwrap().expect("b loads once a is gone");
    Arc::into_inner(t).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_residency_bounds_the_swaps_of_alternating_clients() {
    let models = model_toml("a", "context_length = 1024\n")
        + &model_toml("b", "context_length = 1024\n")
        + &group(&["a", "b"], "min_residency = \"3s\"");
    let t = Arc::new(TestServer::start_with(|rt| settings_toml("", &models, rt)).await);
    let started = Instant::now();
    let clients: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|id| {
            let t = Arc::clone(&t);
            tokio::spawn(async move {
                let mut served = 0;
                while started.elapsed() < Duration::from_secs(8) {
                    generate(&t, id, 2).await.expect("served, if later");
                    served += 1;
                }
                served
            })
        })
        .collect();
    let mut served = 0;
    for c in clients {
        served += c.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let g = t.pool_status().await.groups[0].clone();
    // One swap per min_residency at most, plus the first load's.
    let bound = (elapsed / 3.0).ceil() as u64 + 1;
    assert!(
        g.swaps_total <= bound,
        "{} swaps in {elapsed:.1}s (bound {bound})",
        g.swaps_total
    );
    assert!(g.swaps_total >= 1 && served >= 2, "{g:?} served {served}");
    assert_eq!(g.swaps_last_minute, g.swaps_total);
    Arc::into_inner(t).unwrap().stop().await;
}
