//! Shared harness for the end-to-end tests: where the model, the `modelpool` binary and
//! grpcurl are, and an in-process server on `127.0.0.1:0` with real worker processes.
//!
//! Nothing is skipped when something is missing: a missing model or tool fails the test
//! with the command that provides it. What the host decides (whether its kernel drops
//! pages from the page cache or allows user namespaces, how much memory is available) is
//! probed first; a test that cannot run on such a host says so with [`skipped`] and
//! returns. Tests assert no durations: waits are generous bounds that turn a hang into a
//! failure, and how fast things are is measured in benches/ (BENCHMARKS.md).

use std::path::{Path, PathBuf};
use std::time::Duration;

use modelpool_proto::v1::inference_client::InferenceClient;
use modelpool_proto::v1::model_control_client::ModelControlClient;
use modelpool_proto::v1::{ChatMessage, ChatRequest, GenerateChunk, Role, SamplingParams};
use modelpool_server::{RunningServer, Settings};
use tonic::transport::Channel;

/// The real model every test uses.
pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The checkout under test. Read at run time (cargo sets it for test processes): a
/// test binary reused from a shared target directory may have been compiled in
/// another clone.
pub fn repo_root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A safetensors model directory with SmolLM2's real weights (dequantized from its
/// GGUF by `modelpool_fixtures::dequant`), made once per checkout under `target/`
/// and reused: written into a temporary directory and renamed into place, so
/// concurrent test processes never see half of one.
pub fn safetensors_model_dir() -> PathBuf {
    static MADE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = MADE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = repo_root()
        .join("target")
        .join("test-models")
        .join("smollm2-135m-st");
    if dir.join("config.json").is_file() {
        return dir;
    }
    let parent = dir.parent().expect("has a parent");
    std::fs::create_dir_all(parent).expect("creating target/test-models");
    let tmp = tempfile::tempdir_in(parent).expect("tempdir");
    modelpool_fixtures::dequant::gguf_to_safetensors(&model_path(), tmp.path())
        .expect("dequantizing SmolLM2 into a safetensors directory");
    match std::fs::rename(tmp.path(), &dir) {
        Ok(()) => std::mem::forget(tmp),
        // Another process made it first; ours is removed with `tmp`.
        Err(_) if dir.join("config.json").is_file() => {}
        Err(e) => panic!("moving the safetensors model into {}: {e}", dir.display()),
    }
    dir
}

/// The pool's prediction for the safetensors model at `dir`, `context_length` tokens,
/// quantized at load to `precision`.
pub fn predicted_safetensors_bytes(dir: &Path, context_length: u32, precision: &str) -> u64 {
    let mut spec = modelpool_pool::ModelSpec::new("probe", dir);
    spec.format = modelpool_pool::ModelFormat::Safetensors;
    spec.context_length = context_length;
    spec.precision = Some(precision.into());
    modelpool_supervisor::footprint::predict(&spec)
        .expect("the model's headers read")
        .total_bytes()
}

/// Path of the SmolLM2 GGUF; panics with the fix when it is missing.
pub fn model_path() -> PathBuf {
    let p = repo_root().join("models").join(MODEL_FILE);
    assert!(
        p.is_file(),
        "{} is missing: run `just fetch-models` (or scripts/fetch-models.sh)",
        p.display()
    );
    p
}

/// Path of grpcurl 1.8.6; panics with the fix when it is missing.
pub fn grpcurl_path() -> PathBuf {
    let p = repo_root().join(".tools").join("grpcurl");
    assert!(
        p.is_file(),
        "{} is missing: run `just fetch-tools` (or scripts/fetch-tools.sh)",
        p.display()
    );
    p
}

/// The `modelpool-testbin` binary cargo built next to this test.
pub fn modelpool_exe() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test>  ->  target/<profile>/modelpool-testbin
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("modelpool-testbin");
    assert!(
        bin.is_file(),
        "{} is missing: run the tests with `cargo test --workspace`",
        bin.display()
    );
    bin
}

/// Settings for a test server: loopback, port 0, the real model under each id.
pub fn settings(ids: &[&str], runtime_dir: &Path) -> Settings {
    let models: String = ids
        .iter()
        .map(|id| model_toml(id, "context_length = 2048\nmax_sequences = 4\n"))
        .collect();
    settings_toml("", &models, runtime_dir)
}

