//! modelpool as a KServe ModelMesh model runtime: `mmesh.ModelRuntime` on its own port.
//!
//! ModelMesh owns placement across pods; here each of its models is registered pinned,
//! so the pool never evicts it on its own (ModelMesh unloads what it wants gone). The
//! pool still proves a load fits before starting it, so ModelMesh learns at once when
//! one does not. Model paths are confined to the configured model roots.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use modelpool_pool::{Device, ModelSpec, Pool, PoolError};
use modelpool_proto::mmesh::model_runtime_server::ModelRuntime;
use modelpool_proto::mmesh::runtime_status_response::{MethodInfo, Status as RuntimeState};
use modelpool_proto::mmesh::{
    LoadModelRequest, LoadModelResponse, ModelSizeRequest, ModelSizeResponse,
    PredictModelSizeRequest, PredictModelSizeResponse, RuntimeStatusRequest, RuntimeStatusResponse,
    UnloadModelRequest, UnloadModelResponse,
};
use modelpool_supervisor::WorkerBackend;
use tonic::{Request, Response, Status};

use crate::config::ModelMeshSettings;
use crate::error::ServerError;

/// Field number of `model` in `modelpool.v1.ChatRequest` and `GenerateRequest`, where
/// ModelMesh writes the model id of each request it routes.
const MODEL_FIELD: u32 = 1;

pub struct ModelMeshRuntime {
    pool: Pool<WorkerBackend>,
    settings: ModelMeshSettings,
    load_timeout: Duration,
    /// Ids ModelMesh loaded (and so may unload or purge).
    managed: Mutex<BTreeSet<String>>,
}

impl ModelMeshRuntime {
    pub fn new(
        pool: Pool<WorkerBackend>,
        settings: ModelMeshSettings,
        load_timeout: Duration,
    ) -> Self {
        Self {
            pool,
            settings,
            load_timeout,
            managed: Mutex::new(BTreeSet::new()),
        }
    }

    fn managed(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.managed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The spec for a ModelMesh model, its path confined to the model roots.
    fn spec(&self, id: &str, path: &str) -> Result<ModelSpec, Status> {
        if id.is_empty() {
            return Err(ServerError::invalid("modelId", "required").into());
        }
        let source = confine(&self.settings.model_roots, path, "modelPath")?;
        let mut spec = ModelSpec::new(id, source);
        spec.context_length = self.settings.context_length;
        spec.max_concurrency = self.settings.max_concurrency;
        spec.pinned = true;
        Ok(spec)
    }

    /// Stops and forgets a managed model, waiting for a load still in progress.
    async fn remove(&self, id: &str) -> Result<(), Status> {
        match self.pool.retire(id, self.load_timeout).await {
            Ok(()) | Err(PoolError::NotFound { .. }) => {
                self.managed().remove(id);
                Ok(())
            }
            Err(e) => Err(ServerError::from(e).into()),
        }
    }
}

/// Resolves `path` (following symlinks) and accepts it only inside one of `roots`; an
/// error names `field`, the path's name in the caller's API.
pub(crate) fn confine(
    roots: &[PathBuf],
    path: &str,
    field: &'static str,
) -> Result<PathBuf, Status> {
    if path.is_empty() {
        return Err(ServerError::invalid(field, "required").into());
    }
    let resolved = Path::new(path)
        .canonicalize()
        .map_err(|e| Status::from(ServerError::invalid(field, format!("{path}: {e}"))))?;
    // A directory (ModelMesh's usual layout) holds exactly one .gguf file.
    let file = if resolved.is_dir() {
        let ggufs: Vec<PathBuf> = std::fs::read_dir(&resolved)
            .map_err(|e| Status::from(ServerError::invalid(field, format!("{path}: {e}"))))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
            .collect();
        match ggufs.as_slice() {
            [one] => one.canonicalize().map_err(|e| {
                Status::from(ServerError::invalid(
                    field,
                    format!("{}: {e}", one.display()),
                ))
            })?,
            _ => {
                return Err(ServerError::invalid(
                    field,
                    format!(
                        "{path} is a directory with {} .gguf files; expected one",
                        ggufs.len()
                    ),
                )
                .into())
            }
        }
    } else {
        resolved
    };
    if !roots.iter().any(|root| file.starts_with(root)) {
        let roots: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
        return Err(ServerError::invalid(
            field,
            format!(
                "{path} resolves to {}, outside the model roots ({})",
                file.display(),
                roots.join(", ")
            ),
        )
        .into());
    }
    Ok(file)
}

#[tonic::async_trait]
impl ModelRuntime for ModelMeshRuntime {
    async fn load_model(
        &self,
        request: Request<LoadModelRequest>,
    ) -> Result<Response<LoadModelResponse>, Status> {
        let r = request.into_inner();
        let spec = self.spec(&r.model_id, &r.model_path)?;
        let id = spec.id.clone();
        match self.pool.get(&id) {
            Ok(existing) if self.managed().contains(&id) && existing.spec.source == spec.source => {
            }
            Ok(_) => {
                return Err(Status::already_exists(format!(
                    "model `{id}` is registered already, not by ModelMesh or from another path"
                )))
            }
            Err(_) => {
                self.pool
                    .register(spec.clone())
                    .map_err(ServerError::from)?;
                self.managed().insert(id.clone());
            }
        }
        tracing::info!(model = %id, path = %spec.source, "modelmesh: loadModel");
        if let Err(e) = self.pool.load(&id, true, None).await {
            // Nothing of a failed load stays behind.
            let _ = self.remove(&id).await;
            return Err(ServerError::from(e).into());
        }
        let model = self.pool.get(&id).map_err(ServerError::from)?;
        Ok(Response::new(LoadModelResponse {
            size_in_bytes: model.charged_bytes,
            max_concurrency: model.spec.max_concurrency,
        }))
    }

