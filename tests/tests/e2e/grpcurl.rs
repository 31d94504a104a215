//! The real grpcurl (1.8.6, reflection v1alpha) sees and uses the API.

use std::process::Command;

use modelpool_tests::{grpcurl_path, TestServer};

/// Runs `grpcurl -plaintext FLAGS ADDR ARGS` and returns its stdout.
fn grpcurl(flags: &[&str], addr: &str, args: &[&str]) -> String {
    let out = Command::new(grpcurl_path())
        .arg("-plaintext")
        .args(flags)
        .arg(addr)
        .args(args)
        .output()
        .expect("run grpcurl");
    assert!(
        out.status.success(),
        "grpcurl {flags:?} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_describes_and_streams_a_chat() {
    let t = TestServer::start(&["smollm2"]).await;
    let addr = t.server.local_addr.to_string();
    let addr2 = addr.clone();
    let (list, describe, chat, status) = tokio::task::spawn_blocking(move || {
        let list = grpcurl(&[], &addr2, &["list"]);
        let describe = grpcurl(&[], &addr2, &["describe", "modelpool.v1.Inference"]);
        let chat = grpcurl(
            &[
                "-d",
                r#"{"model":"smollm2","messages":[{"role":"ROLE_SYSTEM","content":"You are a helpful assistant."},{"role":"ROLE_USER","content":"What is the capital of France?"}],"sampling":{"maxTokens":32,"temperature":0}}"#,
            ],
            &addr2,
            &["modelpool.v1.Inference/Chat"],
        );
        let status = grpcurl(&[], &addr2, &["modelpool.v1.ModelControl/GetPoolStatus"]);
        (list, describe, chat, status)
    })
    .await
    .unwrap();
    for service in [
        "modelpool.v1.Inference",
        "modelpool.v1.ModelControl",
        "grpc.health.v1.Health",
    ] {
        assert!(list.contains(service), "{service} missing from {list}");
    }
    assert!(
        !list.contains("modelpool.worker"),
        "private protocol exposed: {list}"
    );
    assert!(describe.contains("rpc Chat"), "{describe}");
    assert!(describe.contains("rpc Generate"), "{describe}");
    // Proto comments travel with the descriptors.
    assert!(describe.contains("chat template"), "{describe}");

    // One JSON object per chunk; together they say Paris, and the last has usage.
    let chunks: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&chat)
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("grpcurl prints JSON objects");
    assert!(chunks.len() >= 3, "few chunks: {chat}");
    let text: String = chunks.iter().filter_map(|c| c["text"].as_str()).collect();
    assert!(text.contains("Paris"), "{chat}");
    let last = chunks.last().unwrap();
    assert!(
        last["usage"]["completionTokens"].as_u64().unwrap_or(0) > 0,
        "{chat}"
    );
    assert!(last["finishReason"].as_str().is_some(), "{chat}");
    // Pool status after the chat: RAM budget, the model resident with its numbers.
    let status: serde_json::Value = serde_json::from_str(&status).expect("status is JSON");
    assert_eq!(status["devices"][0]["device"], "cpu", "{status}");
    assert!(
        status["devices"][0]["budgetBytes"].as_str().is_some(),
        "{status}"
    );
    let model = &status["models"][0];
    assert_eq!(model["state"], "MODEL_STATE_READY", "{status}");
    assert!(
        model["predicted"]["totalBytes"].as_str().is_some(),
        "{status}"
    );
    assert!(model["lastUsed"].as_str().is_some(), "{status}");
    drop(addr);
    t.stop().await;
}
