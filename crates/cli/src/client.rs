//! The client subcommands of the `modelpool` binary (`models`, `status`, `load`, `evict`,
//! `pin`, `unpin`, `register`, `unregister`, `watch`, `chat`) and the offline `plan`.
//!
//! They exist so that an operator or a user can drive a running server from the shell
//! without grpcurl or proto files: human output by default, `--json` for scripts. Every
//! remote command speaks the public `modelpool.v1` API only, exactly as any other
//! client would. `plan` answers "what fits?" from the configuration and the GGUF
//! headers alone, before any server runs.

mod chat;
mod control;
mod events;
mod format;
mod plan;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use tonic::transport::{Channel, Endpoint};

/// Where the client commands look for the server unless told otherwise.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:50051";

/// Options every command that talks to a server takes.
#[derive(Args, Clone, Debug)]
pub struct Conn {
    /// Address of the server: `http://HOST:PORT` or `HOST:PORT`.
    #[arg(long, env = "MODELPOOL_ADDR", default_value = DEFAULT_ADDR, value_name = "URL")]
    pub addr: String,
    /// Machine-readable output: one JSON document (streams: one JSON object per line).
    #[arg(long)]
    pub json: bool,
    /// Bearer token for a server with `[auth]` (the control token for control commands).
    #[arg(
        long,
        env = "MODELPOOL_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// CA certificate (PEM) to verify a server with `[server.tls]`; implies https.
    #[arg(long, env = "MODELPOOL_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for a server that requires mutual TLS.
    #[arg(
        long,
        env = "MODELPOOL_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    #[arg(
        long,
        env = "MODELPOOL_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
}

/// Adds `authorization: Bearer <token>` to every call when a token was given.
#[derive(Clone)]
pub(crate) struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    pub(crate) fn new(token: Option<&str>) -> Result<Self, Failure> {
        let value = token
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| Failure::Message("--token: not a valid header value".into()))
            })
            .transpose()?;
        Ok(Self(value))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// A channel whose calls carry the bearer token.
pub(crate) type Authed = tonic::service::interceptor::InterceptedService<Channel, Bearer>;

