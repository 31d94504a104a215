//! The `modelpool` binary's command line: `serve` runs the server (`modelpool-server`),
//! `worker` runs one model (`modelpool-worker`, started by the server, never by hand),
//! and the client commands talk to a running server ([`client`]). The one crate that
//! joins the server and the engines: it holds no service, pool or engine logic of its
//! own. Lives in a library so that test and benchmark binaries are the very same program.

pub mod client;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use modelpool_server::{Settings, EXIT_CONFIG};

#[derive(Parser)]
#[command(
    name = "modelpool",
    version,
    about = "Serve many LLMs from a fixed memory budget"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "MODELPOOL_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gRPC API.
    Serve {
        /// TOML configuration file; `MODELPOOL__SECTION__KEY` variables override it.
        #[arg(long, short, env = "MODELPOOL_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Run one model in a worker process (started by `serve`).
    #[command(hide = true)]
    Worker(modelpool_worker::WorkerArgs),
    /// Client commands: talk to a running server (and the offline `plan`).
    #[command(flatten)]
    Client(crate::client::ClientCommand),
}

/// Runs the command line given to this process.
pub fn main() -> ExitCode {
    if let Err(msg) = check_cpu() {
        eprintln!("modelpool: {msg}");
        return ExitCode::from(1);
    }
    let cli = Cli::parse();
    // Client commands talk to people: only warnings unless RUST_LOG asks for more.
    let default_level = match cli.command {
        Command::Client(_) => "warn",
        // llama.cpp logs every tensor and metadata key at its info level.
        Command::Worker(_) => "info,llama_cpp_2=warn",
        _ => "info",
    };
    init_tracing(cli.log_format, default_level);
    // A worker runs on one thread: mistral.rs runs its engine on threads of its own, and
    // on a current-thread runtime it skips its post-load "dummy run", one full forward
    // pass that only delays readiness (measured: ~75 ms for SmolLM2, ~1.5 s for a
    // 7B-shaped model on 2 cores); the first real request pays no more for it.
    let runtime = match cli.command {
        Command::Worker(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Runtime::new(),
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("modelpool: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match cli.command {
        Command::Client(command) => crate::client::run(command, &runtime),
        Command::Worker(args) => match runtime.block_on(modelpool_worker::worker::run(args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::from(1)
            }
        },
        Command::Serve { config } => {
            let settings = match Settings::load(config.as_deref()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("modelpool: {e}");
                    return ExitCode::from(EXIT_CONFIG as u8);
                }
            };
            match runtime.block_on(serve(settings)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("modelpool: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Handlers first: once the port is open a client (or a test) may signal at once,
    // and SIGHUP's default action would end the process.
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let server = modelpool_server::start(settings).await?;
    let reloads =
        modelpool_server::reload::reload_on_sighup(hup, std::sync::Arc::clone(&server.reloader));
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
    reloads.abort();
    server.stop().await?;
    Ok(())
}

fn init_tracing(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// This build uses AVX2/FMA/F16C (x86-64-v3); say so plainly on a CPU without them
/// instead of dying on an illegal instruction inside a kernel.
fn check_cpu() -> Result<(), String> {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    {
        let missing: Vec<&str> = [
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
            ("fma", std::arch::is_x86_feature_detected!("fma")),
            ("f16c", std::arch::is_x86_feature_detected!("f16c")),
        ]
        .into_iter()
        .filter(|(_, ok)| !ok)
        .map(|(name, _)| name)
        .collect();
        if !missing.is_empty() {
            return Err(format!(
                "this build needs an x86-64-v3 CPU (AVX2, FMA, F16C); this CPU lacks {}. \
                 rebuild for it with RUSTFLAGS=\"-C target-cpu=native\" cargo build --release",
                missing.join(", ")
            ));
        }
    }
    Ok(())
}
