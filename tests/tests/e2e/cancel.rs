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
    // No time limit is asserted (how fast is `cancel_latency`'s business, BENCHMARKS.md);
    // a hang fails at the end of a long wait. The sequence leaves the worker's books...
    let deadline = Instant::now() + Duration::from_secs(60);
    while worker.stats().await.unwrap().active_sequences != 0 {
        assert!(
            Instant::now() < deadline,
            "worker still lists the sequence 60 s after the client left"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // ...and token production stops (the token being computed when the client left may
    // still finish): the count holds still for a second, then stays put.
    let mut settled = worker.stats().await.unwrap().generated_tokens_total;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = worker.stats().await.unwrap().generated_tokens_total;
        if now == settled {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tokens kept coming for 60 s after the client left"
        );
        settled = now;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = worker.stats().await.unwrap();
    assert_eq!(
        later.generated_tokens_total, settled,
        "tokens kept coming after cancellation"
    );
    assert_eq!(later.cancelled_total, 1);
    assert!(later.generated_tokens_total < 2000);
    drop(lease);
    t.stop().await;
}
