//! A multi-turn chat's time to first token, turn by turn (issue 31: prefix reuse, and
//! prefixes kept across eviction). Each chat goes over the OpenAI front end,
//! `POST /v1/chat/completions` streamed with greedy sampling, and resends the whole
//! conversation every turn: the system prompt, then the user turns and the assistant's
//! real previous answers (the server renders the model's chat template). Turn 1 carries
//! a generated document of ~700 tokens and a question; every later turn adds a question
//! of ~40 tokens.
//!
//! Per round, three chats run one after the other, each with its own document (seeded,
//! made here from a fixed word list), so no chat finds another's prefix beyond the
//! system prompt:
//!
//! - modelpool, the model resident throughout;
//! - modelpool with the model evicted (ModelControl `EvictModel`) after turn
//!   `--evict-after`: the next turn's time to first token includes the reload;
//! - llama.cpp's `llama-server` on the same GGUF (one slot, same context,
//!   `cache_prompt: true`, the plain modelpool chat's document), when `just peers`
//!   has built it.
//!
//! Per turn: time to first token (request sent to the first delta with content), prompt
//! and cached tokens from the final usage (`stream_options.include_usage`), time to the
//! end of the stream. Figures are medians over `--rounds`; "TTFT / turn 1" is the median
//! of the per-round ratios. Turn 1 is the baseline without reuse: the model is resident
//! and nothing but the system prompt can be cached. Later turns carry more tokens than
//! turn 1, so the ratio understates what reuse saves against prefilling them whole.
//!
//! modelpool runs with a spill directory (a temporary one beside the model, so the
//! model's copy there is a hard link), where the engine may keep prefixes across an
//! eviction. This binary is also its own worker (`chat_turns worker ...`).
//!
//! `just bench-chat` or `cargo run -p modelpool-benches --bin chat_turns -- --rounds 3`

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use modelpool_benches::median;
use modelpool_benches::peers::{self, LlamaServer, ServerArgs};
use modelpool_proto::v1::model_control_client::ModelControlClient;
use modelpool_proto::v1::EvictModelRequest;
use modelpool_server::Settings;
use serde_json::{json, Value};
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    /// GGUF model.
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// Turns per chat.
    #[arg(long, default_value_t = 10)]
    turns: usize,
    /// Tokens generated per answer.
    #[arg(long, default_value_t = 32)]
    max_tokens: u32,
    /// Context of modelpool's model and of llama-server's one slot.
    #[arg(long, default_value_t = 4096)]
    context: u32,
    /// Times each chat is repeated (with a new document each time); medians per turn.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The evicted chat's model is evicted after this turn (at most `--turns` - 1).
    #[arg(long, default_value_t = 5)]
    evict_after: usize,
    /// Words of the turn-1 document (about 700 tokens with SmolLM2's tokenizer).
    #[arg(long, default_value_t = 595)]
    doc_words: usize,
    /// Leave llama-server out even when it is built.
    #[arg(long)]
    no_llama_server: bool,
}

const MODEL: &str = "chat";
const SYSTEM: &str = "You are a helpful assistant. You answer questions about the document \
                      the user gives you, briefly and only from what the document says.";

fn main() -> anyhow::Result<()> {
    modelpool_benches::run_as_worker_if_asked();
    let args = Args::parse();
    if args.turns == 0 || args.rounds == 0 {
        bail!("--turns and --rounds must be at least 1");
    }
    tokio::runtime::Runtime::new()?.block_on(run(args))
}

