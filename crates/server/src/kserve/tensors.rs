//! KServe v2 tensors to and from a generation: the inputs `text_input` (BYTES, a raw
//! prompt), `sampling_parameters` (BYTES, a JSON object) and `stream` (BOOL), and the
//! output `text_output` (BYTES). BYTES elements travel either in
//! `contents.bytes_contents` or in `raw_input_contents`, each element a 4-byte
//! little-endian length and its bytes.

use std::collections::HashMap;

use modelpool_proto::kserve::infer_parameter::ParameterChoice;
use modelpool_proto::kserve::model_infer_request::InferInputTensor;
use modelpool_proto::kserve::model_infer_response::InferOutputTensor;
use modelpool_proto::kserve::{InferParameter, ModelInferRequest, ModelInferResponse};
use modelpool_proto::v1::{FinishReason, GenerateChunk, SamplingParams};
use serde_json::Value;
use tonic::Status;

use crate::error::ServerError;
use crate::inference::{Generation, Prompt};

pub(super) const TEXT_INPUT: &str = "text_input";
pub(super) const SAMPLING_INPUT: &str = "sampling_parameters";
pub(super) const STREAM_INPUT: &str = "stream";
pub(super) const TEXT_OUTPUT: &str = "text_output";
/// The request parameter with which a client asks for an empty last response.
pub(super) const ASK_FINAL: &str = "triton_enable_empty_final_response";
/// The response parameter that marks the last response of a request.
pub(super) const FINAL: &str = "triton_final_response";
/// Inputs Triton's LLM backends take that change nothing here.
const IGNORED_INPUTS: [&str; 1] = ["exclude_input_in_output"];

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Status {
    ServerError::invalid(field, reason).into()
}

/// A request ready to run.
pub(super) struct Parsed {
    pub generation: Generation,
    /// One response per text delta (else one with the whole text).
    pub stream: bool,
    /// The client asked for `triton_final_response`.
    pub mark_final: bool,
}

/// Reads `r` into a generation of `kind`, with the client's deadline.
pub(super) fn parse(
    r: &ModelInferRequest,
    kind: &'static str,
    deadline: Option<tokio::time::Instant>,
) -> Result<Parsed, Status> {
    check_version(&r.model_version, "model_version")?;
    if !r.raw_input_contents.is_empty() && r.raw_input_contents.len() != r.inputs.len() {
        return Err(invalid(
            "raw_input_contents",
            format!(
                "{} entries for {} inputs; send one per input or none",
                r.raw_input_contents.len(),
                r.inputs.len()
            ),
        ));
    }
    let (mut prompt, mut sampling, mut stream) = (None, None, false);
    for (i, input) in r.inputs.iter().enumerate() {
        let raw = r.raw_input_contents.get(i).map(Vec::as_slice);
        match input.name.as_str() {
            TEXT_INPUT => prompt = Some(one_text(i, input, raw)?),
            SAMPLING_INPUT => sampling = Some(sampling_json(&one_text(i, input, raw)?)?),
            STREAM_INPUT => stream = one_bool(i, input, raw)?,
            name if IGNORED_INPUTS.contains(&name) => {}
            other => {
                return Err(invalid(
                    format!("inputs[{i}].name"),
                    format!("unknown input {other:?}; this model takes {TEXT_INPUT}, {SAMPLING_INPUT} and {STREAM_INPUT}"),
                ))
            }
        }
    }
    if let Some((i, o)) = r
        .outputs
        .iter()
        .enumerate()
        .find(|(_, o)| o.name != TEXT_OUTPUT)
    {
        return Err(invalid(
            format!("outputs[{i}].name"),
            format!(
                "unknown output {:?}; this model answers {TEXT_OUTPUT}",
                o.name
            ),
        ));
    }
    let prompt = prompt.ok_or_else(|| invalid("inputs", format!("{TEXT_INPUT} is required")))?;
    let mark_final = matches!(
        r.parameters
            .get(ASK_FINAL)
            .and_then(|p| p.parameter_choice.as_ref()),
        Some(ParameterChoice::BoolParam(true))
    );
    Ok(Parsed {
        generation: Generation {
            model: r.model_name.clone(),
            prompt: Prompt::Raw(prompt),
            sampling,
            deadline,
            kind,
            traceparent: None,
        },
        stream,
        mark_final,
    })
}

/// modelpool serves one version of each model: "" or "1".
pub(super) fn check_version(version: &str, field: &str) -> Result<(), Status> {
    match version {
        "" | "1" => Ok(()),
        other => Err(invalid(
            field,
            format!("modelpool serves one version of each model, \"1\"; got {other:?}"),
        )),
    }
}

