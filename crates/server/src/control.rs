//! `modelpool.v1.ModelControl`: what the pool knows, what is resident and why, and the
//! operator's levers (register, load, pin, evict) plus the live event stream.

use std::path::Path;
use std::pin::Pin;
use std::time::SystemTime;

use futures::Stream;
use modelpool_pool::{
    EventKind, EvictReason, ModelFormat as PoolFormat, ModelSnapshot, Pool, PoolEvent, SlotState,
    Source,
};
use modelpool_proto::v1::model_control_server::ModelControl;
use modelpool_proto::v1::pool_event::{self, Kind};
use modelpool_proto::v1::{
    DeviceBudget, DeviceStatus, EvictModelRequest, EvictModelResponse, Footprint, GetModelRequest,
    GetPoolStatusRequest, GroupStatus, KvCache, ListModelsRequest, ListModelsResponse,
    LoadModelRequest, LoadModelResponse, ModelFormat, ModelInfo, ModelState, PinModelRequest,
    PoolStatus, PrefixCache, RegisterModelRequest, ReloadConfigRequest, ReloadConfigResponse,
    SpillStatus, UnpinModelRequest, UnregisterModelRequest, UnregisterModelResponse,
    WatchEventsRequest,
};
use modelpool_supervisor::{EngineKind, WorkerBackend};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::config::{model_spec, RawModel};
use crate::error::ServerError;
use crate::inference::deadline_of;
use crate::reload::Reloader;
use std::sync::Arc;

/// How long GetModel waits for a worker's own figures.
const PREFIX_STATS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

pub struct ControlService {
    pool: Pool<WorkerBackend>,
    /// When set, `RegisterModel` paths must resolve inside one of these.
    model_roots: Option<Vec<std::path::PathBuf>>,
    reloader: Arc<Reloader>,
    /// Turns true when the server starts draining; event streams end then.
    draining: watch::Receiver<bool>,
    /// Shown in status; empty without a spill directory.
    spill_dir: String,
}

impl ControlService {
    pub fn new(
        pool: Pool<WorkerBackend>,
        reloader: Arc<Reloader>,
        draining: watch::Receiver<bool>,
        model_roots: Option<Vec<std::path::PathBuf>>,
        spill_dir: String,
    ) -> Self {
        Self {
            pool,
            model_roots,
            reloader,
            draining,
            spill_dir,
        }
    }

    /// What a ready llama.cpp model's worker keeps for later requests, and its KV
    /// cache; `None` when it is not ready or does not answer within a second.
    async fn worker_state(&self, id: &str) -> Option<(PrefixCache, KvCache)> {
        let instance = self.pool.ready_instance(id)?;
        let stats = tokio::time::timeout(PREFIX_STATS_TIMEOUT, instance.stats())
            .await
            .ok()?
            .ok()?;
        let kv = KvCache {
            cells: stats.kv_cells,
            cells_reserved: stats.kv_cells_reserved,
            waiting_for_room: stats.waiting_for_kv_room,
            peak_running: stats.peak_batch_sequences,
        };
        let prefixes = PrefixCache {
            kept: stats.kept_prefixes,
            kept_tokens: stats.kept_prefix_tokens,
            saved: stats.saved_prefixes,
            saved_bytes: stats.saved_prefix_bytes,
            reused_prompt_tokens_total: stats.reused_prompt_tokens_total,
            restored_total: stats.restored_prefixes_total,
        };
        Some((prefixes, kv))
    }

    fn info(&self, id: &str) -> Result<Response<ModelInfo>, Status> {
        let snap = self.pool.get(id).map_err(ServerError::from)?;
        Ok(Response::new(info(snap)))
    }
}

fn required_id(id: String) -> Result<String, Status> {
    if id.is_empty() {
        return Err(ServerError::invalid("id", "required").into());
    }
    Ok(id)
}

pub(crate) fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

/// A request's duration as the configuration file writes it ("1m 30s"), for the
/// same checks; a negative one is refused naming `field`.
fn duration_text(
    field: &'static str,
    d: Option<prost_types::Duration>,
) -> Result<Option<String>, ServerError> {
    d.map(|d| {
        std::time::Duration::try_from(d)
            .map(|d| humantime::format_duration(d).to_string())
            .map_err(|_| ServerError::invalid(field, "must not be negative"))
    })
    .transpose()
}

fn proto_duration(d: std::time::Duration) -> Option<prost_types::Duration> {
    prost_types::Duration::try_from(d).ok()
}

