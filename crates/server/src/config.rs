//! Settings: a TOML file plus `MODELPOOL__SECTION__KEY` environment overrides, read with
//! the `config` crate and validated into typed values. Every error names the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use modelpool_pool::budget::parse_bytes;

use crate::auth::{AuthSettings, Secret};
use crate::error::ServerError;
use modelpool_pool::{GroupSpec, ModelSpec, TurnPolicy};
use serde::Deserialize;

// The model tables (`[[models]]`, `RegisterModel`) in a file of their own; the path is
// spelled out so the fuzz crate, which compiles this file on its own, finds it too.
#[path = "config/model.rs"]
mod model;
pub use model::{model_spec, RawModel};

/// Exit code for an unusable configuration (EX_USAGE).
pub const EXIT_CONFIG: i32 = 64;

const MIN_CONTEXT: u32 = 16;
const MAX_CONTEXT: u32 = 1 << 20;
const MAX_SEQUENCES: u32 = 1024;
const MAX_CONCURRENCY: u32 = 4096;

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ServerError {
    ServerError::Config {
        key: key.into(),
        reason: reason.into(),
    }
}

/// Validated settings of a `modelpool serve`.
#[derive(Clone, Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    /// Plain-HTTP address of `/metrics`; `None` when set to "" (off).
    pub metrics_listen: Option<SocketAddr>,
    /// Plain-HTTP address of the OpenAI-compatible API (`/v1/...`); off unless set.
    pub openai_listen: Option<SocketAddr>,
    /// The file these settings came from, re-read on reload.
    pub source: Option<PathBuf>,
    /// When set, models registered through the API must lie inside these.
    pub model_roots: Option<Vec<PathBuf>>,
    /// How long in-flight streams may run after SIGTERM before they are cut.
    pub drain_timeout: Duration,
    /// Generation streams open at once, over all clients; more get RESOURCE_EXHAUSTED.
    pub max_concurrent_streams: u32,
    /// TLS (and mutual TLS) on the gRPC ports; plaintext when `None`.
    pub tls: Option<TlsSettings>,
    /// A worker not ready after this long is killed.
    pub load_timeout: Duration,
    /// Nice value of a loading mistral.rs worker (0: off); see
    /// `WorkerBackendConfig::load_nice`. llama.cpp workers load at normal priority.
    pub load_nice: i32,
    /// Workers of models at least this large get transparent huge pages (`u64::MAX`:
    /// never); see `WorkerBackendConfig::huge_pages_from_bytes`.
    pub huge_pages_from_bytes: u64,
    /// Where the private socket directory is created.
    pub runtime_dir: PathBuf,
    /// The binary that runs workers; the running executable when unset.
    pub worker_exe: Option<PathBuf>,
    pub pool: PoolSettings,
    /// Off unless the file has a `[modelmesh]` section.
    pub modelmesh: Option<ModelMeshSettings>,
    /// Bearer tokens; none by default (a loopback sidecar).
    pub auth: AuthSettings,
    /// The spill directory; off unless `[storage] spill_dir` is set.
    pub storage: Option<StorageSettings>,
    pub models: Vec<ModelSpec>,
    /// `[[groups]]`: models of which at most `max_resident` are resident at once.
    pub groups: Vec<GroupSpec>,
}