/// A `[[models]]` table for the real model under `id`, with `extra` keys.
pub fn model_toml(id: &str, extra: &str) -> String {
    format!(
        "[[models]]\nid = \"{id}\"\npath = \"{}\"\n{extra}\n",
        model_path().display()
    )
}

/// Test settings with a `[pool]` section (`pool`, may be empty) and model tables.
pub fn settings_toml(pool: &str, models: &str, runtime_dir: &Path) -> Settings {
    // A request may wait minutes for a load or a drain on a loaded machine: the queue
    // timeout (60 s by default) is far off unless a test sets its own.
    let queue = if pool.contains("queue_timeout") {
        ""
    } else {
        "queue_timeout = \"600s\"\n"
    };
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\ndrain_timeout = \"5s\"\n\
         [workers]\nload_timeout = \"300s\"\nruntime_dir = \"{}\"\nexe = \"{}\"\n\
         [pool]\n{queue}{pool}\n{models}",
        runtime_dir.display(),
        modelpool_exe().display()
    );
    Settings::from_toml(&toml, Path::new("/")).expect("test settings are valid")
}

/// The pool's prediction for the real model at `context_length` and one sequence.
pub fn predicted_bytes(context_length: u32) -> u64 {
    let mut spec = modelpool_pool::ModelSpec::new("probe", model_path());
    spec.context_length = context_length;
    modelpool_supervisor::footprint::predict(&spec)
        .expect("the model's header reads")
        .total_bytes()
}

/// The pool's prediction for the real model at `context_length` and one sequence, split
/// as the pool charges ids that map the one file (llama.cpp on the CPU, the default for a
/// GGUF): the file's pages, charged once however many of them map it, and each id's own
/// bytes. The split is the pool's own (`modelpool_pool`'s `sharing::split`): the mapped
/// part is the prediction's `mapped_bytes`, at most its RAM charge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OneFileFootprint {
    /// The file's mapped pages: charged once while any id maps the file.
    pub mapped_bytes: u64,
    /// The rest of one id's charge: charged per id.
    pub own_bytes: u64,
}

impl OneFileFootprint {
    pub fn predict(context_length: u32) -> Self {
        let mut spec = modelpool_pool::ModelSpec::new("probe", model_path());
        spec.context_length = context_length;
        let footprint =
            modelpool_supervisor::footprint::predict(&spec).expect("the model's header reads");
        let ram = footprint.charge.get(modelpool_pool::Device::Cpu);
        let mapped_bytes = footprint.mapped_bytes.min(ram);
        assert!(
            mapped_bytes > 0,
            "the GGUF's tensors are mapped (llama.cpp on the CPU): {footprint:?}"
        );
        Self {
            mapped_bytes,
            own_bytes: footprint.total_bytes() - mapped_bytes,
        }
    }

    /// Bytes `models` ids on the file need together (a fraction of an id is room for
    /// part of one more): the file's pages once and each id's own bytes.
    pub fn bytes_for(&self, models: f64) -> u64 {
        self.mapped_bytes + (self.own_bytes as f64 * models) as u64
    }
}

/// End-to-end tests take this lock for their whole run, so only one test's workers
/// use the CPU and memory at a time on a 2-core machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits until no other end-to-end test runs; hold the guard for the whole test.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// A server running inside the test process, its workers real child processes.
pub struct TestServer {
    pub server: RunningServer,
    pub channel: Channel,
    _runtime: tempfile::TempDir,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

impl TestServer {
    pub async fn start(ids: &[&str]) -> Self {
        Self::start_with(|runtime| settings(ids, runtime)).await
    }

    /// Starts a server with settings made for its runtime directory.
    pub async fn start_with(make: impl FnOnce(&Path) -> Settings) -> Self {
        let serial = serial().await;
        let runtime = tempfile::tempdir().expect("tempdir");
        let server = modelpool_server::start(make(runtime.path()))
            .await
            .expect("server starts");
        let channel = Channel::from_shared(format!("http://{}", server.local_addr))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect to test server");
        Self {
            server,
            channel,
            _runtime: runtime,
            _serial: serial,
        }
    }