fn info(s: ModelSnapshot) -> ModelInfo {
    let error_pct = s.prediction_error_pct().unwrap_or(0.0);
    let engine = s.spec.engine_kind().map(|e| e.as_str().to_owned());
    let mut out = ModelInfo {
        id: s.spec.id,
        source: s.spec.source.to_string(),
        tier: s.tier.as_str().into(),
        file: s.file.map(|f| f.display().to_string()).unwrap_or_default(),
        page_cache_bytes: s.page_cache_bytes,
        file_bytes: s.file_bytes,
        spilled_bytes: s.spilled_bytes,
        context_length: s.spec.context_length,
        worker_pid: s.worker_pid.unwrap_or(0),
        resident_bytes: s.resident_bytes,
        in_flight_requests: s.in_flight,
        last_error: s.last_error.unwrap_or_default(),
        device: s.spec.device.to_string(),
        pinned: s.spec.pinned,
        max_sequences: s.spec.max_sequences,
        max_concurrency: s.spec.max_concurrency,
        idle_ttl: s.spec.idle_ttl.and_then(proto_duration),
        waiting_requests: s.waiting,
        peak_bytes: s.peak_bytes,
        charged_bytes: s.charged_bytes,
        predicted: s.predicted.map(|f| Footprint {
            weights_bytes: f.weights_bytes,
            kv_cache_bytes: f.kv_bytes,
            overhead_bytes: f.overhead_bytes,
            activation_bytes: f.activation_bytes,
            total_bytes: f.total_bytes(),
        }),
        load_measured_bytes: s.load_measured_bytes,
        prediction_error_percent: error_pct,
        last_used: Some(timestamp(s.last_used)),
        loaded_at: s.loaded_at.map(timestamp),
        loads_started: s.loads_started,
        precision: s.precision.unwrap_or_default(),
        precisions: s.spec.precisions,
        engine: engine.unwrap_or_default(),
        kv_budget_tokens: s.kv_budget_tokens.unwrap_or(0),
        kv_budget_grown_from: s.kv_grown_from.unwrap_or(0),
        waiting_reason: s.waiting_reason.unwrap_or_default(),
        waiting_for: (!s.waiting_for.is_zero())
            .then(|| proto_duration(s.waiting_for))
            .flatten(),
        ..Default::default()
    };
    out.set_format(match s.spec.format {
        PoolFormat::Gguf => ModelFormat::Gguf,
        PoolFormat::Safetensors => ModelFormat::Safetensors,
    });
    out.set_state(match s.state {
        SlotState::Registered => ModelState::Registered,
        SlotState::Loading => ModelState::Loading,
        SlotState::Ready => ModelState::Ready,
        SlotState::Unloading => ModelState::Unloading,
        SlotState::Failed => ModelState::Failed,
    });
    out
}

/// A pool event on the wire.
pub(crate) fn event(ev: PoolEvent) -> modelpool_proto::v1::PoolEvent {
    let kind = match ev.kind {
        EventKind::Registered => Kind::Registered(pool_event::Registered {}),
        EventKind::Unregistered => Kind::Unregistered(pool_event::Unregistered {}),
        load @ (EventKind::LoadStarted { .. }
        | EventKind::LoadProgress { .. }
        | EventKind::LoadFinished { .. }
        | EventKind::LoadFailed { .. }) => load_event_kind(load),
        EventKind::Evicted {
            reason,
            freed_bytes,
        } => Kind::Evicted(pool_event::Evicted {
            reason: evict_reason_label(&reason).into(),
            detail: reason.to_string(),
            freed_bytes,
        }),
        EventKind::Fetched { bytes, duration } => Kind::Fetched(pool_event::Fetched {
            bytes,
            duration: proto_duration(duration),
        }),
        EventKind::Spilled {
            bytes,
            duration,
            how,
        } => Kind::Spilled(pool_event::Spilled {
            bytes,
            duration: proto_duration(duration),
            how: how.into(),
        }),
        EventKind::SpillFailed { error } => Kind::SpillFailed(pool_event::SpillFailed { error }),
        EventKind::SwapStarted { group, outgoing } => {
            Kind::SwapStarted(pool_event::SwapStarted { group, outgoing })
        }
        EventKind::SwapFinished {
            group,
            duration,
            bytes,
        } => Kind::SwapFinished(pool_event::SwapFinished {
            group,
            duration: proto_duration(duration),
            bytes,
        }),
        EventKind::TurnStarted { outgoing, waited } => Kind::TurnStarted(pool_event::TurnStarted {
            outgoing,
            waited: proto_duration(waited),
        }),
        EventKind::TurnFinished { duration, waited } => {
            Kind::TurnFinished(pool_event::TurnFinished {
                duration: proto_duration(duration),
                waited: proto_duration(waited),
            })
        }
        EventKind::Pinned => Kind::Pinned(pool_event::Pinned {}),
        EventKind::Unpinned => Kind::Unpinned(pool_event::Unpinned {}),
        EventKind::BudgetChanged {
            device,
            budget_bytes,
        } => Kind::BudgetChanged(pool_event::BudgetChanged {
            device: device.to_string(),
            budget_bytes,
        }),
    };
    modelpool_proto::v1::PoolEvent {
        time: Some(timestamp(ev.at)),
        model: ev.model,
        kind: Some(kind),
    }
}

