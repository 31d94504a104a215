//! The server's side of a worker: spawn `modelpool worker`, wait until it is ready,
//! talk to it over its Unix socket, and stop it so that its memory returns.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use modelpool_pool::{Backend, BackendError, Footprint, Instance, ModelSpec, Progress, Quantized};
use modelpool_proto::v1::GenerateChunk;
use modelpool_proto::worker::v1::worker_client::WorkerClient;
use modelpool_proto::worker::v1::{
    SavePrefixesRequest, StatsRequest, StatsResponse, WorkerGenerateRequest,
};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tonic::transport::{Channel, Endpoint};

use crate::protocol::{ReadyInfo, WorkerArgs, READY_PREFIX, STAGE_PREFIX};
use modelpool_catalog::{EngineKind, ModelFormat};
use modelpool_store::{SavedPrefixIndex, SavedPrefixes};

/// Lines of a worker's stderr kept to explain a failed start.
const STDERR_TAIL_LINES: usize = 12;

/// How long a stopping worker may spend saving its kept prefixes before it is killed
/// anyway (a 7B model's full context is ~1 GiB of KV state).
const SAVE_PREFIXES_TIMEOUT: Duration = Duration::from_secs(10);

/// Turns an idle OpenMP thread of a worker spins before it sleeps (`GOMP_SPINCOUNT`).
const WORKER_OMP_SPIN_COUNT: &str = "10000";

/// How the server starts workers.
#[derive(Clone, Debug)]
pub struct WorkerBackendConfig {
    /// The `modelpool` binary (workers are the same binary, `worker` subcommand).
    pub worker_exe: PathBuf,
    /// A private (0700) directory for the workers' sockets.
    pub runtime_dir: PathBuf,
    /// A worker not ready after this long is killed and the load fails.
    pub load_timeout: Duration,
    /// Nice value a mistral.rs worker loads at (0: none), so a load, which keeps every
    /// core busy for seconds, yields the CPU to the models already serving. Set back to
    /// 0 once ready where the process may raise priority (root or CAP_SYS_NICE).
    /// llama.cpp workers, whose loads map the weights, load at normal priority.
    pub load_nice: i32,
    /// Workers of models whose weights files are at least this large get transparent
    /// huge pages (see [`WorkerProcess::spawn`]); `u64::MAX` turns them off.
    pub huge_pages_from_bytes: u64,
    /// Where llama.cpp workers save the prefixes they keep before they are stopped
    /// (and restore them after a load); `None`: kept in memory only.
    pub saved_prefixes: Option<SavedPrefixes>,
    /// The index that keeps every saved prefix within one byte budget; rescanned after
    /// each save.
    pub saved_index: Option<Arc<SavedPrefixIndex>>,
}

/// Starts one worker process per resident model.
pub struct WorkerBackend {
    config: WorkerBackendConfig,
    next_socket: AtomicU64,
}

impl WorkerBackend {
    pub fn new(config: WorkerBackendConfig) -> Self {
        Self {
            config,
            next_socket: AtomicU64::new(0),
        }
    }
}

impl Backend for WorkerBackend {
    type Instance = WorkerProcess;

    fn footprint(&self, spec: &ModelSpec) -> Result<Footprint, BackendError> {
        check_loadable(spec)?;
        crate::footprint::predict(spec)
    }

    fn footprints(
        &self,
        spec: &ModelSpec,
        precisions: &[Option<String>],
    ) -> Result<Vec<Footprint>, BackendError> {
        check_loadable(spec)?;
        crate::footprint::predict_each(spec, precisions)
    }

