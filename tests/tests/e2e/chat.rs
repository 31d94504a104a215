//! Chat and Generate answer correctly, stream, and report usage.

use modelpool_proto::v1::{FinishReason, GenerateRequest, SamplingParams};
use modelpool_tests::{chat, collect, greedy, model_toml, settings_toml, text_of, TestServer};

fn secs(d: &Option<prost_types::Duration>) -> f64 {
    d.as_ref()
        .map_or(0.0, |d| d.seconds as f64 + f64::from(d.nanos) / 1e9)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_answers_paris_streams_and_reports_usage() {
    let t = TestServer::start(&["smollm2"]).await;
    let mut client = t.inference();

    let stream = client
        .chat(chat(
            "smollm2",
            "What is the capital of France?",
            greedy(48),
        ))
        .await
        .expect("chat starts")
        .into_inner();
    let chunks = collect(stream).await.expect("chat streams to the end");
    let text = text_of(&chunks);
    assert!(text.contains("Paris"), "answer was {text:?}");

    // Several chunks before the final one; only the final one carries usage.
    assert!(chunks.len() >= 3, "only {} chunks", chunks.len());
    let (last, rest) = chunks.split_last().unwrap();
    assert!(rest
        .iter()
        .all(|c| c.usage.is_none() && c.finish_reason == FinishReason::Unspecified as i32));
    assert_ne!(last.finish_reason, FinishReason::Unspecified as i32);
    let usage = last.usage.as_ref().expect("final chunk has usage");
    assert!(
        usage.prompt_tokens >= 8,
        "prompt_tokens {}",
        usage.prompt_tokens
    );
    assert!(usage.completion_tokens >= 3 && usage.completion_tokens <= 48);
    // The first request found the model cold and paid for its load.
    assert!(usage.cold_start);
    assert!(
        secs(&usage.load_wait) > 0.05,
        "load_wait {:?}",
        usage.load_wait
    );
    assert!(secs(&usage.time_to_first_token) >= secs(&usage.load_wait));
    assert!(secs(&usage.total_time) >= secs(&usage.time_to_first_token));

    // The same request again: warm, deterministic, same counts.
    let again = collect(
        client
            .chat(chat(
                "smollm2",
                "What is the capital of France?",
                greedy(48),
            ))
            .await
            .unwrap()
            .into_inner(),
    )
    .await
    .unwrap();
    assert_eq!(text_of(&again), text);
    let usage2 = again.last().unwrap().usage.unwrap();
    assert!(!usage2.cold_start);
    assert_eq!(secs(&usage2.load_wait), 0.0);
    assert_eq!(usage2.prompt_tokens, usage.prompt_tokens);
    assert_eq!(usage2.completion_tokens, usage.completion_tokens);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_counts_tokens_exactly_and_stops_at_max_tokens() {
    let t = TestServer::start(&["smollm2"]).await;
    let mut client = t.inference();
    let request = |max_tokens| GenerateRequest {
        model: "smollm2".into(),
        prompt: "Once upon a time, in a small village by the sea,".into(),
        sampling: Some(greedy(max_tokens)),
    };
    let chunks = collect(client.generate(request(8)).await.unwrap().into_inner())
        .await
        .unwrap();
    let last = chunks.last().unwrap();
    assert_eq!(last.finish_reason, FinishReason::Length as i32);
    let usage = last.usage.unwrap();
    assert_eq!(usage.completion_tokens, 8);
    let prompt_tokens = usage.prompt_tokens;
    assert!(
        (10..=20).contains(&prompt_tokens),
        "prompt_tokens {prompt_tokens}"
    );
    assert!(!text_of(&chunks).trim().is_empty());

    let chunks = collect(client.generate(request(20)).await.unwrap().into_inner())
        .await
        .unwrap();
    let usage = chunks.last().unwrap().usage.unwrap();
    assert_eq!(usage.completion_tokens, 20);
    assert_eq!(usage.prompt_tokens, prompt_tokens);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_makes_sampling_repeatable_and_stop_strings_end_generation() {
    let t = TestServer::start(&["smollm2"]).await;
    let mut client = t.inference();
    let sampled = |seed| SamplingParams {
        max_tokens: Some(24),
        temperature: Some(1.0),
        top_p: Some(0.95),
        seed: Some(seed),
        ..Default::default()
    };
    let run = |s: SamplingParams| {
        let mut c = client.clone();
        async move {
            text_of(
                &collect(
                    c.chat(chat("smollm2", "Write one sentence about the sea.", s))
                        .await
                        .unwrap()
                        .into_inner(),
                )
                .await
                .unwrap(),
            )
        }
    };
    let a = run(sampled(1234)).await;
    let b = run(sampled(1234)).await;
    assert_eq!(a, b, "same seed, same text");
    let others = [
        run(sampled(1)).await,
        run(sampled(2)).await,
        run(sampled(3)).await,
    ];
    assert!(
        others.iter().any(|o| *o != a),
        "different seeds all gave {a:?}"
    );

    // A stop string: generation ends before it would be emitted.
    let stop = SamplingParams {
        stop: vec!["Paris".into()],
        ..greedy(48)
    };
    let chunks = collect(
        client
            .chat(chat("smollm2", "What is the capital of France?", stop))
            .await
            .unwrap()
            .into_inner(),
    )
    .await
    .unwrap();
    assert!(
        !text_of(&chunks).contains("Paris"),
        "{:?}",
        text_of(&chunks)
    );
    assert_eq!(
        chunks.last().unwrap().finish_reason,
        FinishReason::Stop as i32
    );
    t.stop().await;
}

/// `stream_interval`: a model that decodes faster than it holds its tokens and sends
/// them together, the first at once and the last with the usage; the text is the one
/// every token's own chunk gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_interval_sends_fast_tokens_together() {
    let t = TestServer::start_with(|runtime| {
        let every = model_toml("every", "context_length = 1024\n");
        let held = model_toml("held", "context_length = 1024\nstream_interval = \"1s\"\n");
        settings_toml("", &(every + &held), runtime)
    })
    .await;
    let mut client = t.inference();
    let mut run = async |model: &str| {
        let request = GenerateRequest {
            model: model.into(),
            prompt: "Once upon a time, in a small village by the sea,".into(),
            sampling: Some(greedy(32)),
        };
        let started = std::time::Instant::now();
        let chunks = collect(client.generate(request).await.unwrap().into_inner())
            .await
            .unwrap();
        (chunks, started.elapsed())
    };
    let (every, _) = run("every").await;
    let (held, took) = run("held").await;
    assert_eq!(text_of(&held), text_of(&every));
    let tokens = every.last().unwrap().usage.unwrap().completion_tokens;
    assert!(every.len() as u32 >= tokens / 2, "{} chunks", every.len());
    // The first chunk, then at most one a second, then the last.
    let most = 2 + took.as_secs() as usize;
    assert!(
        held.len() <= most,
        "{} chunks in {took:?}, at most {most} with a 1 s interval",
        held.len()
    );
    assert!(!held[0].text.is_empty(), "the first token is not held");
    assert!(held.last().unwrap().usage.is_some());
    t.stop().await;
}
