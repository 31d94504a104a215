//! Checks a safetensors model directory written by `gguf_to_safetensors` with mistral.rs
//! in-process on the CPU: loads it plain, with ISQ Q8_0, with ISQ Q8_0 writing UQFF, and
//! from that UQFF, then asks one chat question with greedy sampling and prints the
//! answer, the load time and the process memory. `gguf` asks the source GGUF the same
//! question; `tokens` compares both tokenizers id for id.
//!
//! `st_check all` runs every mode in its own process (memory figures stay per mode):
//! `cargo run -p modelpool-benches --bin st_check -- all`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context};
use clap::{Parser, ValueEnum};
use mistralrs::core::TokenizationRequest;
use mistralrs::{
    DeviceMapSetting, GgufModelBuilder, IsqType, Model, Request, RequestBuilder, TextMessageRole,
    TextModelBuilder, TokenSource, UqffTextModelBuilder,
};

const QUESTION: &str = "What is the capital of France?";
/// The system prompt of the project's end-to-end tests.
const SYSTEM_PROMPT: &str = "You are a helpful assistant.";
/// The name mistral.rs is told to write; it writes `q8_0-0.uqff` (shard 0) beside it.
const UQFF_NAME: &str = "q8_0.uqff";
const UQFF_SHARD: &str = "q8_0-0.uqff";

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Mode {
    /// The source GGUF through mistral.rs' GGUF pipeline (the reference).
    Gguf,
    /// The safetensors directory, no ISQ (mistral.rs picks the dtype: F16 on a CPU).
    Plain,
    /// The safetensors directory with ISQ Q8_0.
    Isq,
    /// ISQ Q8_0, writing UQFF into --uqff-dir.
    IsqWrite,
    /// From the UQFF in --uqff-dir alone (its own config, tokenizer, residual weights).
    Uqff,
    /// From the UQFF, with the safetensors directory as the model directory.
    UqffOrig,
    /// Both tokenizers (GGUF and safetensors) on the same inputs, id for id.
    Tokens,
    /// Every mode above, each in its own process.
    All,
}

#[derive(Parser)]
struct Args {
    #[arg(value_enum, default_value = "all")]
    mode: Mode,
    /// The safetensors model directory.
    #[arg(long, default_value = "models/smollm2-135m-st")]
    dir: PathBuf,
    /// The GGUF it was made from.
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    gguf: PathBuf,
    /// Where `isq-write` puts the UQFF and `uqff` reads it.
    #[arg(long, default_value = "models/smollm2-135m-uqff")]
    uqff_dir: PathBuf,
    #[arg(long, default_value_t = 48)]
    max_tokens: usize,
    /// mistral.rs' own logging (dtype chosen, files loaded, ISQ).
    #[arg(long)]
    log: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.mode {
        Mode::All => run_all(&args),
        Mode::Tokens => compare_tokens(&args).await,
        mode => ask(&args, mode).await,
    }
}

/// Each mode in a child process, in order (isq-write before the UQFF loads).
fn run_all(args: &Args) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let modes = [
        Mode::Gguf,
        Mode::Plain,
        Mode::Isq,
        Mode::IsqWrite,
        Mode::Uqff,
        Mode::UqffOrig,
        Mode::Tokens,
    ];
    let mut failed = Vec::new();
    for mode in modes {
        let name = mode.to_possible_value().unwrap().get_name().to_owned();
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg(&name)
            .arg("--dir")
            .arg(&args.dir)
            .arg("--gguf")
            .arg(&args.gguf)
            .arg("--uqff-dir")
            .arg(&args.uqff_dir)
            .arg("--max-tokens")
            .arg(args.max_tokens.to_string());
        if args.log {
            cmd.arg("--log");
        }
        if !cmd.status()?.success() {
            failed.push(name);
        }
    }
    ensure!(failed.is_empty(), "modes failed: {failed:?}");
    Ok(())
}

fn text_builder(model_dir: &Path, log: bool) -> TextModelBuilder {
    configure(TextModelBuilder::new(model_dir.display()), log)
}

/// Local files only, CPU, one sequence, no prefix cache, everything on one device.
fn configure(b: TextModelBuilder, log: bool) -> TextModelBuilder {
    let b = b
        .with_token_source(TokenSource::None)
        .with_force_cpu()
        .with_max_num_seqs(1)
        .with_prefix_cache_n(None)
        .with_device_mapping(DeviceMapSetting::dummy());
    if log {
        b.with_logging()
    } else {
        b
    }
}

async fn load_gguf(path: &Path, log: bool) -> anyhow::Result<Model> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let file = path.file_name().context("--gguf is not a file path")?;
    let b = GgufModelBuilder::new(
        dir.unwrap_or(Path::new(".")).display(),
        vec![file.to_string_lossy().into_owned()],
    )
    .with_token_source(TokenSource::None)
    .with_force_cpu()
    .with_max_num_seqs(1)
    .with_prefix_cache_n(None)
    .with_device_mapping(DeviceMapSetting::dummy());
    let b = if log { b.with_logging() } else { b };
    b.build().await
}

