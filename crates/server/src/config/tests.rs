//! Configuration parsing and validation: defaults, every key's error, models, groups.

use super::*;
use modelpool_pool::{Device, EngineKind, ModelFormat, Source};

const URL_WITHOUT_SPILL: &str = "[[models]]\nid = \"a\"\nurl = \"http://h/m\"\nsha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"";

#[test]
fn defaults_and_relative_paths() {
    let s = Settings::from_toml(
        "[[models]]\nid = \"m\"\npath = \"x.gguf\"\n",
        Path::new("/etc/modelpool"),
    )
    .unwrap();
    assert_eq!(s.listen.to_string(), "127.0.0.1:50051");
    assert_eq!(s.drain_timeout, Duration::from_secs(30));
    assert_eq!(
        s.models[0].source,
        Source::Path(PathBuf::from("/etc/modelpool/x.gguf"))
    );
    assert_eq!(s.models[0].context_length, 4096);
    assert_eq!(s.models[0].device, Device::Cpu);
    assert_eq!(s.pool.ram_budget, BudgetSetting::Auto);
    assert_eq!(s.pool.turns, modelpool_pool::TurnPolicy::default());
    assert_eq!(s.openai_listen, None);
}

#[test]
fn openai_listen_is_off_unless_set_and_loopback_unless_allowed() {
    let on = |text: &str| Settings::from_toml(text, Path::new("/")).map(|s| s.openai_listen);
    assert_eq!(on("[server]\nopenai_listen = \"\"").unwrap(), None);
    assert_eq!(
        on("[server]\nopenai_listen = \"127.0.0.1:8080\"")
            .unwrap()
            .map(|a| a.to_string()),
        Some("127.0.0.1:8080".into())
    );
    let remote = "[server]\nopenai_listen = \"0.0.0.0:8080\"\nallow_remote = true";
    assert_eq!(on(remote).unwrap().map(|a| a.port()), Some(8080));
}