/// The `[storage]` section: the NVMe spill directory under resident models.
#[derive(Clone, Debug, PartialEq)]
pub struct StorageSettings {
    pub spill_dir: PathBuf,
    /// Bytes the directory may hold; least recently used artifacts go first.
    pub spill_budget_bytes: u64,
    /// Bytes of saved KV prefixes (llama.cpp) kept under `spill_dir/prefixes`, all
    /// models together; 0 turns saving off.
    pub saved_prefix_budget_bytes: u64,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    spill_dir: Option<PathBuf>,
    spill_budget: Option<String>,
    saved_prefix_budget: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    workers: RawWorkers,
    #[serde(default)]
    pool: RawPool,
    modelmesh: Option<RawModelMesh>,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    storage: RawStorage,
    #[serde(default)]
    models: Vec<RawModel>,
    #[serde(default)]
    groups: Vec<RawGroup>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    inference_token: Option<String>,
    control_token: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawModelMesh {
    listen: Option<String>,
    model_roots: Option<Vec<PathBuf>>,
    context_length: Option<u32>,
    max_concurrency: Option<u32>,
    default_model_size: Option<String>,
}

/// The `[modelmesh]` section: modelpool as a KServe ModelMesh model runtime.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelMeshSettings {
    /// Where `mmesh.ModelRuntime` is served (ModelMesh's side of the pod).
    pub listen: SocketAddr,
    /// `modelPath` must resolve (symlinks followed) inside one of these.
    pub model_roots: Vec<PathBuf>,
    pub context_length: u32,
    pub max_concurrency: u32,
    /// What ModelMesh assumes for a model it has not sized yet.
    pub default_model_size_bytes: u64,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPool {
    /// The container's memory limit (Kubernetes Downward API: `limits.memory` in bytes).
    memory_limit: Option<RawSize>,
    ram_budget: Option<String>,
    vram_budget: Option<String>,
    auto_fraction: Option<f64>,
    reserve: Option<String>,
    queue_depth: Option<u32>,
    queue_timeout: Option<String>,
    max_loads_in_flight: Option<u32>,
    fairness_window: Option<String>,
    min_residency: Option<String>,
    drain_timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    name: String,
    members: Vec<String>,
    max_resident: Option<u32>,
    budget: Option<String>,
    drain_timeout: Option<String>,
    min_residency: Option<String>,
    /// "wait" (default) or "refuse".
    on_swap: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    model_roots: Option<Vec<PathBuf>>,
    metrics_listen: Option<String>,
    openai_listen: Option<String>,
    drain_timeout: Option<String>,
    max_concurrent_streams: Option<u32>,
    tls: Option<RawTls>,
    /// Listening beyond loopback is an explicit choice.
    allow_remote: Option<bool>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
}

/// `[server.tls]`: TLS on the gRPC ports (API and ModelMesh), mutual TLS with
/// `client_ca`. PEM files, read at start.
#[derive(Clone, Debug, PartialEq)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate this CA signed.
    pub client_ca: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawWorkers {
    load_timeout: Option<String>,
    load_nice: Option<i32>,
    huge_pages_from: Option<String>,
    runtime_dir: Option<PathBuf>,
    exe: Option<PathBuf>,
}

/// A size given as text ("8GiB") or, from the environment, a plain number of bytes.
#[derive(Deserialize, Clone, Debug)]
#[serde(untagged)]
enum RawSize {
    Bytes(u64),
    Text(String),
}

/// A budget as configured: absolute bytes, or `auto`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BudgetSetting {
    Bytes(u64),
    /// `total * auto_fraction - reserve`.
    Auto,
}

impl BudgetSetting {
    /// Bytes for a device with `total_bytes`.
    pub fn resolve(self, total_bytes: u64, pool: &PoolSettings) -> u64 {
        match self {
            BudgetSetting::Bytes(b) => b,
            BudgetSetting::Auto => ((total_bytes as f64 * pool.auto_fraction) as u64)
                .saturating_sub(pool.reserve_bytes),
        }
    }
}

/// The `[pool]` section, validated.
#[derive(Clone, Debug)]
pub struct PoolSettings {
    /// RAM this process tree may use (a container limit); `auto` budgets follow it.
    pub memory_limit_bytes: Option<u64>,
    pub ram_budget: BudgetSetting,
    /// Per GPU.
    pub vram_budget: BudgetSetting,
    pub auto_fraction: f64,
    /// Kept free on every device: subtracted from `auto` budgets and from the memory
    /// the machine reports available when admitting a model.
    pub reserve_bytes: u64,
    pub queue_depth: u32,
    pub queue_timeout: Duration,
    /// Worker starts running at once.
    pub max_loads_in_flight: u32,
    /// Turns for models whose requests wait for room while busy models hold it.
    pub turns: TurnPolicy,
}