async fn load(args: &Args, mode: Mode) -> anyhow::Result<Model> {
    let uqff_file = args.uqff_dir.join(UQFF_SHARD);
    match mode {
        Mode::Gguf => load_gguf(&args.gguf, args.log).await,
        Mode::Plain => text_builder(&args.dir, args.log).build().await,
        Mode::Isq => {
            text_builder(&args.dir, args.log)
                .with_isq(IsqType::Q8_0)
                .build()
                .await
        }
        Mode::IsqWrite => {
            text_builder(&args.dir, args.log)
                .with_isq(IsqType::Q8_0)
                .write_uqff(args.uqff_dir.join(UQFF_NAME))
                .build()
                .await
        }
        Mode::Uqff => {
            ensure!(
                uqff_file.is_file(),
                "{} missing: run isq-write first",
                uqff_file.display()
            );
            // The UQFF directory as the model, the shard named relative to it; no `with_isq`.
            let b =
                UqffTextModelBuilder::new(args.uqff_dir.display(), vec![PathBuf::from(UQFF_SHARD)]);
            configure(b.into_inner(), args.log).build().await
        }
        Mode::UqffOrig => {
            ensure!(
                uqff_file.is_file(),
                "{} missing: run isq-write first",
                uqff_file.display()
            );
            let abs = std::fs::canonicalize(&uqff_file)?;
            let b = UqffTextModelBuilder::new(args.dir.display(), vec![abs]);
            configure(b.into_inner(), args.log).build().await
        }
        Mode::Tokens | Mode::All => unreachable!(),
    }
}

async fn ask(args: &Args, mode: Mode) -> anyhow::Result<()> {
    let started = Instant::now();
    let model = load(args, mode)
        .await
        .with_context(|| format!("loading for mode {mode:?}"))?;
    let load_s = started.elapsed().as_secs_f64();
    let (rss_load, _) = rss_mib();
    println!("mode={mode:?} load_s={load_s:.2} rss_after_load_mib={rss_load:.0}");
    // Without a system turn SmolLM2's template adds its own; the tests use this one.
    for system in [None, Some(SYSTEM_PROMPT)] {
        let mut request = RequestBuilder::new();
        if let Some(system) = system {
            request = request.add_message(TextMessageRole::System, system);
        }
        let request = request
            .add_message(TextMessageRole::User, QUESTION)
            .set_deterministic_sampler()
            .set_sampler_max_len(args.max_tokens);
        let started = Instant::now();
        let response = model.send_chat_request(request).await?;
        let gen_s = started.elapsed().as_secs_f64();
        let answer = response
            .choices
            .first()
            .and_then(|c| c.message.content.clone())
            .unwrap_or_default();
        println!(
            "  system={system:?} gen_s={gen_s:.2} prompt_tokens={} completion_tokens={}\n  answer: {answer:?}",
            response.usage.prompt_tokens, response.usage.completion_tokens,
        );
    }
    let (rss, hwm) = rss_mib();
    println!("  rss_mib={rss:.0} peak_rss_mib={hwm:.0}");
    if mode == Mode::IsqWrite {
        let mut names: Vec<String> = std::fs::read_dir(&args.uqff_dir)?
            .filter_map(|e| e.ok())
            .map(|e| {
                let size = e.metadata().map_or(0, |m| m.len());
                format!("{} ({size} B)", e.file_name().to_string_lossy())
            })
            .collect();
        names.sort();
        println!("  {} holds: {}", args.uqff_dir.display(), names.join(", "));
    }
    Ok(())
}

/// VmRSS and VmHWM of this process, MiB.
fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Token ids of `text` (`{"Right": raw}` or `{"Left": chat turns}`) from `model`.
async fn tokenize(model: &Model, text: serde_json::Value, chat: bool) -> anyhow::Result<Vec<u32>> {
    // TokenizationRequest is deserializable: this builds its `Either` without naming it.
    let mut req: TokenizationRequest = serde_json::from_value(serde_json::json!({
        "text": text, "tools": null, "add_generation_prompt": chat,
        "add_special_tokens": !chat, "enable_thinking": null, "reasoning_effort": null,
    }))?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    req.response = tx;
    model
        .inner()
        .get_sender(None)?
        .send(Request::Tokenize(req))
        .await?;
    rx.recv().await.context("no tokenizer answer")?
}

async fn compare_tokens(args: &Args) -> anyhow::Result<()> {
    let gguf = load_gguf(&args.gguf, args.log).await?;
    let st = text_builder(&args.dir, args.log).build().await?;
    let texts = [
        "Hello world",
        "  leading spaces,   runs of spaces\n\nnew lines\ttabs \r\n",
        "Numbers 1234567 and 3.14159; don't, I'll, we've, THEY'RE",
        "Unicode: café, naïve, 日本語, 🦀 emoji — dashes",
        "<|im_start|>user\nhi<|im_end|>\n<|endoftext|><repo_name>",
        "fn main() { println!(\"{}\", 1 + 2); } // code",
    ];
    let mut inputs: Vec<(serde_json::Value, bool)> = texts
        .iter()
        .map(|t| (serde_json::json!({"Right": t}), false))
        .collect();
    inputs.push((
        serde_json::json!({"Left": [
            {"role": {"Left": "system"}, "content": {"Left": SYSTEM_PROMPT}},
            {"role": {"Left": "user"}, "content": {"Left": QUESTION}},
        ]}),
        true,
    ));
    let mut all_same = true;
    for (text, chat) in inputs {
        let a = tokenize(&gguf, text.clone(), chat).await?;
        let b = tokenize(&st, text.clone(), chat).await?;
        let same = a == b;
        all_same &= same;
        println!("tokens same={same} n={} {}", a.len(), text);
        if !same {
            println!("  gguf: {a:?}\n  st:   {b:?}");
        }
    }
    println!("mode=Tokens all_same={all_same}");
    ensure!(all_same, "the tokenizers differ");
    Ok(())
}
