//! Safetensors models quantized at load (mistral.rs ISQ): the quantized weights (UQFF)
//! a first load writes are kept in the spill directory and reused by the next load,
//! which answers the same; and a model that does not fit at its best precision loads
//! at the first of its precisions that does.

use std::path::Path;
use std::time::Duration;

use modelpool_proto::v1::pool_event::Kind;
use modelpool_proto::v1::{EvictModelRequest, ModelFormat, RegisterModelRequest};
use modelpool_tests::{
    chat, collect, greedy, next_event, safetensors_model_dir, settings_toml, text_of, TestServer,
};
use tonic::Code;

fn st_model(id: &str, dir: &Path, precisions: &str) -> String {
    format!(
        "[[models]]\nid = \"{id}\"\npath = \"{}\"\ncontext_length = 1024\nprecisions = [{precisions}]\n",
        dir.display()
    )
}

/// The worker's command line, to see which weights it was told to load.
fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

async fn answer(t: &TestServer, id: &str) -> String {
    let stream = t
        .inference()
        .chat(chat(id, "What is the capital of France?", greedy(24)))
        .await
        .expect("chat")
        .into_inner();
    text_of(&collect(stream).await.expect("the answer streams"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quantized_weights_are_written_once_to_the_spill_dir_and_reused_with_the_same_answer() {
    let dir = safetensors_model_dir();
    let spill = tempfile::tempdir().unwrap();
    let pool = format!(
        "[storage]\nspill_dir = \"{}\"\nspill_budget = \"1GiB\"\n",
        spill.path().display()
    );
    let models = st_model("st", &dir, "\"q8_0\"");
    let t = TestServer::start_with(|rt| settings_toml(&pool, &models, rt)).await;
    let mut control = t.control();
    let mut events = t.events().await;

    let first = answer(&t, "st").await;
    assert!(first.contains("Paris"), "{first}");
    let m = t.model("st").await;
    assert_eq!(
        (m.precision.as_str(), m.precisions.clone()),
        ("q8_0", vec!["q8_0".to_string()])
    );
    assert!(
        cmdline(m.worker_pid).contains("--write-quantized"),
        "{}",
        cmdline(m.worker_pid)
    );
    // The quantized weights reach the spill directory once the load is done.
    let spilled = loop {
        let e = next_event(&mut events, Duration::from_secs(30)).await;
        if let Some(Kind::Spilled(s)) = e.kind {
            assert_eq!(s.how, "quantized");
            break s.bytes;
        }
    };
    let usage = t.pool_status().await.spill.expect("spill status");
    assert_eq!((usage.artifacts, usage.used_bytes), (1, spilled));
    let names: Vec<String> = std::fs::read_dir(spill.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().any(|n| n.ends_with(".uqff")), "{names:?}");
    assert!(
        !names.iter().any(|n| n.ends_with(".tmp")),
        "scratch left behind: {names:?}"
    );

    control
        .evict_model(EvictModelRequest { id: "st".into() })
        .await
        .unwrap();
    let second = answer(&t, "st").await;
    assert_eq!(second, first, "the same weights answer the same");
    let m = t.model("st").await;
    let line = cmdline(m.worker_pid);
    assert!(line.contains("--reuse-quantized"), "{line}");
    assert!(!line.contains("--write-quantized"), "{line}");
    assert_eq!(t.pool_status().await.spill.unwrap().artifacts, 1);

    // Kept weights that no longer load (here: overwritten with zeros) fail one load,
    // are discarded, and the next load quantizes afresh.
    let uqff = std::fs::read_dir(spill.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "uqff"))
        .unwrap();
    let len = std::fs::metadata(&uqff).unwrap().len() as usize;
    std::fs::write(&uqff, vec![0u8; len]).unwrap();
    control
        .evict_model(EvictModelRequest { id: "st".into() })
        .await
        .unwrap();
    let stream = t
        .inference()
        .chat(chat("st", "What is the capital of France?", greedy(8)))
        .await;
    let failed = match stream {
        Ok(s) => collect(s.into_inner()).await.is_err(),
        Err(_) => true,
    };
    assert!(failed, "garbage quantized weights cannot load");
    assert!(!uqff.exists(), "the bad artifact was discarded");
    let third = answer(&t, "st").await;
    assert_eq!(third, first);
    let line = cmdline(t.model("st").await.worker_pid);
    assert!(line.contains("--write-quantized"), "{line}");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_too_big_at_its_best_precision_loads_at_the_first_that_fits() {
    let dir = safetensors_model_dir();
    let predicted = |p: &str| modelpool_tests::predicted_safetensors_bytes(&dir, 1024, p);
    let (native, q8) = (predicted("none"), predicted("q8_0"));
    assert!(q8 < native, "8-bit is smaller: {q8} vs {native}");
    // Room for 8-bit, not for the unquantized weights.
    let budget = q8 + (native - q8) / 2;
    if let Err(why) = modelpool_tests::memory_for_budget(budget) {
        return modelpool_tests::skipped(&why);
    }
    let pool = format!("ram_budget = \"{budget}\"\n");
    let models = st_model("st", &dir, "\"none\", \"q8_0\"");
    let t = TestServer::start_with(|rt| settings_toml(&pool, &models, rt)).await;
    let mut events = t.events().await;
    let text = answer(&t, "st").await;
    assert!(text.contains("Paris"), "{text}");
    let m = t.model("st").await;
    assert_eq!(m.precision, "q8_0");
    assert_eq!(m.predicted.unwrap().total_bytes, q8);
    let started = loop {
        let e = next_event(&mut events, Duration::from_secs(30)).await;
        if let Some(Kind::LoadStarted(s)) = e.kind {
            break s;
        }
    };
    assert_eq!(
        (started.precision.as_str(), started.predicted_bytes),
        ("q8_0", q8)
    );
    let status = t.pool_status().await;
    let cpu = &status.devices[0];
    assert!(cpu.used_bytes <= budget, "{} over {budget}", cpu.used_bytes);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_model_takes_a_safetensors_directory_and_refuses_bad_precisions() {
    let dir = safetensors_model_dir();
    let t = TestServer::start(&["smollm2"]).await;
    let request = |id: &str, path: &Path, precisions: &[&str]| RegisterModelRequest {
        id: id.into(),
        path: path.display().to_string(),
        precisions: precisions.iter().map(|p| p.to_string()).collect(),
        context_length: Some(512),
        ..Default::default()
    };
    let gguf = modelpool_tests::model_path();
    let cases = [
        (
            request("a", &dir, &["q3_0"]),
            "precisions",
            "unknown precision",
        ),
        (
            request("b", &gguf, &["q8_0"]),
            "precisions",
            "only a safetensors",
        ),
        (
            request("c", dir.parent().unwrap(), &["q8_0"]),
            "path",
            "config.json",
        ),
    ];
    for (req, field, why) in cases {
        let err = t.control().register_model(req).await.expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().starts_with(field), "{}", err.message());
        assert!(err.message().contains(why), "{}", err.message());
    }
    assert_eq!(t.model_ids().await.len(), 1, "nothing was registered");

    let info = t
        .control()
        .register_model(request("st", &dir, &["q4_0"]))
        .await
        .expect("registered")
        .into_inner();
    assert_eq!(info.format, ModelFormat::Safetensors as i32);
    assert_eq!(info.precisions, ["q4_0"]);
    let text = answer(&t, "st").await;
    assert!(text.contains("Paris"), "{text}");
    assert_eq!(t.model("st").await.precision, "q4_0");
    t.stop().await;
}

/// A chat template that refuses the messages (as templates that demand alternating
/// roles do) is the client's problem: INVALID_ARGUMENT with the template's words, not
/// an error that invites a retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_template_that_refuses_the_messages_is_invalid_argument() {
    let src = safetensors_model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("strict");
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let to = dir.join(path.file_name().unwrap());
        if path.file_name().unwrap() == "tokenizer_config.json" {
            let mut config: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            config["chat_template"] =
                "{{ raise_exception('this model takes no system message') }}".into();
            std::fs::write(&to, serde_json::to_vec(&config).unwrap()).unwrap();
        } else {
            std::fs::hard_link(&path, &to).unwrap();
        }
    }
    let models = st_model("strict", &dir, "\"q8_0\"");
    let t = TestServer::start_with(|rt| settings_toml("", &models, rt)).await;
    let err = t
        .inference()
        .chat(chat("strict", "Hi", greedy(4)))
        .await
        .unwrap_err();
    let says = "this model takes no system message";
    modelpool_tests::assert_refused(&err, Code::InvalidArgument, says);
    t.stop().await;
}
