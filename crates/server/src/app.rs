//! Wires the pool, the worker backend and the gRPC services together, serves them, and
//! shuts down in order: stop accepting, drain in-flight streams, stop every worker,
//! remove the socket directory.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use modelpool_pool::budget::human_bytes;
use modelpool_pool::{Device, MemoryProbe, Pool, PoolConfig, Store, SystemProbe};
use modelpool_proto::kserve::grpc_inference_service_server::GrpcInferenceServiceServer;
use modelpool_proto::v1::inference_server::InferenceServer;
use modelpool_proto::v1::model_control_server::ModelControlServer;
use modelpool_store::{SavedPrefixIndex, SavedPrefixes};
use modelpool_supervisor::{WorkerBackend, WorkerBackendConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

use crate::auth::{AuthSettings, Scope};
use crate::config::{ModelMeshSettings, PoolSettings, Settings};
use crate::control::ControlService;
use crate::error::ServerError;
use crate::inference::{FrontEnd, InferenceService};
use crate::kserve::KServe;
use crate::metrics::{self, Metrics};
use crate::modelmesh::{self, ModelMeshRuntime};
use crate::openai;
use crate::reload::Reloader;

/// A server running in the background; see [`start`].
pub struct RunningServer {
    pub local_addr: SocketAddr,
    /// Where `/metrics` is served, when enabled.
    pub metrics_addr: Option<SocketAddr>,
    /// Where the ModelMesh runtime API is served, when enabled.
    pub modelmesh_addr: Option<SocketAddr>,
    /// Where the OpenAI-compatible HTTP API is served, when enabled.
    pub openai_addr: Option<SocketAddr>,
    pub pool: Pool<WorkerBackend>,
    pub runtime_dir: PathBuf,
    /// Re-reads the configuration file and applies the model list (SIGHUP, RPC).
    pub reloader: Arc<Reloader>,
    metrics_task: Option<JoinHandle<()>>,
    openai_task: Option<JoinHandle<()>>,
    stop_modelmesh: tokio::sync::watch::Sender<bool>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServerError>>,
}

impl RunningServer {
    /// Stops the server gracefully and waits until workers are gone.
    pub async fn stop(mut self) -> Result<(), ServerError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = self.stop_modelmesh.send(true);
        let result = (&mut self.task)
            .await
            .map_err(|e| ServerError::Serve(e.to_string()))?;
        for task in [self.metrics_task.take(), self.openai_task.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
        result
    }
}

/// Binds `addr`, returning the listener and the address it got (port 0 resolved).
async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), ServerError> {
    let err = |source| ServerError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(err)?;
    let bound = listener.local_addr().map_err(err)?;
    Ok((listener, bound))
}

/// The ports `start` binds before it creates anything, each with the address it got.
struct Listeners {
    api: (TcpListener, SocketAddr),
    metrics: Option<(TcpListener, SocketAddr)>,
    openai: Option<(TcpListener, SocketAddr)>,
    modelmesh: Option<((TcpListener, SocketAddr), ModelMeshSettings)>,
}

/// Binds every configured port, so a port in use fails the start before anything is
/// created.
async fn bind_all(settings: &Settings) -> Result<Listeners, ServerError> {
    let api = bind(settings.listen).await?;
    let metrics = match settings.metrics_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let openai = match settings.openai_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let modelmesh = match &settings.modelmesh {
        Some(mm) => Some((bind(mm.listen).await?, mm.clone())),
        None => None,
    };
    Ok(Listeners {
        api,
        metrics,
        openai,
        modelmesh,
    })
}

