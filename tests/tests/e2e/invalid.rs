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
    let info = t.model("smollm2").await;
    assert_eq!(info.worker_pid, 0);
    let err = t
        .control()
        .get_model(GetModelRequest { id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    t.stop().await;
}

/// A minimal GGUF v3 header: no tensors, one key, `general.architecture`.
fn gguf_with_architecture(arch: &str) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // metadata entries
    let key = "general.architecture";
    b.extend((key.len() as u64).to_le_bytes());
    b.extend(key.as_bytes());
    b.extend(8u32.to_le_bytes()); // string
    b.extend((arch.len() as u64).to_le_bytes());
    b.extend(arch.as_bytes());
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_refuses_files_that_cannot_load_and_paths_outside_the_roots() {
    use modelpool_proto::v1::RegisterModelRequest;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let models_dir = modelpool_tests::model_path()
        .parent()
        .unwrap()
        .canonicalize()
        .unwrap();
    let roots = vec![root.clone(), models_dir];
    let t = TestServer::start_with(move |runtime| {
        let mut s = modelpool_tests::settings(&["smollm2"], runtime);
        s.model_roots = Some(roots);
        s
    })
    .await;
    std::fs::write(root.join("notes.gguf"), "not a model").unwrap();
    let real = std::fs::read(modelpool_tests::model_path()).unwrap();
    std::fs::write(root.join("truncated.gguf"), &real[..4096]).unwrap();
    std::fs::write(root.join("mamba.gguf"), gguf_with_architecture("mamba")).unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("x.gguf"), &real[..4096]).unwrap();
    std::os::unix::fs::symlink(outside.path().join("x.gguf"), root.join("link.gguf")).unwrap();

    std::fs::write(root.join("clip.gguf"), gguf_with_architecture("clip")).unwrap();
    let st_dir = modelpool_tests::repo_root().join("models");

    // (path, engine, the field the refusal names, what it says)
    let cases = [
        (root.join("missing.gguf"), "", "path", "not a file".to_owned()),
        (root.join("notes.gguf"), "", "path", "not a gguf".into()),
        (root.join("truncated.gguf"), "", "path", "truncated.gguf".into()),
        // llama.cpp runs mamba; this header has no shape to predict from.
        (root.join("mamba.gguf"), "", "path", "mamba.gguf".into()),
        (
            root.join("mamba.gguf"),
            "mistral.rs",
            "engine",
            "architecture \"mamba\" is not one engine \"mistral.rs\" generates with; engine llama.cpp loads it".into(),
        ),
        (
            root.join("clip.gguf"),
            "",
            "engine",
            "architecture \"clip\" is not one engine \"llama.cpp\" generates with".into(),
        ),
        (root.join("notes.gguf"), "vllm", "engine", "unknown engine \"vllm\"".into()),
        (st_dir, "llama.cpp", "engine", "cannot read safetensors".into()),
        (outside.path().join("x.gguf"), "", "path", "outside the model roots".into()),
        (root.join("link.gguf"), "", "path", "outside the model roots".into()),
    ];
    for (i, (path, engine, field, why)) in cases.iter().enumerate() {
        let err = t
            .control()
            .register_model(RegisterModelRequest {
                id: format!("bad-{i}"),
                path: path.display().to_string(),
                engine: engine.to_string(),
                format: if path.ends_with("models") {
                    "safetensors".into()
                } else {
                    String::new()
                },
                ..Default::default()
            })
            .await
            .expect_err("refused");
        assert_eq!(
            err.code(),
            tonic::Code::InvalidArgument,
            "{path:?}: {err:?}"
        );
        assert!(
            err.message().starts_with(&format!("{field}:")),
            "{path:?}: {}",
            err.message()
        );
        assert!(
            err.message().contains(why.as_str()),
            "{path:?}: {}",
            err.message()
        );
    }
    let with_interval = |secs| RegisterModelRequest {
        id: "interval".into(),
        path: modelpool_tests::model_path().display().to_string(),
        stream_interval: Some(prost_types::Duration {
            seconds: secs,
            nanos: 0,
        }),
        ..Default::default()
    };
    let err = t
        .control()
        .register_model(with_interval(2))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert_eq!(err.message(), "stream_interval: must be at most 1s, got 2s");
    assert_eq!(t.model_ids().await.len(), 1, "nothing was registered");
    t.assert_nothing_charged().await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_longer_than_the_context_is_refused_naming_it() {
    let models = modelpool_tests::model_toml("m", "context_length = 256\n");
    let t = TestServer::start_with(|runtime| modelpool_tests::settings_toml("", &models, runtime))
        .await;
    let request = GenerateRequest {
        model: "m".into(),
        prompt: " the".repeat(400),
        sampling: Some(greedy(8)),
    };
    let result = match t.inference().generate(request).await {
        Ok(stream) => modelpool_tests::collect(stream.into_inner())
            .await
            .map(|_| ()),
        Err(status) => Err(status),
    };
    let err = result.expect_err("400 tokens do not fit a 256-token context");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("prompt"), "{}", err.message());
    assert!(err.message().contains("256"), "{}", err.message());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_above_the_max_message_size_is_resource_exhausted() {
    let t = TestServer::start(&["smollm2"]).await;
    // tonic's default limit is 4 MiB per message.
    let huge = "x".repeat(5 << 20);
    let err = t
        .inference()
        .chat(chat("smollm2", &huge, greedy(4)))
        .await
        .expect_err("above the message size limit");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("message length too large"),
        "{}",
        err.message()
    );
    t.assert_nothing_charged().await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_the_limit_are_refused_until_one_ends() {
    let t = TestServer::start_with(|rt| {
        let mut s = modelpool_tests::settings(&["smollm2"], rt);
        s.max_concurrent_streams = 2;
        s
    })
    .await;
    let open = |n: u32| {
        let mut c = t.inference();
        async move {
            c.chat(chat("smollm2", "Tell me a long story.", greedy(n)))
                .await
        }
    };
    let first = open(500).await.expect("first stream").into_inner();
    let second = open(500).await.expect("second stream").into_inner();
    let err = open(4).await.expect_err("a third stream is one too many");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("server.max_concurrent_streams"),
        "{}",
        err.message()
    );
    // A client that goes away frees its stream (as soon as the server hears of it; a
    // busy machine only delays that).
    drop(first);
    let mut third = None;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while third.is_none() && std::time::Instant::now() < deadline {
        match open(4).await {
            Ok(s) => third = Some(s.into_inner()),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
    let third = third.expect("a stream slot came free");
    modelpool_tests::collect(third)
        .await
        .expect("the third stream completes");
    drop(second);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_expires_while_the_model_loads_is_deadline_exceeded() {
    let t = TestServer::start(&["smollm2"]).await;
    let mut request = tonic::Request::new(chat("smollm2", "Hi", greedy(4)));
    // The header alone (a client-side timer would answer for the server).
    request
        .metadata_mut()
        .insert("grpc-timeout", "100m".parse().unwrap());
    let err = t
        .inference()
        .chat(request)
        .await
        .expect_err("a cold model does not load in 100 ms");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("still loading"), "{}", err.message());
    // Nothing is left waiting, and the load it started serves the next request.
    let m = t.model("smollm2").await;
    assert_eq!((m.in_flight_requests, m.waiting_requests), (0, 0), "{m:?}");
    assert!(t.ask_capital("smollm2").await.contains("Paris"));
    t.stop().await;
}
