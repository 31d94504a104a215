//! OpenAI request bodies into [`Generation`]s. Only the shape is checked here (types,
//! fields modelpool does not support); values (ranges, sizes, the model id) are checked
//! by the one validation every front end shares, and its errors name the same fields.

use axum::http::HeaderMap;
use modelpool_proto::v1::{ChatMessage, Role, SamplingParams};
use modelpool_proto::worker::v1::ChatPrompt;
use serde_json::{Map, Value};

use super::ApiError;
use crate::inference::{Generation, Prompt};

/// A request ready to run.
pub(super) struct Parsed {
    pub generation: Generation,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the usage and no choices.
    pub include_usage: bool,
}

/// The fields of a JSON object, with `null` read as absent (as OpenAI does).
struct Fields<'a>(&'a Map<String, Value>);

type Field<T> = Result<Option<T>, ApiError>;

impl<'a> Fields<'a> {
    fn of(body: &'a Value) -> Result<Self, ApiError> {
        body.as_object()
            .map(Fields)
            .ok_or_else(|| ApiError::invalid("body", "must be a JSON object"))
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn string(&self, key: &str) -> Field<&'a str> {
        self.get(key)
            .map(|v| v.as_str().ok_or_else(|| wrong_type(key, "a string", v)))
            .transpose()
    }

    fn bool(&self, key: &str) -> Field<bool> {
        self.get(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| wrong_type(key, "true or false", v))
            })
            .transpose()
    }

    fn number(&self, key: &str) -> Field<f32> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .map(|n| n as f32)
                    .ok_or_else(|| wrong_type(key, "a number", v))
            })
            .transpose()
    }

    /// A whole number in `min..=max`.
    fn integer(&self, key: &str, min: u64, max: u64) -> Field<u64> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        match v.as_u64() {
            Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ if v.is_number() => Err(ApiError::invalid(
                key,
                format!("must be a whole number in {min}..={max}, got {v}"),
            )),
            _ => Err(wrong_type(key, "a whole number", v)),
        }
    }
}

fn wrong_type(key: &str, want: &str, got: &Value) -> ApiError {
    let kind = match got {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    };
    ApiError::invalid(key, format!("must be {want}, got {kind}"))
}

/// `POST /v1/chat/completions`.
pub(super) fn chat(body: &Value, headers: &HeaderMap) -> Result<Parsed, ApiError> {
    let f = Fields::of(body)?;
    refuse_unsupported(&f, &["tools", "functions", "audio"])?;
    if f.bool("logprobs")? == Some(true) {
        return Err(ApiError::invalid("logprobs", "not supported"));
    }
    if let Some(format) = f.get("response_format") {
        let kind = format.get("type").and_then(Value::as_str).unwrap_or("");
        if kind != "text" {
            return Err(ApiError::invalid(
                "response_format",
                format!("only {{\"type\": \"text\"}} is supported, got {format}"),
            ));
        }
    }
    let messages = match f.get("messages") {
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(i, m)| message(i, m))
            .collect::<Result<Vec<_>, _>>()?,
        Some(other) => return Err(wrong_type("messages", "a list of messages", other)),
        None => Vec::new(),
    };
    let prompt = Prompt::Chat(ChatPrompt { messages });
    parsed(&f, prompt, "openai.chat", headers)
}

/// `POST /v1/completions`.
pub(super) fn completion(body: &Value, headers: &HeaderMap) -> Result<Parsed, ApiError> {
    let f = Fields::of(body)?;
    if f.bool("echo")? == Some(true) {
        return Err(ApiError::invalid("echo", "not supported"));
    }
    if f.integer("best_of", 0, u64::MAX)?.is_some_and(|n| n > 1) {
        return Err(ApiError::invalid("best_of", "only 1 is supported"));
    }
    if f.string("suffix")?.is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "not supported"));
    }
    if f.get("logprobs").is_some() {
        return Err(ApiError::invalid("logprobs", "not supported"));
    }
    let text = match f.get("prompt") {
        None => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(list)) => match list.as_slice() {
            [Value::String(s)] => s.clone(),
            [_] => {
                return Err(ApiError::invalid(
                    "prompt",
                    "token arrays are not supported; send text",
                ))
            }
            _ => {
                return Err(ApiError::invalid(
                    "prompt",
                    format!("one prompt per request is supported, got {}", list.len()),
                ))
            }
        },
        Some(other) => return Err(wrong_type("prompt", "a string", other)),
    };
    parsed(&f, Prompt::Raw(text), "openai.completion", headers)
}

fn refuse_unsupported(f: &Fields<'_>, keys: &[&str]) -> Result<(), ApiError> {
    for key in keys {
        let present = match f.get(key) {
            Some(Value::Array(list)) => !list.is_empty(),
            Some(_) => true,
            None => false,
        };
        if present {
            return Err(ApiError::invalid(*key, "not supported by modelpool"));
        }
    }
    Ok(())
}

/// What chat and completions share: model, stream flags, sampling.
fn parsed(
    f: &Fields<'_>,
    prompt: Prompt,
    kind: &'static str,
    headers: &HeaderMap,
) -> Result<Parsed, ApiError> {
    let model = f.string("model")?.unwrap_or_default().to_owned();
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        Some(Value::Object(o)) => Fields(o).bool("include_usage").map_err(|_| {
            ApiError::invalid("stream_options.include_usage", "must be true or false")
        })?,
        Some(other) => return Err(wrong_type("stream_options", "an object", other)),
        None => None,
    }
    .unwrap_or(false);
    let generation = Generation {
        model,
        prompt,
        sampling: Some(sampling(f)?),
        deadline: None,
        kind,
        traceparent: headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    };
    Ok(Parsed {
        generation,
        stream,
        include_usage,
    })
}

