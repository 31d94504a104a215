//! Fair turns with the real model: three SmolLM2 ids wanted all the time and a budget
//! that holds two. Busy models keep their memory, so without turns the third would be
//! refused for as long as the others stay busy; with turns every model is served, a
//! busy model drains for the one that waited, and status says why requests wait.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use modelpool_proto::v1::pool_event::Kind;
use modelpool_tests::{
    chat, collect, greedy, model_toml, modelpool_exe, parse_prometheus, sample_value, scrape,
    settings_toml, OneFileFootprint, TestServer,
};

const CONTEXT: u32 = 1024;
const IDS: [&str; 3] = ["a", "b", "c"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_models_with_room_for_two_are_all_served_in_turns() {
    // Room for two and a half: the three ids map the one GGUF, whose pages the pool
    // charges once, so each id more needs only its own bytes.
    let budget = OneFileFootprint::predict(CONTEXT).bytes_for(2.5);
    let models: String = IDS
        .iter()
        .map(|id| {
            model_toml(
                id,
                &format!("context_length = {CONTEXT}\nmax_sequences = 1\n"),
            )
        })
        .collect();
    // Short turns; drain and queue timeouts long enough that a slow, shared machine
    // makes the test slower, never cut (a cut is the drain timeout doing its job).
    let pool = format!(
        "ram_budget = \"{budget}\"\nfairness_window = \"1s\"\nmin_residency = \"3s\"\n\
         drain_timeout = \"300s\"\nqueue_timeout = \"600s\"\n"
    );
    let t = TestServer::start_with(|runtime| settings_toml(&pool, &models, runtime)).await;
    let mut events = t.events().await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let keep = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok(Some(ev)) = events.message().await {
            keep.lock().unwrap().push(ev);
        }
    });
    // Two clients per model, each asking again as soon as it is answered, until every
    // model has answered three times.
    let served: Arc<Mutex<BTreeMap<&str, u32>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for i in 0..6 {
        let id = IDS[i % 3];
        let (mut client, served, done) = (t.inference(), Arc::clone(&served), Arc::clone(&done));
        clients.push(tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                let stream = client.chat(chat(id, "Hi", greedy(6))).await?.into_inner();
                collect(stream).await?;
                let mut served = served.lock().unwrap();
                *served.entry(id).or_default() += 1;
                if IDS.iter().all(|m| served.get(m).copied().unwrap_or(0) >= 3) {
                    done.store(true, Ordering::SeqCst);
                }
            }
            Ok::<_, tonic::Status>(())
        }));
    }
    // While they run, status shows a model waiting and why: in GetPoolStatus, in
    // `modelpool status` (its WAITING table) and in the metrics.
    let (mut reasons, mut tables, mut waiting_metric) = (Vec::new(), Vec::new(), 0.0f64);
    let metrics = t.server.metrics_addr.expect("metrics are on");
    while !done.load(Ordering::SeqCst) && reasons.len() < 50 {
        let status = t.pool_status().await;
        let before = reasons.len();
        reasons.extend(
            status
                .models
                .into_iter()
                .filter(|m| !m.waiting_reason.is_empty())
                .map(|m| (m.id, m.waiting_reason)),
        );
        if reasons.len() > before {
            tables.push(status_text(&t).await);
            let parsed = parse_prometheus(&scrape(metrics).await);
            for id in IDS {
                for reason in ["room", "turn", "draining"] {
                    let labels = [("model", id), ("reason", reason)];
                    waiting_metric += sample_value(&parsed, "modelpool_waiting_requests", &labels);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for c in clients {
        c.await.unwrap().expect("every request is served");
    }
    let served = served.lock().unwrap().clone();
    assert!(
        IDS.iter().all(|m| served.get(m).copied().unwrap_or(0) >= 3),
        "{served:?}"
    );
    assert!(!reasons.is_empty(), "status never showed a model waiting");
    let known = [
        "waiting for room",
        "waiting for its turn",
        "draining for model",
    ];
    for (id, why) in &reasons {
        assert!(known.iter().any(|k| why.starts_with(k)), "{id}: {why}");
    }
    // Waits are short-lived: the CLI and the scrape, a moment after the status that
    // showed one, see at least one of them.
    let shown = tables.iter().find(|text| {
        text.lines().any(|l| l.starts_with("WAITING")) && known.iter().any(|k| text.contains(k))
    });
    assert!(
        shown.is_some(),
        "`modelpool status` never showed a wait: {tables:?}"
    );
    assert!(
        waiting_metric > 0.0,
        "modelpool_waiting_requests never counted a wait"
    );
    let events = seen.lock().unwrap().clone();
    let turns = events
        .iter()
        .filter(|e| matches!(e.kind, Some(Kind::TurnStarted(_))))
        .count();
    let finished = events
        .iter()
        .filter(|e| matches!(e.kind, Some(Kind::TurnFinished(_))))
        .count();
    let drained = events
        .iter()
        .filter(|e| matches!(&e.kind, Some(Kind::Evicted(ev)) if ev.reason == "turn"))
        .count();
    assert!(turns >= 1 && finished >= 1 && drained >= 1, "{events:?}");
    let status = t.pool_status().await;
    assert!(status.turns_total >= 1);
    for d in &status.devices {
        assert!(d.used_bytes + d.reserved_bytes <= d.budget_bytes, "{d:?}");
    }
    t.stop().await;
}

/// `modelpool status` against the test server, as an operator runs it.
async fn status_text(t: &TestServer) -> String {
    let out = tokio::process::Command::new(modelpool_exe())
        .args(["status", "--addr", &t.server.local_addr.to_string()])
        .env_remove("MODELPOOL_ADDR")
        .env_remove("MODELPOOL_CONFIG")
        .env_remove("RUST_LOG")
        .kill_on_drop(true)
        .output()
        .await
        .expect("modelpool status runs");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
