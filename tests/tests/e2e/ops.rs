//! Operating the server: Prometheus metrics that move with requests, and live reload
//! of the model list (RPC and SIGHUP) that drains what it removes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use modelpool_proto::v1::{GenerateRequest, ListModelsRequest, ModelState, ReloadConfigRequest};
use modelpool_server::Settings;
use modelpool_tests::{
    chat, collect, greedy, model_path, modelpool_exe, parse_prometheus, sample_value, scrape,
    ServeChild, TestServer,
};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_with_a_request() {
    let t = TestServer::start(&["smollm2"]).await;
    let addr = t.server.metrics_addr.expect("metrics enabled");
    let before = parse_prometheus(&scrape(addr).await);
    let ok = [("model", "smollm2"), ("code", "Ok")];
    assert_eq!(sample_value(&before, "modelpool_requests_total", &ok), 0.0);
    assert!(sample_value(&before, "modelpool_budget_bytes", &[("device", "cpu")]) > 0.0);

    let chunks = collect(
        t.inference()
            .chat(chat(
                "smollm2",
                "What is the capital of France?",
                greedy(12),
            ))
            .await
            .unwrap()
            .into_inner(),
    )
    .await
    .unwrap();
    let completion = chunks
        .last()
        .unwrap()
        .usage
        .as_ref()
        .unwrap()
        .completion_tokens;
    // A refused request is counted with its code too; ids nobody registered share one
    // label, so clients cannot grow the series without bound.
    for unknown in ["nope", "nope-2"] {
        let err = t
            .inference()
            .chat(chat(unknown, "Hi", greedy(4)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
    }

    let after = parse_prometheus(&scrape(addr).await);
    let m = [("model", "smollm2")];
    assert_eq!(sample_value(&after, "modelpool_requests_total", &ok), 1.0);
    assert_eq!(
        sample_value(
            &after,
            "modelpool_requests_total",
            &[("model", "(unregistered)"), ("code", "NotFound")]
        ),
        2.0
    );
    assert_eq!(
        sample_value(
            &after,
            "modelpool_requests_total",
            &[("model", "nope"), ("code", "NotFound")]
        ),
        0.0
    );
    assert_eq!(
        sample_value(&after, "modelpool_generated_tokens_total", &m),
        f64::from(completion)
    );
    assert_eq!(
        sample_value(
            &after,
            "modelpool_loads_total",
            &[("model", "smollm2"), ("result", "ok")]
        ),
        1.0
    );
    assert_eq!(
        sample_value(&after, "modelpool_load_duration_seconds_count", &m),
        1.0
    );
    assert_eq!(
        sample_value(&after, "modelpool_cold_start_requests_total", &m),
        1.0
    );
    assert!(sample_value(&after, "modelpool_cold_start_wait_seconds_sum", &m) > 0.0);
    assert_eq!(
        sample_value(&after, "modelpool_time_to_first_token_seconds_count", &m),
        1.0
    );
    assert!(sample_value(&after, "modelpool_inter_token_latency_seconds_count", &m) >= 1.0);
    assert!(
        sample_value(
            &after,
            "modelpool_resident_bytes",
            &[("model", "smollm2"), ("tier", "resident")]
        ) > 50e6
    );
    assert!(sample_value(&after, "modelpool_used_bytes", &[("device", "cpu")]) > 50e6);
    assert_eq!(
        sample_value(&after, "modelpool_in_flight_requests", &m),
        0.0
    );
    t.stop().await;
}

/// A configuration for `models` (id, context). Two sequences each, so a request to a
/// model that is generating runs beside it instead of queueing behind it.
fn write_models(path: &Path, runtime: &Path, models: &[(&str, u32)]) {
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"\"\ndrain_timeout = \"600s\"\n\
         [workers]\nruntime_dir = \"{}\"\nexe = \"{}\"\n[pool]\nqueue_timeout = \"600s\"\n",
        runtime.display(),
        modelpool_exe().display()
    );
    for (id, ctx) in models {
        text += &format!(
            "[[models]]\nid = \"{id}\"\npath = \"{}\"\ncontext_length = {ctx}\nmax_sequences = 2\n",
            model_path().display()
        );
    }
    std::fs::write(path, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_removes_and_drains() {
    let dir = tempfile::tempdir().unwrap();
    let config: PathBuf = dir.path().join("modelpool.toml");
    let cfg = config.clone();
    let t = TestServer::start_with(move |runtime| {
        write_models(&cfg, runtime, &[("a", 1024), ("b", 1024)]);
        Settings::load(Some(&cfg)).unwrap()
    })
    .await;
    let runtime = t.server.runtime_dir.parent().unwrap().to_path_buf();

    // b is generating when the reload removes it: it finishes, new requests are refused.
    // (300 tokens: seconds of work, so it is still going when the reload looks.)
    let mut b_stream = t
        .inference()
        .generate(GenerateRequest {
            model: "b".into(),
            prompt: "1, 2, 3, 4, 5, 6, 7, 8,".into(),
            sampling: Some(greedy(300)),
        })
        .await
        .unwrap()
        .into_inner();
    b_stream.message().await.unwrap().expect("b is generating");
    write_models(&config, &runtime, &[("a", 2048), ("c", 1024)]);
    let mut control = t.control();
    let reload = tokio::spawn(async move { control.reload_config(ReloadConfigRequest {}).await });
    let mut inference = t.inference();
    // The reload marks b as leaving (requests before that are served beside its
    // generation), then waits for that generation.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let refused = loop {
        match inference.chat(chat("b", "Hi", greedy(4))).await {
            Err(e) => break e,
            Ok(served) => drop(collect(served.into_inner()).await),
        }
        if reload.is_finished() {
            panic!("the reload ended first: {:?}", reload.await);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "b was never marked as leaving"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!reload.is_finished(), "the reload waits for b's generation");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("being removed"),
        "{}",
        refused.message()
    );
    let rest = collect(b_stream)
        .await
        .expect("b's generation finishes during the drain");
    assert!(rest.last().unwrap().usage.is_some());

    let report = reload.await.unwrap().expect("reload succeeds").into_inner();
    assert_eq!(report.added, vec!["c".to_string()]);
    assert_eq!(report.removed, vec!["b".to_string()]);
    assert_eq!(report.changed, vec!["a".to_string()]);
    assert_eq!(t.model_ids().await, vec!["a".to_string(), "c".to_string()]);
    let gone = t
        .inference()
        .chat(chat("b", "Hi", greedy(4)))
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    assert!(t.ask_capital("c").await.contains("Paris"));

    // An invalid file is rejected whole; the old configuration keeps serving.
    std::fs::write(
        &config,
        "[[models]]\nid = \"a\"\npath = \"x\"\ncontext_length = 1\n",
    )
    .unwrap();
    let err = t
        .control()
        .reload_config(ReloadConfigRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("models[0].context_length"),
        "{}",
        err.message()
    );
    assert_eq!(t.model_ids().await, vec!["a".to_string(), "c".to_string()]);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_real_binary() {
    let _serial = modelpool_tests::serial().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("modelpool.toml");
    let write = |ids: &[&str]| {
        let mut text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"\"\n[workers]\nruntime_dir = \"{}\"\n",
            dir.path().display()
        );
        for id in ids {
            text += &format!(
                "[[models]]\nid = \"{id}\"\npath = \"{}\"\n",
                model_path().display()
            );
        }
        std::fs::write(&config, text).unwrap();
    };
    write(&["a"]);
    let mut cmd = std::process::Command::new(modelpool_exe());
    cmd.args(["serve", "--config"]).arg(&config);
    let mut server = ServeChild::spawn(cmd).await;
    let channel = server.connect().await;
    let mut control = modelpool_proto::v1::model_control_client::ModelControlClient::new(channel);
    write(&["a", "added"]);
    server.signal(libc::SIGHUP);
    // The reload is done when the server logs its report (however busy the machine).
    server.wait_for_log("configuration reloaded").await;
    let list = control
        .list_models(ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<String> = list.models.iter().map(|m| m.id.clone()).collect();
    assert_eq!(ids, vec!["a".to_string(), "added".to_string()]);
    assert!(list
        .models
        .iter()
        .all(|m| m.state() == ModelState::Registered));
    server.signal(libc::SIGTERM);
    let status = server.wait().await;
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_request_span_and_trace_context() {
    let _serial = modelpool_tests::serial().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("modelpool.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"\"\n[workers]\nruntime_dir = \"{}\"\n\
             [[models]]\nid = \"smollm2\"\npath = \"{}\"\ncontext_length = 1024\n",
            dir.path().display(),
            model_path().display()
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(modelpool_exe());
    cmd.args(["--log-format", "json", "serve", "--config"])
        .arg(&config);
    let mut server = ServeChild::spawn(cmd).await;
    let channel = server.connect().await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = tonic::Request::new(chat("smollm2", "Hi", greedy(4)));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-00f067aa0ba902b7-01").parse().unwrap(),
    );
    let mut client = modelpool_proto::v1::inference_client::InferenceClient::new(channel);
    collect(client.chat(request).await.unwrap().into_inner())
        .await
        .unwrap();
    server.signal(libc::SIGTERM);
    server.wait().await;
    let text = server.log_text();

    let finished: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "request finished")
        .collect();
    assert_eq!(finished.len(), 1, "{text}");
    let span = &finished[0]["span"];
    assert_eq!(span["name"], "request", "{span}");
    assert_eq!(span["model"], "smollm2", "{span}");
    assert_eq!(span["trace_id"], trace, "{span}");
    assert_eq!(span["parent_span_id"], "00f067aa0ba902b7", "{span}");
    let id = span["request_id"].as_str().unwrap_or("");
    assert!(
        id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{span}"
    );
    assert!(
        finished[0]["fields"]["completion_tokens"]
            .as_u64()
            .unwrap_or(0)
            > 0
    );
}