fn sampling(f: &Fields<'_>) -> Result<SamplingParams, ApiError> {
    if let Some(n) = f.integer("n", 0, u64::MAX)? {
        if n != 1 {
            return Err(ApiError::invalid(
                "n",
                format!("only 1 choice per request is supported, got {n}"),
            ));
        }
    }
    let limit = u64::from(u32::MAX);
    let max_tokens = match f.integer("max_completion_tokens", 1, limit)? {
        Some(n) => Some(n),
        None => f.integer("max_tokens", 1, limit)?,
    };
    let stop = match f.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::invalid("stop", "must be a string or a list of strings"))?,
        Some(other) => return Err(wrong_type("stop", "a string or a list of strings", other)),
    };
    Ok(SamplingParams {
        max_tokens: max_tokens.map(|n| n as u32),
        temperature: f.number("temperature")?,
        top_p: f.number("top_p")?,
        top_k: f.integer("top_k", 0, limit)?.map(|n| n as u32),
        seed: f.integer("seed", 0, u64::MAX)?,
        stop,
    })
}

/// One chat message: `role` and `content` (text, or a list of text parts).
fn message(i: usize, m: &Value) -> Result<ChatMessage, ApiError> {
    let key = |k: &str| format!("messages[{i}].{k}");
    let f = Fields::of(m)
        .map_err(|_| ApiError::invalid(format!("messages[{i}]"), "must be an object"))?;
    let role = match f
        .string("role")
        .map_err(|_| ApiError::invalid(key("role"), "must be a string"))?
    {
        Some("system" | "developer") => Role::System,
        Some("user") => Role::User,
        Some("assistant") => Role::Assistant,
        Some(other) => {
            return Err(ApiError::invalid(
                key("role"),
                format!("must be system, developer, user or assistant, got {other:?}"),
            ))
        }
        None => return Err(ApiError::invalid(key("role"), "required")),
    };
    let content = match f.get("content") {
        None => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            text_parts(parts).map_err(|reason| ApiError::invalid(key("content"), reason))?
        }
        Some(other) => {
            return Err(wrong_type(
                &key("content"),
                "a string or a list of text parts",
                other,
            ))
        }
    };
    Ok(ChatMessage {
        role: role.into(),
        content,
    })
}

/// `[{"type": "text", "text": "..."}, ...]` joined; other part types are refused.
fn text_parts(parts: &[Value]) -> Result<String, String> {
    let mut out = String::new();
    for (j, part) in parts.iter().enumerate() {
        match (
            part.get("type").and_then(Value::as_str),
            part.get("text").and_then(Value::as_str),
        ) {
            (Some("text"), Some(text)) => out.push_str(text),
            (kind, _) => {
                return Err(format!(
                    "part {j}: only text parts are supported, got type {}",
                    kind.unwrap_or("(none)")
                ))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn param_of(e: ApiError) -> String {
        e.body()["error"]["param"].as_str().unwrap_or("").to_owned()
    }

    #[test]
    fn chat_fields_become_one_generation() {
        let body = json!({
            "model": "m", "stream": true, "stream_options": {"include_usage": true},
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            ],
            "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 3,
            "stop": "\n", "n": 1, "user": "ignored",
        });
        let p = chat(&body, &HeaderMap::new()).unwrap();
        assert!(p.stream && p.include_usage);
        let s = p.generation.sampling.unwrap();
        assert_eq!(
            (s.max_tokens, s.seed, s.stop),
            (Some(7), Some(3), vec!["\n".to_owned()])
        );
        let Prompt::Chat(c) = p.generation.prompt else {
            panic!("a chat prompt")
        };
        assert_eq!(c.messages[0].role, Role::System as i32);
        assert_eq!(c.messages[1].content, "hi");
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (json!({"model": "m", "messages": [], "n": 2}), "n"),
            (
                json!({"model": "m", "messages": [], "temperature": "hot"}),
                "temperature",
            ),
            (
                json!({"model": "m", "messages": [], "max_tokens": 0}),
                "max_tokens",
            ),
            (json!({"model": "m", "messages": [], "stop": [1]}), "stop"),
            (
                json!({"model": "m", "messages": [{"role": "tool", "content": "x"}]}),
                "messages[0].role",
            ),
            (json!({"model": "m", "messages": "hi"}), "messages"),
            (json!({"model": 5, "messages": []}), "model"),
            (
                json!({"model": "m", "messages": [], "tools": [{}]}),
                "tools",
            ),
            (json!({"model": "m", "messages": [], "seed": -1}), "seed"),
        ];
        for (body, field) in cases {
            let err = chat(&body, &HeaderMap::new()).err().expect("refused");
            assert_eq!(param_of(err), field, "{body}");
        }
        let err = completion(
            &json!({"model": "m", "prompt": ["a", "b"]}),
            &HeaderMap::new(),
        );
        assert_eq!(param_of(err.err().unwrap()), "prompt");
    }

    #[test]
    fn completion_takes_a_string_or_one_element_list() {
        for prompt in [json!("Once"), json!(["Once"])] {
            let p =
                completion(&json!({"model": "m", "prompt": prompt}), &HeaderMap::new()).unwrap();
            assert!(matches!(p.generation.prompt, Prompt::Raw(ref t) if t == "Once"));
            assert!(!p.stream);
        }
    }
}