/// The backend that runs workers from `worker_exe` with their sockets in
/// `runtime_dir`, saving KV prefixes when `[storage]` gives them a budget.
fn worker_backend(settings: &Settings, worker_exe: PathBuf, runtime_dir: PathBuf) -> WorkerBackend {
    let saved_prefixes = settings
        .storage
        .as_ref()
        .filter(|s| s.saved_prefix_budget_bytes > 0)
        .map(|s| SavedPrefixes {
            dir: s.spill_dir.join(modelpool_store::SAVED_PREFIXES_DIR),
            budget_bytes: s.saved_prefix_budget_bytes,
        });
    // Reads the saved-prefix directory's listing once (no file contents).
    let saved_index = saved_prefixes
        .as_ref()
        .map(|s| Arc::new(SavedPrefixIndex::open(&s.dir, s.budget_bytes)));
    WorkerBackend::new(WorkerBackendConfig {
        worker_exe,
        runtime_dir,
        load_timeout: settings.load_timeout,
        load_nice: settings.load_nice,
        huge_pages_from_bytes: settings.huge_pages_from_bytes,
        saved_prefixes,
        saved_index,
    })
}

/// The pool's configuration: budgets and groups, and with `[storage]` the spill
/// directory, opened (its artifacts verified) before the pool starts.
async fn full_pool_config(
    settings: &Settings,
    probe: &SystemProbe,
) -> Result<PoolConfig, ServerError> {
    let mut pool_config = pool_config(&settings.pool, probe);
    pool_config.groups = settings.groups.clone();
    if let Some(storage) = settings.storage.clone() {
        // Verifying every artifact's checksum reads the directory once: off the
        // async threads.
        let (store, _report) = tokio::task::spawn_blocking(move || {
            Store::open(&storage.spill_dir, storage.spill_budget_bytes)
        })
        .await
        .map_err(|e| ServerError::Serve(format!("spill directory scan: {e}")))??;
        tracing::info!(dir = %store.dir().display(), budget = %human_bytes(store.budget_bytes()),
            used = %human_bytes(store.usage().used_bytes), "spill directory");
        pool_config.store = Some(Arc::new(store));
    }
    for (device, bytes) in &pool_config.budgets {
        tracing::info!(%device, budget = %human_bytes(*bytes), "budget");
    }
    Ok(pool_config)
}

/// Serves `/metrics` when its port was bound: the address and the task.
fn spawn_metrics(
    listener: Option<(TcpListener, SocketAddr)>,
    metrics: &Arc<Metrics>,
    pool: &Pool<WorkerBackend>,
) -> (Option<SocketAddr>, Option<JoinHandle<()>>) {
    let Some((listener, bound)) = listener else {
        return (None, None);
    };
    let task = tokio::spawn(metrics::serve(listener, Arc::clone(metrics), pool.clone()));
    tracing::info!(addr = %bound, "metrics on http://{bound}/metrics");
    (Some(bound), Some(task))
}

/// Serves the ModelMesh runtime API when its port was bound, until `stopped` turns
/// true.
fn spawn_modelmesh(
    listener: Option<((TcpListener, SocketAddr), ModelMeshSettings)>,
    pool: &Pool<WorkerBackend>,
    load_timeout: Duration,
    tls: Option<&tonic::transport::ServerTlsConfig>,
    stopped: &tokio::sync::watch::Receiver<bool>,
) -> Result<Option<SocketAddr>, ServerError> {
    let Some(((listener, bound), mm)) = listener else {
        return Ok(None);
    };
    let runtime = Arc::new(ModelMeshRuntime::new(pool.clone(), mm, load_timeout));
    let mut stopped = stopped.clone();
    let builder = grpc_server(tls)?;
    tokio::spawn(modelmesh::serve(listener, builder, runtime, async move {
        let _ = stopped.wait_for(|s| *s).await;
    }));
    tracing::info!(addr = %bound, "ModelMesh runtime API (mmesh.ModelRuntime)");
    Ok(Some(bound))
}

/// Serves the OpenAI-compatible API when its port was bound, until draining begins:
/// the address and the task.
fn spawn_openai(
    listener: Option<(TcpListener, SocketAddr)>,
    inference: &InferenceService,
    control: &Arc<ControlService>,
    auth: &AuthSettings,
    draining: &tokio::sync::watch::Receiver<bool>,
) -> (Option<SocketAddr>, Option<JoinHandle<()>>) {
    let Some((listener, bound)) = listener else {
        return (None, None);
    };
    let api = FrontEnd::new(inference.clone(), Arc::clone(control), auth.clone());
    let mut stopped = draining.clone();
    let task = tokio::spawn(openai::serve(listener, api, async move {
        let _ = stopped.wait_for(|d| *d).await;
    }));
    tracing::info!(addr = %bound, "OpenAI-compatible API on http://{bound}/v1");
    (Some(bound), Some(task))
}

