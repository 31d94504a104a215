//! Worker processes: one per resident model, gone when the server stops or dies.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use modelpool_proto::v1::inference_client::InferenceClient;
use modelpool_proto::v1::model_control_client::ModelControlClient;
use modelpool_proto::v1::{GetModelRequest, ModelState};
use modelpool_tests::{
    chat, collect, eventually, greedy, model_path, modelpool_exe, process_alive, skipped,
    ServeChild, TestServer,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_server_ends_its_workers() {
    let t = TestServer::start(&["smollm2"]).await;
    collect(
        t.inference()
            .chat(chat("smollm2", "Hi", greedy(4)))
            .await
            .unwrap()
            .into_inner(),
    )
    .await
    .unwrap();
    let info = t.model("smollm2").await;
    assert_eq!(info.state, ModelState::Ready as i32);
    let pid = info.worker_pid;
    assert!(pid > 0 && process_alive(pid));
    assert!(
        info.resident_bytes > 50 << 20,
        "worker rss {}",
        info.resident_bytes
    );
    let runtime_dir = t.server.runtime_dir.clone();
    assert!(
        std::fs::read_dir(&runtime_dir).unwrap().count() == 1,
        "one socket"
    );
    t.stop().await;
    assert!(!process_alive(pid), "worker {pid} outlived the server");
    assert!(!runtime_dir.exists(), "runtime dir left behind");
}

/// A child server's configuration. Its drain timeout is far off: on a machine loaded so
/// much that a worker's 120 tokens take minutes, the drain still waits for them.
fn write_config(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("modelpool.toml");
    let mut f = std::fs::File::create(&path).unwrap();
    write!(
        f,
        "[server]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\n\
         drain_timeout = \"600s\"\n\
         [workers]\nruntime_dir = \"{}\"\n\
         [[models]]\nid = \"smollm2\"\npath = \"{}\"\ncontext_length = 2048\n",
        dir.display(),
        model_path().display()
    )
    .unwrap();
    path
}

/// Starts `modelpool serve` on a port of its choosing with its runtime dir in `dir`, as
/// a real child process, and connects to it.
async fn spawn_server(dir: &std::path::Path) -> (ServeChild, tonic::transport::Channel) {
    let config = write_config(dir);
    let mut cmd = Command::new(modelpool_exe());
    cmd.args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null());
    let server = ServeChild::spawn(cmd).await;
    let channel = server.connect().await;
    (server, channel)
}