impl Settings {
    /// Reads `file` (if any) and the environment, then validates.
    pub fn load(file: Option<&Path>) -> Result<Self, ServerError> {
        let mut builder = config::Config::builder();
        if let Some(f) = file {
            if !f.is_file() {
                return Err(ServerError::ConfigRead(format!(
                    "{} does not exist",
                    f.display()
                )));
            }
            builder = builder.add_source(config::File::from(f).format(config::FileFormat::Toml));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("MODELPOOL")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        );
        let raw: RawSettings = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ServerError::ConfigRead(e.to_string()))?;
        let base = file
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let mut settings = Self::validate(raw, &base)?;
        settings.source = file.map(Path::to_path_buf);
        Ok(settings)
    }

    /// Parses a TOML string (no environment), resolving relative paths against `base`.
    pub fn from_toml(text: &str, base: &Path) -> Result<Self, ServerError> {
        let raw: RawSettings = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ServerError::ConfigRead(e.to_string()))?;
        Self::validate(raw, base)
    }

    fn validate(raw: RawSettings, base: &Path) -> Result<Self, ServerError> {
        let (listen, metrics_listen, openai_listen) = listen_addresses(&raw.server)?;
        let drain_timeout = duration("server.drain_timeout", raw.server.drain_timeout, "30s")?;
        let tls = raw.server.tls.map(|t| tls_settings(t, base)).transpose()?;
        let max_concurrent_streams = max_concurrent_streams(raw.server.max_concurrent_streams)?;
        let model_roots = raw
            .server
            .model_roots
            .map(|roots| server_model_roots(roots, base))
            .transpose()?;
        let (load_timeout, load_nice, huge_pages_from_bytes) = worker_limits(&raw.workers)?;
        let pool = pool_settings(raw.pool)?;
        let modelmesh = raw
            .modelmesh
            .map(|m| modelmesh_settings(m, base))
            .transpose()?;
        let auth = auth_settings(raw.auth)?;
        let storage = storage_settings(raw.storage, base)?;
        let models = model_specs(raw.models, base, storage.is_some())?;
        let groups = groups(raw.groups, &models)?;
        if raw.server.allow_remote != Some(true) {
            refuse_remote_listeners([
                ("server.listen", Some(listen)),
                ("server.metrics_listen", metrics_listen),
                ("server.openai_listen", openai_listen),
                ("modelmesh.listen", modelmesh.as_ref().map(|m| m.listen)),
            ])?;
        }
        Ok(Settings {
            groups,
            listen,
            metrics_listen,
            openai_listen,
            source: None,
            model_roots,
            drain_timeout,
            max_concurrent_streams,
            tls,
            load_timeout,
            load_nice,
            huge_pages_from_bytes,
            runtime_dir: raw.workers.runtime_dir.unwrap_or_else(std::env::temp_dir),
            worker_exe: raw.workers.exe,
            pool,
            modelmesh,
            auth,
            storage,
            models,
        })
    }
}

/// `server.listen`, `server.metrics_listen` ("" turns it off) and
/// `server.openai_listen` (off unless set), in that order.
fn listen_addresses(
    raw: &RawServer,
) -> Result<(SocketAddr, Option<SocketAddr>, Option<SocketAddr>), ServerError> {
    let listen = raw
        .listen
        .as_deref()
        .unwrap_or("127.0.0.1:50051")
        .parse()
        .map_err(|e| {
            invalid(
                "server.listen",
                format!("not an address like 127.0.0.1:50051 ({e})"),
            )
        })?;
    let metrics_listen = match raw.metrics_listen.as_deref().map(str::trim) {
        Some("") => None,
        text => Some(text.unwrap_or("127.0.0.1:9464").parse().map_err(|e| {
            invalid(
                "server.metrics_listen",
                format!("not an address like 127.0.0.1:9464, or \"\" for off ({e})"),
            )
        })?),
    };
    let openai_listen = match raw.openai_listen.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) => Some(text.parse().map_err(|e| {
            invalid(
                "server.openai_listen",
                format!("not an address like 127.0.0.1:8080, or \"\" for off ({e})"),
            )
        })?),
    };
    Ok((listen, metrics_listen, openai_listen))
}

/// `[server.tls]`: cert and key are required, and every file named must exist
/// (relative paths resolve against `base`).
fn tls_settings(t: RawTls, base: &Path) -> Result<TlsSettings, ServerError> {
    let file = |k: &str, p: Option<PathBuf>| -> Result<PathBuf, ServerError> {
        let p =
            p.ok_or_else(|| invalid(format!("server.tls.{k}"), "required with [server.tls]"))?;
        let p = if p.is_absolute() { p } else { base.join(p) };
        if !p.is_file() {
            return Err(invalid(
                format!("server.tls.{k}"),
                format!("{} is not a readable file", p.display()),
            ));
        }
        Ok(p)
    };
    Ok(TlsSettings {
        cert: file("cert", t.cert)?,
        key: file("key", t.key)?,
        client_ca: t
            .client_ca
            .map(|c| file("client_ca", Some(c)))
            .transpose()?,
    })
}

fn max_concurrent_streams(raw: Option<u32>) -> Result<u32, ServerError> {
    let max_concurrent_streams = raw.unwrap_or(256);
    if !(1..=100_000).contains(&max_concurrent_streams) {
        return Err(invalid(
            "server.max_concurrent_streams",
            format!("must be 1..=100000, got {max_concurrent_streams}"),
        ));
    }
    Ok(max_concurrent_streams)
}