    async fn unload_model(
        &self,
        request: Request<UnloadModelRequest>,
    ) -> Result<Response<UnloadModelResponse>, Status> {
        let id = request.into_inner().model_id;
        tracing::info!(model = %id, "modelmesh: unloadModel");
        if self.managed().contains(&id) {
            self.remove(&id).await?;
        }
        Ok(Response::new(UnloadModelResponse {}))
    }

    async fn predict_model_size(
        &self,
        request: Request<PredictModelSizeRequest>,
    ) -> Result<Response<PredictModelSizeResponse>, Status> {
        let r = request.into_inner();
        let spec = self.spec(&r.model_id, &r.model_path)?;
        let footprint = modelpool_supervisor::footprint::predict(&spec)
            .map_err(|e| Status::from(ServerError::invalid("modelPath", e.to_string())))?;
        Ok(Response::new(PredictModelSizeResponse {
            size_in_bytes: footprint.total_bytes(),
        }))
    }

    async fn model_size(
        &self,
        request: Request<ModelSizeRequest>,
    ) -> Result<Response<ModelSizeResponse>, Status> {
        let id = request.into_inner().model_id;
        let model = self.pool.get(&id).map_err(ServerError::from)?;
        Ok(Response::new(ModelSizeResponse {
            size_in_bytes: model.charged_bytes,
        }))
    }

    async fn runtime_status(
        &self,
        _: Request<RuntimeStatusRequest>,
    ) -> Result<Response<RuntimeStatusResponse>, Status> {
        // ModelMesh asks at its start: whatever it loaded before is no longer its.
        let stale: Vec<String> = self.managed().iter().cloned().collect();
        for id in stale {
            tracing::info!(model = %id, "modelmesh: purging a model loaded before ModelMesh started");
            self.remove(&id).await?;
        }
        let capacity = self
            .pool
            .status()
            .devices
            .iter()
            .find(|d| d.device == Device::Cpu)
            .map_or(0, |d| d.budget_bytes);
        let method = || MethodInfo {
            id_injection_path: vec![MODEL_FIELD],
        };
        let method_infos: HashMap<String, MethodInfo> = [
            ("modelpool.v1.Inference/Chat".to_owned(), method()),
            ("modelpool.v1.Inference/Generate".to_owned(), method()),
        ]
        .into_iter()
        .collect();
        Ok(Response::new(RuntimeStatusResponse {
            status: RuntimeState::Ready as i32,
            capacity_in_bytes: capacity,
            max_loading_concurrency: 1,
            model_loading_timeout_ms: u32::try_from(self.load_timeout.as_millis())
                .unwrap_or(u32::MAX),
            default_model_size_in_bytes: self.settings.default_model_size_bytes,
            runtime_version: env!("CARGO_PKG_VERSION").to_owned(),
            numeric_runtime_version: 0,
            method_infos,
            limit_model_concurrency: false,
            allow_any_method: false,
        }))
    }
}

/// Serves the runtime API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    mut builder: tonic::transport::Server,
    runtime: Arc<ModelMeshRuntime>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let service =
        modelpool_proto::mmesh::model_runtime_server::ModelRuntimeServer::from_arc(runtime);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    if let Err(e) = builder
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
    {
        tracing::error!("modelmesh runtime API: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_outside_the_roots_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let inside = root.path().join("m.gguf");
        std::fs::write(&inside, b"GGUF").unwrap();
        let secret = outside.path().join("s.gguf");
        std::fs::write(&secret, b"GGUF").unwrap();
        let roots = vec![root.path().canonicalize().unwrap()];
        let ok = |p: &Path| confine(&roots, p.to_str().unwrap(), "modelPath");
        assert!(ok(&inside).is_ok());
        assert_eq!(
            ok(root.path()).unwrap(),
            inside.canonicalize().unwrap(),
            "a directory with one .gguf"
        );
        std::os::unix::fs::symlink(&secret, root.path().join("link.gguf")).unwrap();
        let two = ok(root.path()).unwrap_err();
        assert!(two.message().contains("2 .gguf files"), "{}", two.message());
        for bad in [
            secret.clone(),
            root.path().join("link.gguf"),
            root.path()
                .join("../")
                .join(outside.path().file_name().unwrap())
                .join("s.gguf"),
            PathBuf::from("/etc/passwd"),
        ] {
            let err = ok(&bad).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}");
            assert!(err.message().starts_with("modelPath:"), "{}", err.message());
        }
    }
}