    pub fn inference(&self) -> InferenceClient<Channel> {
        InferenceClient::new(self.channel.clone())
    }

    pub fn control(&self) -> ModelControlClient<Channel> {
        ModelControlClient::new(self.channel.clone())
    }

    /// Asks `model` the France question (greedy, 12 tokens) and returns the answer.
    pub async fn ask_capital(&self, model: &str) -> String {
        ask_capital(self.channel.clone(), model).await
    }

    /// One model as `GetModel` shows it.
    pub async fn model(&self, id: &str) -> modelpool_proto::v1::ModelInfo {
        self.control()
            .get_model(modelpool_proto::v1::GetModelRequest { id: id.into() })
            .await
            .expect("get model")
            .into_inner()
    }

    /// The pool's status now.
    /// The pool's event stream, from now on.
    pub async fn events(&self) -> tonic::Streaming<modelpool_proto::v1::PoolEvent> {
        self.control()
            .watch_events(modelpool_proto::v1::WatchEventsRequest {})
            .await
            .expect("watch_events")
            .into_inner()
    }

    pub async fn pool_status(&self) -> modelpool_proto::v1::PoolStatus {
        self.control()
            .get_pool_status(modelpool_proto::v1::GetPoolStatusRequest {})
            .await
            .expect("pool status")
            .into_inner()
    }

    /// Ids of the registered models, sorted.
    pub async fn model_ids(&self) -> Vec<String> {
        let list = self
            .control()
            .list_models(modelpool_proto::v1::ListModelsRequest {})
            .await
            .expect("list models")
            .into_inner();
        list.models.into_iter().map(|m| m.id).collect()
    }

    /// No bytes are charged or reserved on any device: nothing resident, no load
    /// in progress.
    pub async fn assert_nothing_charged(&self) {
        for d in self.pool_status().await.devices {
            assert_eq!(
                (d.used_bytes, d.reserved_bytes),
                (0, 0),
                "{}: {d:?}",
                d.device
            );
        }
    }

    pub async fn stop(self) {
        self.server.stop().await.expect("clean stop");
    }
}

/// Asks `model` the France question (greedy, 12 tokens) over `channel`; the answer.
pub async fn ask_capital(channel: Channel, model: &str) -> String {
    let request = chat(model, "What is the capital of France?", greedy(12));
    let stream = InferenceClient::new(channel)
        .chat(request)
        .await
        .expect("chat starts")
        .into_inner();
    text_of(&collect(stream).await.expect("chat completes"))
}

/// The next pool event from a `WatchEvents` stream; panics after `limit` without one.
pub async fn next_event(
    events: &mut tonic::Streaming<modelpool_proto::v1::PoolEvent>,
    limit: Duration,
) -> modelpool_proto::v1::PoolEvent {
    tokio::time::timeout(limit, events.message())
        .await
        .expect("an event in time")
        .expect("the event stream is healthy")
        .expect("the event stream is open")
}

/// System prompt of every test chat. Without one, SmolLM2's chat template inserts its
/// own ("You are a helpful AI assistant named SmolLM, ..."), under which this 135M Q4_1
/// model answers the France question in rambling French; with this one it says
/// "The capital of France is Paris." (checked against the raw ChatML prompt).
pub const SYSTEM_PROMPT: &str = "You are a helpful assistant.";

/// A one-turn chat request (after the system prompt).
pub fn chat(model: &str, prompt: &str, sampling: SamplingParams) -> ChatRequest {
    ChatRequest {
        model: model.into(),
        messages: vec![
            ChatMessage {
                role: Role::System.into(),
                content: SYSTEM_PROMPT.into(),
            },
            ChatMessage {
                role: Role::User.into(),
                content: prompt.into(),
            },
        ],
        sampling: Some(sampling),
    }
}

/// Greedy decoding of at most `max_tokens`.
pub fn greedy(max_tokens: u32) -> SamplingParams {
    SamplingParams {
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        ..Default::default()
    }
}

/// Reads a stream to its end.
pub async fn collect(
    mut stream: tonic::Streaming<GenerateChunk>,
) -> Result<Vec<GenerateChunk>, tonic::Status> {
    let mut out = Vec::new();
    while let Some(chunk) = stream.message().await? {
        out.push(chunk);
    }
    Ok(out)
}

pub fn text_of(chunks: &[GenerateChunk]) -> String {
    chunks.iter().map(|c| c.text.as_str()).collect()
}

/// Whether a process with this pid exists (and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        }
        Err(_) => false,
    }
}