/// A small deterministic generator (SplitMix64), so every run sends the same text.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// One word of a space-separated list.
    fn word(&mut self, list: &'static str) -> &'static str {
        self.pick(list.split_whitespace())
    }

    /// One item of a list separated by `sep`.
    fn item(&mut self, list: &'static str, sep: char) -> &'static str {
        self.pick(list.split(sep))
    }

    fn pick<I: Iterator<Item = &'static str> + Clone>(&mut self, mut items: I) -> &'static str {
        let n = items.clone().count() as u64;
        items.nth((self.next() % n) as usize).unwrap_or_default()
    }
}

// Word lists: words split on whitespace, places on commas.
const ADJECTIVES: &str = "old quiet bright small heavy careful young distant narrow busy green \
                          broken patient cold famous simple strange wooden";
const NOUNS: &str = "farmer river teacher market bridge garden engineer village doctor harbor \
                     letter council merchant library storm machine painter road child mill \
                     captain window baker station";
const VERBS: &str = "repaired visited described followed carried painted opened measured \
                     watched crossed moved protected counted remembered built sold found closed";
const PLACES: &str = "north gate,old square,east field,harbor wall,town hall,hill road,small lake,\
                      west bank,train station,central market";
const LINKS: &str = "Later that year,|Because of this,|In the morning,|After the long winter,|\
                     According to the records,|For many weeks,";

/// One sentence of plain English-like text.
fn sentence(rng: &mut Rng) -> String {
    let (a, n, v) = (rng.word(ADJECTIVES), rng.word(NOUNS), rng.word(VERBS));
    let (a2, n2, place) = (rng.word(ADJECTIVES), rng.word(NOUNS), rng.item(PLACES, ','));
    match rng.next() % 4 {
        0 => format!("The {a} {n} {v} the {a2} {n2} near the {place}."),
        1 => format!(
            "{} the {n} {v} the {a2} {n2} by the {place}.",
            rng.item(LINKS, '|')
        ),
        2 => format!("Nobody knew why the {a} {n} {v} the {n2}, but it happened at the {place}."),
        _ => format!("At the {place}, the {a} {n} and the {a2} {n2} {v} everything they could."),
    }
}

/// A document of at least `words` words, in paragraphs of five sentences.
fn document(rng: &mut Rng, words: usize) -> String {
    let (mut text, mut count, mut sentences) = (String::new(), 0, 0);
    while count < words {
        let s = sentence(rng);
        count += s.split_whitespace().count();
        sentences += 1;
        text += &s;
        text += if sentences % 5 == 0 { "\n\n" } else { " " };
    }
    text.trim_end().to_owned()
}

/// The question of turn `turn`: about 40 tokens.
fn question(rng: &mut Rng, turn: usize) -> String {
    let (a, n, place) = (rng.word(ADJECTIVES), rng.word(NOUNS), rng.item(PLACES, ','));
    let (n2, v) = (rng.word(NOUNS), rng.word(VERBS));
    format!(
        "Question {turn}: according to the document, what happened to the {a} {n} near the \
         {place}, and why was it the {n2} who {v} it afterwards? Answer in one short sentence, \
         using only facts from the document."
    )
}

/// A server's OpenAI-compatible chat endpoint on loopback.
struct Endpoint {
    name: &'static str,
    port: u16,
    /// Fields added to every request body.
    extra: Value,
}

/// One turn's figures.
#[derive(Clone, Debug)]
struct Turn {
    ttft: Duration,
    total: Duration,
    prompt_tokens: u64,
    cached_tokens: u64,
    /// The answer, sent back as the assistant's message in the next turn.
    text: String,
}

/// (prompt tokens, cached tokens) of a stream's event: `usage` as OpenAI shapes it, or
/// llama-server's `timings` (`prompt_n` prefilled, `cache_n` reused) when it has none.
fn usage_of(event: &Value) -> Option<(u64, u64)> {
    let usage = &event["usage"];
    if let Some(prompt) = usage["prompt_tokens"].as_u64() {
        let cached = usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .or_else(|| event["timings"]["cache_n"].as_u64())
            .unwrap_or(0);
        return Some((prompt, cached));
    }
    let timings = &event["timings"];
    let (prefilled, cached) = (timings["prompt_n"].as_u64()?, timings["cache_n"].as_u64()?);
    Some((prefilled + cached, cached))
}

/// Sends `messages` as one streamed, greedy chat completion and times it.
async fn ask(ep: &Endpoint, messages: &[Value], max_tokens: u32) -> anyhow::Result<Turn> {
    let mut body = json!({
        "model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
        "stream": true, "stream_options": {"include_usage": true},
    });
    if let (Some(body), Some(extra)) = (body.as_object_mut(), ep.extra.as_object()) {
        body.extend(extra.clone());
    }
    let start = Instant::now();
    let events = peers::post_events(ep.port, "/v1/chat/completions", &body.to_string()).await?;
    let (mut first, mut text, mut usage) = (None, String::new(), None);
    for event in events.iter().filter(|e| e.data != "[DONE]") {
        let v: Value = serde_json::from_str(&event.data)
            .with_context(|| format!("an event that is not JSON: {}", event.data))?;
        if let Some(error) = v.get("error") {
            bail!("{} answered with an error event: {error}", ep.name);
        }
        if let Some(piece) = v["choices"][0]["delta"]["content"].as_str() {
            if !piece.is_empty() {
                first.get_or_insert(event.at);
                text.push_str(piece);
            }
        }
        usage = usage_of(&v).or(usage);
    }
    let first = first.with_context(|| format!("{} streamed no content", ep.name))?;
    let (prompt_tokens, cached_tokens) =
        usage.with_context(|| format!("{}'s stream has no usage", ep.name))?;
    let end = events.last().map_or(first, |e| e.at);
    Ok(Turn {
        ttft: first - start,
        total: end - start,
        prompt_tokens,
        cached_tokens,
        text,
    })
}

/// Evicts modelpool's model after one turn of a chat.
struct Evict<'a> {
    control: &'a mut ModelControlClient<Channel>,
    after: usize,
}