/// The control service, with the model roots and the spill directory ("" without
/// `[storage]`) it reports.
fn control_service(
    settings: &Settings,
    pool: &Pool<WorkerBackend>,
    reloader: &Arc<Reloader>,
    draining: &tokio::sync::watch::Receiver<bool>,
) -> Arc<ControlService> {
    let spill_dir = settings
        .storage
        .as_ref()
        .map(|s| s.spill_dir.display().to_string())
        .unwrap_or_default();
    Arc::new(ControlService::new(
        pool.clone(),
        Arc::clone(reloader),
        draining.clone(),
        settings.model_roots.clone(),
        spill_dir,
    ))
}

/// Binds, spawns the server task and returns at once.
pub async fn start(settings: Settings) -> Result<RunningServer, ServerError> {
    let listeners = bind_all(&settings).await?;
    let (listener, local_addr) = listeners.api;
    let worker_exe = match &settings.worker_exe {
        Some(p) => p.clone(),
        None => std::env::current_exe().map_err(ServerError::WorkerExe)?,
    };
    let tls = settings.tls.as_ref().map(tls_config).transpose()?;
    // Refuse a bad certificate or key now, not at the first connection.
    grpc_server(tls.as_ref())?;
    let runtime_dir = prepare_runtime_dir(&settings.runtime_dir)?;
    let backend = worker_backend(&settings, worker_exe, runtime_dir.clone());
    let probe = Arc::new(SystemProbe::new());
    let pool_config = full_pool_config(&settings, probe.as_ref()).await?;
    let pool = Pool::new(backend, probe, pool_config, settings.models.clone());
    let metrics = Arc::new(Metrics::new());
    metrics::follow_pool(Arc::clone(&metrics), &pool);
    let (metrics_addr, metrics_task) = spawn_metrics(listeners.metrics, &metrics, &pool);
    let reloader = Arc::new(Reloader::new(pool.clone(), settings.clone()));
    let (stop_modelmesh, modelmesh_stopped) = tokio::sync::watch::channel(false);
    let modelmesh_addr = spawn_modelmesh(
        listeners.modelmesh,
        &pool,
        settings.load_timeout,
        tls.as_ref(),
        &modelmesh_stopped,
    )?;
    let (tx, rx) = oneshot::channel();
    // True once shutdown began: every front end then refuses new requests.
    let (draining_tx, draining_rx) = tokio::sync::watch::channel(false);
    let inference = InferenceService::new(
        pool.clone(),
        metrics,
        draining_rx.clone(),
        settings.max_concurrent_streams,
    );
    let control = control_service(&settings, &pool, &reloader, &draining_rx);
    let (openai_addr, openai_task) = spawn_openai(
        listeners.openai,
        &inference,
        &control,
        &settings.auth,
        &draining_rx,
    );
    let parts = Parts {
        pool: pool.clone(),
        inference,
        control,
        draining_tx,
        auth: settings.auth.clone(),
        tls,
    };
    let task = tokio::spawn(serve(
        listener,
        parts,
        runtime_dir.clone(),
        settings.drain_timeout,
        async {
            let _ = rx.await;
        },
    ));
    tracing::info!(addr = %local_addr, models = settings.models.len(), "modelpool serving");
    Ok(RunningServer {
        local_addr,
        metrics_addr,
        modelmesh_addr,
        openai_addr,
        openai_task,
        stop_modelmesh,
        metrics_task,
        reloader,
        pool,
        runtime_dir,
        shutdown: Some(tx),
        task,
    })
}