    async fn load(
        &self,
        spec: &ModelSpec,
        progress: Progress,
    ) -> Result<WorkerProcess, BackendError> {
        check_loadable(spec)?;
        let file = spec.local_file()?;
        progress("starting worker process");
        let n = self.next_socket.fetch_add(1, Ordering::Relaxed);
        let safe_id: String = spec
            .id
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .take(40)
            .collect();
        let mut args = WorkerArgs {
            socket: self.config.runtime_dir.join(format!("{safe_id}-{n}.sock")),
            model_path: file.to_path_buf(),
            model_id: spec.id.clone(),
            context_length: spec.context_length,
            max_sequences: spec.max_sequences,
            device: spec.device.to_string(),
            format: spec.format,
            precision: spec.precision.clone(),
            reuse_quantized: match &spec.quantized {
                Some(Quantized::Reuse(p)) => Some(p.clone()),
                _ => None,
            },
            write_quantized: match &spec.quantized {
                Some(Quantized::Write(p)) => Some(p.clone()),
                _ => None,
            },
            engine: engine_of(spec)?,
            repack: spec.engine.llama_cpp.repack,
            mlock: spec.engine.llama_cpp.mlock,
            prefix_cache: spec.engine.llama_cpp.prefix_cache,
            kv_budget_tokens: spec.engine.llama_cpp.kv_budget_tokens.unwrap_or(0),
            stream_interval_us: spec.engine.llama_cpp.stream_interval.as_micros() as u64,
            saved_prefixes_dir: None,
            saved_prefixes_budget_bytes: 0,
        };
        let saved = self
            .config
            .saved_prefixes
            .as_ref()
            .filter(|_| spec.engine.llama_cpp.prefix_cache);
        if let (EngineKind::LlamaCpp, Some(saved)) = (args.engine, saved) {
            args.saved_prefixes_dir = Some(saved.dir.clone());
            args.saved_prefixes_budget_bytes = saved.budget_bytes;
        }
        let huge_pages = weights_file_bytes(file) >= self.config.huge_pages_from_bytes;
        WorkerProcess::spawn(&self.config, &args, huge_pages, &progress).await
    }
}

/// Bytes of a model's weights on disk: the file, or a directory's files.
fn weights_file_bytes(path: &Path) -> u64 {
    match std::fs::read_dir(path) {
        Ok(entries) => entries
            .filter_map(|e| e.ok()?.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum(),
        Err(_) => std::fs::metadata(path).map_or(0, |m| m.len()),
    }
}

/// The engine `spec` names, or the default for its format.
pub fn engine_of(spec: &ModelSpec) -> Result<EngineKind, BackendError> {
    spec.engine_kind()
        .map_err(|e| BackendError::InvalidModel(format!("engine: {e}")))
}

/// Refuses a GGUF model whose file is clearly not one, and a model its engine cannot
/// run, before anything is predicted or started for it.
pub fn check_loadable(spec: &ModelSpec) -> Result<(), BackendError> {
    engine_of(spec)?;
    if spec.format == ModelFormat::Gguf {
        check_gguf(spec.local_file()?)?;
    }
    Ok(())
}

/// Refuses what is clearly not a GGUF file before a process is started for it.
fn check_gguf(path: &Path) -> Result<(), BackendError> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path)
        .map_err(|e| BackendError::InvalidModel(format!("cannot open {}: {e}", path.display())))?;
    f.read_exact(&mut magic).map_err(|_| {
        BackendError::InvalidModel(format!("{} is too short to be a gguf file", path.display()))
    })?;
    if &magic != b"GGUF" {
        return Err(BackendError::InvalidModel(format!(
            "{} is not a gguf file (magic {:02x?})",
            path.display(),
            magic
        )));
    }
    Ok(())
}

/// One live worker process holding one model.
pub struct WorkerProcess {
    pid: u32,
    /// Asks the task that owns the child process to kill it.
    kill: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    /// Set (once) to how the process ended, by the task that owns it.
    exited: tokio::sync::watch::Receiver<Option<String>>,
    /// Held open for the worker's lifetime: the worker exits when it reads end-of-file.
    _stdin: ChildStdin,
    channel: Channel,
    socket: PathBuf,
    ready: ReadyInfo,
    /// Whether it is asked to save its kept prefixes before it is stopped.
    saves_prefixes: bool,
    /// Told of what it saved.
    saved_index: Option<Arc<SavedPrefixIndex>>,
}

