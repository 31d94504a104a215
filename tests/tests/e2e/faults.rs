//! Faults injected for real: a worker killed with SIGKILL in the middle of a stream.

use std::time::{Duration, Instant};

use modelpool_proto::v1::ModelState;
use modelpool_tests::{chat, eventually, greedy, model_toml, settings_toml, TestServer};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_fails_fast_and_the_next_request_reloads() {
    let models =
        model_toml("a", "context_length = 1024\n") + &model_toml("b", "context_length = 1024\n");
    let t = TestServer::start_with(|runtime| settings_toml("", &models, runtime)).await;
    assert!(t.ask_capital("b").await.contains("Paris"));
    let b_before = t.model("b").await;

    let long = chat(
        "a",
        "Write a long story about a dragon and a knight.",
        greedy(300),
    );
    let mut stream = t.inference().chat(long).await.unwrap().into_inner();
    stream.message().await.unwrap().expect("a is generating");
    let victim = t.model("a").await.worker_pid;
    // SAFETY: kill(2) on a worker process this test's server started.
    assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
    // The client learns from the dead stream itself, not from a timeout: the bound only
    // turns a hang into a failure (the stream would otherwise wait for 300 tokens).
    let err = ends_in_error(&mut stream, "its worker was killed").await;
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    // The pool notices: a is cold again with the reason, its bytes are released.
    let a = failed_within_a_minute(&t, "a").await;
    assert_eq!(a.state(), ModelState::Failed);
    assert!(a.last_error.contains("SIGKILL"), "{}", a.last_error);
    let status = t.pool_status().await;
    let b_now = status.models.iter().find(|m| m.id == "b").unwrap();
    assert_eq!(
        status.devices[0].used_bytes, b_now.charged_bytes,
        "only b is charged"
    );

    // b never noticed; a's next request starts a fresh worker and answers.
    assert_eq!(t.model("b").await.worker_pid, b_before.worker_pid);
    assert!(t.ask_capital("b").await.contains("Paris"));
    assert!(t.ask_capital("a").await.contains("Paris"));
    let fresh = t.model("a").await.worker_pid;
    assert!(fresh != 0 && fresh != victim);
    assert!(
        eventually(Duration::from_secs(30), || !modelpool_tests::process_alive(
            victim
        ))
        .await
    );
    t.stop().await;
}

/// A server whose "worker" is the shell script `body`.
async fn server_with_worker_script(
    body: &str,
    load_timeout: Duration,
) -> (TestServer, tempfile::TempDir) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("worker.sh");
    std::fs::write(&script, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let models = model_toml("m", "context_length = 1024\n");
    let t = TestServer::start_with(|runtime| {
        let mut s = settings_toml("", &models, runtime);
        s.worker_exe = Some(script);
        s.load_timeout = load_timeout;
        s
    })
    .await;
    (t, dir)
}

/// Children of this process named `comm`.
fn children_named(comm: &str) -> Vec<u32> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let (name, rest) = stat.split_once(") ")?;
            let ppid = rest.split_whitespace().nth(1)?;
            let state = rest.split_whitespace().next()?;
            (name.ends_with(&format!("({comm}")) && ppid == me && state != "Z")
                .then(|| e.file_name().to_string_lossy().parse().ok())
                .flatten()
        })
        .collect()
}