impl Evict<'_> {
    /// Evicts the model and returns how long that took (request to worker gone). A
    /// model still busy with the stream that just ended is retried for a while.
    async fn run(&mut self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            let request = EvictModelRequest { id: MODEL.into() };
            match self.control.evict_model(request).await {
                Ok(r) if r.get_ref().evicted => return Ok(started.elapsed()),
                Ok(_) => bail!("evicting {MODEL}: it was not resident"),
                Err(s)
                    if s.code() == tonic::Code::FailedPrecondition
                        && started.elapsed() < Duration::from_secs(10) =>
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(s) => return Err(s).context("evicting the model"),
            }
        }
    }
}

/// One chat's turns, and how long its eviction took when it had one.
struct ChatRun {
    turns: Vec<Turn>,
    evict: Option<Duration>,
}

/// One whole chat of `args.turns` turns on the document of `seed`.
async fn chat(
    ep: &Endpoint,
    args: &Args,
    seed: u64,
    mut evict: Option<Evict<'_>>,
) -> anyhow::Result<ChatRun> {
    let mut rng = Rng(seed);
    let doc = document(&mut rng, args.doc_words);
    let mut messages = vec![json!({"role": "system", "content": SYSTEM})];
    let mut run = ChatRun {
        turns: Vec::new(),
        evict: None,
    };
    for t in 1..=args.turns {
        let q = question(&mut rng, t);
        let content = if t == 1 {
            format!("Here is a document.\n\n{doc}\n\n{q}")
        } else {
            q
        };
        messages.push(json!({"role": "user", "content": content}));
        let turn = ask(ep, &messages, args.max_tokens)
            .await
            .with_context(|| format!("{}, turn {t}", ep.name))?;
        messages.push(json!({"role": "assistant", "content": turn.text}));
        run.turns.push(turn);
        if let Some(e) = evict.as_mut().filter(|e| e.after == t) {
            run.evict = Some(e.run().await?);
        }
    }
    let ttfts: Vec<String> = run
        .turns
        .iter()
        .map(|t| format!("{:.0}", ms(t.ttft)))
        .collect();
    eprintln!("  {}: TTFT ms per turn {}", ep.name, ttfts.join(", "));
    Ok(run)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The server with the OpenAI API on, `MODEL` on llama.cpp with one sequence, and a
/// spill directory.
async fn start(
    args: &Args,
    model: &Path,
    runtime_dir: &Path,
    spill_dir: &Path,
) -> anyhow::Result<modelpool_server::RunningServer> {
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nopenai_listen = \"127.0.0.1:0\"\nmetrics_listen = \"\"\n\
         [workers]\nruntime_dir = \"{}\"\nexe = \"{}\"\nload_timeout = \"600s\"\n\
         [storage]\nspill_dir = \"{}\"\n\
         [[models]]\nid = \"{MODEL}\"\npath = \"{}\"\nengine = \"llama.cpp\"\n\
         context_length = {}\nmax_sequences = 1\n",
        runtime_dir.display(),
        std::env::current_exe()?.display(),
        spill_dir.display(),
        model.display(),
        args.context,
    );
    Ok(modelpool_server::start(Settings::from_toml(&toml, Path::new("/"))?).await?)
}

