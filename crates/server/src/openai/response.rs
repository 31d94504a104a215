//! Runs a parsed request and answers in OpenAI's shapes: one JSON completion, or
//! server-sent events (one chunk per text delta, a last chunk with the finish reason,
//! optionally one with the usage, then `data: [DONE]`). While the model loads, a
//! streaming client gets SSE comment lines (`: loading <id> … 3s`), which clients
//! ignore, so the connection stays alive and a person watching sees why it is slow.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::{Duration, Instant, SystemTime};

use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::future::BoxFuture;
use futures::StreamExt;
use modelpool_pool::SlotState;
use modelpool_proto::v1::{FinishReason, GenerateChunk};
use serde_json::{json, Value};
use tonic::Status;

use super::request::Parsed;
use super::{json_response, ApiError};
use crate::inference::{collect_text, ChunkStream, InferenceService};

/// How often a waiting stream hears why.
const LOADING_COMMENT_EVERY: Duration = Duration::from_secs(1);

/// Which endpoint: the shapes differ.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Chat,
    Text,
}

/// The envelope every object of one response shares.
struct Completion {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
}

impl Completion {
    fn new(kind: Kind, model: &str) -> Self {
        let prefix = match kind {
            Kind::Chat => "chatcmpl",
            Kind::Text => "cmpl",
        };
        Self {
            kind,
            id: format!("{prefix}-{}", crate::inference::next_request_id()),
            created: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model: model.to_owned(),
        }
    }

    fn object(&self, streamed: bool) -> &'static str {
        match (self.kind, streamed) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }

    fn envelope(&self, streamed: bool, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(streamed),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// The whole answer of a non-streamed request.
    fn full(&self, text: &str, last: &GenerateChunk) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish_reason(last),
            }),
            Kind::Text => json!({
                "index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason(last),
            }),
        };
        let mut out = self.envelope(false, json!([choice]));
        out["usage"] = usage(last);
        out
    }

    /// One streamed delta; `first` adds the assistant role, `finish` the reason.
    fn delta(&self, text: &str, first: bool, finish: Option<&str>) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = json!({ "content": text });
                if first {
                    delta["role"] = json!("assistant");
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Text => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
            }
        };
        self.envelope(true, json!([choice]))
    }
}

fn finish_reason(chunk: &GenerateChunk) -> &'static str {
    match chunk.finish_reason() {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Unspecified => "stop",
    }
}

fn usage(chunk: &GenerateChunk) -> Value {
    let u = chunk.usage.unwrap_or_default();
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": { "cached_tokens": u.cached_tokens },
    })
}

/// Runs `parsed` and answers.
pub(super) async fn run(inference: &InferenceService, parsed: Parsed, kind: Kind) -> Response {
    let completion = Completion::new(kind, &parsed.generation.model);
    let model = parsed.generation.model.clone();
    if !parsed.stream {
        return match inference.open(parsed.generation).await {
            Ok(chunks) => collect(&completion, chunks).await,
            Err(status) => ApiError::from(status).into_response(),
        };
    }
    let service = inference.clone();
    let open: BoxFuture<'static, Result<ChunkStream, Status>> =
        Box::pin(async move { service.open(parsed.generation).await });
    // A resident model answers errors with their HTTP status before any event; one
    // that must load first commits to the event stream at once, so the client hears
    // why it waits (a failure then arrives as an error event).
    let phase = if resident(inference, &model) {
        match open.await {
            Ok(chunks) => Phase::Streaming(chunks),
            Err(status) => return ApiError::from(status).into_response(),
        }
    } else {
        Phase::Opening {
            open,
            ticks: tokio::time::interval(LOADING_COMMENT_EVERY),
            since: Instant::now(),
        }
    };
    let events = Events {
        phase,
        pending: VecDeque::new(),
        completion,
        include_usage: parsed.include_usage,
        first: true,
        inference: inference.clone(),
    };
    let stream = futures::stream::unfold(events, |mut e| async move {
        let event = e.next().await?;
        Some((Ok::<_, Infallible>(event), e))
    });
    Sse::new(stream).into_response()
}

/// Whether `model` is resident now (a request for an unknown one fails fast too).
fn resident(inference: &InferenceService, model: &str) -> bool {
    inference
        .pool()
        .get(model)
        .map_or(true, |m| m.state == SlotState::Ready)
}