/// Polls `cond` every 20 ms for up to `limit`.
pub async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `GET /metrics` from `addr`, the body as text.
pub async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to /metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: modelpool\r\n\r\n")
        .await
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_owned()
}

/// Parses Prometheus text with the reference parser (Python `prometheus_client`, put in
/// `.tools/python` by `just fetch-tools`): sample name -> [(labels, value)].
pub fn parse_prometheus(
    text: &str,
) -> std::collections::BTreeMap<String, Vec<(serde_json::Value, f64)>> {
    use std::io::Write;
    let lib = repo_root().join(".tools/python");
    assert!(
        lib.join("prometheus_client").is_dir(),
        "{} is missing: run `just fetch-tools`",
        lib.display()
    );
    let script = "import sys, json\n\
        from prometheus_client.parser import text_string_to_metric_families as parse\n\
        out = {}\n\
        for fam in parse(sys.stdin.read()):\n    \
            for s in fam.samples:\n        \
                out.setdefault(s.name, []).append([s.labels, s.value])\n\
        print(json.dumps(out))\n";
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .env("PYTHONPATH", &lib)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused the text: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: std::collections::BTreeMap<String, Vec<(serde_json::Value, f64)>> =
        serde_json::from_slice(&out.stdout).expect("parser output is JSON");
    parsed
}

/// The value of sample `name` whose labels include all of `labels`; 0 when absent.
pub fn sample_value(
    parsed: &std::collections::BTreeMap<String, Vec<(serde_json::Value, f64)>>,
    name: &str,
    labels: &[(&str, &str)],
) -> f64 {
    parsed
        .get(name)
        .into_iter()
        .flatten()
        .find(|(l, _)| labels.iter().all(|(k, v)| l[*k] == *v))
        .map_or(0.0, |(_, v)| *v)
}

/// Says on the real stderr (not libtest's captured one, so it shows on every run) that a
/// test, named by its thread as libtest names it, cannot run on this host and precisely
/// why; the test then returns.
pub fn skipped(reason: &str) {
    use std::io::Write;
    let thread = std::thread::current();
    let test = thread.name().filter(|n| *n != "main").unwrap_or("a test");
    let _ = writeln!(std::io::stderr(), "skipped: {test}: {reason}");
}

/// The pool's default `pool.reserve`: memory it leaves to the rest of the machine.
const POOL_RESERVE_BYTES: u64 = 512 << 20;

/// Whether the machine has memory available now (as the pool itself measures it,
/// cgroup limits included) for a RAM budget of `budget_bytes` plus the pool's reserve.
/// Below that the pool caps the budget, and a test that sized its budget for exactly
/// two models sees evictions it did not plan; the error says what was available.
pub fn memory_for_budget(budget_bytes: u64) -> Result<(), String> {
    use modelpool_pool::MemoryProbe;
    let devices = modelpool_pool::SystemProbe::new().devices();
    let available = devices.first().map_or(0, |d| d.available_bytes);
    let needed = budget_bytes + POOL_RESERVE_BYTES;
    if available >= needed {
        return Ok(());
    }
    Err(format!(
        "the machine has {} MiB available, and a RAM budget of {} MiB needs {} MiB with \
         the pool's reserve: the pool would cap the budget the test sized",
        available >> 20,
        budget_bytes >> 20,
        needed >> 20
    ))
}

/// `modelpool serve` run as a child process, listening on the address its log reported
/// (configure `listen = "127.0.0.1:0"`: no port is picked here and raced for). Killed
/// on drop unless it has exited.
pub struct ServeChild {
    child: Option<std::process::Child>,
    pub addr: std::net::SocketAddr,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    reader: std::thread::JoinHandle<()>,
}