impl WorkerProcess {
    async fn spawn(
        config: &WorkerBackendConfig,
        args: &WorkerArgs,
        huge_pages: bool,
        progress: &Progress,
    ) -> Result<WorkerProcess, BackendError> {
        let _ = std::fs::remove_file(&args.socket);
        // Only mistral.rs loads are CPU-bound for seconds (it copies and converts the
        // weights); a llama.cpp load maps them, and starving it behind busy models
        // turned a 0.4 s 7B swap-in into 6.5 s with no gain for them (BENCHMARKS.md).
        let load_nice = match args.engine {
            EngineKind::MistralRs => config.load_nice,
            EngineKind::LlamaCpp => 0,
        };
        let mut cmd = worker_command(config, args, huge_pages, load_nice);
        let mut child = cmd.spawn().map_err(|e| {
            BackendError::Failed(format!(
                "cannot start worker {}: {e}",
                config.worker_exe.display()
            ))
        })?;
        let pid = child.id().unwrap_or(0);
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let tail = forward_stderr(stderr, args.model_id.clone(), pid);

        let mut lines = BufReader::new(stdout).lines();
        let ready = wait_for_ready(&mut child, &mut lines, config, args, &tail, progress).await?;
        if load_nice > 0 {
            restore_priority(pid);
        }
        // Keep draining stdout so the worker never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

        progress("connecting to the worker");
        let channel = match connect_unix(&args.socket).await {
            Ok(c) => c,
            Err(e) => {
                let _ = child.kill().await;
                let _ = std::fs::remove_file(&args.socket);
                return Err(BackendError::Failed(format!(
                    "cannot connect to worker socket {}: {e}",
                    args.socket.display()
                )));
            }
        };
        let (kill_tx, exited) = own_child(child);
        Ok(WorkerProcess {
            pid,
            kill: Mutex::new(Some(kill_tx)),
            exited,
            _stdin: stdin,
            channel,
            socket: args.socket.clone(),
            ready,
            saves_prefixes: args.saved_prefixes_dir.is_some(),
            saved_index: config.saved_index.clone(),
        })
    }

    /// Asks the worker to save the prefixes it keeps, within [`SAVE_PREFIXES_TIMEOUT`];
    /// a worker that is gone or slow is stopped without them.
    async fn save_prefixes(&self) {
        let mut client = WorkerClient::new(self.channel.clone());
        let call = client.save_prefixes(SavePrefixesRequest {});
        match tokio::time::timeout(SAVE_PREFIXES_TIMEOUT, call).await {
            Ok(Ok(r)) if r.get_ref().prefixes > 0 => {
                let r = r.into_inner();
                tracing::info!(
                    pid = self.pid,
                    prefixes = r.prefixes,
                    bytes = r.bytes,
                    "prefixes saved"
                );
            }
            Ok(Ok(_)) => {}
            Ok(Err(status)) => {
                tracing::debug!(pid = self.pid, "saving prefixes: {}", status.message());
            }
            Err(_) => tracing::warn!(
                pid = self.pid,
                "saving prefixes took over {SAVE_PREFIXES_TIMEOUT:?}; stopping without them"
            ),
        }
    }

    /// Streams one generation from the worker.
    pub async fn generate(
        &self,
        request: WorkerGenerateRequest,
    ) -> Result<tonic::Streaming<GenerateChunk>, tonic::Status> {
        let mut client = WorkerClient::new(self.channel.clone());
        Ok(client.generate(request).await?.into_inner())
    }

    /// The worker's counters.
    pub async fn stats(&self) -> Result<StatsResponse, tonic::Status> {
        let mut client = WorkerClient::new(self.channel.clone());
        Ok(client.stats(StatsRequest {}).await?.into_inner())
    }

    /// The context length the worker runs with.
    pub fn context_length(&self) -> u32 {
        self.ready.context_length
    }

    /// How long the worker took from start to ready, as it measured.
    pub fn load_ms(&self) -> u64 {
        self.ready.load_ms
    }
}

