//! `ModelStreamInfer`: the responses of every request a client sends on one stream,
//! merged into the one response stream, with no task or channel between the worker's
//! text and the client (the same path as `modelpool.v1`). Each request is a stream of
//! its own responses: open the generation, then answer its chunks. [`Responses`] reads
//! requests as they arrive and polls the running ones fairly. Dropping it (the client
//! went away) drops every generation's chunks, which cancels them.

use std::collections::HashMap;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::stream::{self, BoxStream, SelectAll};
use futures::{Stream, StreamExt};
use modelpool_proto::kserve::infer_parameter::ParameterChoice;
use modelpool_proto::kserve::{
    InferParameter, ModelInferRequest, ModelInferResponse, ModelStreamInferResponse,
};
use modelpool_proto::v1::GenerateChunk;
use tonic::{Status, Streaming};

use super::tensors::{finish_parameters, param, parse, response, FINAL};
use crate::inference::InferenceService;

/// A failed request of a stream: the stream stays open for the others.
fn stream_error(model: &str, id: &str, status: &Status) -> ModelStreamInferResponse {
    ModelStreamInferResponse {
        error_message: status.message().to_owned(),
        infer_response: Some(response(model, id, None, HashMap::new())),
    }
}

fn ok(resp: ModelInferResponse) -> ModelStreamInferResponse {
    ModelStreamInferResponse {
        error_message: String::new(),
        infer_response: Some(resp),
    }
}

/// How one request is answered, chunk by chunk.
struct Answer {
    model: String,
    id: String,
    /// One response per text delta (else one with the whole text).
    stream: bool,
    /// The client asked for `triton_final_response`.
    mark_final: bool,
    /// The text so far, when not streaming.
    text: String,
    /// A response went out for this request.
    sent: bool,
    done: bool,
}

impl Answer {
    fn flag(&self, last: bool) -> HashMap<String, InferParameter> {
        if self.mark_final {
            HashMap::from([(FINAL.to_owned(), param(ParameterChoice::BoolParam(last)))])
        } else {
            HashMap::new()
        }
    }

    fn reply(
        &self,
        text: Option<&str>,
        params: HashMap<String, InferParameter>,
    ) -> ModelStreamInferResponse {
        ok(response(&self.model, &self.id, text, params))
    }

    /// The responses to one chunk: none, a delta, or the last ones.
    fn responses(&mut self, item: Result<GenerateChunk, Status>) -> Vec<ModelStreamInferResponse> {
        let out = self.respond(item);
        self.sent |= !out.is_empty();
        out
    }

    fn respond(&mut self, item: Result<GenerateChunk, Status>) -> Vec<ModelStreamInferResponse> {
        let chunk = match item {
            Ok(chunk) => chunk,
            Err(status) => {
                self.done = true;
                return vec![stream_error(&self.model, &self.id, &status)];
            }
        };
        if chunk.usage.is_none() {
            if !self.stream {
                self.text.push_str(&chunk.text);
                return Vec::new();
            }
            return match chunk.text.is_empty() {
                true => Vec::new(),
                false => vec![self.reply(Some(&chunk.text), self.flag(false))],
            };
        }
        self.done = true;
        let mut params = finish_parameters(&chunk);
        params.extend(self.flag(true));
        match (self.stream, self.mark_final) {
            (false, _) => {
                self.text.push_str(&chunk.text);
                vec![self.reply(Some(&self.text), params)]
            }
            // The last delta carries the finish reason when no empty final is asked
            // for; a generation that wrote nothing still answers once, with its reason.
            (true, false) if chunk.text.is_empty() && self.sent => Vec::new(),
            (true, false) => vec![self.reply(Some(&chunk.text), params)],
            (true, true) => {
                let mut out = Vec::new();
                if !chunk.text.is_empty() {
                    out.push(self.reply(Some(&chunk.text), self.flag(false)));
                }
                out.push(self.reply(None, params));
                out
            }
        }
    }
}

