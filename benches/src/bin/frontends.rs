//! Decode speed and time to first token through each front end of one server, against
//! `modelpool.v1.Inference/Generate`: the OpenAI-compatible `/v1/completions` streamed
//! as server-sent events over HTTP/1, and KServe v2 `ModelStreamInfer` (decoupled, one
//! response per delta). Same model, raw prompt and greedy settings; runs interleaved
//! (v1, OpenAI, KServe, v1, ...) so machine drift hits every path alike.
//!
//! This binary is also its own worker (`frontends worker ...`).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use futures::StreamExt;
use modelpool_benches::median;
use modelpool_benches::timing::{Run, RunArgs};
use modelpool_proto::kserve::grpc_inference_service_client::GrpcInferenceServiceClient;
use modelpool_proto::kserve::model_infer_request::InferInputTensor;
use modelpool_proto::kserve::ModelInferRequest;
use modelpool_proto::v1::inference_client::InferenceClient;
use modelpool_server::Settings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    run: RunArgs,
}

const PROMPT: &str = "Once upon a time, in a small village by the sea, there lived";
const MODEL: &str = "bench";

/// Figures of one stream, or the error that it produced nothing.
fn figures(start: Instant, stamps: &[Instant], tokens: u32) -> anyhow::Result<Run> {
    modelpool_benches::timing::figures(start, stamps, tokens).context("a run produced nothing")
}

fn main() -> anyhow::Result<()> {
    modelpool_benches::run_as_worker_if_asked();
    let args = Args::parse();
    tokio::runtime::Runtime::new()?.block_on(bench(args))
}

async fn v1(client: &mut InferenceClient<Channel>, max_tokens: u32) -> anyhow::Result<Run> {
    let start = Instant::now();
    let mut stream = client
        .generate(modelpool_benches::greedy_request(MODEL, PROMPT, max_tokens))
        .await?
        .into_inner();
    let (mut stamps, mut tokens) = (Vec::new(), 0);
    while let Some(chunk) = stream.message().await? {
        stamps.push(Instant::now());
        if let Some(u) = chunk.usage {
            tokens = u.completion_tokens;
        }
    }
    figures(start, &stamps, tokens)
}

/// `POST /v1/completions` with `stream: true` over a fresh HTTP/1.0 connection (so the
/// body is the bare event stream, no chunked framing); stamps each event as it lands.
async fn openai(addr: SocketAddr, max_tokens: u32) -> anyhow::Result<Run> {
    let body = serde_json::json!({
        "model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
        "stream": true,
    })
    .to_string();
    let start = Instant::now();
    let mut socket = tokio::net::TcpStream::connect(addr).await?;
    socket.set_nodelay(true)?;
    let request = format!(
        "POST /v1/completions HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(request.as_bytes()).await?;
    let (mut buf, mut stamps, mut events, mut headers_done) = (Vec::new(), Vec::new(), 0, false);
    let mut finish = String::new();
    let mut chunk = [0u8; 16 << 10];
    loop {
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        let now = Instant::now();
        buf.extend_from_slice(&chunk[..n]);
        if !headers_done {
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
                bail!(
                    "OpenAI API answered {head}: {}",
                    String::from_utf8_lossy(&buf[end..])
                );
            }
            buf.drain(..end + 4);
            headers_done = true;
        }
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            let Some(data) = text.lines().find_map(|l| l.strip_prefix("data: ")) else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(data)?;
            if let Some(reason) = v["choices"][0]["finish_reason"].as_str() {
                finish = reason.to_owned();
            }
            stamps.push(now);
            events += 1;
        }
    }
    if finish != "length" {
        bail!("an OpenAI run stopped early ({finish:?} after {events} events)");
    }
    figures(start, &stamps, max_tokens)
}

fn kserve_request(max_tokens: u32) -> ModelInferRequest {
    let bytes = |s: &str| [(s.len() as u32).to_le_bytes().as_slice(), s.as_bytes()].concat();
    let input = |name: &str, datatype: &str| InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape: vec![1],
        ..Default::default()
    };
    let sampling = format!(r#"{{"max_tokens": {max_tokens}, "temperature": 0}}"#);
    ModelInferRequest {
        model_name: MODEL.into(),
        id: "bench".into(),
        inputs: vec![
            input("text_input", "BYTES"),
            input("sampling_parameters", "BYTES"),
            input("stream", "BOOL"),
        ],
        raw_input_contents: vec![bytes(PROMPT), bytes(&sampling), vec![1]],
        ..Default::default()
    }
}

