//! Synthetic models (random weights, real shapes, SmolLM2's tokenizer) load and
//! generate through the real server, so benchmarks can use them as stand-ins for
//! larger models. Their text is meaningless; only that it streams is checked.

use modelpool_fixtures::synth::{write_llama, Quant, Shape};
use modelpool_proto::v1::{GenerateRequest, RegisterModelRequest};
use modelpool_tests::{collect, greedy, model_path, TestServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synthetic_llama_loads_and_generates() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestServer::start(&[]).await;
    for (name, quant) in [("q4", Quant::Q4_0), ("q8", Quant::Q8_0)] {
        let file = dir.path().join(format!("synth-{name}.gguf"));
        let shape = Shape {
            hidden: 256,
            layers: 4,
            heads: 8,
            kv_heads: 2,
            ffn: 512,
            context: 1024,
        };
        write_llama(&file, shape, quant, &model_path(), 1).unwrap();
        t.control()
            .register_model(RegisterModelRequest {
                id: name.into(),
                path: file.display().to_string(),
                context_length: Some(512),
                ..Default::default()
            })
            .await
            .unwrap();
        let stream = t
            .inference()
            .generate(GenerateRequest {
                model: name.into(),
                prompt: "Once upon a time".into(),
                sampling: Some(greedy(8)),
            })
            .await
            .unwrap()
            .into_inner();
        let chunks = collect(stream)
            .await
            .expect("the synthetic model generates");
        let usage = chunks.last().unwrap().usage.unwrap();
        assert!(
            usage.prompt_tokens > 0 && usage.completion_tokens > 0,
            "{usage:?}"
        );
    }
    t.stop().await;
}