/// The `modelpool worker` command for `args`: piped stdio, killed with its parent,
/// and the environment and load priority the worker runs best with.
fn worker_command(
    config: &WorkerBackendConfig,
    args: &WorkerArgs,
    huge_pages: bool,
    load_nice: i32,
) -> Command {
    let mut cmd = Command::new(&config.worker_exe);
    cmd.arg("worker")
        .args(args.to_args())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(ordinal) = args.device.strip_prefix("cuda:") {
        // The worker's only visible GPU is its own (see llm::place).
        cmd.env("CUDA_VISIBLE_DEVICES", ordinal);
    }
    // Errors inside mistral.rs' loader capture a backtrace whenever RUST_BACKTRACE is
    // set, and symbolizing it maps the binary's debug info: measured with
    // RUST_BACKTRACE=1, ~60 MiB more worker RSS and ~80 ms more load for SmolLM2.
    // Panics still print theirs; RUST_LIB_BACKTRACE set by the operator wins.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        cmd.env("RUST_LIB_BACKTRACE", "0");
    }
    // glibc then asks for transparent huge pages on its large allocations (where the
    // kernel's THP mode is `madvise` or `always`): a 4 GiB model takes 512x fewer
    // page faults to load and its exit frees 2 MiB pages, not 4 KiB ones. Measured
    // for a 7B-shaped Q4_0 model: evict (kill to reaped) 312 -> 18 ms, reload from
    // the page cache 8.0 -> 5.3 s. The operator's own GLIBC_TUNABLES win.
    if huge_pages && std::env::var_os("GLIBC_TUNABLES").is_none() {
        cmd.env("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1");
    }
    // llama.cpp's OpenMP threads spin at each barrier before they sleep (libgomp's
    // default: 300,000 turns). Several workers busy on few cores then spin against
    // each other: 3 SmolLM2 workers on 2 cores served 1.8 requests/s by default,
    // 4.8 at 10,000 turns, 7.1 at 3,000; one worker alone decoded as fast at 10,000
    // as by default (98 against 97 tok/s) and ~10% slower at 3,000 (BENCHMARKS.md).
    // The operator's own OpenMP settings win.
    if std::env::var_os("GOMP_SPINCOUNT").is_none() && std::env::var_os("OMP_WAIT_POLICY").is_none()
    {
        cmd.env("GOMP_SPINCOUNT", WORKER_OMP_SPIN_COUNT);
    }
    die_with_parent(&mut cmd);
    load_at_low_priority(&mut cmd, load_nice);
    cmd
}

/// Reads the worker's stdout up to its ready line, passing each stage line on to
/// `progress`; `None` when stdout closes first.
async fn read_ready(
    lines: &mut Lines<BufReader<ChildStdout>>,
    progress: &Progress,
) -> Option<ReadyInfo> {
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(stage) = line.strip_prefix(STAGE_PREFIX) {
            progress(stage.trim());
        }
        if let Some(json) = line.strip_prefix(READY_PREFIX) {
            return serde_json::from_str::<ReadyInfo>(json).ok();
        }
    }
    None
}

/// Waits up to the load timeout for the worker's ready line. A worker that exits
/// first is reaped (killed if it hangs), one not ready in time is killed; either way
/// its socket is removed and the error quotes its last stderr lines.
async fn wait_for_ready(
    child: &mut Child,
    lines: &mut Lines<BufReader<ChildStdout>>,
    config: &WorkerBackendConfig,
    args: &WorkerArgs,
    tail: &Mutex<VecDeque<String>>,
    progress: &Progress,
) -> Result<ReadyInfo, BackendError> {
    match tokio::time::timeout(config.load_timeout, read_ready(lines, progress)).await {
        Ok(Some(ready)) => Ok(ready),
        Ok(None) => {
            // Stdout closed: the worker is exiting. One that closed it and hangs
            // is killed rather than waited on forever.
            let status = match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
                Ok(status) => status.ok(),
                Err(_) => {
                    let _ = child.start_kill();
                    child.wait().await.ok()
                }
            };
            // Let the stderr forwarder drain the last lines.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = std::fs::remove_file(&args.socket);
            let status = status.map_or_else(|| "unknown status".into(), |s| s.to_string());
            Err(BackendError::Failed(format!(
                "worker exited ({status}) before it was ready: {}",
                render_tail(tail)
            )))
        }
        Err(_) => {
            let _ = child.kill().await;
            let _ = std::fs::remove_file(&args.socket);
            Err(BackendError::Timeout(format!(
                "worker was not ready after {:?}; killed it. last output: {}",
                config.load_timeout,
                render_tail(tail)
            )))
        }
    }
}

/// Hands `child` to the one task that owns it: it reaps it when it exits on its own
/// (a crash) or kills it when asked (or when the kill sender is dropped). Returns the
/// kill sender and where the task reports how the process ended.
fn own_child(
    mut child: Child,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::sync::watch::Receiver<Option<String>>,
) {
    let (kill_tx, kill_rx) = tokio::sync::oneshot::channel::<()>();
    let (exited_tx, exited) = tokio::sync::watch::channel(None);
    tokio::spawn(async move {
        let status = tokio::select! {
            status = child.wait() => status,
            _ = kill_rx => {
                let _ = child.start_kill();
                child.wait().await
            }
        };
        let how = match status {
            Ok(s) => describe_exit(s),
            Err(e) => format!("cannot wait for it: {e}"),
        };
        let _ = exited_tx.send(Some(how));
    });
    (kill_tx, exited)
}