#[test]
fn budgets_and_model_options() {
    let s = Settings::from_toml(
        "[pool]\nram_budget = \"6GiB\"\nreserve = \"1GiB\"\nauto_fraction = 0.5\n\
         [[models]]\nid = \"m\"\npath = \"x.gguf\"\npinned = true\nidle_ttl = \"10m\"\nmax_concurrency = 2",
        Path::new("/"),
    )
    .unwrap();
    assert_eq!(s.pool.ram_budget, BudgetSetting::Bytes(6 << 30));
    let limited =
        Settings::from_toml("[pool]\nmemory_limit = 4294967296\n", Path::new("/")).unwrap();
    assert_eq!(limited.pool.memory_limit_bytes, Some(4 << 30));
    assert_eq!(BudgetSetting::Auto.resolve(16 << 30, &s.pool), 7 << 30);
    let m = &s.models[0];
    assert!(m.pinned);
    assert_eq!(
        (m.idle_ttl, m.max_concurrency),
        (Some(Duration::from_secs(600)), 2)
    );
    if !crate::CUDA_BUILD {
        let err = Settings::from_toml(
            "[[models]]\nid = \"a\"\npath = \"a\"\ndevice = \"cuda:0\"",
            Path::new("/"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("`cuda` feature"), "{err}");
    }
}

#[test]
fn errors_name_the_key() {
    let cases = [
        ("[server]\nlisten = \"nope\"", "server.listen"),
        ("[server]\ndrain_timeout = \"soon\"", "server.drain_timeout"),
        (
            "[[models]]\nid = \"a\"\npath = \"a\"\ncontext_length = 1",
            "models[0].context_length",
        ),
        (
            "[[models]]\nid = \"a\"\npath = \"a\"\n[[models]]\nid = \"a\"\npath = \"b\"",
            "models[1].id",
        ),
        (
            "[[models]]\nid = \"a\"\npath = \"a\"\nformat = \"onnx\"",
            "models[0].format",
        ),
        (
            "[[models]]\nid = \"a\"\npath = \"a\"\ndevice = \"tpu\"",
            "models[0].device",
        ),
        (
            "[[models]]\nid = \"a\"\npath = \"a\"\nidle_ttl = \"soon\"",
            "models[0].idle_ttl",
        ),
        ("[pool]\nram_budget = \"6 parsecs\"", "pool.ram_budget"),
        ("[pool]\nauto_fraction = 1.0", "pool.auto_fraction"),
        ("[pool]\nqueue_depth = 0", "pool.queue_depth"),
        ("[pool]\nfairness_window = \"60s\"", "pool.fairness_window"),
        ("[pool]\nmin_residency = \"a while\"", "pool.min_residency"),
        ("[pool]\ndrain_timeout = \"-1s\"", "pool.drain_timeout"),
        ("[server]\nlisten = \"0.0.0.0:50051\"", "server.listen"),
        ("[workers]\nload_nice = 20", "workers.load_nice"),
        (
            "[server]\nmetrics_listen = \"10.0.0.1:9464\"",
            "server.metrics_listen",
        ),
        (
            "[server]\nopenai_listen = \"0.0.0.0:8080\"",
            "server.openai_listen",
        ),
        (
            "[server]\nopenai_listen = \"port 80\"",
            "server.openai_listen",
        ),
        (
            "[storage]\nspill_dir = \"/s\"\nspill_budget = \"0\"",
            "storage.spill_budget",
        ),
        (
            "[storage]\nspill_dir = \"/s\"\nsaved_prefix_budget = \"lots\"",
            "storage.saved_prefix_budget",
        ),
        (
            "[[models]]\nid = \"a\"\nurl = \"http://h/m.gguf\"\nsha256 = \"00\"",
            "models[0].sha256",
        ),
        (
            "[storage]\nspill_dir = \"/s\"\n[[models]]\nid = \"a\"\nurl = \"ftp://h/m\"",
            "models[0].url",
        ),
        (
            "[[models]]\nid = \"a\"\npath = \"a\"\nurl = \"http://h/m\"",
            "models[0].url",
        ),
        (
            // A URL source needs somewhere to download to.
            URL_WITHOUT_SPILL,
            "models[0].url",
        ),
    ];
    for (toml, key) in cases {
        let err = Settings::from_toml(toml, Path::new("/"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("`{key}`")), "{toml:?} gave {err}");
    }
    let err = Settings::from_toml("[server]\nlisten_addr = 1", Path::new("/"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("listen_addr"), "{err}");
}

#[test]
fn precisions_are_checked_and_only_for_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().display();
    // A directory is a safetensors model; precisions are lowercased and kept in order.
    let s = Settings::from_toml(
        &format!(
            "[[models]]\nid = \"m\"\npath = \"{st}\"\nprecisions = [\"none\", \"Q8_0\", \"q4k\"]\n"
        ),
        Path::new("/"),
    )
    .unwrap();
    assert_eq!(s.models[0].format, ModelFormat::Safetensors);
    assert_eq!(s.models[0].precisions, ["none", "q8_0", "q4k"]);
    let cases = [
        (
            format!("path = \"{st}\"\nprecisions = [\"q3_0\"]"),
            "unknown precision",
        ),
        (
            format!("path = \"{st}\"\nprecisions = [\"q8_0\", \"q8_0\"]"),
            "listed twice",
        ),
        (
            "path = \"m.gguf\"\nprecisions = [\"q8_0\"]".to_owned(),
            "only a safetensors model",
        ),
        (
            "url = \"http://h/m\"\nsha256 = \"00\"\nformat = \"safetensors\"".to_owned(),
            "models[0]",
        ),
    ];
    for (keys, needle) in cases {
        let err = Settings::from_toml(&format!("[[models]]\nid = \"m\"\n{keys}\n"), Path::new("/"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{keys}: {err}");
    }
}

#[test]
fn an_inference_token_alone_is_refused() {
    let err = Settings::from_toml(
        "[auth]\ninference_token = \"0123456789abcdef\"\n",
        Path::new("/"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("auth.control_token") && err.contains("control RPCs would be open"));
    let both =
        "[auth]\ninference_token = \"0123456789abcdef\"\ncontrol_token = \"fedcba9876543210\"\n";
    assert!(Settings::from_toml(both, Path::new("/")).is_ok());
    let control_only = "[auth]\ncontrol_token = \"fedcba9876543210\"\n";
    assert!(Settings::from_toml(control_only, Path::new("/")).is_ok());
}

#[test]
fn engines_default_by_format_and_are_checked() {
    let model = |extra: &str| {
        Settings::from_toml(
            &format!("[[models]]\nid = \"a\"\npath = \"a.gguf\"\n{extra}"),
            Path::new("/"),
        )
    };
    let s = model("").unwrap();
    assert_eq!(
        (
            s.models[0].engine.kind.map(|e| e.as_str()),
            s.models[0].engine.llama_cpp.repack,
            s.models[0].engine.llama_cpp.mlock,
            s.models[0].engine.llama_cpp.prefix_cache
        ),
        (Some("llama.cpp"), false, false, true)
    );
    assert!(
        !model("prefix_cache = false").unwrap().models[0]
            .engine
            .llama_cpp
            .prefix_cache
    );
    let shared = model("context_length = 1024\nmax_sequences = 4\nkv_budget = 2048").unwrap();
    assert_eq!(
        shared.models[0].engine.llama_cpp.kv_budget_tokens,
        Some(2048)
    );
    assert_eq!(shared.models[0].kv_cells(), 2048);
    let growing =
        model("context_length = 1024\nmax_sequences = 4\nkv_budget = 2048\nkv_budget_max = 4096")
            .unwrap();
    assert_eq!(
        growing.models[0].engine.llama_cpp.kv_budget_max_tokens,
        Some(4096)
    );
    assert_eq!(model("").unwrap().models[0].kv_cells(), 4096);
    let interval = |extra| {
        model(extra).unwrap().models[0]
            .engine
            .llama_cpp
            .stream_interval
    };
    assert_eq!(interval(""), std::time::Duration::ZERO);
    assert_eq!(
        interval("stream_interval = \"20ms\""),
        std::time::Duration::from_millis(20)
    );
    assert_eq!(
        interval("stream_interval = \"1s\""),
        std::time::Duration::from_secs(1)
    );
    let s = model("engine = \"mistral.rs\"").unwrap();
    assert_eq!(s.models[0].engine.kind, Some(EngineKind::MistralRs));
    let s = model("repack = true\nmlock = true").unwrap();
    assert!(s.models[0].engine.llama_cpp.repack && s.models[0].engine.llama_cpp.mlock);
    for (extra, key, says) in [
        (
            "engine = \"vllm\"",
            "models[0].engine",
            "llama.cpp, mistral.rs",
        ),
        (
            "format = \"safetensors\"\nengine = \"llama.cpp\"",
            "models[0].engine",
            "cannot read safetensors",
        ),
        (
            "engine = \"mistral.rs\"\nrepack = true",
            "models[0].repack",
            "llama.cpp setting",
        ),
        (
            "engine = \"mistral.rs\"\nmlock = true",
            "models[0].mlock",
            "llama.cpp setting",
        ),
        (
            "engine = \"mistral.rs\"\nprefix_cache = false",
            "models[0].prefix_cache",
            "llama.cpp setting",
        ),
        (
            "engine = \"mistral.rs\"\nstream_interval = \"20ms\"",
            "models[0].stream_interval",
            "llama.cpp setting",
        ),
        (
            "stream_interval = \"1001ms\"",
            "models[0].stream_interval",
            "must be at most 1s, got 1s 1ms",
        ),
        (
            "stream_interval = \"often\"",
            "models[0].stream_interval",
            "not a duration like \"20ms\"",
        ),
        (
            "context_length = 1024\nmax_sequences = 4\nkv_budget = 512",
            "models[0].kv_budget",
            "must be 1024..=4096 tokens",
        ),
        (
            "context_length = 1024\nmax_sequences = 4\nkv_budget = 5000",
            "models[0].kv_budget",
            "got 5000",
        ),
        (
            "engine = \"mistral.rs\"\nkv_budget = 4096",
            "models[0].kv_budget",
            "llama.cpp setting",
        ),
        (
            "context_length = 1024\nmax_sequences = 4\nkv_budget_max = 2048",
            "models[0].kv_budget_max",
            "needs kv_budget",
        ),
        (
            "context_length = 1024\nmax_sequences = 4\nkv_budget = 2048\nkv_budget_max = 1024",
            "models[0].kv_budget_max",
            "must be 2048..=4096 tokens",
        ),
        (
            "context_length = 1024\nmax_sequences = 4\nkv_budget = 2048\nkv_budget_max = 8192",
            "models[0].kv_budget_max",
            "got 8192",
        ),
    ] {
        let err = model(extra).unwrap_err().to_string();
        assert!(
            err.contains(&format!("`{key}`")) && err.contains(says),
            "{extra:?} gave {err}"
        );
    }
}

#[test]
fn saved_prefixes_follow_the_spill_dir_with_their_own_budget() {
    let storage = |extra: &str| {
        let toml = format!("[storage]\nspill_dir = \"/s\"\n{extra}");
        Settings::from_toml(&toml, Path::new("/"))
            .unwrap()
            .storage
            .unwrap()
    };
    assert_eq!(storage("").saved_prefix_budget_bytes, 2 << 30);
    let small = storage("saved_prefix_budget = \"64MiB\"");
    assert_eq!(small.saved_prefix_budget_bytes, 64 << 20);
    assert_eq!(
        storage("saved_prefix_budget = \"0\"").saved_prefix_budget_bytes,
        0
    );
}