/// A load event's kind on the wire; `event` passes only the four load events here.
fn load_event_kind(kind: EventKind) -> Kind {
    match kind {
        EventKind::LoadStarted {
            predicted_bytes,
            expected,
            precision,
            kv_budget_tokens,
            kv_grown_from,
        } => Kind::LoadStarted(pool_event::LoadStarted {
            precision: precision.unwrap_or_default(),
            predicted_bytes,
            expected_duration: expected.and_then(proto_duration),
            kv_budget_tokens: kv_budget_tokens.unwrap_or(0),
            kv_budget_grown_from: kv_grown_from.unwrap_or(0),
        }),
        EventKind::LoadProgress {
            stage,
            elapsed,
            expected,
        } => Kind::LoadProgress(pool_event::LoadProgress {
            stage,
            elapsed: proto_duration(elapsed),
            expected_duration: expected.and_then(proto_duration),
        }),
        EventKind::LoadFinished {
            duration,
            predicted_bytes,
            measured_bytes,
        } => Kind::LoadFinished(pool_event::LoadFinished {
            duration: proto_duration(duration),
            predicted_bytes,
            measured_bytes,
        }),
        EventKind::LoadFailed { duration, error } => Kind::LoadFailed(pool_event::LoadFailed {
            duration: proto_duration(duration),
            error,
        }),
        other => unreachable!("not a load event: {other:?}"),
    }
}

/// The short name of an eviction's reason on the wire and in metrics labels.
pub(crate) fn evict_reason_label(reason: &EvictReason) -> &'static str {
    match reason {
        EvictReason::MakeRoom { .. } => "lru",
        EvictReason::IdleTtl { .. } => "idle_ttl",
        EvictReason::Requested => "requested",
        EvictReason::Shutdown => "shutdown",
        EvictReason::Crashed { .. } => "crashed",
        EvictReason::Swap { .. } => "swap",
        EvictReason::Turn { .. } => "turn",
    }
}

type EventStream =
    Pin<Box<dyn Stream<Item = Result<modelpool_proto::v1::PoolEvent, Status>> + Send>>;

#[tonic::async_trait]
impl ModelControl for ControlService {
    async fn list_models(
        &self,
        _: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        let models = self.pool.snapshot().into_iter().map(info).collect();
        Ok(Response::new(ListModelsResponse { models }))
    }

    async fn get_model(
        &self,
        request: Request<GetModelRequest>,
    ) -> Result<Response<ModelInfo>, Status> {
        let id = required_id(request.into_inner().id)?;
        let mut info = self.info(&id)?;
        // mistral.rs keeps no prefixes (its prefix cache is off).
        if info.get_ref().engine != EngineKind::MistralRs.as_str() {
            if let Some((prefixes, kv)) = self.worker_state(&id).await {
                let info = info.get_mut();
                if kv.waiting_for_room > 0 && info.waiting_reason.is_empty() {
                    info.waiting_reason = format!(
                        "waiting for KV room: {} requests; {} of {} cells taken by the running sequences",
                        kv.waiting_for_room, kv.cells_reserved, kv.cells
                    );
                }
                info.prefixes = Some(prefixes);
                info.kv_cache = Some(kv);
            }
        }
        Ok(info)
    }