/// llama-server on the same file, one slot of `--context`, or why it is left out.
async fn start_llama_server(args: &Args, model: &Path) -> Result<LlamaServer, String> {
    if args.no_llama_server {
        return Err("--no-llama-server".into());
    }
    peers::peer_exe("llama-server").map_err(|e| e.to_string())?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    LlamaServer::start(&ServerArgs {
        model,
        context_total: args.context,
        parallel: 1,
        threads,
        repack: false,
        kv_unified: false,
    })
    .await
    .map_err(|e| format!("it did not start: {e:#}"))
}

/// One warm-up turn, so loads and first-use costs stay out of the measured chats. It
/// has the chats' system prompt, so every chat's turn 1 finds the same prefix cached.
async fn warm_up(ep: &Endpoint) -> anyhow::Result<()> {
    let messages = [
        json!({"role": "system", "content": SYSTEM}),
        json!({"role": "user", "content": "Say hello."}),
    ];
    ask(ep, &messages, 4)
        .await
        .with_context(|| format!("{}: warm-up", ep.name))?;
    Ok(())
}

/// Every round's chats of one server (or one way of running it).
struct Series {
    name: String,
    runs: Vec<ChatRun>,
    /// The turn after which the model was evicted, if it was.
    evicted_after: Option<usize>,
}

impl Series {
    fn new(name: impl Into<String>, evicted_after: Option<usize>) -> Self {
        Self {
            name: name.into(),
            runs: Vec::new(),
            evicted_after,
        }
    }

    /// The median over rounds of `f` of turn `t` (0-based).
    fn per_turn(&self, t: usize, f: impl Fn(&Turn) -> f64) -> f64 {
        median(&self.runs.iter().map(|r| f(&r.turns[t])).collect::<Vec<_>>())
    }

    /// The median over rounds of turn `t`'s TTFT over turn 1's.
    fn ratio(&self, t: usize) -> f64 {
        let ratios: Vec<f64> = self
            .runs
            .iter()
            .map(|r| r.turns[t].ttft.as_secs_f64() / r.turns[0].ttft.as_secs_f64())
            .collect();
        median(&ratios)
    }

    fn print_table(&self) {
        println!("### {}\n", self.name);
        println!("| turn | prompt tokens | cached tokens | TTFT ms | TTFT / turn 1 | total ms |");
        println!("|---|---|---|---|---|---|");
        for t in 0..self.runs[0].turns.len() {
            let mark = if self.evicted_after == Some(t) {
                " (after eviction)"
            } else {
                ""
            };
            println!(
                "| {}{mark} | {:.0} | {:.0} | {:.1} | {:.2} | {:.1} |",
                t + 1,
                self.per_turn(t, |x| x.prompt_tokens as f64),
                self.per_turn(t, |x| x.cached_tokens as f64),
                self.per_turn(t, |x| ms(x.ttft)),
                self.ratio(t),
                self.per_turn(t, |x| ms(x.total)),
            );
        }
        let evicts: Vec<f64> = self.runs.iter().filter_map(|r| r.evict).map(ms).collect();
        if !evicts.is_empty() {
            println!(
                "\nevict after turn {} (request to worker gone): median {:.1} ms",
                self.evicted_after.unwrap_or_default(),
                median(&evicts)
            );
        }
        println!();
    }

    /// Median and worst (with its turn) of the later turns' TTFT / turn 1; `None` for a
    /// one-turn chat.
    fn later_turns(&self) -> Option<(f64, f64, usize)> {
        let turns = self.runs[0].turns.len();
        let ratios: Vec<f64> = (1..turns).map(|t| self.ratio(t)).collect();
        let (worst_at, worst) = ratios
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))?;
        Some((median(&ratios), *worst, worst_at + 2))
    }
}

fn verdict(value: f64, target: f64) -> &'static str {
    if value <= target {
        "met"
    } else {
        "NOT met"
    }
}