/// The client subcommands; `cli.rs` flattens them into the binary's command list.
#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// List the registered models: state, device, memory, requests, last use.
    Models {
        #[command(flatten)]
        conn: Conn,
    },
    /// Budget, usage and free room per device, and the resident models.
    Status {
        #[command(flatten)]
        conn: Conn,
    },
    /// Load a model now (evicting idle models if room is needed) and wait until ready.
    Load {
        /// Model id.
        id: String,
        /// Pin it as well: never evicted until unpinned.
        #[arg(long, conflicts_with = "prefetch")]
        pin: bool,
        /// Only read its file into the page cache (no worker), so a later load is fast.
        #[arg(long)]
        prefetch: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Stop an idle model's worker and wait until its memory is released.
    Evict {
        /// Model id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Pin a model: it is never evicted for room or idleness.
    Pin {
        /// Model id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Unpin a model.
    Unpin {
        /// Model id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Register a model with the running server (without loading it).
    Register(RegisterArgs),
    /// Stop a model's worker (if any) and forget the model.
    Unregister {
        /// Model id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Make the server re-read its configuration file (as SIGHUP does).
    Reload {
        #[command(flatten)]
        conn: Conn,
    },
    /// Print the pool's events as they happen (loads, evictions, pins), until Ctrl-C.
    Watch {
        #[command(flatten)]
        conn: Conn,
    },
    /// Chat with a model: one prompt, or an interactive conversation read from stdin.
    Chat(ChatArgs),
    /// Offline: what the configured models need and which fit the budgets (no server).
    Plan(PlanArgs),
}

#[derive(Args, Debug)]
pub struct RegisterArgs {
    /// Id that clients will name in requests.
    #[arg(long)]
    pub id: String,
    /// The GGUF weights file, or a safetensors model directory (a relative path is
    /// taken from the current directory).
    #[arg(long, required_unless_present = "url", conflicts_with = "url")]
    pub path: Option<PathBuf>,
    /// Instead of --path: an http(s) URL the server downloads into its spill directory.
    #[arg(long, requires = "sha256")]
    pub url: Option<String>,
    /// The sha256 of the file at --url (64 hex digits).
    #[arg(long)]
    pub sha256: Option<String>,
    /// "cpu" (server default), "cuda:N" or "auto".
    #[arg(long)]
    pub device: Option<String>,
    /// Tokens of context.
    #[arg(long)]
    pub context_length: Option<u32>,
    /// Sequences the engine may batch at once.
    #[arg(long)]
    pub max_sequences: Option<u32>,
    /// Requests served at once; more wait.
    #[arg(long)]
    pub max_concurrency: Option<u32>,
    /// Never evict it.
    #[arg(long)]
    pub pinned: bool,
    /// Unload it after this long without requests, like "10m".
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub idle_ttl: Option<Duration>,
    /// Safetensors models: precisions to quantize to at load, best first, comma
    /// separated ("none,q8_0,q4k"); the server loads the first that fits.
    #[arg(long, value_delimiter = ',')]
    pub precisions: Vec<String>,
    /// "llama.cpp" (default for a GGUF) or "mistral.rs".
    #[arg(long)]
    pub engine: Option<String>,
    /// llama.cpp: repack weights for its CPU kernels (an anonymous copy).
    #[arg(long)]
    pub repack: Option<bool>,
    /// llama.cpp: lock the mapped weights in memory.
    #[arg(long)]
    pub mlock: bool,
    /// llama.cpp: reuse the KV of shared prompt prefixes and save them across eviction
    /// (default true).
    #[arg(long)]
    pub prefix_cache: Option<bool>,
    /// llama.cpp: tokens of KV cache its sequences share (default: context length for
    /// each sequence).
    #[arg(long)]
    pub kv_budget: Option<u32>,
    /// llama.cpp: the most tokens `--kv-budget` may grow to at a load when the model's
    /// requests outnumber it and room is spare.
    #[arg(long)]
    pub kv_budget_max: Option<u32>,
    /// llama.cpp: the shortest time between two chunks of one stream, like "20ms"
    /// (default 0: every token as it is decoded).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub stream_interval: Option<Duration>,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Args, Debug)]
pub struct ChatArgs {
    /// Model id.
    pub model: String,
    /// The question; without it, read one user turn per line from stdin until EOF or
    /// "/exit", keeping the conversation.
    pub prompt: Option<String>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: u32,
    /// 0 picks the most likely token every step; up to 2.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// The system message that opens the conversation ("" for none).
    #[arg(long, default_value = "You are a helpful assistant.")]
    pub system: String,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// TOML configuration file, as for `serve`.
    #[arg(long, short, env = "MODELPOOL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Machine-readable output: one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// Why a client command failed; [`Failure::report`] prints it and picks the exit code.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The server answered with an error.
    Status(tonic::Status),
    /// Anything else worth a line: unreachable server, bad input.
    Message(String),
    /// An unusable configuration file (exit code 64, as for `serve`).
    Config(String),
    /// Already printed; exit 1.
    Reported,
    /// Nobody reads stdout any more (`| head`): stop quietly.
    BrokenPipe,
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        Failure::Status(s)
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            Failure::BrokenPipe
        } else {
            Failure::Message(format!("cannot write the output: {e}"))
        }
    }
}

impl Failure {
    fn report(self) -> ExitCode {
        match self {
            Failure::Status(s) => {
                eprintln!("modelpool: {}", status_text(&s));
                ExitCode::from(1)
            }
            Failure::Message(m) => {
                eprintln!("modelpool: {m}");
                ExitCode::from(1)
            }
            Failure::Config(m) => {
                eprintln!("modelpool: {m}");
                ExitCode::from(modelpool_server::EXIT_CONFIG as u8)
            }
            Failure::Reported => ExitCode::from(1),
            Failure::BrokenPipe => ExitCode::SUCCESS,
        }
    }
}

/// `NOT_FOUND: model `x` is not registered ...`: the canonical code name, then the
/// server's message (and the transport's cause, when the call never reached a server).
pub(crate) fn status_text(s: &tonic::Status) -> String {
    let mut text = format!("{}: {}", code_name(s.code()), s.message());
    if let Some(source) = std::error::Error::source(s) {
        let cause = error_chain(source);
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// The name gRPC gives a status code in every language: `NOT_FOUND`, not tonic's
/// "Some requested entity was not found".
pub(crate) fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// An error and its causes on one line; tonic's transport error alone only says
/// "transport error".
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let part = cause.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        next = cause.source();
    }
    text
}

/// `127.0.0.1:50051` means `http://127.0.0.1:50051`.
fn server_url(addr: &str) -> String {
    server_url_with(addr, false)
}

fn server_url_with(addr: &str, tls: bool) -> String {
    let addr = addr.trim();
    if addr.contains("://") {
        addr.to_owned()
    } else if tls {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    }
}

/// Connects now, so that an unreachable server is one clear message naming it.
pub(crate) async fn connect(conn: &Conn) -> Result<Channel, Failure> {
    let addr = &conn.addr;
    let url = server_url_with(addr, conn.tls_ca.is_some());
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| {
            Failure::Message(format!(
                "invalid server address {addr:?} (--addr or MODELPOOL_ADDR): {}",
                error_chain(&e)
            ))
        })?
        .connect_timeout(Duration::from_secs(5));
    if let Some(ca) = &conn.tls_ca {
        modelpool_server::app::install_crypto_provider();
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|e| Failure::Message(format!("{}: {e}", p.display())))
        };
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
        if let (Some(cert), Some(key)) = (&conn.tls_cert, &conn.tls_key) {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                read(cert)?,
                read(key)?,
            ));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| Failure::Message(format!("tls: {}", error_chain(&e))))?;
    }
    endpoint.connect().await.map_err(|e| {
        Failure::Message(format!(
            "cannot reach the modelpool server at {url}: {}",
            error_chain(&e)
        ))
    })
}