/// `server.model_roots`, each resolved against `base` and canonicalized.
fn server_model_roots(roots: Vec<PathBuf>, base: &Path) -> Result<Vec<PathBuf>, ServerError> {
    roots
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let r = if r.is_absolute() { r } else { base.join(r) };
            r.canonicalize().map_err(|e| {
                invalid(
                    format!("server.model_roots[{i}]"),
                    format!("{}: {e}", r.display()),
                )
            })
        })
        .collect()
}

/// `[workers]` load timeout, load nice value and huge-page threshold, in that order.
fn worker_limits(raw: &RawWorkers) -> Result<(Duration, i32, u64), ServerError> {
    let load_timeout = duration("workers.load_timeout", raw.load_timeout.clone(), "120s")?;
    if load_timeout.is_zero() {
        return Err(invalid("workers.load_timeout", "must be above zero"));
    }
    let load_nice = raw.load_nice.unwrap_or(10);
    if !(0..=19).contains(&load_nice) {
        return Err(invalid(
            "workers.load_nice",
            format!("must be 0..=19 (0 turns it off), got {load_nice}"),
        ));
    }
    // Small models keep 4 KiB pages, which hold them ~2% leaner.
    let huge_pages_from_bytes = match raw.huge_pages_from.as_deref() {
        Some("never") => u64::MAX,
        text => parse_bytes(text.unwrap_or("1GiB"))
            .map_err(|e| invalid("workers.huge_pages_from", format!("{e}, or \"never\"")))?,
    };
    Ok((load_timeout, load_nice, huge_pages_from_bytes))
}

/// `[auth]`: tokens of at least 16 characters, and a control token whenever there is
/// an inference token.
fn auth_settings(raw: RawAuth) -> Result<AuthSettings, ServerError> {
    let token = |key: &str, v: Option<String>| -> Result<Option<Secret>, ServerError> {
        match v {
            None => Ok(None),
            Some(t) if t.trim().len() < 16 => Err(invalid(
                key,
                "too short: use at least 16 characters (the value is not shown)",
            )),
            Some(t) => Ok(Some(Secret::new(t.trim().to_owned()))),
        }
    };
    let auth = AuthSettings {
        inference_token: token("auth.inference_token", raw.inference_token)?,
        control_token: token("auth.control_token", raw.control_token)?,
    };
    if auth.inference_token.is_some() && auth.control_token.is_none() {
        // Otherwise inference would need a token while control (RegisterModel with
        // any path, EvictModel, ReloadConfig) stayed open.
        return Err(invalid(
            "auth.control_token",
            "required when auth.inference_token is set, or control RPCs would be open",
        ));
    }
    Ok(auth)
}

/// `[storage]`: off when `spill_dir` is unset or empty.
fn storage_settings(raw: RawStorage, base: &Path) -> Result<Option<StorageSettings>, ServerError> {
    let d = match raw.spill_dir {
        None => return Ok(None),
        Some(d) if d.as_os_str().is_empty() => return Ok(None),
        Some(d) => d,
    };
    let spill_dir = if d.is_absolute() { d } else { base.join(d) };
    let spill_budget_bytes = parse_bytes(raw.spill_budget.as_deref().unwrap_or("20GiB"))
        .map_err(|e| invalid("storage.spill_budget", e))?;
    if spill_budget_bytes == 0 {
        return Err(invalid("storage.spill_budget", "must be above zero"));
    }
    let saved_prefix_budget_bytes =
        parse_bytes(raw.saved_prefix_budget.as_deref().unwrap_or("2GiB"))
            .map_err(|e| invalid("storage.saved_prefix_budget", e))?;
    Ok(Some(StorageSettings {
        spill_dir,
        spill_budget_bytes,
        saved_prefix_budget_bytes,
    }))
}

/// `[[models]]`: each valid, ids unique, and URL sources only with a spill directory
/// to download into.
fn model_specs(
    raw: Vec<RawModel>,
    base: &Path,
    has_storage: bool,
) -> Result<Vec<ModelSpec>, ServerError> {
    let mut models: Vec<ModelSpec> = Vec::with_capacity(raw.len());
    for (i, m) in raw.into_iter().enumerate() {
        let spec = model_spec(m, base)
            .map_err(|(k, reason)| invalid(format!("models[{i}].{k}"), reason))?;
        if models.iter().any(|o| o.id == spec.id) {
            return Err(invalid(
                format!("models[{i}].id"),
                format!("duplicate id {:?}", spec.id),
            ));
        }
        if !has_storage && spec.source.path().is_none() {
            return Err(invalid(
                format!("models[{i}].url"),
                "a URL source needs a spill directory to download into ([storage] spill_dir)",
            ));
        }
        models.push(spec);
    }
    Ok(models)
}