/// The ratios against issue 31's targets, and modelpool against llama-server.
fn print_ratios(plain: &Series, evicted: Option<&Series>, peer: Option<&Series>) {
    println!("### Against the targets\n");
    println!(
        "Turn 1 is the baseline: a resident model that has only the system prompt cached. \
         Later turns carry more tokens than turn 1, so their ratio understates what reuse \
         saves against prefilling them whole.\n"
    );
    for (series, target) in std::iter::once((plain, Some(0.35))).chain(peer.map(|p| (p, None))) {
        if let Some((med, worst, at)) = series.later_turns() {
            let target = target.map_or(String::new(), |t| {
                format!(" (target <= {t}: {})", verdict(worst, t))
            });
            println!(
                "- {}: later turns' TTFT / turn 1: median {med:.2}, worst {worst:.2} \
                 (turn {at}){target}",
                series.name
            );
        }
    }
    if let Some(e) = evicted {
        let after = e.evicted_after.unwrap_or_default();
        let r = e.ratio(after);
        println!(
            "- {}: turn {}'s TTFT (reload included) / turn 1: {r:.2} (target <= 0.5: {})",
            e.name,
            after + 1,
            verdict(r, 0.5)
        );
    }
    if let Some(peer) = peer {
        let per_round = |t: usize| -> f64 {
            let ratios: Vec<f64> = (plain.runs.iter().zip(&peer.runs))
                .map(|(o, p)| o.turns[t].ttft.as_secs_f64() / p.turns[t].ttft.as_secs_f64())
                .collect();
            median(&ratios)
        };
        let turns = plain.runs[0].turns.len();
        let later: Vec<f64> = (1..turns).map(per_round).collect();
        let later = if later.is_empty() {
            String::new()
        } else {
            format!("; later turns, median {:.2}", median(&later))
        };
        println!(
            "- modelpool TTFT / llama-server TTFT, same documents: turn 1 {:.2}{later}",
            per_round(0)
        );
    }
    println!();
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

async fn run(args: Args) -> anyhow::Result<()> {
    let model = std::fs::canonicalize(&args.model)
        .with_context(|| format!("{} (run `just fetch-models`)", args.model.display()))?;
    let runtime = tempfile::tempdir()?;
    // Beside the model, so the spill directory's copy of it is a hard link.
    let spill = tempfile::Builder::new()
        .prefix(".chat_turns-spill-")
        .tempdir_in(model.parent().context("the model's directory")?)?;
    let server = start(&args, &model, runtime.path(), &spill.path().join("spill")).await?;
    let port = server.openai_addr.context("the OpenAI API is on")?.port();
    let channel = Channel::from_shared(format!("http://{}", server.local_addr))?
        .connect()
        .await?;
    let mut control = ModelControlClient::new(channel);
    let ours = Endpoint {
        name: "modelpool",
        port,
        extra: json!({}),
    };
    warm_up(&ours).await?;
    let llama = match start_llama_server(&args, &model).await {
        Ok(server) => Some(server),
        Err(why) => {
            println!("llama-server skipped: {why}\n");
            None
        }
    };
    let theirs = llama.as_ref().map(|s| Endpoint {
        name: "llama-server",
        port: s.port,
        extra: json!({"cache_prompt": true}),
    });
    if let Some(ep) = &theirs {
        warm_up(ep).await?;
    }
    let evict_after = args.evict_after.min(args.turns - 1);
    let mut plain = Series::new("modelpool", None);
    let mut evicted = (evict_after > 0).then(|| {
        Series::new(
            format!("modelpool, evicted after turn {evict_after}"),
            Some(evict_after),
        )
    });
    let mut peer = theirs.as_ref().map(|_| Series::new("llama-server", None));
    for round in 0..args.rounds {
        eprintln!("round {}/{}", round + 1, args.rounds);
        let seed = 1000 + 2 * round as u64;
        plain.runs.push(chat(&ours, &args, seed, None).await?);
        if let Some(series) = evicted.as_mut() {
            let evict = Evict {
                control: &mut control,
                after: evict_after,
            };
            series
                .runs
                .push(chat(&ours, &args, seed + 1, Some(evict)).await?);
        }
        if let (Some(ep), Some(series)) = (&theirs, peer.as_mut()) {
            series.runs.push(chat(ep, &args, seed, None).await?);
        }
    }
    println!(
        "model {}; {} turns, {} tokens per answer, greedy, streamed; context {}; \
         {} rounds (medians); document {} words; nproc {}; load average {}\n",
        model.file_name().unwrap_or_default().to_string_lossy(),
        args.turns,
        args.max_tokens,
        args.context,
        args.rounds,
        args.doc_words,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        load_average(),
    );
    for series in std::iter::once(&plain).chain(&evicted).chain(&peer) {
        series.print_table();
    }
    print_ratios(&plain, evicted.as_ref(), peer.as_ref());
    server.stop().await?;
    if let Some(llama) = llama {
        llama.stop().await?;
    }
    Ok(())
}