/// What the gRPC services are built from.
struct Parts {
    pool: Pool<WorkerBackend>,
    inference: InferenceService,
    control: Arc<ControlService>,
    /// Turned true when shutdown begins.
    draining_tx: tokio::sync::watch::Sender<bool>,
    auth: AuthSettings,
    tls: Option<tonic::transport::ServerTlsConfig>,
}

/// The gRPC services health reports on, besides the server as a whole ("").
const HEALTH_SERVICES: [&str; 3] = [
    <InferenceServer<InferenceService> as tonic::server::NamedService>::NAME,
    <ModelControlServer<ControlService> as tonic::server::NamedService>::NAME,
    <GrpcInferenceServiceServer<KServe> as tonic::server::NamedService>::NAME,
];

/// Health SERVING: each service, then the server as a whole.
async fn mark_serving(health: &tonic_health::server::HealthReporter) {
    for service in HEALTH_SERVICES {
        health
            .set_service_status(service, tonic_health::ServingStatus::Serving)
            .await;
    }
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
}

/// Health NOT_SERVING: the server as a whole first, then each service.
async fn mark_not_serving(health: &tonic_health::server::HealthReporter) {
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    for service in HEALTH_SERVICES {
        health
            .set_service_status(service, tonic_health::ServingStatus::NotServing)
            .await;
    }
}

/// Shutdown, in order: health turns NOT_SERVING (probes and balancers stop sending)
/// and new requests get UNAVAILABLE while the connections stay up; once no request
/// holds or awaits a model, this returns and tonic stops accepting and closes the
/// connections. `drain_tx` starts the drain timeout.
async fn drain_on_shutdown(
    shutdown: impl Future<Output = ()>,
    draining_tx: tokio::sync::watch::Sender<bool>,
    drain_tx: oneshot::Sender<()>,
    health: tonic_health::server::HealthReporter,
    pool: Pool<WorkerBackend>,
) {
    shutdown.await;
    // Endless streams (WatchEvents) end now so they do not hold up the drain.
    let _ = draining_tx.send(true);
    let _ = drain_tx.send(());
    tracing::info!("shutting down: draining in-flight requests");
    mark_not_serving(&health).await;
    pool.requests_done().await;
}

async fn serve(
    listener: TcpListener,
    parts: Parts,
    runtime_dir: PathBuf,
    drain_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let Parts {
        pool,
        inference,
        control,
        draining_tx,
        auth,
        tls,
    } = parts;
    let (health, health_service) = tonic_health::server::health_reporter();
    mark_serving(&health).await;

    // grpcurl 1.8.x speaks reflection v1alpha; newer clients v1. Serve both.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(modelpool_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;

    let (drain_tx, drain_rx) = oneshot::channel::<()>();
    let graceful = drain_on_shutdown(shutdown, draining_tx, drain_tx, health, pool.clone());

    let router = grpc_server(tls.as_ref())?
        .layer(tower::util::MapResponseLayer::new(
            oversized_is_resource_exhausted::<tonic::body::Body>,
        ))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(GrpcInferenceServiceServer::new(KServe::new(FrontEnd::new(
            inference.clone(),
            Arc::clone(&control),
            auth.clone(),
        ))))
        .add_service(InferenceServer::with_interceptor(
            inference,
            auth.interceptor(Scope::Inference),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            ModelControlServer::from_arc(control),
            auth.interceptor(Scope::Control),
        ));
    let server = router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), graceful);
    tokio::pin!(server);
    let result = tokio::select! {
        r = &mut server => r,
        _ = async {
            let _ = drain_rx.await;
            tokio::time::sleep(drain_timeout).await;
        } => {
            tracing::warn!(?drain_timeout, "drain timeout reached; cutting remaining streams");
            Ok(())
        }
    };
    pool.shutdown().await;
    let _ = std::fs::remove_dir_all(&runtime_dir);
    tracing::info!("modelpool stopped");
    result.map_err(|e| ServerError::Serve(e.to_string()))
}