/// A sidecar listens on loopback. Anything else must be asked for, so a typo or a
/// stray environment variable cannot expose the API (or its metrics) to the network:
/// the first listener (by key) off loopback is refused.
fn refuse_remote_listeners(listeners: [(&str, Option<SocketAddr>); 4]) -> Result<(), ServerError> {
    for (key, addr) in listeners {
        if let Some(addr) = addr.filter(|a: &SocketAddr| !a.ip().is_loopback()) {
            return Err(invalid(
                key,
                format!(
                    "{addr} is reachable from other hosts; set server.allow_remote = true to serve them (and consider [auth] tokens and [server.tls])"
                ),
            ));
        }
    }
    Ok(())
}

fn groups(raw: Vec<RawGroup>, models: &[ModelSpec]) -> Result<Vec<GroupSpec>, ServerError> {
    let mut out: Vec<GroupSpec> = Vec::with_capacity(raw.len());
    for (i, g) in raw.into_iter().enumerate() {
        let key = |k: &str| format!("groups[{i}].{k}");
        if g.name.trim().is_empty() || out.iter().any(|o| o.name == g.name) {
            return Err(invalid(
                key("name"),
                format!("must be non-empty and unique, got {:?}", g.name),
            ));
        }
        if g.members.is_empty() {
            return Err(invalid(key("members"), "list at least one model id"));
        }
        for m in &g.members {
            if !models.iter().any(|s| &s.id == m) {
                return Err(invalid(
                    key("members"),
                    format!("{m:?} is not a configured model"),
                ));
            }
            if let Some(other) = out.iter().find(|o| o.members.contains(m)) {
                return Err(invalid(
                    key("members"),
                    format!(
                        "{m:?} is already in group {:?}; a model belongs to one group",
                        other.name
                    ),
                ));
            }
        }
        let max_resident = g.max_resident.unwrap_or(1);
        if max_resident == 0 {
            return Err(invalid(key("max_resident"), "must be at least 1"));
        }
        let budget_bytes = g
            .budget
            .as_deref()
            .map(parse_bytes)
            .transpose()
            .map_err(|e| invalid(key("budget"), e))?;
        let refuse_during_swap = match g.on_swap.as_deref().unwrap_or("wait") {
            "wait" => false,
            "refuse" => true,
            other => {
                return Err(invalid(
                    key("on_swap"),
                    format!("\"wait\" or \"refuse\", got {other:?}"),
                ))
            }
        };
        out.push(GroupSpec {
            name: g.name,
            members: g.members,
            max_resident,
            budget_bytes,
            drain_timeout: duration(&key("drain_timeout"), g.drain_timeout, "30s")?,
            min_residency: duration(&key("min_residency"), g.min_residency, "10s")?,
            refuse_during_swap,
        });
    }
    Ok(out)
}

fn modelmesh_settings(raw: RawModelMesh, base: &Path) -> Result<ModelMeshSettings, ServerError> {
    let listen = raw
        .listen
        .as_deref()
        .unwrap_or("127.0.0.1:8085")
        .parse()
        .map_err(|e| {
            invalid(
                "modelmesh.listen",
                format!("not an address like 127.0.0.1:8085 ({e})"),
            )
        })?;
    let roots = raw.model_roots.unwrap_or_default();
    if roots.is_empty() {
        return Err(invalid(
            "modelmesh.model_roots",
            "required: the directories ModelMesh may load models from",
        ));
    }
    let mut model_roots = Vec::with_capacity(roots.len());
    for (i, root) in roots.into_iter().enumerate() {
        let root = if root.is_absolute() {
            root
        } else {
            base.join(root)
        };
        let resolved = root.canonicalize().map_err(|e| {
            invalid(
                format!("modelmesh.model_roots[{i}]"),
                format!("{}: {e}", root.display()),
            )
        })?;
        model_roots.push(resolved);
    }
    let context_length = raw.context_length.unwrap_or(4096);
    if !(MIN_CONTEXT..=MAX_CONTEXT).contains(&context_length) {
        return Err(invalid(
            "modelmesh.context_length",
            format!("must be {MIN_CONTEXT}..={MAX_CONTEXT} tokens, got {context_length}"),
        ));
    }
    let max_concurrency = raw.max_concurrency.unwrap_or(4);
    if !(1..=MAX_CONCURRENCY).contains(&max_concurrency) {
        return Err(invalid(
            "modelmesh.max_concurrency",
            format!("must be 1..={MAX_CONCURRENCY}, got {max_concurrency}"),
        ));
    }
    let default_model_size_bytes = parse_bytes(raw.default_model_size.as_deref().unwrap_or("1GiB"))
        .map_err(|e| invalid("modelmesh.default_model_size", e))?;
    Ok(ModelMeshSettings {
        listen,
        model_roots,
        context_length,
        max_concurrency,
        default_model_size_bytes,
    })
}