/// "killed by signal 9 (SIGKILL)", "exited with status 1". SIGBUS is what a worker
/// gets when the file its weights are mapped from is truncated under it.
fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    let name = |sig: i32| match sig {
        libc::SIGKILL => " (SIGKILL)",
        libc::SIGBUS => " (SIGBUS: its mapped weights file changed or was truncated)",
        libc::SIGSEGV => " (SIGSEGV)",
        libc::SIGABRT => " (SIGABRT)",
        libc::SIGILL => " (SIGILL)",
        libc::SIGTERM => " (SIGTERM)",
        _ => "",
    };
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}{}", name(sig)),
        (None, None) => status.to_string(),
    }
}

impl Instance for WorkerProcess {
    fn pid(&self) -> Option<u32> {
        Some(self.pid)
    }

    fn resident_bytes(&self) -> u64 {
        rss_bytes(self.pid).unwrap_or(0)
    }

    fn peak_bytes(&self) -> u64 {
        modelpool_pool::memory::process_rss(self.pid).1
    }

    async fn exited(&self) -> String {
        let mut rx = self.exited.clone();
        let how = match rx.wait_for(Option::is_some).await {
            Ok(how) => how.clone().unwrap_or_default(),
            Err(_) => "its monitor ended".into(),
        };
        how
    }

    async fn shutdown(&self) {
        if self.saves_prefixes {
            self.save_prefixes().await;
            if let Some(index) = self.saved_index.clone() {
                let _ = tokio::task::spawn_blocking(move || index.rescan()).await;
            }
        }
        let kill = self.kill.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(kill) = kill {
            let _ = kill.send(());
            let _ = self.exited().await;
            tracing::info!(pid = self.pid, "worker stopped");
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        // kill_on_drop ends the process; the socket file is ours to remove.
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Resident set size of a process, from `/proc/PID/statm`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).unwrap_or(4096))
}

/// Asks the kernel to SIGKILL the child when the server dies (Linux), in addition to
/// the stdin end-of-file the worker watches for.
/// Starts the worker at nice `nice`; every thread it creates inherits it.
fn load_at_low_priority(cmd: &mut Command, nice: i32) {
    if nice <= 0 {
        return;
    }
    // SAFETY: setpriority is a plain syscall, async-signal-safe between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setpriority(libc::PRIO_PROCESS, 0, nice);
            Ok(())
        });
    }
}

/// Puts every thread of a worker that finished loading back at nice 0. Lowering a nice
/// value needs privilege; without it the worker keeps its load priority (logged once).
fn restore_priority(pid: u32) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    let mut refused = false;
    for task in tasks.flatten() {
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<libc::id_t>().ok())
        else {
            continue;
        };
        // SAFETY: plain syscall on a thread id of our own child.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 0) } != 0 {
            refused = true;
        }
    }
    if refused {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            tracing::info!(
                pid,
                "workers keep their load priority (raising it back needs CAP_SYS_NICE)"
            );
        });
    }
}

fn die_with_parent(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: getpid is async-signal-safe.
        let parent = unsafe { libc::getpid() };
        // SAFETY: the closure calls only async-signal-safe functions (prctl, getppid,
        // _exit) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

fn forward_stderr(
    stderr: tokio::process::ChildStderr,
    model: String,
    pid: u32,
) -> Arc<Mutex<VecDeque<String>>> {
    let tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL_LINES)));
    let keep = Arc::clone(&tail);
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::debug!(target: "modelpool::worker", model = %model, pid, "{line}");
            let mut t = keep.lock().unwrap_or_else(|e| e.into_inner());
            if t.len() == STDERR_TAIL_LINES {
                t.pop_front();
            }
            t.push_back(line);
        }
    });
    tail
}

fn render_tail(tail: &Mutex<VecDeque<String>>) -> String {
    let t = tail.lock().unwrap_or_else(|e| e.into_inner());
    if t.is_empty() {
        return "(no output)".into();
    }
    t.iter().cloned().collect::<Vec<_>>().join(" | ")
}

async fn connect_unix(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    // The URI is required by the API but unused: the connector dials the socket.
    Endpoint::from_static("http://worker.local")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
}
