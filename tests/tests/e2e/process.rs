//! Worker processes: one per resident model, gone when the server stops or dies.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use modelpool_proto::v1::inference_client::InferenceClient;
use modelpool_proto::v1::model_control_client::ModelControlClient;
use modelpool_proto::v1::{GetModelRequest, ModelState};
use modelpool_tests::{
    chat, collect, connect_when_up, eventually, free_port, greedy, model_path, modelpool_exe,
    process_alive, TestServer,
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

fn write_config(dir: &std::path::Path, port: u16) -> std::path::PathBuf {
    let path = dir.join("modelpool.toml");
    let mut f = std::fs::File::create(&path).unwrap();
    write!(
        f,
        "[server]\nlisten = \"127.0.0.1:{port}\"\nmetrics_listen = \"127.0.0.1:0\"\n\
         [workers]\nruntime_dir = \"{}\"\n\
         [[models]]\nid = \"smollm2\"\npath = \"{}\"\ncontext_length = 2048\n",
        dir.display(),
        model_path().display()
    )
    .unwrap();
    path
}

/// Starts `modelpool serve` on a fresh port with its runtime dir in `dir`, as a real
/// child process, and connects to it.
async fn spawn_server(dir: &std::path::Path) -> (std::process::Child, tonic::transport::Channel) {
    let port = free_port();
    let config = write_config(dir, port);
    let server = Command::new(modelpool_exe())
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (server, connect_when_up(port).await)
}

/// Starts `modelpool serve` as a real child process and makes it load the model.
async fn spawn_server_with_worker(dir: &std::path::Path) -> (std::process::Child, u32) {
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
    // SIGKILL: the server gets no chance to clean up.
    server.kill().unwrap();
    server.wait().unwrap();
    assert!(
        eventually(Duration::from_secs(3), || !process_alive(worker)).await,
        "worker {worker} survived its server's SIGKILL"
    );
    // Its socket directory stays behind; the next server on the same runtime dir
    // starts anyway and removes it.
    let stale = dir.path().join(format!("modelpool-{}", server.id()));
    assert!(stale.is_dir(), "expected the killed server's runtime dir");
    let (mut next, next_worker) = spawn_server_with_worker(dir.path()).await;
    assert!(
        !stale.exists(),
        "stale runtime dir not cleaned: {}",
        stale.display()
    );
    next.kill().unwrap();
    next.wait().unwrap();
    assert!(eventually(Duration::from_secs(3), || !process_alive(next_worker)).await);
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
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(server.id() as i32, libc::SIGTERM) }, 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // New work is refused while the old stream drains...
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
    let rest = collect(stream)
        .await
        .expect("the in-flight stream finishes");
    assert!(rest.last().unwrap().usage.is_some());
    let status = tokio::task::spawn_blocking(move || server.wait())
        .await
        .unwrap()
        .unwrap();
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
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(server.id() as i32, libc::SIGTERM) }, 0);
    let status = server.wait().unwrap();
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

/// Anonymous memory in transparent huge pages, in KiB.
fn anon_huge_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("AnonHugePages:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_of_large_models_get_huge_pages_and_small_ones_stay_on_small_pages() {
    // Default threshold (1 GiB): SmolLM2 (94 MiB) keeps 4 KiB pages.
    let t = TestServer::start(&["smollm2"]).await;
    assert!(t.ask_capital("smollm2").await.contains("Paris"));
    let pid = t.model("smollm2").await.worker_pid;
    let env = environ(pid);
    assert!(
        !env.iter().any(|e| e.starts_with("GLIBC_TUNABLES=")),
        "{env:?}"
    );
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        assert!(env.iter().any(|e| e == "RUST_LIB_BACKTRACE=0"), "{env:?}");
    }
    t.stop().await;

    // Threshold 0: every worker is "large".
    let t = TestServer::start_with(|rt| {
        let mut s = modelpool_tests::settings(&["smollm2"], rt);
        s.huge_pages_from_bytes = 0;
        s
    })
    .await;
    assert!(t.ask_capital("smollm2").await.contains("Paris"));
    let pid = t.model("smollm2").await.worker_pid;
    let env = environ(pid);
    assert!(
        env.iter()
            .any(|e| e == "GLIBC_TUNABLES=glibc.malloc.hugetlb=1"),
        "{env:?}"
    );
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if !thp.contains("[never]") && !thp.is_empty() {
        assert!(anon_huge_kib(pid) > 0, "THP mode {thp:?}, no huge pages");
    }
    t.stop().await;
}