fn pool_settings(raw: RawPool) -> Result<PoolSettings, ServerError> {
    let budget = |key: &str, v: Option<String>| -> Result<BudgetSetting, ServerError> {
        match v.as_deref().map(str::trim) {
            None | Some("auto") => Ok(BudgetSetting::Auto),
            Some(text) => parse_bytes(text)
                .map(BudgetSetting::Bytes)
                .map_err(|e| invalid(key, format!("{e}; or \"auto\""))),
        }
    };
    let auto_fraction = raw.auto_fraction.unwrap_or(0.85);
    if !(0.05..=0.98).contains(&auto_fraction) {
        return Err(invalid(
            "pool.auto_fraction",
            format!("must be 0.05..=0.98 (never all of a device), got {auto_fraction}"),
        ));
    }
    let reserve_bytes = parse_bytes(raw.reserve.as_deref().unwrap_or("512MiB"))
        .map_err(|e| invalid("pool.reserve", e))?;
    let queue_depth = raw.queue_depth.unwrap_or(64);
    if !(1..=100_000).contains(&queue_depth) {
        return Err(invalid(
            "pool.queue_depth",
            format!("must be 1..=100000, got {queue_depth}"),
        ));
    }
    let queue_timeout = duration("pool.queue_timeout", raw.queue_timeout, "60s")?;
    if queue_timeout.is_zero() {
        return Err(invalid("pool.queue_timeout", "must be above zero"));
    }
    let memory_limit_bytes = match raw.memory_limit {
        None => None,
        Some(RawSize::Bytes(0)) => None,
        Some(RawSize::Bytes(b)) => Some(b),
        Some(RawSize::Text(t)) if t.trim().is_empty() => None,
        Some(RawSize::Text(t)) => {
            Some(parse_bytes(&t).map_err(|e| invalid("pool.memory_limit", e))?)
        }
    };
    let max_loads_in_flight = raw.max_loads_in_flight.unwrap_or(2);
    if !(1..=64).contains(&max_loads_in_flight) {
        return Err(invalid(
            "pool.max_loads_in_flight",
            format!("must be 1..=64, got {max_loads_in_flight}"),
        ));
    }
    let turns = TurnPolicy {
        fairness_window: duration("pool.fairness_window", raw.fairness_window, "3s")?,
        min_residency: duration("pool.min_residency", raw.min_residency, "10s")?,
        drain_timeout: duration("pool.drain_timeout", raw.drain_timeout, "30s")?,
    };
    if turns.fairness_window >= queue_timeout {
        return Err(invalid(
            "pool.fairness_window",
            format!(
                "must be below pool.queue_timeout ({:.0}s), or no waiting request would ever get a turn; got {:.0}s",
                queue_timeout.as_secs_f64(),
                turns.fairness_window.as_secs_f64()
            ),
        ));
    }
    Ok(PoolSettings {
        turns,
        max_loads_in_flight,
        memory_limit_bytes,
        ram_budget: budget("pool.ram_budget", raw.ram_budget)?,
        vram_budget: budget("pool.vram_budget", raw.vram_budget)?,
        auto_fraction,
        reserve_bytes,
        queue_depth,
        queue_timeout,
    })
}

fn duration(key: &str, value: Option<String>, default: &str) -> Result<Duration, ServerError> {
    let text = value.as_deref().unwrap_or(default);
    humantime::parse_duration(text).map_err(|e| {
        invalid(
            key,
            format!("not a duration like \"30s\" or \"2m\" ({e}), got {text:?}"),
        )
    })
}

#[cfg(test)]
#[path = "config/tests.rs"]
mod tests;