impl ServeChild {
    /// Spawns `cmd` (a `modelpool serve`, possibly behind a wrapper that `exec`s it) with
    /// its stderr read here, and waits for the "modelpool serving" line.
    pub async fn spawn(mut cmd: std::process::Command) -> Self {
        use std::io::BufRead;
        let mut child = cmd
            .env_remove("RUST_LOG")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the server starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let lines = std::sync::Arc::clone(&log);
        let reader = std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = tx.is_some().then(|| serving_addr(&line)).flatten() {
                    let _ = tx.take().map(|tx| tx.send(addr));
                }
                lines.lock().unwrap().push(line);
            }
        });
        let mut server = Self {
            child: Some(child),
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
            reader,
        };
        match tokio::time::timeout(Duration::from_secs(60), rx).await {
            Ok(Ok(addr)) => server.addr = addr,
            _ => panic!(
                "the server never said where it listens; its log:\n{}",
                server.log_text()
            ),
        }
        server
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, std::process::Child::id)
    }

    /// Its stderr so far.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits (up to 60 s) until its log has a line containing `needle`.
    pub async fn wait_for_log(&self, needle: &str) {
        let seen = eventually(Duration::from_secs(60), || {
            self.log.lock().unwrap().iter().any(|l| l.contains(needle))
        })
        .await;
        assert!(
            seen,
            "no {needle:?} in the server's log:\n{}",
            self.log_text()
        );
    }

    /// A channel to it.
    pub async fn connect(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect_timeout(Duration::from_secs(10))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connecting to the server at {}: {e}", self.addr))
    }

    /// Sends `signal` to it.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child, which has not been waited for.
        assert_eq!(unsafe { libc::kill(self.pid() as i32, signal) }, 0);
    }

    /// Waits (up to 60 s) for it to exit and its log to end; past that it is killed and
    /// the test fails.
    pub async fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let child = self.child.as_mut().expect("a server process");
        loop {
            if let Some(status) = child.try_wait().expect("waiting for the server") {
                let reader = &self.reader;
                eventually(Duration::from_secs(10), || reader.is_finished()).await;
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the server did not exit within 60 s; its log:\n{}",
                self.log.lock().unwrap().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ServeChild {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// The address in a server's "modelpool serving" log line, human or JSON.
fn serving_addr(line: &str) -> Option<std::net::SocketAddr> {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
        let fields = &v["fields"];
        return (fields["message"] == "modelpool serving")
            .then(|| fields["addr"].as_str()?.parse().ok())
            .flatten();
    }
    let plain = strip_ansi(line);
    let (_, rest) = plain.split_once("modelpool serving")?;
    let (_, addr) = rest.split_once("addr=")?;
    addr.split_whitespace().next()?.parse().ok()
}

/// `s` without ANSI colour sequences (ESC [ ... letter).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A TCP port free on loopback right now. Racy: another process may take it before the
/// caller binds it. Only for a program whose port must be chosen before it starts and
/// that cannot report the one it got; a `modelpool serve` child reports its own (use
/// [`ServeChild`] with `listen = "127.0.0.1:0"`).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A loopback address that refuses connections for as long as the returned socket
/// lives: bound, never listening, so no other process can take the port meanwhile.
pub fn refusing_addr() -> (std::os::fd::OwnedFd, std::net::SocketAddr) {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket(2); the descriptor is owned by the OwnedFd at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh socket nobody else owns.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_in is plain data; all-zero is a valid value.
    let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sin.sin_family = libc::AF_INET as libc::sa_family_t;
    sin.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let sa = std::ptr::addr_of_mut!(sin).cast::<libc::sockaddr>();
    // SAFETY: sa points to a sockaddr_in of `len` bytes for both calls.
    unsafe {
        assert_eq!(
            libc::bind(fd, sa, len),
            0,
            "bind: {}",
            std::io::Error::last_os_error()
        );
        assert_eq!(libc::getsockname(fd, sa, &mut len), 0);
    }
    let port = u16::from_be(sin.sin_port);
    (owned, std::net::SocketAddr::from(([127, 0, 0, 1], port)))
}

/// Whether the kernel drops a clean file's pages from the page cache in `dir` when
/// asked (`POSIX_FADV_DONTNEED`); tmpfs, overlays of it and some network or FUSE file
/// systems keep them. Measured on a probe file with a `mincore` of its own, so a fault in
/// modelpool's page-cache code shows as a failure, not as a skip.
pub fn page_cache_drops_in(dir: &Path) -> Result<(), String> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    const LEN: usize = 1 << 20;
    let probe = tempfile::NamedTempFile::new_in(dir).map_err(|e| e.to_string())?;
    let mut f = probe.as_file();
    f.write_all(&vec![1u8; LEN]).map_err(|e| e.to_string())?;
    f.sync_all().map_err(|e| e.to_string())?;
    // SAFETY: plain syscall on an open descriptor; length 0 means the whole file.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    // SAFETY: a read-only shared mapping of the probe, only passed to mincore, unmapped
    // below; `pages` has one byte per 4 KiB page, enough for any larger page size too.
    let resident = unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            LEN,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        if addr == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        let mut pages = vec![0u8; LEN / 4096];
        let rc = libc::mincore(addr, LEN, pages.as_mut_ptr());
        libc::munmap(addr, LEN);
        if rc != 0 {
            return Err(format!("mincore: {}", std::io::Error::last_os_error()));
        }
        pages.iter().filter(|p| **p & 1 == 1).count()
    };
    if resident > 0 {
        return Err(format!(
            "the kernel kept {resident} of the probe's pages in the page cache after \
             POSIX_FADV_DONTNEED in {} (tmpfs or a file system that ignores the advice)",
            dir.display()
        ));
    }
    Ok(())
}

