//! The OpenAI-compatible HTTP API, driven by the official `openai` Python package and
//! by curl: real server, real model, real HTTP.

use std::process::Stdio;
use std::time::Duration;

use modelpool_proto::v1::ModelState;
use modelpool_server::auth::{AuthSettings, Secret};
use modelpool_server::config::BudgetSetting;
use modelpool_tests::{
    assert_one_generation_cancelled, chat, greedy, python_client, register_huge, run_python_client,
    settings_with_openai, TestServer,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn base_url(t: &TestServer) -> String {
    let addr = t.server.openai_addr.expect("the OpenAI API is on");
    format!("http://{addr}/v1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_client_lists_chats_completes_and_gets_errors() {
    let t = TestServer::start_with(|rt| settings_with_openai(&["smollm2"], rt)).await;
    // Models, a chat (streamed and not) that says Paris, completions, a 400 naming
    // `temperature` and `n`, a 404 listing the registered ids.
    run_python_client("openai_client.py", &[&base_url(&t), "basic", "smollm2"]).await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_streamed_chat_loads_a_cold_model() {
    let t = TestServer::start_with(|rt| settings_with_openai(&["smollm2"], rt)).await;
    run_python_client("openai_client.py", &[&base_url(&t), "cold", "smollm2"]).await;
    let m = t.model("smollm2").await;
    assert_eq!(
        (m.state(), m.loads_started),
        (ModelState::Ready, 1),
        "{m:?}"
    );
    t.stop().await;
}

/// Runs curl with `args` against `url`; its stdout.
async fn curl(url: &str, args: &[&str]) -> String {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "300"])
        .args(args)
        .arg(url)
        .output()
        .await
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl {args:?} {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// curl's HTTP status and the JSON body.
async fn status_and_body(url: &str, args: &[&str]) -> (String, serde_json::Value) {
    let out = curl(url, &[&["-w", "\n%{http_code}"][..], args].concat()).await;
    let (body, code) = out.rsplit_once('\n').expect("a status line");
    (
        code.to_owned(),
        serde_json::from_str(body).expect("a JSON body"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_reads_loading_comments_then_deltas_then_done() {
    let t = TestServer::start_with(|rt| settings_with_openai(&["smollm2"], rt)).await;
    let body = r#"{"model":"smollm2","stream":true,"max_tokens":16,"temperature":0,
        "messages":[{"role":"system","content":"You are a helpful assistant."},
                    {"role":"user","content":"What is the capital of France?"}]}"#;
    let url = format!("{}/chat/completions", base_url(&t));
    let out = curl(
        &url,
        &["-N", "-H", "Content-Type: application/json", "-d", body],
    )
    .await;
    let lines: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
    // The model was cold: the first line says it is loading, before any data.
    assert!(lines[0].starts_with(": loading smollm2 …"), "{out}");
    let first_data = lines
        .iter()
        .position(|l| l.starts_with("data:"))
        .expect("data");
    assert!(
        lines[..first_data]
            .iter()
            .all(|l| l.starts_with(": loading smollm2")),
        "{out}"
    );
    assert_eq!(lines.last(), Some(&"data: [DONE]"), "{out}");
    let mut text = String::new();
    for line in &lines[first_data..lines.len() - 1] {
        let chunk: serde_json::Value =
            serde_json::from_str(line.strip_prefix("data: ").expect("a data line")).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk", "{line}");
        text.push_str(
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or(""),
        );
    }
    assert!(text.contains("Paris"), "{out}");

    // The same chat again, whole: every prompt token comes from the cells the first
    // one left, and the usage says so as OpenAI's does.
    let again = body.replace(r#""stream":true,"#, "");
    let json = ["-H", "Content-Type: application/json", "-d", &again];
    let (code, answer) = status_and_body(&url, &json).await;
    assert_eq!(code, "200", "{answer}");
    let usage = &answer["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 0, "{answer}");
    assert_eq!(
        usage["prompt_tokens_details"]["cached_tokens"], usage["prompt_tokens"],
        "{answer}"
    );

    // Errors: the status and OpenAI's JSON shape, naming the field or the ids.
    let bad = r#"{"model":"smollm2","messages":[{"role":"user","content":"hi"}],"top_p":7}"#;
    let json = ["-H", "Content-Type: application/json", "-d", bad];
    let (code, body) = status_and_body(&url, &json).await;
    assert_eq!(code, "400", "{body}");
    assert_eq!(body["error"]["param"], "top_p", "{body}");
    let (code, body) = status_and_body(&format!("{}/models/nope", base_url(&t)), &[]).await;
    assert_eq!(code, "404", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("smollm2"),
        "{body}"
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_client_that_disconnects_frees_its_sequence() {
    let t = TestServer::start_with(|rt| settings_with_openai(&["smollm2"], rt)).await;
    let base = base_url(&t);
    let mut child = python_client("openai_client.py", &[&base, "disconnect", "smollm2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(
        lines.next_line().await.unwrap().as_deref(),
        Some("streaming")
    );
    // Ask the worker itself while the client holds its stream open.
    let lease = t.server.pool.acquire("smollm2", None).await.unwrap();
    let worker = lease.instance();
    assert_eq!(worker.stats().await.unwrap().active_sequences, 1);
    assert_eq!(t.model("smollm2").await.in_flight_requests, 2);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"close\n").await.unwrap();
    assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("closed"));
    assert_one_generation_cancelled(worker).await;
    drop(lease);
    assert_eq!(t.model("smollm2").await.in_flight_requests, 0);
    assert!(child.wait().await.unwrap().success());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_api_takes_the_grpc_tokens() {
    let (good, control) = ("inference-token-0123456789", "control-token-0123456789");
    let t = TestServer::start_with(|rt| {
        let mut s = settings_with_openai(&["smollm2"], rt);
        s.auth = AuthSettings {
            inference_token: Some(Secret::new(good.into())),
            control_token: Some(Secret::new(control.into())),
        };
        s
    })
    .await;
    let args = [
        base_url(&t),
        "auth".into(),
        "smollm2".into(),
        good.into(),
        "wrong".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_python_client("openai_client.py", &args).await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_request_over_the_stream_limit_is_429_with_the_numbers() {
    let t = TestServer::start_with(|rt| {
        let mut s = settings_with_openai(&["smollm2"], rt);
        s.max_concurrent_streams = 1;
        s
    })
    .await;
    // One gRPC stream holds the only slot.
    let mut held = t
        .inference()
        .generate(modelpool_proto::v1::GenerateRequest {
            model: "smollm2".into(),
            prompt: "1, 2, 3,".into(),
            sampling: Some(modelpool_tests::greedy(200)),
        })
        .await
        .unwrap()
        .into_inner();
    held.message().await.unwrap().expect("a chunk");
    let body = r#"{"model":"smollm2","prompt":"Once","max_tokens":4}"#;
    let url = format!("{}/completions", base_url(&t));
    let json = ["-H", "Content-Type: application/json", "-d", body];
    let (code, body) = status_and_body(&url, &json).await;
    assert_eq!(code, "429", "{body}");
    assert_eq!(body["error"]["code"], "resource_exhausted", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("all 1 allowed"), "{body}");
    drop(held);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_maps_over_budget_to_429_and_removal_to_503() {
    // A budget of its own, so that "huge" is over it on any host.
    let t = TestServer::start_with(|rt| {
        let mut s = settings_with_openai(&["smollm2"], rt);
        s.pool.ram_budget = BudgetSetting::Bytes(2 << 30);
        s
    })
    .await;
    let url = format!("{}/chat/completions", base_url(&t));
    let ask = |model: &str| {
        format!(
            r#"{{"model":"{model}","max_tokens":4,"messages":[{{"role":"user","content":"hi"}}]}}"#
        )
    };
    register_huge(&t).await;
    let body = ask("huge");
    let json = ["-H", "Content-Type: application/json", "-d", &body];
    let (code, body) = status_and_body(&url, &json).await;
    assert_eq!(code, "429", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("needs") && message.contains("budget is"),
        "{body}"
    );

    // A model being removed: a request in flight holds the removal in its drain, and
    // new requests over HTTP are refused with 503 meanwhile.
    let mut running = t
        .inference()
        .chat(chat("smollm2", "Tell me a long story.", greedy(2000)))
        .await
        .expect("a long stream")
        .into_inner();
    running.message().await.unwrap().expect("a first chunk");
    let pool = t.server.pool.clone();
    let removal =
        tokio::spawn(async move { pool.retire("smollm2", Duration::from_secs(120)).await });
    // Once the pool refuses new leases the removal has begun (a lease taken before
    // that is dropped at once).
    let mut begun = false;
    for _ in 0..500 {
        if t.server.pool.acquire("smollm2", None).await.is_err() {
            begun = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(begun, "the removal never began");
    let body = ask("smollm2");
    let json = ["-H", "Content-Type: application/json", "-d", &body];
    let (code, body) = status_and_body(&url, &json).await;
    assert_eq!(code, "503", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("being removed"),
        "{body}"
    );
    drop(running);
    removal
        .await
        .unwrap()
        .expect("the model is removed once its request ends");
    assert!(!t.model_ids().await.contains(&"smollm2".to_owned()));
    t.assert_nothing_charged().await;
    t.stop().await;
}