async fn collect(completion: &Completion, chunks: ChunkStream) -> Response {
    match collect_text(chunks).await {
        Ok((text, last)) => json_response(StatusCode::OK, &completion.full(&text, &last)),
        Err(status) => ApiError::from(status).into_response(),
    }
}

enum Phase {
    /// Waiting for the lease (and the load) and the worker stream.
    Opening {
        open: BoxFuture<'static, Result<ChunkStream, Status>>,
        ticks: tokio::time::Interval,
        since: Instant,
    },
    Streaming(ChunkStream),
    Done,
}

/// The event stream of one request. Dropped when the client goes away, which drops
/// the chunk stream (or the pending open) and so cancels the generation.
struct Events {
    phase: Phase,
    pending: VecDeque<Event>,
    completion: Completion,
    include_usage: bool,
    first: bool,
    inference: InferenceService,
}

impl Events {
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            match &mut self.phase {
                Phase::Done => return None,
                Phase::Opening { open, ticks, since } => {
                    let opened = tokio::select! {
                        opened = open => Ok(opened),
                        _ = ticks.tick() => Err(since.elapsed()),
                    };
                    match opened {
                        Ok(Ok(chunks)) => self.phase = Phase::Streaming(chunks),
                        Ok(Err(status)) => self.fail(status),
                        Err(waited) => return Some(self.waiting(waited)),
                    }
                }
                Phase::Streaming(chunks) => {
                    let item = chunks.next().await;
                    match item {
                        Some(Ok(chunk)) => self.chunk(&chunk),
                        Some(Err(status)) => self.fail(status),
                        None => self.phase = Phase::Done,
                    }
                }
            }
        }
    }

    /// `: loading smollm2 … 2s` while the model loads; `: waiting for smollm2 … 2s`
    /// while it waits for a concurrency slot.
    fn waiting(&self, waited: Duration) -> Event {
        let model = &self.completion.model;
        let loading = self
            .inference
            .pool()
            .get(model)
            .is_ok_and(|m| m.state != SlotState::Ready);
        let what = if loading { "loading" } else { "waiting for" };
        Event::default().comment(format!("{what} {model} … {}s", waited.as_secs()))
    }

    fn chunk(&mut self, chunk: &GenerateChunk) {
        let last = chunk.usage.is_some();
        if !chunk.text.is_empty() || (self.first && !last) {
            let delta = self.completion.delta(&chunk.text, self.first, None);
            self.first = false;
            self.pending.push_back(data(&delta));
        }
        if !last {
            return;
        }
        let reason = finish_reason(chunk);
        let end = self.completion.delta("", self.first, Some(reason));
        self.pending.push_back(data(&end));
        if self.include_usage {
            let mut u = self.completion.envelope(true, json!([]));
            u["usage"] = usage(chunk);
            self.pending.push_back(data(&u));
        }
        self.pending.push_back(Event::default().data("[DONE]"));
        self.phase = Phase::Done;
    }

    /// A failure after the events began: OpenAI's error object as a `data:` event.
    fn fail(&mut self, status: Status) {
        self.pending.push_back(data(&ApiError::from(status).body()));
        self.phase = Phase::Done;
    }
}

fn data(value: &Value) -> Event {
    Event::default().data(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelpool_proto::v1::Usage;

    fn last(reason: FinishReason) -> GenerateChunk {
        GenerateChunk {
            text: String::new(),
            finish_reason: reason as i32,
            usage: Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 3,
                cached_tokens: 4,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn shapes_of_chat_and_text_completions() {
        let chat = Completion::new(Kind::Chat, "m");
        let full = chat.full("Paris", &last(FinishReason::Length));
        assert_eq!(full["object"], "chat.completion");
        assert_eq!(full["choices"][0]["message"]["content"], "Paris");
        assert_eq!(full["choices"][0]["finish_reason"], "length");
        assert_eq!(full["usage"]["total_tokens"], 8);
        assert_eq!(full["usage"]["prompt_tokens_details"]["cached_tokens"], 4);
        let first = chat.delta("Pa", true, None);
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(first["choices"][0]["finish_reason"], Value::Null);
        let text = Completion::new(Kind::Text, "m");
        let full = text.full("ris", &last(FinishReason::Stop));
        assert_eq!(full["object"], "text_completion");
        assert_eq!(full["choices"][0]["text"], "ris");
        assert_eq!(full["choices"][0]["finish_reason"], "stop");
        assert!(chat.id.starts_with("chatcmpl-") && text.id.starts_with("cmpl-"));
    }
}