/// Starts `modelpool serve` as a real child process and makes it load the model.
async fn spawn_server_with_worker(dir: &std::path::Path) -> (ServeChild, u32) {
    let (server, channel) = spawn_server(dir).await;
    collect(
        InferenceClient::new(channel.clone())
            .chat(chat("smollm2", "Hi", greedy(4)))
            .await
            .unwrap()
            .into_inner(),
    )
    .await
    .unwrap();
    let pid = ModelControlClient::new(channel)
        .get_model(GetModelRequest {
            id: "smollm2".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .worker_pid;
    assert!(pid > 0 && process_alive(pid));
    (server, pid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_server_leaves_no_worker() {
    let _serial = modelpool_tests::serial().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut server, worker) = spawn_server_with_worker(dir.path()).await;
    let server_pid = server.pid();
    // SIGKILL: the server gets no chance to clean up.
    server.signal(libc::SIGKILL);
    server.wait().await;
    assert!(
        eventually(Duration::from_secs(30), || !process_alive(worker)).await,
        "worker {worker} survived its server's SIGKILL"
    );
    // Its socket directory stays behind; the next server on the same runtime dir
    // starts anyway and removes it.
    let stale = dir.path().join(format!("modelpool-{server_pid}"));
    assert!(stale.is_dir(), "expected the killed server's runtime dir");
    let (mut next, next_worker) = spawn_server_with_worker(dir.path()).await;
    assert!(
        !stale.exists(),
        "stale runtime dir not cleaned: {}",
        stale.display()
    );
    next.signal(libc::SIGKILL);
    next.wait().await;
    assert!(eventually(Duration::from_secs(30), || !process_alive(next_worker)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_streams_and_refuses_new_ones() {
    let _serial = modelpool_tests::serial().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut server, channel) = spawn_server(dir.path()).await;
    let mut client = InferenceClient::new(channel.clone());
    let long = modelpool_proto::v1::GenerateRequest {
        model: "smollm2".into(),
        prompt: "1, 2, 3, 4, 5, 6, 7, 8,".into(),
        sampling: Some(greedy(120)),
    };
    let mut stream = client.generate(long).await.unwrap().into_inner();
    stream.message().await.unwrap().expect("generating");
    server.signal(libc::SIGTERM);
    // Once the server says it drains (however long a busy machine takes to get there),
    // new work is refused while the old stream drains...
    server
        .wait_for_log("shutting down: draining in-flight requests")
        .await;
    let mut fresh = InferenceClient::new(channel);
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        fresh.chat(chat("smollm2", "Hi", greedy(4))),
    )
    .await
    .expect("a refusal, not a hang")
    .expect_err("new requests are refused while draining");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    // ...and the in-flight one runs to its end.
    let rest = collect(stream).await.unwrap_or_else(|e| {
        panic!(
            "the in-flight stream finishes: {e:?}; the server's log:\n{}",
            server.log_text()
        )
    });
    assert!(rest.last().unwrap().usage.is_some());
    let status = server.wait().await;
    assert!(status.success(), "exit status {status}");
    let leftovers = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("modelpool-"))
        .count();
    assert_eq!(leftovers, 0, "runtime dir left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_cleanly_and_stops_workers() {
    let _serial = modelpool_tests::serial().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut server, worker) = spawn_server_with_worker(dir.path()).await;
    server.signal(libc::SIGTERM);
    let status = server.wait().await;
    assert!(status.success(), "exit status {status}");
    assert!(
        !process_alive(worker),
        "worker {worker} outlived a clean shutdown"
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with("modelpool-"))
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}

#[test]
fn invalid_config_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[server]\ndrain_timeout = \"soon\"\n").unwrap();
    let out = Command::new(modelpool_exe())
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("server.drain_timeout"), "{stderr}");

    // The environment overrides the file, and is validated the same way.
    std::fs::write(&path, "").unwrap();
    let out = Command::new(modelpool_exe())
        .args(["serve", "--config"])
        .arg(&path)
        .env("MODELPOOL__SERVER__LISTEN", "not-an-address")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.listen"));
}

