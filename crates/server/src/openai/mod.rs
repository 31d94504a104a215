//! The OpenAI-compatible HTTP API (`[server] openai_listen`): `/v1/models`,
//! `/v1/chat/completions` and `/v1/completions`, streamed as server-sent events or not.
//! A thin adapter: requests become [`Generation`](crate::inference::Generation)s run by
//! the same [`InferenceService::open`] as gRPC, model lists come from the same
//! `ModelControl` calls, and errors are gRPC statuses put through one table
//! ([`crate::error::http_status`]) into OpenAI's error shape.

mod request;
mod response;

use std::future::Future;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Request as HttpRequest, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use modelpool_proto::v1::model_control_server::ModelControl;
use modelpool_proto::v1::{GetModelRequest, ListModelsRequest, ModelInfo, ModelState};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tonic::Status;

use crate::auth::Scope;
use crate::error::{http_status, invalid_field};
use crate::inference::FrontEnd;

/// Request bodies above this are refused before parsing (413); prompts are capped
/// at [`crate::inference::MAX_PROMPT_BYTES`] of text by the shared validation.
const MAX_BODY_BYTES: usize = 4 << 20;

type Api = State<Arc<FrontEnd>>;

/// Serves the API on `listener` until `shutdown` resolves and open streams end.
pub async fn serve(
    listener: TcpListener,
    api: FrontEnd,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let result = axum::serve(listener, router(Arc::new(api)))
        .with_graceful_shutdown(shutdown)
        .await;
    if let Err(e) = result {
        tracing::warn!("OpenAI API server stopped: {e}");
    }
}

fn router(api: Arc<FrontEnd>) -> Router {
    Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(get_model))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .fallback(unknown_route)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&api),
            authorize,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(api)
}

/// The gRPC bearer tokens, from the `Authorization` header: every route is inference.
async fn authorize(State(api): Api, request: HttpRequest, next: Next) -> Response {
    let meta = tonic::metadata::MetadataMap::from_headers(request.headers().clone());
    match api.auth.check(Scope::Inference, &meta) {
        Ok(()) => next.run(request).await,
        Err(status) => ApiError::from(status).into_response(),
    }
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, with
/// the HTTP status of its gRPC code.
#[derive(Debug)]
pub(crate) struct ApiError(Status);

impl From<Status> for ApiError {
    fn from(status: Status) -> Self {
        Self(status)
    }
}

impl ApiError {
    /// 400 naming `field`, through the shared validation error.
    fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self(crate::error::ServerError::invalid(field, reason).into())
    }

    fn status(&self) -> StatusCode {
        let (code, _) = http_status(self.0.code());
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The JSON body, also sent as an SSE `data:` event when a stream fails.
    fn body(&self) -> Value {
        let (_, kind) = http_status(self.0.code());
        let code = format!("{:?}", self.0.code());
        json!({
            "error": {
                "message": self.0.message(),
                "type": kind,
                "param": invalid_field(&self.0),
                "code": snake_case(&code),
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_response(self.status(), &self.body())
    }
}

/// A JSON body with its content type.
fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// `ResourceExhausted` -> `resource_exhausted`.
fn snake_case(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 4);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

async fn unknown_route(request: HttpRequest) -> ApiError {
    ApiError(Status::not_found(format!(
        "no route {} {}; served: GET /v1/models, GET /v1/models/{{id}}, POST /v1/chat/completions, POST /v1/completions",
        request.method(),
        request.uri().path()
    )))
}

/// How `/v1/models` names a model's state: resident, loading, cold (registered, not
/// loaded, or its last load failed) or unloading.
fn state_name(m: &ModelInfo) -> &'static str {
    match m.state() {
        ModelState::Ready => "resident",
        ModelState::Loading => "loading",
        ModelState::Unloading => "unloading",
        ModelState::Registered | ModelState::Failed | ModelState::Unspecified => "cold",
    }
}

fn model_json(m: &ModelInfo) -> Value {
    json!({
        "id": m.id,
        "object": "model",
        "created": m.loaded_at.as_ref().map_or(0, |t| t.seconds.max(0)),
        "owned_by": "modelpool",
        "state": state_name(m),
        "context_length": m.context_length,
    })
}

async fn list_models(State(api): Api) -> Result<Response, ApiError> {
    let list = api
        .control
        .list_models(tonic::Request::new(ListModelsRequest {}))
        .await?
        .into_inner();
    let data: Vec<Value> = list.models.iter().map(model_json).collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({ "object": "list", "data": data }),
    ))
}

async fn get_model(State(api): Api, Path(id): Path<String>) -> Result<Response, ApiError> {
    let model = api
        .control
        .get_model(tonic::Request::new(GetModelRequest { id }))
        .await?
        .into_inner();
    Ok(json_response(StatusCode::OK, &model_json(&model)))
}

async fn chat_completions(State(api): Api, headers: HeaderMap, body: Bytes) -> Response {
    let parsed = parse_body(&body).and_then(|v| request::chat(&v, &headers));
    match parsed {
        Ok(parsed) => response::run(&api.inference, parsed, response::Kind::Chat).await,
        Err(e) => e.into_response(),
    }
}

async fn completions(State(api): Api, headers: HeaderMap, body: Bytes) -> Response {
    let parsed = parse_body(&body).and_then(|v| request::completion(&v, &headers));
    match parsed {
        Ok(parsed) => response::run(&api.inference, parsed, response::Kind::Text).await,
        Err(e) => e.into_response(),
    }
}

fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::invalid("body", format!("not JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_status_type_param_and_code() {
        let e = ApiError::invalid("temperature", "must be between 0 and 2, got 5");
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let body = e.body();
        assert_eq!(body["error"]["param"], "temperature");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "invalid_argument");
        let e = ApiError::from(Status::resource_exhausted("queue full: 64 waiting"));
        assert_eq!(e.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(e.body()["error"]["param"], Value::Null);
        assert_eq!(e.body()["error"]["code"], "resource_exhausted");
        let e = ApiError::from(Status::unauthenticated("no token"));
        assert_eq!(e.status(), StatusCode::UNAUTHORIZED);
    }
}
