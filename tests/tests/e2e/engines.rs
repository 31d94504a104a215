//! The same behaviour through either engine: llama.cpp and mistral.rs serving the same
//! GGUF side by side, asked the same things.

use std::time::{Duration, Instant};

use modelpool_proto::v1::{FinishReason, GenerateChunk, GenerateRequest, SamplingParams};
use modelpool_tests::{
    assert_refused, chat, collect, greedy, model_toml, settings_toml, text_of, TestServer,
};

/// (model id, engine) of the two models every test here registers.
const ENGINES: [(&str, &str); 2] = [("on-llama", "llama.cpp"), ("on-mistral", "mistral.rs")];

async fn both_engines() -> TestServer {
    TestServer::start_with(|runtime| {
        let models: String = ENGINES
            .iter()
            .map(|(id, engine)| {
                model_toml(
                    id,
                    &format!("engine = \"{engine}\"\ncontext_length = 512\nmax_sequences = 2\n"),
                )
            })
            .collect();
        settings_toml("", &models, runtime)
    })
    .await
}

async fn generate(
    t: &TestServer,
    model: &str,
    prompt: &str,
    sampling: SamplingParams,
) -> Vec<GenerateChunk> {
    let stream = t
        .inference()
        .generate(GenerateRequest {
            model: model.into(),
            prompt: prompt.into(),
            sampling: Some(sampling),
        })
        .await
        .expect("generate starts")
        .into_inner();
    collect(stream).await.expect("generate completes")
}

async fn ask(t: &TestServer, model: &str, sampling: SamplingParams) -> Vec<GenerateChunk> {
    let stream = t
        .inference()
        .chat(chat(model, "What is the capital of France?", sampling))
        .await
        .expect("chat starts")
        .into_inner();
    collect(stream).await.expect("chat completes")
}

