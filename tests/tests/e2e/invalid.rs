//! Bad requests get the right gRPC code and a message naming the field.

use modelpool_proto::v1::{
    ChatMessage, ChatRequest, GenerateRequest, GetModelRequest, Role, SamplingParams,
};
use modelpool_tests::{chat, greedy, TestServer};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_name_the_field() {
    let t = TestServer::start(&["smollm2"]).await;
    let mut client = t.inference();

    let err = client
        .chat(chat("no-such-model", "hi", greedy(4)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("no-such-model") && err.message().contains("smollm2"));

    let cases: Vec<(ChatRequest, &str)> = vec![
        (
            ChatRequest {
                model: "smollm2".into(),
                messages: vec![],
                sampling: None,
            },
            "messages",
        ),
        (
            chat(
                "smollm2",
                "hi",
                SamplingParams {
                    temperature: Some(-0.5),
                    ..Default::default()
                },
            ),
            "sampling.temperature",
        ),
        (
            chat(
                "smollm2",
                "hi",
                SamplingParams {
                    top_p: Some(1.5),
                    ..Default::default()
                },
            ),
            "sampling.top_p",
        ),
        (chat("", "hi", greedy(4)), "model"),
        (
            ChatRequest {
                model: "smollm2".into(),
                messages: vec![ChatMessage {
                    role: Role::Unspecified.into(),
                    content: "hi".into(),
                }],
                sampling: None,
            },
            "messages[0].role",
        ),
    ];
    for (request, field) in cases {
        let err = client.chat(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(&format!("{field}:")),
            "{field}: message was {:?}",
            err.message()
        );
    }
    let err = client
        .generate(GenerateRequest {
            model: "smollm2".into(),
            prompt: String::new(),
            sampling: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("prompt:"));

    // Validation happens before any load: the model is still cold.
    let info = t
        .control()
        .get_model(GetModelRequest {
            id: "smollm2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.worker_pid, 0);
    let err = t
        .control()
        .get_model(GetModelRequest { id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    t.stop().await;
}
