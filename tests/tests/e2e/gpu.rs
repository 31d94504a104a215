//! On a GPU: a `cuda:0` model has every layer there, the VRAM the pool charges for it
//! is what NVML reports for its worker (±10%), evicting it gives the VRAM back within a
//! second, and a model over the VRAM budget is refused with the numbers before any load.
//!
//! They need a build whose llama.cpp can reach a GPU (`cuda`, or `llama-shared` with a
//! CUDA libggml on the library path), NVML seeing `cuda:0`, and two models:
//! `MODELPOOL_GPU_SMALL` (default: SmolLM2) and `MODELPOOL_GPU_LARGE` (default:
//! models/synth-llama-7b-a.gguf, `just synth-model 7b`). Where any is missing each test
//! says so and returns. `scripts/gpu-check.sh` runs them on a lent GPU machine; each
//! prints a `gpu-report:` line with its figures.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use modelpool_pool::{Device, MemoryProbe, SystemProbe};
use modelpool_proto::v1::{EvictModelRequest, LoadModelRequest, ModelState};
use modelpool_tests::*;

const MIB: f64 = 1048576.0;

/// The GPU and the models, or why a test cannot run here.
struct Gpu {
    probe: SystemProbe,
    small: PathBuf,
    large: PathBuf,
}

fn gpu() -> Result<Gpu, String> {
    if !modelpool_server::CUDA_BUILD {
        return Err("this build has no GPU engine (features `cuda` or `llama-shared`)".into());
    }
    let probe = SystemProbe::new();
    if let Some(reason) = probe.gpu_absent_reason() {
        return Err(reason);
    }
    if !probe.devices().iter().any(|d| d.device == Device::Cuda(0)) {
        return Err("NVML lists no GPU".into());
    }
    let model = |var: &str, default: PathBuf| {
        let path = std::env::var_os(var).map_or(default, PathBuf::from);
        if path.is_file() {
            Ok(path)
        } else {
            Err(format!("{} is missing (set {var})", path.display()))
        }
    };
    Ok(Gpu {
        small: model(
            "MODELPOOL_GPU_SMALL",
            repo_root().join("models").join(MODEL_FILE),
        )?,
        large: model(
            "MODELPOOL_GPU_LARGE",
            repo_root().join("models/synth-llama-7b-a.gguf"),
        )?,
        probe,
    })
}

impl Gpu {
    /// Bytes in use on GPU 0 now, by every process.
    fn used_bytes(&self) -> u64 {
        self.probe
            .devices()
            .into_iter()
            .find(|d| d.device == Device::Cuda(0))
            .map_or(0, |d| d.total_bytes.saturating_sub(d.available_bytes))
    }

    /// Bytes NVML reports for process `pid` on GPU 0.
    fn process_bytes(&self, pid: u32) -> u64 {
        self.probe
            .process_vram(pid)
            .get(&Device::Cuda(0))
            .copied()
            .unwrap_or(0)
    }
}

/// A server with `small` and `large` on `cuda:0` under `vram_budget`.
async fn server(gpu: &Gpu, vram_budget: &str) -> TestServer {
    let (small, large) = (gpu.small.clone(), gpu.large.clone());
    let budget = vram_budget.to_owned();
    TestServer::start_with(move |dir| {
        let model = |id: &str, path: &PathBuf| {
            format!(
                "[[models]]\nid = \"{id}\"\npath = \"{}\"\ndevice = \"cuda:0\"\ncontext_length = 2048\n",
                path.display()
            )
        };
        settings_toml(
            &format!("vram_budget = \"{budget}\"\n"),
            &(model("small", &small) + &model("large", &large)),
            dir,
        )
    })
    .await
}

fn skip_unless_gpu() -> Option<Gpu> {
    gpu().map_err(|reason| skipped(&reason)).ok()
}