    async fn register_model(
        &self,
        request: Request<RegisterModelRequest>,
    ) -> Result<Response<ModelInfo>, Status> {
        let r = request.into_inner();
        let idle_ttl = duration_text("idle_ttl", r.idle_ttl)?;
        let stream_interval = duration_text("stream_interval", r.stream_interval)?;
        let raw = RawModel {
            id: r.id,
            path: r.path.into(),
            url: Some(r.url).filter(|u| !u.is_empty()),
            sha256: Some(r.sha256).filter(|h| !h.is_empty()),
            format: Some(r.format).filter(|f| !f.is_empty()),
            device: Some(r.device).filter(|d| !d.is_empty()),
            context_length: r.context_length,
            max_sequences: r.max_sequences,
            max_concurrency: r.max_concurrency,
            pinned: Some(r.pinned),
            idle_ttl,
            precisions: r.precisions,
            engine: Some(r.engine).filter(|e| !e.is_empty()),
            repack: r.repack,
            mlock: Some(r.mlock).filter(|m| *m),
            prefix_cache: r.prefix_cache,
            kv_budget: r.kv_budget,
            kv_budget_max: r.kv_budget_max,
            stream_interval,
        };
        let mut spec = model_spec(raw, Path::new("/"))
            .map_err(|(field, reason)| ServerError::invalid(field, reason))?;
        match &spec.source {
            Source::Path(path) => {
                if !path.is_absolute() {
                    return Err(ServerError::invalid("path", "must be absolute").into());
                }
                let is_dir = spec.format == modelpool_pool::ModelFormat::Safetensors;
                if (is_dir && !path.is_dir()) || (!is_dir && !path.is_file()) {
                    return Err(ServerError::invalid(
                        "path",
                        format!(
                            "{} is not a {} on the server",
                            path.display(),
                            if is_dir { "directory" } else { "file" }
                        ),
                    )
                    .into());
                }
                if let Some(roots) = &self.model_roots {
                    let confined =
                        crate::modelmesh::confine(roots, &path.to_string_lossy(), "path")?;
                    spec.source = Source::Path(confined);
                }
                // Refuse what cannot load now (not a GGUF, truncated, an architecture
                // its engine does not run), not at the first request.
                check_engine_runs(&spec)?;
                modelpool_supervisor::footprint::predict(&spec)
                    .map_err(|e| ServerError::invalid("path", e.to_string()))?;
            }
            // Checked once downloaded: the checksum, then the header.
            Source::Url { .. } if self.pool.store_usage().is_none() => {
                return Err(ServerError::invalid(
                    "url",
                    "this server has no spill directory to download into ([storage] spill_dir)",
                )
                .into());
            }
            Source::Url { .. } => {}
        }
        let id = spec.id.clone();
        self.pool.register(spec).map_err(ServerError::from)?;
        tracing::info!(model = %id, "registered");
        self.info(&id)
    }

    async fn unregister_model(
        &self,
        request: Request<UnregisterModelRequest>,
    ) -> Result<Response<UnregisterModelResponse>, Status> {
        let id = required_id(request.into_inner().id)?;
        self.pool.unregister(&id).await.map_err(ServerError::from)?;
        tracing::info!(model = %id, "unregistered");
        Ok(Response::new(UnregisterModelResponse {}))
    }

    async fn load_model(
        &self,
        request: Request<LoadModelRequest>,
    ) -> Result<Response<LoadModelResponse>, Status> {
        let deadline = deadline_of(request.metadata());
        let r = request.into_inner();
        let id = required_id(r.id)?;
        let took = if r.prefetch {
            if r.pin {
                return Err(ServerError::invalid("pin", "cannot be combined with prefetch").into());
            }
            let (cached, len, took) = self.pool.prefetch(&id).await.map_err(ServerError::from)?;
            tracing::info!(model = %id, cached_bytes = cached, file_bytes = len, ms = took.as_millis() as u64, "prefetched");
            took
        } else {
            self.pool
                .load(&id, r.pin, deadline)
                .await
                .map_err(ServerError::from)?
        };
        let model = self.pool.get(&id).map_err(ServerError::from)?;
        Ok(Response::new(LoadModelResponse {
            model: Some(info(model)),
            load_time: proto_duration(took),
        }))
    }

    async fn evict_model(
        &self,
        request: Request<EvictModelRequest>,
    ) -> Result<Response<EvictModelResponse>, Status> {
        let id = required_id(request.into_inner().id)?;
        let evicted = self.pool.unload(&id).await.map_err(ServerError::from)?;
        Ok(Response::new(EvictModelResponse { evicted }))
    }

    async fn pin_model(
        &self,
        request: Request<PinModelRequest>,
    ) -> Result<Response<ModelInfo>, Status> {
        let id = required_id(request.into_inner().id)?;
        self.pool.set_pinned(&id, true).map_err(ServerError::from)?;
        self.info(&id)
    }

    async fn unpin_model(
        &self,
        request: Request<UnpinModelRequest>,
    ) -> Result<Response<ModelInfo>, Status> {
        let id = required_id(request.into_inner().id)?;
        self.pool
            .set_pinned(&id, false)
            .map_err(ServerError::from)?;
        self.info(&id)
    }

