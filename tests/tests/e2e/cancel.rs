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
    let lease = t.server.pool.acquire("smollm2", None).await.unwrap();
    let worker = lease.instance();
    let before = worker.stats().await.unwrap();
    assert_eq!(before.active_sequences, 1);
    assert!(before.generated_tokens_total >= 5);

    drop(stream);
    let dropped_at = Instant::now();
    // The sequence leaves the worker's books at once...
    loop {
        if worker.stats().await.unwrap().active_sequences == 0 {
            break;
        }
        assert!(
            dropped_at.elapsed() < Duration::from_millis(200),
            "worker still lists the sequence 200 ms after the client left"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // ...and token production stops within 200 ms (the token being computed when the
    // client left may still finish): the count 200 ms after the drop is final.
    tokio::time::sleep(Duration::from_millis(200).saturating_sub(dropped_at.elapsed())).await;
    let at_200ms = worker.stats().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = worker.stats().await.unwrap();
    assert_eq!(
        later.generated_tokens_total, at_200ms.generated_tokens_total,
        "tokens kept coming more than 200 ms after cancellation"
    );
    assert_eq!(later.cancelled_total, 1);
    assert!(later.generated_tokens_total < 2000);
    drop(lease);
    t.stop().await;
}
