//! A client that goes away cancels its generation in the worker.

use std::time::{Duration, Instant};

use modelpool_proto::v1::GenerateRequest;
use modelpool_tests::{greedy, TestServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_stream_stops_generation_in_the_worker() {
    let t = TestServer::start(&["smollm2"]).await;
    let mut client = t.inference();
    let mut stream = client
        .generate(GenerateRequest {
            model: "smollm2".into(),
            prompt: "1, 2, 3, 4, 5, 6, 7, 8,".into(),
            sampling: Some(greedy(2000)),
        })
        .await
        .unwrap()
        .into_inner();
    for _ in 0..5 {
        stream.message().await.unwrap().expect("a chunk");
    }
    // Talk to the worker itself for its counters.
    let lease = t.server.pool.acquire("smollm2").await.unwrap();
    let worker = lease.instance();
    let before = worker.stats().await.unwrap();
    assert_eq!(before.active_sequences, 1);
    assert!(before.generated_tokens_total >= 5);

    drop(stream);
    let dropped_at = Instant::now();
    let stopped_after = loop {
        let s = worker.stats().await.unwrap();
        if s.active_sequences == 0 {
            break dropped_at.elapsed();
        }
        assert!(
            dropped_at.elapsed() < Duration::from_secs(2),
            "worker still generating 2 s after the client left"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(
        stopped_after <= Duration::from_millis(200),
        "generation stopped {stopped_after:?} after the client left"
    );
    let after = worker.stats().await.unwrap();
    assert_eq!(after.cancelled_total, 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later = worker.stats().await.unwrap();
    assert_eq!(
        later.generated_tokens_total, after.generated_tokens_total,
        "tokens kept coming after cancellation"
    );
    assert!(after.generated_tokens_total < 2000);
    drop(lease);
    t.stop().await;
}
