//! KServe v2 / Triton `inference.GRPCInferenceService` on the gRPC port, driven by the
//! `tritonclient[grpc]` Python package: real server, real model, real gRPC.

use modelpool_proto::v1::ModelState;
use modelpool_tests::{grpcurl_path, run_python_client, TestServer};

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