/// The one BYTES element of input `i`, as UTF-8.
fn one_text(i: usize, input: &InferInputTensor, raw: Option<&[u8]>) -> Result<String, Status> {
    let field = format!("inputs[{i}]");
    if input.datatype != "BYTES" {
        return Err(invalid(
            format!("{field}.datatype"),
            format!("{} must be BYTES, got {:?}", input.name, input.datatype),
        ));
    }
    let mut elements = match raw {
        Some(raw) => split_bytes(raw).map_err(|reason| invalid(&field, reason))?,
        None => input
            .contents
            .as_ref()
            .map(|c| c.bytes_contents.clone())
            .unwrap_or_default(),
    };
    if elements.len() != 1 {
        return Err(invalid(
            field,
            format!(
                "{} must hold one element, got {}",
                input.name,
                elements.len()
            ),
        ));
    }
    String::from_utf8(elements.remove(0)).map_err(|e| {
        invalid(
            format!("inputs[{i}]"),
            format!("{} is not UTF-8: {e}", input.name),
        )
    })
}

fn one_bool(i: usize, input: &InferInputTensor, raw: Option<&[u8]>) -> Result<bool, Status> {
    if input.datatype != "BOOL" {
        return Err(invalid(
            format!("inputs[{i}].datatype"),
            format!("{} must be BOOL, got {:?}", input.name, input.datatype),
        ));
    }
    let values: Vec<bool> = match raw {
        Some(raw) => raw.iter().map(|b| *b != 0).collect(),
        None => input
            .contents
            .as_ref()
            .map(|c| c.bool_contents.clone())
            .unwrap_or_default(),
    };
    match values.as_slice() {
        [one] => Ok(*one),
        _ => Err(invalid(
            format!("inputs[{i}]"),
            format!("{} must hold one element, got {}", input.name, values.len()),
        )),
    }
}

/// Triton's serialization of BYTES elements: a 4-byte little-endian length, the bytes.
pub(super) fn split_bytes(mut raw: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    while !raw.is_empty() {
        let Some((len, rest)) = raw.split_first_chunk::<4>() else {
            return Err(format!(
                "{} trailing bytes are not a length prefix",
                raw.len()
            ));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return Err(format!("element of {len} bytes, only {} left", rest.len()));
        }
        out.push(rest[..len].to_vec());
        raw = &rest[len..];
    }
    Ok(out)
}

/// One BYTES element, serialized.
pub(super) fn join_bytes(element: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(element.len() + 4);
    out.extend_from_slice(&(element.len() as u32).to_le_bytes());
    out.extend_from_slice(element);
    out
}

/// `sampling_parameters`: `max_tokens`, `temperature`, `top_p`, `top_k`, `seed` (numbers,
/// or numbers as strings, as Triton's LLM examples send them) and `stop` (a string or
/// a list). Values are range-checked by the shared validation.
fn sampling_json(text: &str) -> Result<SamplingParams, Status> {
    let field = |k: &str| format!("{SAMPLING_INPUT}.{k}");
    let value: Value = serde_json::from_str(text)
        .map_err(|e| invalid(SAMPLING_INPUT, format!("not JSON: {e}")))?;
    let Value::Object(map) = value else {
        return Err(invalid(SAMPLING_INPUT, "must be a JSON object"));
    };
    let mut s = SamplingParams::default();
    for (key, v) in &map {
        let number = || -> Result<f64, Status> {
            let n = match v {
                Value::String(t) => t.trim().parse::<f64>().ok(),
                other => other.as_f64(),
            };
            n.ok_or_else(|| invalid(field(key), format!("must be a number, got {v}")))
        };
        let whole = |max: f64| -> Result<u64, Status> {
            let n = number()?;
            if n.fract() != 0.0 || !(0.0..=max).contains(&n) {
                return Err(invalid(
                    field(key),
                    format!("must be a whole number in 0..={max}, got {v}"),
                ));
            }
            Ok(n as u64)
        };
        match key.as_str() {
            "max_tokens" => s.max_tokens = Some(whole(f64::from(u32::MAX))? as u32),
            "temperature" => s.temperature = Some(number()? as f32),
            "top_p" => s.top_p = Some(number()? as f32),
            "top_k" => s.top_k = Some(whole(f64::from(u32::MAX))? as u32),
            "seed" => s.seed = Some(whole(u64::MAX as f64)?),
            "stop" => {
                s.stop = stop_list(v)
                    .ok_or_else(|| invalid(field(key), "must be a string or a list of strings"))?
            }
            other => {
                return Err(invalid(
                    field(other),
                    "unknown; known: max_tokens, temperature, top_p, top_k, seed, stop",
                ))
            }
        }
    }
    Ok(s)
}

fn stop_list(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(list) => list.iter().map(|s| s.as_str().map(str::to_owned)).collect(),
        _ => None,
    }
}

/// A response of request `id` for `model`: `text` as `text_output` (no outputs when
/// `None`), with `parameters`.
pub(super) fn response(
    model: &str,
    id: &str,
    text: Option<&str>,
    parameters: HashMap<String, InferParameter>,
) -> ModelInferResponse {
    let (outputs, raw) = match text {
        Some(text) => (
            vec![InferOutputTensor {
                name: TEXT_OUTPUT.into(),
                datatype: "BYTES".into(),
                shape: vec![1],
                ..Default::default()
            }],
            vec![join_bytes(text.as_bytes())],
        ),
        None => (Vec::new(), Vec::new()),
    };
    ModelInferResponse {
        model_name: model.to_owned(),
        model_version: "1".into(),
        id: id.to_owned(),
        parameters,
        outputs,
        raw_output_contents: raw,
    }
}

