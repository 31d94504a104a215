//! `modelpool chat`: talk to a model from the shell. With a prompt it streams one answer
//! to stdout as the tokens arrive; without one it reads user turns from stdin, one per
//! line, and keeps the whole conversation so that every answer sees the turns before it.

use std::io::{IsTerminal, Write};

use modelpool_proto::v1::inference_client::InferenceClient;
use modelpool_proto::v1::{ChatMessage, ChatRequest, GenerateChunk, Role, SamplingParams};
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;

use super::control::Spinner;
use super::format::{enum_name, secs};
use super::{connect, say, status_text, Authed, Bearer, ChatArgs, Failure};

fn message(role: Role, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.to_owned(),
    }
}

pub(super) async fn run(args: ChatArgs) -> Result<(), Failure> {
    let bearer = Bearer::new(args.conn.token.as_deref())?;
    let mut client = InferenceClient::with_interceptor(connect(&args.conn).await?, bearer);
    let mut messages = Vec::new();
    if !args.system.is_empty() {
        messages.push(message(Role::System, &args.system));
    }
    if let Some(prompt) = &args.prompt {
        messages.push(message(Role::User, prompt));
        turn(&mut client, &args, messages, None).await?;
        return Ok(());
    }

    let interactive = std::io::stdin().is_terminal();
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut failed = false;
    let mut turns = 0u32;
    loop {
        if interactive {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        let line = lines
            .next_line()
            .await
            .map_err(|e| Failure::Message(format!("cannot read stdin: {e}")))?;
        let Some(line) = line else {
            if interactive {
                eprintln!();
            }
            break;
        };
        let line = line.trim();
        if line == "/exit" {
            break;
        }
        if line.is_empty() {
            continue;
        }
        turns += 1;
        messages.push(message(Role::User, line));
        match turn(&mut client, &args, messages.clone(), Some(turns)).await {
            Ok(answer) => messages.push(message(Role::Assistant, &answer)),
            // A refused turn (too long for the context, say) is forgotten; the
            // conversation goes on.
            Err(Failure::Status(s)) => {
                eprintln!("modelpool: {}", status_text(&s));
                messages.pop();
                failed = true;
            }
            Err(other) => return Err(other),
        }
    }
    if failed {
        Err(Failure::Reported)
    } else {
        Ok(())
    }
}

/// Streams one answer to stdout and returns its text. With `--json` each chunk is one
/// JSON line (`turn` numbers them in a conversation).
async fn turn(
    client: &mut InferenceClient<Authed>,
    args: &ChatArgs,
    messages: Vec<ChatMessage>,
    turn: Option<u32>,
) -> Result<String, Failure> {
    let request = ChatRequest {
        model: args.model.clone(),
        messages,
        sampling: Some(SamplingParams {
            max_tokens: Some(args.max_tokens),
            temperature: Some(args.temperature),
            ..Default::default()
        }),
    };
    let json = args.conn.json;
    // A cold model loads before its first token: show that something is happening.
    let mut spinner = (!json).then(|| Spinner::start(format!("waiting for {}", args.model)));
    let mut text = String::new();
    let result = async {
        let mut stream = client.chat(request).await?.into_inner();
        while let Some(chunk) = stream.message().await? {
            if let Some(s) = spinner.take() {
                s.stop().await;
            }
            text.push_str(&chunk.text);
            if json {
                say(chunk_json(&chunk, turn))?;
            } else if !chunk.text.is_empty() {
                let mut out = std::io::stdout().lock();
                out.write_all(chunk.text.as_bytes())?;
                out.flush()?;
            }
        }
        Ok::<(), Failure>(())
    }
    .await;
    if let Some(s) = spinner.take() {
        s.stop().await;
    }
    if !json && (result.is_ok() || !text.is_empty()) {
        // End the answer's line, also before an error that cut it short.
        let mut out = std::io::stdout().lock();
        writeln!(out)?;
        out.flush()?;
    }
    result.map(|()| text)
}

fn chunk_json(chunk: &GenerateChunk, turn: Option<u32>) -> Value {
    let mut out = json!({ "text": chunk.text });
    if let Some(n) = turn {
        out["turn"] = json!(n);
    }
    if let Some(u) = &chunk.usage {
        out["finish_reason"] = json!(enum_name(
            chunk.finish_reason().as_str_name(),
            "FINISH_REASON_"
        ));
        out["usage"] = json!({
            "prompt_tokens": u.prompt_tokens,
            "cached_tokens": u.cached_tokens,
            "completion_tokens": u.completion_tokens,
            "time_to_first_token_s": secs(u.time_to_first_token.as_ref()),
            "load_wait_s": secs(u.load_wait.as_ref()),
            "cold_start": u.cold_start,
            "total_time_s": secs(u.total_time.as_ref()),
        });
    }
    out
}
