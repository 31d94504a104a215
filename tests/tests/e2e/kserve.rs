//! KServe v2 / Triton `inference.GRPCInferenceService` on the gRPC port, driven by the
//! `tritonclient[grpc]` Python package: real server, real model, real gRPC.

use modelpool_proto::kserve::grpc_inference_service_client::GrpcInferenceServiceClient;
use modelpool_proto::kserve::model_infer_request::InferInputTensor;
use modelpool_proto::kserve::{InferTensorContents, ModelInferRequest};
use modelpool_proto::v1::ModelState;
use modelpool_tests::{
    assert_one_generation_cancelled, grpcurl_path, run_python_client, TestServer,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_loads_and_unloads_through_the_repository() {
    let t = TestServer::start(&["smollm2"]).await;
    let addr = t.server.local_addr.to_string();
    // Live, ready, the index (UNAVAILABLE, then READY after load_model), model
    // metadata, unload_model, and an unknown model refused with the registered ids.
    run_python_client("triton_client.py", &[&addr, "repository", "smollm2"]).await;
    // The pool shows it evicted: registered, no worker, nothing charged.
    let m = t.model("smollm2").await;
    assert_eq!(m.state(), ModelState::Registered, "{m:?}");
    assert_eq!((m.worker_pid, m.loads_started), (0, 1), "{m:?}");
    t.assert_nothing_charged().await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_infers_and_streams_deltas() {
    let t = TestServer::start(&["smollm2"]).await;
    let addr = t.server.local_addr.to_string();
    // ModelInfer: the whole answer; bad sampling and an unknown model refused.
    run_python_client("triton_client.py", &[&addr, "infer", "smollm2"]).await;
    // ModelStreamInfer: one response per delta, then the empty final response.
    run_python_client("triton_client.py", &[&addr, "stream", "smollm2"]).await;
    assert_eq!(t.model("smollm2").await.in_flight_requests, 0);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kserve_is_in_reflection_and_health() {
    let t = TestServer::start(&["smollm2"]).await;
    let addr = t.server.local_addr.to_string();
    let out = tokio::process::Command::new(grpcurl_path())
        .args(["-plaintext", &addr, "list"])
        .output()
        .await
        .expect("grpcurl runs");
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(list.contains("inference.GRPCInferenceService"), "{list}");
    let mut health = tonic_health::pb::health_client::HealthClient::new(t.channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "inference.GRPCInferenceService".into(),
        })
        .await
        .expect("health knows the service")
        .into_inner();
    assert_eq!(
        status.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    t.stop().await;
}

/// A `ModelStreamInfer` request of `max_tokens` on `model`, streamed.
fn stream_request(model: &str, max_tokens: u32) -> ModelInferRequest {
    let bytes = |name: &str, value: &str| InferInputTensor {
        name: name.into(),
        datatype: "BYTES".into(),
        shape: vec![1],
        contents: Some(InferTensorContents {
            bytes_contents: vec![value.as_bytes().to_vec()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let sampling = format!(r#"{{"max_tokens": {max_tokens}, "temperature": 0}}"#);
    ModelInferRequest {
        model_name: model.into(),
        id: "gone".into(),
        inputs: vec![
            // A raw prompt in the model's own chat format, so it answers at length.
            bytes(
                "text_input",
                "<|im_start|>user\nWrite a very long story about the sea.<|im_end|>\n<|im_start|>assistant\n",
            ),
            bytes("sampling_parameters", &sampling),
            InferInputTensor {
                name: "stream".into(),
                datatype: "BOOL".into(),
                shape: vec![1],
                contents: Some(InferTensorContents {
                    bool_contents: vec![true],
                    ..Default::default()
                }),
                ..Default::default()
            },
        ],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kserve_client_that_disconnects_mid_stream_frees_its_sequence() {
    let t = TestServer::start(&["smollm2"]).await;
    let mut client = GrpcInferenceServiceClient::new(t.channel.clone());
    let (requests, rx) = tokio::sync::mpsc::channel(1);
    requests
        .send(stream_request("smollm2", 2000))
        .await
        .unwrap();
    let requests_stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let mut responses = client
        .model_stream_infer(requests_stream)
        .await
        .expect("the stream opens")
        .into_inner();
    let first = responses.message().await.unwrap().expect("a first delta");
    assert_eq!(first.error_message, "", "{first:?}");
    // Ask the worker itself while the client holds its stream open.
    let lease = t.server.pool.acquire("smollm2", None).await.unwrap();
    let worker = lease.instance();
    assert_eq!(worker.stats().await.unwrap().active_sequences, 1);
    // The client goes away: its request stream and the call both dropped.
    drop((responses, requests, client));
    assert_one_generation_cancelled(worker).await;
    drop(lease);
    assert_eq!(t.model("smollm2").await.in_flight_requests, 0);
    t.stop().await;
}