/// One request's responses: its generation opened (waiting for its model like any
/// request), then the answers to its chunks; an error is one error response.
fn request_responses(
    inference: InferenceService,
    r: ModelInferRequest,
    deadline: Option<tokio::time::Instant>,
) -> BoxStream<'static, ModelStreamInferResponse> {
    stream::once(async move {
        let (model, id) = (r.model_name.clone(), r.id.clone());
        let opened = match parse(&r, "kserve.stream", deadline) {
            Ok(p) => {
                let modes = (p.stream, p.mark_final);
                inference
                    .open(p.generation)
                    .await
                    .map(|chunks| (chunks, modes))
            }
            Err(status) => Err(status),
        };
        let (chunks, (stream, mark_final)) = match opened {
            Ok(v) => v,
            Err(status) => return stream::iter([stream_error(&model, &id, &status)]).boxed(),
        };
        let answer = Answer {
            model,
            id,
            stream,
            mark_final,
            text: String::new(),
            sent: false,
            done: false,
        };
        chunks
            .scan(answer, |answer, item| {
                let out = (!answer.done).then(|| answer.responses(item));
                futures::future::ready(out)
            })
            .flat_map(stream::iter)
            .boxed()
    })
    .flatten()
    .boxed()
}

/// The responses of one `ModelStreamInfer` call.
pub(super) struct Responses {
    inference: InferenceService,
    deadline: Option<tokio::time::Instant>,
    /// The client's requests; `None` once it sent its last one (or the read failed).
    requests: Option<Streaming<ModelInferRequest>>,
    running: SelectAll<BoxStream<'static, ModelStreamInferResponse>>,
}

impl Responses {
    pub(super) fn new(
        inference: InferenceService,
        requests: Streaming<ModelInferRequest>,
        deadline: Option<tokio::time::Instant>,
    ) -> Self {
        Self {
            inference,
            deadline,
            requests: Some(requests),
            running: SelectAll::new(),
        }
    }
}

impl Stream for Responses {
    type Item = Result<ModelStreamInferResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        // Start every request that has arrived.
        while let Some(requests) = this.requests.as_mut() {
            match requests.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(r))) => {
                    let responses = request_responses(this.inference.clone(), r, this.deadline);
                    this.running.push(responses);
                }
                Poll::Ready(Some(Err(status))) => {
                    this.requests = None;
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(None) => this.requests = None,
                Poll::Pending => break,
            }
        }
        match this.running.poll_next_unpin(cx) {
            Poll::Ready(Some(resp)) => Poll::Ready(Some(Ok(resp))),
            // Nothing running: the call ends once the client sent its last request.
            Poll::Ready(None) if this.requests.is_none() => Poll::Ready(None),
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelpool_proto::v1::{FinishReason, Usage};

    fn answer(stream: bool, mark_final: bool) -> Answer {
        Answer {
            model: "m".into(),
            id: "1".into(),
            stream,
            mark_final,
            text: String::new(),
            sent: false,
            done: false,
        }
    }

    fn chunk(text: &str, last: bool) -> Result<GenerateChunk, Status> {
        Ok(GenerateChunk {
            text: text.into(),
            finish_reason: if last { FinishReason::Stop as i32 } else { 0 },
            usage: last.then(Usage::default),
        })
    }

    #[test]
    fn a_streamed_generation_that_wrote_nothing_still_answers_once() {
        let mut a = answer(true, false);
        assert_eq!(a.responses(chunk("", true)).len(), 1);
        assert!(a.done);
    }

    #[test]
    fn a_streamed_empty_last_chunk_after_deltas_adds_nothing() {
        let mut a = answer(true, false);
        assert_eq!(a.responses(chunk("Par", false)).len(), 1);
        assert_eq!(a.responses(chunk("", true)).len(), 0);
    }

    #[test]
    fn a_final_flag_is_one_more_empty_response() {
        let mut a = answer(true, true);
        assert_eq!(a.responses(chunk("is", true)).len(), 2);
    }
}