/// The parameters of a request's last response: why it ended and its token counts.
pub(super) fn finish_parameters(last: &GenerateChunk) -> HashMap<String, InferParameter> {
    let usage = last.usage.unwrap_or_default();
    let reason = match last.finish_reason() {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Unspecified => "stop",
    };
    HashMap::from([
        (
            "finish_reason".into(),
            param(ParameterChoice::StringParam(reason.into())),
        ),
        (
            "prompt_tokens".into(),
            param(ParameterChoice::Int64Param(usage.prompt_tokens.into())),
        ),
        (
            "completion_tokens".into(),
            param(ParameterChoice::Int64Param(usage.completion_tokens.into())),
        ),
        (
            "cached_tokens".into(),
            param(ParameterChoice::Int64Param(usage.cached_tokens.into())),
        ),
    ])
}

pub(super) fn param(choice: ParameterChoice) -> InferParameter {
    InferParameter {
        parameter_choice: Some(choice),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelpool_proto::kserve::InferTensorContents;

    fn input(name: &str, datatype: &str) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape: vec![1],
            ..Default::default()
        }
    }

    #[test]
    fn bytes_round_trip_and_truncation_is_refused() {
        let raw = [join_bytes(b"hi"), join_bytes(b"")].concat();
        assert_eq!(split_bytes(&raw).unwrap(), vec![b"hi".to_vec(), Vec::new()]);
        assert!(split_bytes(&raw[..3]).is_err());
        assert!(split_bytes(&[5, 0, 0, 0, b'a']).is_err());
    }

    #[test]
    fn raw_and_typed_contents_both_read() {
        let mut text = input(TEXT_INPUT, "BYTES");
        text.contents = Some(InferTensorContents {
            bytes_contents: vec![b"Once".to_vec()],
            ..Default::default()
        });
        let r = ModelInferRequest {
            model_name: "m".into(),
            inputs: vec![text],
            ..Default::default()
        };
        let p = parse(&r, "t", None).unwrap();
        assert!(matches!(p.generation.prompt, Prompt::Raw(ref t) if t == "Once"));
        assert!(!p.stream && !p.mark_final);

        let r = ModelInferRequest {
            model_name: "m".into(),
            inputs: vec![
                input(TEXT_INPUT, "BYTES"),
                input(SAMPLING_INPUT, "BYTES"),
                input(STREAM_INPUT, "BOOL"),
            ],
            raw_input_contents: vec![
                join_bytes(b"Once"),
                join_bytes(br#"{"max_tokens": "8", "temperature": 0.5, "stop": "\n"}"#),
                vec![1],
            ],
            parameters: HashMap::from([(
                ASK_FINAL.into(),
                param(ParameterChoice::BoolParam(true)),
            )]),
            ..Default::default()
        };
        let p = parse(&r, "t", None).unwrap();
        assert!(p.stream && p.mark_final);
        let s = p.generation.sampling.unwrap();
        assert_eq!(
            (s.max_tokens, s.temperature, s.stop),
            (Some(8), Some(0.5), vec!["\n".to_owned()])
        );
    }

    #[test]
    fn bad_requests_name_the_field() {
        let with = |inputs: Vec<InferInputTensor>, raw: Vec<Vec<u8>>| ModelInferRequest {
            model_name: "m".into(),
            inputs,
            raw_input_contents: raw,
            ..Default::default()
        };
        let cases = [
            (with(vec![], vec![]), "inputs: text_input is required"),
            (
                with(vec![input("image", "FP32")], vec![vec![]]),
                "inputs[0].name",
            ),
            (
                with(vec![input(TEXT_INPUT, "FP32")], vec![vec![]]),
                "inputs[0].datatype",
            ),
            (
                with(
                    vec![input(TEXT_INPUT, "BYTES"), input(SAMPLING_INPUT, "BYTES")],
                    vec![join_bytes(b"x"), join_bytes(br#"{"beams": 2}"#)],
                ),
                "sampling_parameters.beams",
            ),
            (
                with(
                    vec![input(TEXT_INPUT, "BYTES"), input(SAMPLING_INPUT, "BYTES")],
                    vec![join_bytes(b"x"), join_bytes(br#"{"max_tokens": 1.5}"#)],
                ),
                "sampling_parameters.max_tokens",
            ),
            (
                with(vec![input(TEXT_INPUT, "BYTES")], vec![]),
                "inputs[0]: text_input must hold one element",
            ),
        ];
        for (r, says) in cases {
            let err = parse(&r, "t", None).err().expect("refused");
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.message().starts_with(says), "{says}: {}", err.message());
        }
        assert!(check_version("2", "model_version").is_err());
    }
}