/// Budgets per device from the `[pool]` settings and what the machine has; a GPU gets a
/// budget only where NVML sees it.
pub fn pool_config(settings: &PoolSettings, probe: &dyn MemoryProbe) -> PoolConfig {
    let budgets: BTreeMap<Device, u64> = probe
        .devices()
        .iter()
        .map(|d| {
            let (setting, total) = match d.device {
                // A container limit (Downward API) caps what "auto" may take.
                Device::Cpu => (
                    settings.ram_budget,
                    settings
                        .memory_limit_bytes
                        .map_or(d.total_bytes, |l| l.min(d.total_bytes)),
                ),
                Device::Cuda(_) => (settings.vram_budget, d.total_bytes),
            };
            (d.device, setting.resolve(total, settings))
        })
        .collect();
    if let Some(reason) = probe.gpu_absent_reason() {
        tracing::info!(%reason, "VRAM tier absent");
    }
    PoolConfig {
        budgets,
        headroom_bytes: settings.reserve_bytes,
        queue_depth: settings.queue_depth,
        queue_timeout: settings.queue_timeout,
        turns: settings.turns,
        store: None,
        groups: Vec::new(),
        max_loads_in_flight: settings.max_loads_in_flight as usize,
    }
}

/// Creates `<base>/modelpool-<pid>` with mode 0700 for worker sockets, after removing
/// directories left by servers that died without cleaning up.
fn prepare_runtime_dir(base: &Path) -> Result<PathBuf, ServerError> {
    use std::os::unix::fs::DirBuilderExt;
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ServerError::RuntimeDir { path, source }
    };
    if let Ok(entries) = std::fs::read_dir(base) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix("modelpool-"))
                .and_then(|p| p.parse::<i32>().ok())
            else {
                continue;
            };
            // SAFETY: kill with signal 0 only checks whether the process exists.
            let alive = unsafe { libc::kill(pid, 0) } == 0
                || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
            if !alive {
                tracing::info!(path = %entry.path().display(), "removing stale runtime directory");
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = base.join(format!("modelpool-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(err(&dir))?;
    Ok(dir)
}

/// Both of rustls' crypto providers are compiled in (tonic uses ring, the HTTP client
/// of the spill directory aws-lc-rs), so rustls cannot pick one by itself: choose ring
/// for the process, once, before any TLS configuration is built.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The server certificate and key, and for mutual TLS the CA that signs clients.
fn tls_config(
    t: &crate::config::TlsSettings,
) -> Result<tonic::transport::ServerTlsConfig, ServerError> {
    install_crypto_provider();
    let read = |p: &Path| {
        std::fs::read(p).map_err(|e| ServerError::Tls(format!("cannot read {}: {e}", p.display())))
    };
    let identity = tonic::transport::Identity::from_pem(read(&t.cert)?, read(&t.key)?);
    let mut config = tonic::transport::ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &t.client_ca {
        config = config.client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?));
    }
    Ok(config)
}

/// A gRPC server builder, with TLS when configured.
fn grpc_server(
    tls: Option<&tonic::transport::ServerTlsConfig>,
) -> Result<tonic::transport::Server, ServerError> {
    let builder = tonic::transport::Server::builder();
    match tls {
        Some(config) => builder
            .tls_config(config.clone())
            .map_err(|e| ServerError::Tls(format!("{e}: {:?}", std::error::Error::source(&e)))),
        None => Ok(builder),
    }
}

/// tonic answers a request above the maximum message size with `OUT_OF_RANGE`; gRPC's
/// own servers (and clients that retry on it) expect `RESOURCE_EXHAUSTED`. Rewrites that
/// one status, which tonic sends in the response headers, before it leaves.
fn oversized_is_resource_exhausted<B>(
    mut res: tonic::codegen::http::Response<B>,
) -> tonic::codegen::http::Response<B> {
    let headers = res.headers_mut();
    let oversized = headers.get("grpc-status").is_some_and(|v| v == "11")
        && headers
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|m| {
                m.contains("message%20length%20too%20large")
                    || m.contains("message length too large")
            });
    if oversized {
        headers.insert(
            "grpc-status",
            tonic::codegen::http::HeaderValue::from_static("8"),
        );
    }
    res
}