/// Checks that a request was refused with `code` and a message containing `says`.
pub fn assert_refused(err: &tonic::Status, code: tonic::Code, says: &str) {
    assert_eq!(err.code(), code, "{err:?}");
    assert!(err.message().contains(says), "{}", err.message());
}

/// Settings for a test server that also serves the OpenAI-compatible API on a free
/// loopback port.
pub fn settings_with_openai(ids: &[&str], runtime_dir: &Path) -> Settings {
    let mut s = settings(ids, runtime_dir);
    s.openai_listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    s
}

/// A Python client script of `tests/clients/` with the real `openai` and
/// `tritonclient` packages (`just fetch-tools` puts them in `.tools/python`), ready to
/// run with `args`; panics with the fix when the packages are missing.
pub fn python_client(script: &str, args: &[&str]) -> tokio::process::Command {
    let root = repo_root();
    let lib = root.join(".tools/python");
    assert!(
        lib.join("openai").is_dir() && lib.join("tritonclient").is_dir(),
        "the openai and tritonclient packages are missing from {}: run `just fetch-tools` \
         (or scripts/fetch-py-clients.sh)",
        lib.display()
    );
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg(root.join("tests/clients").join(script))
        .args(args)
        .env("PYTHONPATH", &lib)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .kill_on_drop(true);
    cmd
}

/// Runs a client script to its end and fails the test, with its output, unless it
/// passed (it prints `ok` last).
pub async fn run_python_client(script: &str, args: &[&str]) -> String {
    let out = python_client(script, args)
        .output()
        .await
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && stdout.trim_end().ends_with("ok"),
        "{script} {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Waits (up to 10 s) until `worker` has no active sequence, then checks that its one
/// generation (of up to 2000 tokens) was cancelled early because its client left.
pub async fn assert_one_generation_cancelled(worker: &modelpool_supervisor::WorkerProcess) {
    let mut stats = worker.stats().await.expect("worker stats");
    for _ in 0..500 {
        if stats.active_sequences == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        stats = worker.stats().await.expect("worker stats");
    }
    assert_eq!(
        stats.active_sequences, 0,
        "the sequence outlived its client"
    );
    assert_eq!(stats.cancelled_total, 1, "{stats:?}");
    assert!(stats.generated_tokens_total < 2000, "{stats:?}");
}

/// Registers `huge` on the real model: 64 sequences of 8192 tokens, ~12 GiB of KV
/// cache, over any budget a test sets.
pub async fn register_huge(t: &TestServer) {
    t.control()
        .register_model(modelpool_proto::v1::RegisterModelRequest {
            id: "huge".into(),
            path: model_path().display().to_string(),
            context_length: Some(8192),
            max_sequences: Some(64),
            ..Default::default()
        })
        .await
        .expect("registers");
}