/// Starts a server whose worker runs `script` and hangs, asks it for a chat, and checks
/// the refusal (`code`, a message containing `says`), that the worker is gone and that
/// nothing stays charged.
async fn a_hung_worker_is_killed(script: &str, load_timeout: Duration, code: Code, says: &str) {
    let (t, _dir) = server_with_worker_script(script, load_timeout).await;
    let err = t
        .inference()
        .chat(chat("m", "Hi", greedy(4)))
        .await
        .unwrap_err();
    modelpool_tests::assert_refused(&err, code, says);
    assert!(
        eventually(Duration::from_secs(30), || children_named("sleep")
            .is_empty())
        .await,
        "the hung worker is still running"
    );
    t.assert_nothing_charged().await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_hangs_while_loading_is_killed_at_the_load_timeout() {
    let script = "exec sleep 300";
    let says = "not ready after 1s";
    a_hung_worker_is_killed(script, Duration::from_secs(1), Code::DeadlineExceeded, says).await;
}

/// A worker that closes its stdout (so it can never report ready) but does not exit is
/// killed a few seconds later, not waited on forever with its load's bytes reserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_closes_stdout_and_hangs_is_killed() {
    let script = "exec >&-; exec sleep 300";
    let says = "before it was ready";
    a_hung_worker_is_killed(script, Duration::from_secs(60), Code::Unavailable, says).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_keeps_crashing_is_backed_off_with_its_last_error() {
    let (t, _dir) = server_with_worker_script(
        "echo 'boom: cannot map weights' >&2; exit 3",
        Duration::from_secs(10),
    )
    .await;
    for _ in 0..3 {
        let err = t
            .inference()
            .chat(chat("m", "Hi", greedy(4)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert!(
            err.message().contains("boom: cannot map weights"),
            "{}",
            err.message()
        );
    }
    let err = t
        .inference()
        .chat(chat("m", "Hi", greedy(4)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("failed 3 times"),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains("boom: cannot map weights"),
        "{}",
        err.message()
    );
    let status = t.pool_status().await;
    assert_eq!(
        status.models[0].loads_started, 3,
        "no fourth start while backing off"
    );
    assert_eq!(status.devices[0].reserved_bytes, 0);
    t.stop().await;
}

/// llama.cpp maps the GGUF: a file truncated under a running worker takes that worker
/// down with SIGBUS at its next step. Only that worker: its stream ends UNAVAILABLE,
/// the model turns cold with the reason, and nothing stays charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mapped_file_truncated_under_its_worker_ends_that_worker_only() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.gguf");
    std::fs::copy(modelpool_tests::model_path(), &copy).unwrap();
    let models = format!(
        "[[models]]\nid = \"mapped\"\npath = \"{}\"\nengine = \"llama.cpp\"\ncontext_length = 1024\n",
        copy.display()
    ) + &model_toml("other", "context_length = 1024\n");
    let t = TestServer::start_with(|runtime| settings_toml("", &models, runtime)).await;
    assert!(t.ask_capital("other").await.contains("Paris"));
    let long = chat("mapped", "Write a long story about a dragon.", greedy(400));
    let mut stream = t.inference().chat(long).await.unwrap().into_inner();
    stream
        .message()
        .await
        .unwrap()
        .expect("mapped is generating");
    let victim = t.model("mapped").await.worker_pid;

    std::fs::OpenOptions::new()
        .write(true)
        .open(&copy)
        .unwrap()
        .set_len(0)
        .unwrap();
    let err = ends_in_error(&mut stream, "its file was truncated").await;
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    let m = failed_within_a_minute(&t, "mapped").await;
    assert_eq!(m.state(), ModelState::Failed);
    assert!(m.last_error.contains("SIGBUS"), "{}", m.last_error);
    assert!(
        eventually(Duration::from_secs(30), || !modelpool_tests::process_alive(
            victim
        ))
        .await
    );
    let status = t.pool_status().await;
    let other = status.models.iter().find(|m| m.id == "other").unwrap();
    assert_eq!(
        status.devices[0].used_bytes, other.charged_bytes,
        "only `other` is charged"
    );
    assert!(t.ask_capital("other").await.contains("Paris"));
    t.stop().await;
}

/// Reads `stream` until it fails; a clean end or a hang (60 s) fails the test. The
/// client learns from the dead stream itself, not from a timeout: the bound only turns
/// a hang into a failure.
async fn ends_in_error(
    stream: &mut tonic::Streaming<modelpool_proto::v1::GenerateChunk>,
    after: &str,
) -> tonic::Status {
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended cleanly after {after}"),
                Err(status) => break status,
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the stream after {after} hung for 60 s"))
}

/// `id` as GetModel shows it once it is Failed, or after a minute of waiting for that
/// (the caller asserts the state).
async fn failed_within_a_minute(t: &TestServer, id: &str) -> modelpool_proto::v1::ModelInfo {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut m = t.model(id).await;
    while m.state() != ModelState::Failed && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        m = t.model(id).await;
    }
    m
}