/// Prints one line to stdout and flushes it (a pipe sees each line at once).
pub(crate) fn say(line: impl std::fmt::Display) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

/// Prints a whole command's JSON document.
pub(crate) fn say_json(value: &serde_json::Value) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Failure::Message(format!("cannot encode JSON: {e}")))?;
    say(text)
}

/// Runs one client command to its exit code. (`cli::main` logs warnings only for
/// client commands: their stderr is for the user, not for info lines.)
pub fn run(command: ClientCommand, runtime: &tokio::runtime::Runtime) -> ExitCode {
    let result = match command {
        ClientCommand::Plan(args) => plan::run(&args),
        remote => runtime.block_on(run_remote(remote)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(),
    }
}

async fn run_remote(command: ClientCommand) -> Result<(), Failure> {
    match command {
        ClientCommand::Models { conn } => control::models(&conn).await,
        ClientCommand::Status { conn } => control::status(&conn).await,
        ClientCommand::Load {
            id,
            pin,
            prefetch,
            conn,
        } => control::load(&conn, id, pin, prefetch).await,
        ClientCommand::Evict { id, conn } => control::evict(&conn, id).await,
        ClientCommand::Pin { id, conn } => control::pin(&conn, id, true).await,
        ClientCommand::Unpin { id, conn } => control::pin(&conn, id, false).await,
        ClientCommand::Register(args) => control::register(args).await,
        ClientCommand::Unregister { id, conn } => control::unregister(&conn, id).await,
        ClientCommand::Reload { conn } => control::reload(&conn).await,
        ClientCommand::Watch { conn } => control::watch(&conn).await,
        ClientCommand::Chat(args) => chat::run(args).await,
        ClientCommand::Plan(args) => plan::run(&args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_without_a_scheme_are_http() {
        assert_eq!(server_url("127.0.0.1:50051"), "http://127.0.0.1:50051");
        assert_eq!(server_url(" http://h:1 "), "http://h:1");
        assert_eq!(server_url("https://h:1"), "https://h:1");
    }

    #[test]
    fn status_lines_use_canonical_code_names() {
        let s = tonic::Status::not_found("model `nope` is not registered");
        assert_eq!(status_text(&s), "NOT_FOUND: model `nope` is not registered");
        assert_eq!(
            code_name(tonic::Code::ResourceExhausted),
            "RESOURCE_EXHAUSTED"
        );
    }
}