fn last(chunks: &[GenerateChunk]) -> (FinishReason, u32, u32) {
    let c = chunks.last().expect("a last chunk");
    let usage = c.usage.expect("usage on the last chunk");
    (
        c.finish_reason(),
        usage.prompt_tokens,
        usage.completion_tokens,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_engines_answer_the_same_chat_and_count_the_same_prompt() {
    let t = both_engines().await;
    let mut prompt_counts = Vec::new();
    for (id, engine) in ENGINES {
        assert_eq!(t.model(id).await.engine, engine);
        let chunks = ask(&t, id, greedy(32)).await;
        let text = text_of(&chunks);
        assert!(text.contains("Paris"), "{engine} answered {text:?}");
        let (_, prompt_tokens, completion_tokens) = last(&chunks);
        assert!(
            (1..=32).contains(&completion_tokens),
            "{engine}: {completion_tokens}"
        );
        prompt_counts.push(prompt_tokens);
    }
    // One chat template (the GGUF's own), one tokenizer: the same prompt tokens.
    assert_eq!(
        prompt_counts[0], prompt_counts[1],
        "prompt tokens per engine"
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tokens_seeds_and_stop_strings_behave_alike() {
    let t = both_engines().await;
    for (id, engine) in ENGINES {
        let chunks = generate(&t, id, "The capital of France is", greedy(5)).await;
        let (reason, _, completion) = last(&chunks);
        assert_eq!((reason, completion), (FinishReason::Length, 5), "{engine}");

        let seeded = SamplingParams {
            max_tokens: Some(16),
            temperature: Some(0.9),
            top_p: Some(0.95),
            top_k: Some(40),
            seed: Some(7),
            ..Default::default()
        };
        let a = text_of(&generate(&t, id, "Once upon a time", seeded.clone()).await);
        let b = text_of(&generate(&t, id, "Once upon a time", seeded).await);
        assert_eq!(a, b, "{engine}: one seed, one text");

        let full = text_of(&ask(&t, id, greedy(32)).await);
        let at = full.find("Paris").expect("the greedy answer names Paris");
        let stopped = ask(
            &t,
            id,
            SamplingParams {
                stop: vec!["Paris".into()],
                ..greedy(32)
            },
        )
        .await;
        assert_eq!(
            text_of(&stopped),
            full[..at],
            "{engine}: text before the stop"
        );
        assert_eq!(last(&stopped).0, FinishReason::Stop, "{engine}");
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_longer_than_the_context_are_refused_by_both() {
    let t = both_engines().await;
    let long = "word ".repeat(700);
    for (id, engine) in ENGINES {
        let err = t
            .inference()
            .generate(GenerateRequest {
                model: id.into(),
                prompt: long.clone(),
                sampling: Some(greedy(4)),
            })
            .await
            .expect_err("a prompt over the 512-token context");
        assert_refused(&err, tonic::Code::InvalidArgument, "context is 512 tokens");
        let _ = engine;
    }
    t.stop().await;
}

/// Prompts whose continuation starts with emoji, which the SmolLM2 vocabulary splits
/// into several byte tokens: one to three tokens stop inside a character.
const EMOJI_PROMPT: &str = "Emoji only: 😀😃😄😁😆😅😂🤣😊😇🙂🙃😉😌😍🥰😘";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_cut_inside_a_character_end_with_their_length_as_whole_text() {
    let t = both_engines().await;
    for (id, engine) in ENGINES {
        for max_tokens in 1..=3 {
            let chunks = generate(&t, id, EMOJI_PROMPT, greedy(max_tokens)).await;
            let (reason, _, completion) = last(&chunks);
            assert_eq!(
                reason,
                FinishReason::Length,
                "{engine} at {max_tokens} tokens"
            );
            // mistral.rs' own count runs one over here (its logits processor sees one
            // more step than it streams); llama.cpp's is exact.
            if engine == "llama.cpp" {
                assert_eq!(completion, max_tokens, "{engine}");
            }
            let text = text_of(&chunks);
            assert!(
                !text.contains('\u{fffd}'),
                "{engine} at {max_tokens} tokens sent a broken character: {text:?}"
            );
        }
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_frees_its_sequence_in_either_engine() {
    let t = both_engines().await;
    for (id, engine) in ENGINES {
        let mut stream = t
            .inference()
            .generate(GenerateRequest {
                model: id.into(),
                prompt: "1, 2, 3, 4, 5, 6, 7, 8,".into(),
                sampling: Some(greedy(400)),
            })
            .await
            .unwrap()
            .into_inner();
        for _ in 0..3 {
            stream.message().await.unwrap().expect("a chunk");
        }
        let lease = t.server.pool.acquire(id, None).await.unwrap();
        let worker = lease.instance();
        assert_eq!(
            worker.stats().await.unwrap().active_sequences,
            1,
            "{engine}"
        );
        drop(stream);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let stats = worker.stats().await.unwrap();
            if stats.active_sequences == 0 && stats.cancelled_total == 1 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{engine}: {stats:?} 60 s after the client left"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The model serves the next request as before.
        assert!(
            text_of(&ask(&t, id, greedy(16)).await).contains("Paris"),
            "{engine}"
        );
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequences_of_one_llama_cpp_model_decode_together() {
    let t = both_engines().await;
    let (id, _) = ENGINES[0];
    assert!(text_of(&ask(&t, id, greedy(24)).await).contains("Paris"));
    let lease = t.server.pool.acquire(id, None).await.unwrap();
    let before = lease.instance().stats().await.unwrap();
    assert_eq!(before.peak_batch_sequences, 1, "one request decodes alone");
    drop(lease);
    // Two at once share the model's two sequences, decoded in one batch per step; each
    // still answers the question.
    let long = SamplingParams {
        max_tokens: Some(64),
        ..greedy(64)
    };
    let (a, b) = tokio::join!(ask(&t, id, long.clone()), ask(&t, id, long));
    for answer in [text_of(&a), text_of(&b)] {
        assert!(
            answer.contains("Paris"),
            "{answer:?} beside another sequence"
        );
    }
    let lease = t.server.pool.acquire(id, None).await.unwrap();
    let after = lease.instance().stats().await.unwrap();
    assert_eq!(after.active_sequences, 0);
    assert_eq!(after.peak_batch_sequences, 2, "two sequences in one step");
    t.stop().await;
}

/// Weight repacking is a build-time choice of llama.cpp here (`GGML_CPU_REPACK=OFF` in
/// .cargo/config.toml): a model asking for `repack = true` is refused by its worker with
/// the reason and the way out, instead of silently running with mapped weights.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_asking_for_repacking_this_build_lacks_is_refused_with_the_reason() {
    let t = TestServer::start_with(|runtime| {
        let models = model_toml("repacked", "engine = \"llama.cpp\"\nrepack = true\n");
        settings_toml("", &models, runtime)
    })
    .await;
    let err = match t.inference().chat(chat("repacked", "Hi", greedy(4))).await {
        Err(e) => e,
        Ok(stream) => collect(stream.into_inner())
            .await
            .expect_err("this build cannot repack"),
    };
    assert!(
        err.message().contains("repack") && err.message().contains("GGML_CPU_REPACK"),
        "{err:?}"
    );
    let m = t.model("repacked").await;
    assert!(m.last_error.contains("GGML_CPU_REPACK"), "{m:?}");
    assert_eq!(m.worker_pid, 0, "{m:?}");
    t.assert_nothing_charged().await;
    t.stop().await;
}
