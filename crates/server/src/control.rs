//! `modelpool.v1.ModelControl`: what the pool knows and what state each model is in.

use modelpool_engine::WorkerBackend;
use modelpool_pool::{ModelFormat as PoolFormat, ModelSnapshot, Pool, SlotState};
use modelpool_proto::v1::model_control_server::ModelControl;
use modelpool_proto::v1::{
    GetModelRequest, ListModelsRequest, ListModelsResponse, ModelFormat, ModelInfo, ModelState,
};
use tonic::{Request, Response, Status};

use crate::error::ServerError;

pub struct ControlService {
    pool: Pool<WorkerBackend>,
}

impl ControlService {
    pub fn new(pool: Pool<WorkerBackend>) -> Self {
        Self { pool }
    }
}

fn info(s: ModelSnapshot) -> ModelInfo {
    let mut out = ModelInfo {
        id: s.spec.id,
        source: s.spec.source.display().to_string(),
        context_length: s.spec.context_length,
        worker_pid: s.worker_pid.unwrap_or(0),
        resident_bytes: s.resident_bytes,
        in_flight_requests: s.in_flight,
        last_error: s.last_error.unwrap_or_default(),
        ..Default::default()
    };
    out.set_format(match s.spec.format {
        PoolFormat::Gguf => ModelFormat::Gguf,
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
        let id = request.into_inner().id;
        if id.is_empty() {
            return Err(ServerError::invalid("id", "required").into());
        }
        let snap = self.pool.get(&id).map_err(ServerError::from)?;
        Ok(Response::new(info(snap)))
    }
}