    async fn get_pool_status(
        &self,
        _: Request<GetPoolStatusRequest>,
    ) -> Result<Response<PoolStatus>, Status> {
        let pool = self.pool.clone();
        // /proc, NVML and mincore reads: off the async threads.
        let status = tokio::task::spawn_blocking(move || (pool.status(), pool.store_usage()))
            .await
            .map_err(|e| Status::internal(format!("status task failed: {e}")))?;
        let (status, spill) = status;
        let devices = status
            .devices
            .into_iter()
            .map(|d| DeviceStatus {
                device: d.device.to_string(),
                name: d.name,
                total_bytes: d.total_bytes,
                available_bytes: d.available_bytes,
                budget_bytes: d.budget_bytes,
                used_bytes: d.used_bytes,
                reserved_bytes: d.reserved_bytes,
                free_bytes: d.free_bytes,
            })
            .collect();
        Ok(Response::new(PoolStatus {
            devices,
            models: status.models.into_iter().map(info).collect(),
            gpu_absent_reason: status.gpu_absent_reason.unwrap_or_default(),
            turns_total: status.turns_total,
            turns_last_minute: status.turns_last_minute,
            groups: status
                .groups
                .into_iter()
                .map(|g| GroupStatus {
                    name: g.spec.name,
                    members: g.spec.members,
                    max_resident: g.spec.max_resident,
                    resident: g.resident,
                    resident_bytes: g.resident_bytes,
                    budget_bytes: g.spec.budget_bytes.unwrap_or(0),
                    swaps_total: g.swaps_total,
                    swaps_last_minute: g.swaps_last_minute,
                    min_residency: proto_duration(g.spec.min_residency),
                    drain_timeout: proto_duration(g.spec.drain_timeout),
                })
                .collect(),
            spill: spill.map(|u| SpillStatus {
                dir: self.spill_dir.clone(),
                budget_bytes: u.budget_bytes,
                used_bytes: u.used_bytes,
                artifacts: u.artifacts,
                held_bytes: u.held_bytes,
            }),
        }))
    }

    async fn reload_config(
        &self,
        _: Request<ReloadConfigRequest>,
    ) -> Result<Response<ReloadConfigResponse>, Status> {
        // On a task of its own: a client that goes away mid-reload (its deadline, a
        // dropped connection) must not leave models drained but never replaced.
        let reloader = Arc::clone(&self.reloader);
        let report = tokio::spawn(async move { reloader.reload().await })
            .await
            .map_err(|e| Status::internal(format!("the reload task failed: {e}")))?;
        let report = report.map_err(Status::from)?;
        Ok(Response::new(ReloadConfigResponse {
            added: report.added,
            removed: report.removed,
            changed: report.changed,
            unchanged: report.unchanged as u32,
            budgets: report
                .budgets
                .into_iter()
                .map(|(d, b)| DeviceBudget {
                    device: d.to_string(),
                    budget_bytes: b,
                })
                .collect(),
            restart_needed: report.restart_needed,
        }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        _: Request<WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let rx = self.pool.subscribe();
        let draining = self.draining.clone();
        let stream = futures::stream::unfold((rx, draining), |(mut rx, mut draining)| async move {
            let received = tokio::select! {
                r = rx.recv() => r,
                _ = draining.wait_for(|d| *d) => return None,
            };
            let item = match received {
                Ok(ev) => event(ev),
                Err(RecvError::Lagged(n)) => modelpool_proto::v1::PoolEvent {
                    time: Some(timestamp(SystemTime::now())),
                    model: String::new(),
                    kind: Some(Kind::Missed(n)),
                },
                Err(RecvError::Closed) => return None,
            };
            Some((Ok(item), (rx, draining)))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// A GGUF whose header names an architecture the model's engine does not generate with
/// is refused naming `engine` (and the engine that would run it, if any).
fn check_engine_runs(spec: &modelpool_pool::ModelSpec) -> Result<(), Status> {
    if spec.format != modelpool_pool::ModelFormat::Gguf {
        return Ok(());
    }
    let Ok(path) = spec.local_file() else {
        return Ok(());
    };
    let Ok(header) = modelpool_catalog::gguf::read_header(path) else {
        // An unreadable header is the path's problem, reported by the prediction.
        return Ok(());
    };
    let engine = spec
        .engine_kind()
        .map_err(|e| ServerError::invalid("engine", e))?;
    engine
        .check(spec.format, Some(&header.architecture))
        .map_err(|e| ServerError::invalid("engine", e).into())
}