/// Loads `id` and returns its worker's pid, after a short generation on it.
async fn load_and_generate(t: &TestServer, id: &str) -> u32 {
    let loaded = t
        .control()
        .load_model(LoadModelRequest {
            id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{id} loads on cuda:0: {e}"))
        .into_inner();
    let stream = t
        .inference()
        .chat(chat(id, "Hello", greedy(4)))
        .await
        .unwrap_or_else(|e| panic!("{id} answers on cuda:0: {e}"))
        .into_inner();
    let chunks = collect(stream).await.expect("generates on the GPU");
    assert!(!chunks.is_empty(), "{id} generates on the GPU");
    loaded.model.expect("model info").worker_pid
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_model_has_its_layers_and_its_charge_on_the_gpu() {
    let Some(gpu) = skip_unless_gpu() else {
        return;
    };
    let t = server(&gpu, "64GiB").await;
    let gpu_used = |status: &modelpool_proto::v1::PoolStatus| {
        let d = status.devices.iter().find(|d| d.device == "cuda:0");
        d.map_or(0, |d| d.used_bytes)
    };
    let mut used_before = gpu_used(&t.pool_status().await);
    for id in ["small", "large"] {
        let pid = load_and_generate(&t, id).await;
        let m = t.model(id).await;
        assert_eq!(
            (m.state(), m.device.as_str()),
            (ModelState::Ready, "cuda:0")
        );
        let nvml = gpu.process_bytes(pid);
        // What this model added to the GPU's books.
        let used = gpu_used(&t.pool_status().await);
        let charged = used - used_before;
        used_before = used;
        let predicted = m.predicted.as_ref().map_or(0, |p| p.weights_bytes);
        let (rss, _) = modelpool_pool::memory::process_rss(pid);
        println!(
            "gpu-report: {id}: weights {:.0} MiB; VRAM charged {:.0} MiB, NVML {:.0} MiB for the worker ({:+.1}%); prediction error {:+.1}%; worker RSS {:.0} MiB",
            predicted as f64 / MIB,
            charged as f64 / MIB,
            nvml as f64 / MIB,
            (charged as f64 - nvml as f64) / nvml.max(1) as f64 * 100.0,
            m.prediction_error_percent,
            rss as f64 / MIB,
        );
        // Every layer is on the GPU: its weights are in VRAM (all but the token
        // embedding, which llama.cpp keeps on the host), not in the worker's RAM.
        assert!(nvml > 0, "NVML reports no VRAM for worker {pid}");
        if id == "large" {
            assert!(
                nvml > predicted * 8 / 10,
                "{nvml} of {predicted} weight bytes in VRAM"
            );
            assert!(rss < predicted / 2, "worker RSS {rss} holds the weights");
        }
        let off = (charged as f64 - nvml as f64).abs() / nvml as f64;
        assert!(
            off <= 0.10,
            "charged {charged} vs NVML {nvml}: {:.1}% off",
            off * 100.0
        );
        assert!(
            m.prediction_error_percent.abs() <= 10.0,
            "prediction {:+.1}% off the measured VRAM",
            m.prediction_error_percent
        );
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicting_a_gpu_model_gives_its_vram_back_within_a_second() {
    let Some(gpu) = skip_unless_gpu() else {
        return;
    };
    let t = server(&gpu, "64GiB").await;
    let baseline = gpu.used_bytes();
    load_and_generate(&t, "large").await;
    let loaded = gpu.used_bytes();
    assert!(
        loaded > baseline + (1 << 30),
        "{loaded} vs {baseline} before the load"
    );
    let started = Instant::now();
    let evicted = t
        .control()
        .evict_model(EvictModelRequest { id: "large".into() })
        .await
        .expect("evicts")
        .into_inner();
    assert!(evicted.evicted);
    let answered = started.elapsed();
    // Other processes may allocate meanwhile: within 64 MiB of the baseline is back.
    let back = || gpu.used_bytes() <= baseline + (64 << 20);
    while !back() && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let returned = started.elapsed();
    println!(
        "gpu-report: evict: {:.0} MiB of VRAM in use with the model; evict answered in {} ms, VRAM back to {:.0} MiB after {} ms",
        (loaded - baseline) as f64 / MIB,
        answered.as_millis(),
        gpu.used_bytes() as f64 / MIB,
        returned.as_millis()
    );
    assert!(back(), "VRAM not back to the baseline after {returned:?}");
    assert!(
        returned <= Duration::from_secs(1),
        "VRAM back after {returned:?}"
    );
    t.assert_nothing_charged().await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_over_the_vram_budget_is_refused_before_any_load() {
    let Some(gpu) = skip_unless_gpu() else {
        return;
    };
    let t = server(&gpu, "1GiB").await;
    let before = gpu.used_bytes();
    let err = t
        .control()
        .load_model(LoadModelRequest {
            id: "large".into(),
            ..Default::default()
        })
        .await
        .expect_err("over the VRAM budget");
    println!("gpu-report: refused: {}", err.message());
    assert_refused(
        &err,
        tonic::Code::ResourceExhausted,
        "of cuda:0, budget is 1.0 GiB",
    );
    let m = t.model("large").await;
    assert_eq!((m.state(), m.worker_pid), (ModelState::Registered, 0));
    let after = gpu.used_bytes();
    assert!(
        after <= before + (64 << 20),
        "VRAM {before} -> {after}: something loaded"
    );
    t.assert_nothing_charged().await;
    t.stop().await;
}