/// The worker's environment, as `KEY=value` entries.
fn environ(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|b| {
            b.split(|c| *c == 0)
                .map(|e| String::from_utf8_lossy(e).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The value of `key` in the worker's environment.
fn env_value(env: &[String], key: &str) -> Option<String> {
    env.iter()
        .find_map(|e| e.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_owned)
}

/// The running glibc's version ("2.36").
#[cfg(target_env = "gnu")]
fn glibc_version() -> Option<String> {
    // SAFETY: gnu_get_libc_version returns a static NUL-terminated string.
    let version = unsafe { std::ffi::CStr::from_ptr(libc::gnu_get_libc_version()) };
    Some(version.to_string_lossy().into_owned())
}

#[cfg(not(target_env = "gnu"))]
fn glibc_version() -> Option<String> {
    None
}

/// Why glibc's `glibc.malloc.hugetlb=1` makes no madvise(MADV_HUGEPAGE) call on this
/// host, if it makes none: it advises only where the kernel's THP mode is `madvise`.
fn why_glibc_gives_no_advice() -> Option<String> {
    if let Some(v) = std::env::var_os("GLIBC_TUNABLES") {
        return Some(format!(
            "GLIBC_TUNABLES={v:?} is set for the tests, and an operator's tunables win \
             over modelpool's"
        ));
    }
    let Some(version) = glibc_version() else {
        return Some("this build does not use glibc's malloc".into());
    };
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    if (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) < (2, 35) {
        return Some(format!(
            "glibc {version} predates the hugetlb tunable (2.35)"
        ));
    }
    let path = "/sys/kernel/mm/transparent_hugepage/enabled";
    let Ok(mode) = std::fs::read_to_string(path) else {
        return Some(format!(
            "{path} is absent: this kernel has no transparent huge pages"
        ));
    };
    (!mode.contains("[madvise]")).then(|| {
        format!(
            "the kernel's THP mode is {:?}: glibc advises MADV_HUGEPAGE only in `madvise` \
             mode (under `always` the kernel needs no advice, under `never` it ignores it)",
            mode.trim()
        )
    })
}

/// What modelpool controls about huge pages: a worker of a model at or over
/// `workers.huge_pages_from` starts with glibc's hugetlb tunable, which makes its malloc
/// advise MADV_HUGEPAGE on large allocations; smaller models' workers get neither.
/// Whether the kernel then grants huge pages is the host's business, reported by
/// `reload_tiers` (BENCHMARKS.md), not asserted here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_of_large_models_ask_for_huge_pages_and_small_ones_do_not() {
    // The operator's GLIBC_TUNABLES, if the tests run with one, reach every worker as is.
    let operators = std::env::var("GLIBC_TUNABLES").ok();
    // Default threshold (1 GiB): SmolLM2 (94 MiB) keeps 4 KiB pages.
    let t = TestServer::start(&["smollm2"]).await;
    assert!(t.ask_capital("smollm2").await.contains("Paris"));
    let small_pid = t.model("smollm2").await.worker_pid;
    let env = environ(small_pid);
    assert_eq!(env_value(&env, "GLIBC_TUNABLES"), operators, "{env:?}");
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        assert!(env.iter().any(|e| e == "RUST_LIB_BACKTRACE=0"), "{env:?}");
    }
    // OpenMP threads spin briefly, then sleep, unless the operator set OpenMP's own.
    let omp_set = ["GOMP_SPINCOUNT", "OMP_WAIT_POLICY"]
        .iter()
        .any(|v| std::env::var_os(v).is_some());
    let spin = env_value(&env, "GOMP_SPINCOUNT");
    if omp_set {
        assert_eq!(spin, std::env::var("GOMP_SPINCOUNT").ok(), "{env:?}");
    } else {
        assert_eq!(spin.as_deref(), Some("10000"), "{env:?}");
    }
    let small_advised = modelpool_pool::memory::huge_advised_bytes(small_pid);
    t.stop().await;

    // Threshold 0: every worker is "large".
    let t = TestServer::start_with(|rt| {
        let mut s = modelpool_tests::settings(&["smollm2"], rt);
        s.huge_pages_from_bytes = 0;
        s
    })
    .await;
    assert!(t.ask_capital("smollm2").await.contains("Paris"));
    let large_pid = t.model("smollm2").await.worker_pid;
    let env = environ(large_pid);
    let expected = operators.unwrap_or_else(|| "glibc.malloc.hugetlb=1".into());
    assert_eq!(
        env_value(&env, "GLIBC_TUNABLES").as_deref(),
        Some(expected.as_str()),
        "{env:?}"
    );
    let large_advised = modelpool_pool::memory::huge_advised_bytes(large_pid);
    t.stop().await;

    if let Some(reason) = why_glibc_gives_no_advice() {
        return skipped(&format!(
            "the MADV_HUGEPAGE check ({reason}); the workers' environments were checked"
        ));
    }
    let (Some(small), Some(large)) = (small_advised, large_advised) else {
        return skipped(
            "the MADV_HUGEPAGE check (/proc/PID/smaps cannot be read here); the workers' \
             environments were checked",
        );
    };
    // SmolLM2's tensors alone are tens of MiB of large allocations.
    assert!(
        large >= 16 << 20,
        "the large model's worker advised MADV_HUGEPAGE on {large} bytes only"
    );
    assert_eq!(small, 0, "the small model's worker advised MADV_HUGEPAGE");
}