async fn kserve(
    client: &mut GrpcInferenceServiceClient<Channel>,
    max_tokens: u32,
) -> anyhow::Result<Run> {
    use modelpool_proto::kserve::infer_parameter::ParameterChoice;
    let request = futures::stream::iter([kserve_request(max_tokens)]);
    let start = Instant::now();
    let mut stream = client.model_stream_infer(request).await?.into_inner();
    let (mut stamps, mut tokens) = (Vec::new(), 0);
    while let Some(response) = stream.next().await {
        let response = response?;
        if !response.error_message.is_empty() {
            bail!("KServe: {}", response.error_message);
        }
        stamps.push(Instant::now());
        let params = response
            .infer_response
            .map(|r| r.parameters)
            .unwrap_or_default();
        if let Some(ParameterChoice::Int64Param(n)) = params
            .get("completion_tokens")
            .and_then(|p| p.parameter_choice.clone())
        {
            tokens = n as u32;
        }
    }
    figures(start, &stamps, tokens)
}

async fn start(
    model: &Path,
    runtime_dir: &Path,
) -> anyhow::Result<modelpool_server::RunningServer> {
    // One prompt for every run of every front end: with the prefix cache off each one
    // prefills it, instead of the runs after the first sampling from kept logits.
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nopenai_listen = \"127.0.0.1:0\"\nmetrics_listen = \"\"\n\
         [workers]\nruntime_dir = \"{}\"\nexe = \"{}\"\n\
         [[models]]\nid = \"{MODEL}\"\npath = \"{}\"\ncontext_length = 4096\nmax_sequences = 1\n\
         prefix_cache = false\n",
        runtime_dir.display(),
        std::env::current_exe()?.display(),
        model.display()
    );
    Ok(modelpool_server::start(Settings::from_toml(&toml, Path::new("/"))?).await?)
}

fn ratio_line(what: &str, base: &[Run], other: &[Run], f: fn(&Run) -> f64) -> String {
    let ratios: Vec<f64> = base.iter().zip(other).map(|(b, o)| f(o) / f(b)).collect();
    let rounds: Vec<String> = ratios.iter().map(|r| format!("{r:.3}")).collect();
    format!(
        "{what}: median {:.3} (per-round: {})",
        median(&ratios),
        rounds.join(", ")
    )
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let model_path = std::fs::canonicalize(&args.run.model)
        .with_context(|| format!("{} (run `just fetch-models`)", args.run.model.display()))?;
    let runtime = tempfile::tempdir()?;
    let server = start(&model_path, runtime.path()).await?;
    let http = server.openai_addr.context("the OpenAI API is on")?;
    let channel = Channel::from_shared(format!("http://{}", server.local_addr))?
        .connect()
        .await?;
    let mut v1_client = InferenceClient::new(channel.clone());
    let mut kserve_client = GrpcInferenceServiceClient::new(channel);

    // Warm-up: loads the worker and opens every path once.
    v1(&mut v1_client, 8).await?;
    openai(http, 8).await?;
    kserve(&mut kserve_client, 8).await?;
    let (mut base, mut oai, mut ks) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.run.rounds {
        base.push(v1(&mut v1_client, args.run.max_tokens).await?);
        oai.push(openai(http, args.run.max_tokens).await?);
        ks.push(kserve(&mut kserve_client, args.run.max_tokens).await?);
    }
    if base
        .iter()
        .chain(&ks)
        .any(|r| r.tokens != args.run.max_tokens)
    {
        bail!("a run stopped early; pick a prompt that does not end: {base:?} {ks:?}");
    }
    println!(
        "model {}, {} tokens per run, {} interleaved rounds, greedy, raw prompt\n",
        model_path.file_name().unwrap_or_default().to_string_lossy(),
        args.run.max_tokens,
        args.run.rounds
    );
    println!("| path | decode tok/s (median) | time to first token ms (median) |");
    println!("|---|---|---|");
    let tps = |runs: &[Run]| median(&runs.iter().map(|r| r.decode_tok_s).collect::<Vec<_>>());
    let ms = |runs: &[Run]| {
        median(
            &runs
                .iter()
                .map(|r| r.ttft.as_secs_f64() * 1e3)
                .collect::<Vec<_>>(),
        )
    };
    for (name, runs) in [
        ("modelpool.v1 Generate (gRPC)", &base),
        ("OpenAI /v1/completions (HTTP SSE)", &oai),
        ("KServe v2 ModelStreamInfer (gRPC)", &ks),
    ] {
        println!("| {name} | {:.1} | {:.1} |", tps(runs), ms(runs));
    }
    println!();
    let tok = |r: &Run| r.decode_tok_s;
    let ttft = |r: &Run| r.ttft.as_secs_f64();
    println!("{}", ratio_line("decode OpenAI/v1", &base, &oai, tok));
    println!("{}", ratio_line("decode KServe/v1", &base, &ks, tok));
    println!(
        "{}",
        ratio_line("time-to-first-token OpenAI/v1", &base, &oai, ttft)
    );
    println!(
        "{}",
        ratio_line("time-to-first-token KServe/v1", &base, &ks, ttft)
    );
    server.stop().await?;
    Ok(())
}
