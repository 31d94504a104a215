//! KServe v2 / Triton `inference.GRPCInferenceService` on the gRPC port: a thin adapter.
//! Inference runs through the same [`InferenceService::open`] as `modelpool.v1`; the
//! model-repository extension calls the same `ModelControl` RPCs (ListModels,
//! LoadModel, EvictModel); errors are the same statuses. Liveness and readiness stay
//! open, like gRPC health; inference needs the inference token, the repository the
//! control token.

mod stream;
mod tensors;

use std::pin::Pin;

use futures::Stream;
use modelpool_proto::kserve::grpc_inference_service_server::GrpcInferenceService;
use modelpool_proto::kserve::model_metadata_response::TensorMetadata;
use modelpool_proto::kserve::repository_index_response::ModelIndex;
use modelpool_proto::kserve::{
    ModelInferRequest, ModelInferResponse, ModelMetadataRequest, ModelMetadataResponse,
    ModelReadyRequest, ModelReadyResponse, ModelStreamInferResponse, RepositoryIndexRequest,
    RepositoryIndexResponse, RepositoryModelLoadRequest, RepositoryModelLoadResponse,
    RepositoryModelUnloadRequest, RepositoryModelUnloadResponse, ServerLiveRequest,
    ServerLiveResponse, ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest,
    ServerReadyResponse,
};
use modelpool_proto::v1::model_control_server::ModelControl;
use modelpool_proto::v1::{
    EvictModelRequest, ListModelsRequest, LoadModelRequest, ModelInfo, ModelState,
};
use tonic::{Request, Response, Status, Streaming};

use crate::auth::Scope;
use crate::error::ServerError;
use crate::inference::{collect_text, deadline_of, FrontEnd};
use tensors::{finish_parameters, parse, response, Parsed};

/// The service; see the module documentation.
pub struct KServe(FrontEnd);

impl std::ops::Deref for KServe {
    type Target = FrontEnd;

    fn deref(&self) -> &FrontEnd {
        &self.0
    }
}

impl KServe {
    pub fn new(front: FrontEnd) -> Self {
        Self(front)
    }

    /// The model's snapshot; NOT_FOUND names the registered ids.
    fn model(&self, name: &str) -> Result<modelpool_pool::ModelSnapshot, Status> {
        if name.is_empty() {
            return Err(
                ServerError::invalid("name", "required; name a registered model id").into(),
            );
        }
        Ok(self.inference.pool().get(name).map_err(ServerError::from)?)
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<ModelStreamInferResponse, Status>> + Send>>;

/// Triton's repository states.
fn index_state(m: &ModelInfo) -> (&'static str, String) {
    match m.state() {
        ModelState::Ready => ("READY", String::new()),
        ModelState::Loading => ("LOADING", String::new()),
        ModelState::Unloading => ("UNLOADING", String::new()),
        ModelState::Failed => ("UNAVAILABLE", m.last_error.clone()),
        ModelState::Registered | ModelState::Unspecified => (
            "UNAVAILABLE",
            "not resident; loads on its first request".into(),
        ),
    }
}

fn tensor(name: &str, datatype: &str) -> TensorMetadata {
    TensorMetadata {
        name: name.into(),
        datatype: datatype.into(),
        shape: vec![1],
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for KServe {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        let ready = !self.inference.draining();
        Ok(Response::new(ServerReadyResponse { ready }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        self.auth.check(Scope::Inference, request.metadata())?;
        let r = request.into_inner();
        tensors::check_version(&r.version, "version")?;
        let ready = self.model(&r.name)?.state == modelpool_pool::SlotState::Ready;
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        request: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        self.auth.check(Scope::Inference, request.metadata())?;
        Ok(Response::new(ServerMetadataResponse {
            name: "modelpool".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: vec!["model_repository".into()],
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        self.auth.check(Scope::Inference, request.metadata())?;
        let r = request.into_inner();
        tensors::check_version(&r.version, "version")?;
        let model = self.model(&r.name)?;
        Ok(Response::new(ModelMetadataResponse {
            name: model.spec.id,
            versions: vec!["1".into()],
            platform: "modelpool".into(),
            inputs: vec![
                tensor(tensors::TEXT_INPUT, "BYTES"),
                tensor(tensors::SAMPLING_INPUT, "BYTES"),
                tensor(tensors::STREAM_INPUT, "BOOL"),
            ],
            outputs: vec![tensor(tensors::TEXT_OUTPUT, "BYTES")],
        }))
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        self.auth.check(Scope::Inference, request.metadata())?;
        let deadline = deadline_of(request.metadata());
        let r = request.into_inner();
        let Parsed {
            generation, stream, ..
        } = parse(&r, "kserve.infer", deadline)?;
        if stream {
            return Err(ServerError::invalid(
                tensors::STREAM_INPUT,
                "true needs ModelStreamInfer (decoupled); ModelInfer answers once",
            )
            .into());
        }
        let (text, last) = collect_text(self.inference.open(generation).await?).await?;
        Ok(Response::new(response(
            &r.model_name,
            &r.id,
            Some(&text),
            finish_parameters(&last),
        )))
    }

    type ModelStreamInferStream = ResponseStream;

    async fn model_stream_infer(
        &self,
        request: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        self.auth.check(Scope::Inference, request.metadata())?;
        let deadline = deadline_of(request.metadata());
        let requests = request.into_inner();
        Ok(Response::new(Box::pin(stream::Responses::new(
            self.inference.clone(),
            requests,
            deadline,
        ))))
    }

    async fn repository_index(
        &self,
        request: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        self.auth.check(Scope::Control, request.metadata())?;
        let r = request.into_inner();
        check_repository(&r.repository_name)?;
        let list = self
            .control
            .list_models(Request::new(ListModelsRequest {}))
            .await?
            .into_inner();
        let models = list
            .models
            .iter()
            .map(|m| {
                let (state, reason) = index_state(m);
                ModelIndex {
                    name: m.id.clone(),
                    version: "1".into(),
                    state: state.into(),
                    reason,
                }
            })
            .filter(|m| !r.ready || m.state == "READY")
            .collect();
        Ok(Response::new(RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        request: Request<RepositoryModelLoadRequest>,
    ) -> Result<Response<RepositoryModelLoadResponse>, Status> {
        self.auth.check(Scope::Control, request.metadata())?;
        let (meta, ext, r) = request.into_parts();
        check_repository(&r.repository_name)?;
        if let Some(key) = r.parameters.keys().min() {
            return Err(ServerError::invalid(
                format!("parameters.{key}"),
                "modelpool loads registered models as configured; register new ones with ModelControl.RegisterModel",
            )
            .into());
        }
        let load = LoadModelRequest {
            id: r.model_name,
            pin: false,
            prefetch: false,
        };
        // The caller's metadata travels along: its deadline bounds the load.
        self.control
            .load_model(Request::from_parts(meta, ext, load))
            .await?;
        Ok(Response::new(RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        self.auth.check(Scope::Control, request.metadata())?;
        let r = request.into_inner();
        check_repository(&r.repository_name)?;
        self.control
            .evict_model(Request::new(EvictModelRequest { id: r.model_name }))
            .await?;
        Ok(Response::new(RepositoryModelUnloadResponse {}))
    }
}

/// modelpool has one repository: the pool.
fn check_repository(name: &str) -> Result<(), Status> {
    if name.is_empty() {
        return Ok(());
    }
    Err(ServerError::invalid(
        "repository_name",
        format!("modelpool has one repository (send \"\"), got {name:?}"),
    )
    .into())
}
