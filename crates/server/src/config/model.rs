//! One model's table (`[[models]]` in the file, or a `RegisterModel` request) and its
//! validation into the pool's `ModelSpec`: every error names the field.

use std::path::{Path, PathBuf};

use modelpool_catalog::{EngineKind, EngineOptions, LlamaCppOptions};
use modelpool_pool::{Device, MemoryProbe, ModelFormat, ModelSpec, Source};
use serde::Deserialize;

use super::{MAX_CONCURRENCY, MAX_CONTEXT, MAX_SEQUENCES, MIN_CONTEXT};

/// A model as a config file or a `RegisterModel` request describes it.
#[derive(Deserialize, Default, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub id: String,
    #[serde(default)]
    pub path: PathBuf,
    /// Instead of `path`: an http(s) URL with its sha256.
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub sha256: Option<String>,
    pub format: Option<String>,
    pub device: Option<String>,
    pub context_length: Option<u32>,
    pub max_sequences: Option<u32>,
    pub max_concurrency: Option<u32>,
    pub pinned: Option<bool>,
    pub idle_ttl: Option<String>,
    /// Safetensors models: precisions to quantize to at load, best first ("none",
    /// "q8_0", "q4k", ...); the pool loads the first that fits.
    #[serde(default)]
    pub precisions: Vec<String>,
    /// "llama.cpp" (default for GGUF) or "mistral.rs" (the only one for safetensors).
    pub engine: Option<String>,
    /// llama.cpp: repack weights for its CPU kernels (default off: weights stay mapped).
    pub repack: Option<bool>,
    /// llama.cpp: lock the mapped weights in memory (default off).
    pub mlock: Option<bool>,
    /// llama.cpp: reuse the KV of shared prompt prefixes and save them across eviction
    /// (default on).
    pub prefix_cache: Option<bool>,
    /// llama.cpp: tokens of KV cache the sequences share (default: context_length for
    /// each of max_sequences); requests run as their prompt and answer fit it.
    pub kv_budget: Option<u32>,
    /// llama.cpp: the most tokens `kv_budget` may grow to at a load when the model's
    /// requests outnumber what it holds at full context and the pool has room to spare.
    pub kv_budget_max: Option<u32>,
    /// llama.cpp: the shortest time between two chunks of one stream, like "20ms"
    /// (default 0: every token); text decoded sooner goes with the next chunk.
    pub stream_interval: Option<String>,
}

/// Validates one model; an error names the field (without the `models[i].` prefix).
pub fn model_spec(m: RawModel, base: &Path) -> Result<ModelSpec, (&'static str, String)> {
    check_id(&m.id)?;
    let source = model_source(m.path, m.url, m.sha256.as_deref(), base)?;
    let format = model_format(m.format.as_deref(), &source)?;
    let precisions = precisions(&m.precisions, format)?;
    let stream_interval = stream_interval(m.stream_interval.as_deref())?;
    let llama_only = [
        ("repack", m.repack.is_some()),
        ("mlock", m.mlock == Some(true)),
        ("prefix_cache", m.prefix_cache == Some(false)),
        ("kv_budget", m.kv_budget.is_some()),
        ("kv_budget_max", m.kv_budget_max.is_some()),
        ("stream_interval", !stream_interval.is_zero()),
    ];
    let engine = engine_of(m.engine.as_deref(), &llama_only, format)?;
    let device = device_of(m.device.as_deref())?;
    gpu_build_check(device, engine)?;
    let (context_length, max_sequences) = context_and_sequences(m.context_length, m.max_sequences)?;
    let kv_budget_tokens = kv_budget(m.kv_budget, context_length, max_sequences)?;
    let kv_budget_max_tokens = kv_budget_max(
        m.kv_budget_max,
        kv_budget_tokens,
        context_length,
        max_sequences,
    )?;
    let max_concurrency = max_concurrency(m.max_concurrency)?;
    let idle_ttl = idle_ttl(m.idle_ttl.as_deref())?;
    Ok(ModelSpec {
        id: m.id,
        source,
        format,
        device,
        context_length,
        max_sequences,
        max_concurrency,
        pinned: m.pinned.unwrap_or(false),
        idle_ttl,
        precisions,
        precision: None,
        quantized: None,
        engine: EngineOptions {
            kind: Some(engine),
            llama_cpp: LlamaCppOptions {
                repack: m.repack.unwrap_or(false),
                mlock: m.mlock.unwrap_or(false),
                prefix_cache: m.prefix_cache.unwrap_or(true),
                kv_budget_tokens,
                kv_budget_max_tokens,
                stream_interval,
            },
        },
    })
}

/// `id`: 1-128 characters of `[A-Za-z0-9-_.:/]`.
fn check_id(id: &str) -> Result<(), (&'static str, String)> {
    if id.is_empty()
        || id.len() > 128
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/".contains(c))
    {
        return Err((
            "id",
            format!("must be 1-128 characters of [A-Za-z0-9-_.:/], got {id:?}"),
        ));
    }
    Ok(())
}

/// Where the weights come from: a `path` (relative to `base`), or an http(s) `url`
/// with its `sha256`; exactly one of them.
fn model_source(
    path: PathBuf,
    url: Option<String>,
    sha256: Option<&str>,
    base: &Path,
) -> Result<Source, (&'static str, String)> {
    match (path.as_os_str().is_empty(), url) {
        (true, None) => Err(("path", "required (or `url` with `sha256`)".into())),
        (false, Some(_)) => Err(("url", "give `path` or `url`, not both".into())),
        (false, None) => Ok(Source::Path(if path.is_absolute() {
            path
        } else {
            base.join(path)
        })),
        (true, Some(url)) => {
            if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() > 2048 {
                return Err((
                    "url",
                    format!("must be an http:// or https:// URL, got {url:?}"),
                ));
            }
            let sha256 = sha256.unwrap_or_default().to_ascii_lowercase();
            if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err((
                    "sha256",
                    format!("required with `url`: 64 hex digits, got {sha256:?}"),
                ));
            }
            Ok(Source::Url { url, sha256 })
        }
    }
}

/// The format named, or by default the source's: a directory is a Hugging Face model
/// (safetensors, which must come from a `path`); a file is a GGUF.
fn model_format(
    name: Option<&str>,
    source: &Source,
) -> Result<ModelFormat, (&'static str, String)> {
    let is_dir = source.path().is_some_and(Path::is_dir);
    let format = match name.unwrap_or("") {
        "" if is_dir => ModelFormat::Safetensors,
        "gguf" | "" => ModelFormat::Gguf,
        "safetensors" => ModelFormat::Safetensors,
        other => {
            return Err((
                "format",
                format!("unsupported format {other:?}; supported: gguf, safetensors"),
            ))
        }
    };
    if format == ModelFormat::Safetensors && source.path().is_none() {
        return Err((
            "url",
            "a safetensors model is a directory: give its `path`".into(),
        ));
    }
    Ok(format)
}

/// `precisions`: known names (lowercased), each once, and only for safetensors.
fn precisions(
    names: &[String],
    format: ModelFormat,
) -> Result<Vec<String>, (&'static str, String)> {
    let mut precisions = Vec::new();
    for p in names {
        let p = p.to_ascii_lowercase();
        if !modelpool_pool::PRECISIONS.contains(&p.as_str()) {
            return Err((
                "precisions",
                format!(
                    "unknown precision {p:?}; known: {}",
                    modelpool_pool::PRECISIONS.join(", ")
                ),
            ));
        }
        if precisions.contains(&p) {
            return Err(("precisions", format!("{p:?} is listed twice")));
        }
        precisions.push(p);
    }
    if !precisions.is_empty() && format != ModelFormat::Safetensors {
        return Err((
            "precisions",
            "only a safetensors model is quantized at load; a GGUF file keeps its own precision"
                .into(),
        ));
    }
    Ok(precisions)
}

/// `device`: "cpu" by default (or when empty), "auto", or a device name.
fn device_of(name: Option<&str>) -> Result<Device, (&'static str, String)> {
    Ok(match name.unwrap_or("cpu") {
        "auto" => auto_device(),
        "" => Device::Cpu,
        text => text.parse::<Device>().map_err(|e| ("device", e))?,
    })
}

/// `context_length` and `max_sequences`, defaulted and range-checked.
fn context_and_sequences(
    context_length: Option<u32>,
    max_sequences: Option<u32>,
) -> Result<(u32, u32), (&'static str, String)> {
    let context_length = context_length.unwrap_or(4096);
    if !(MIN_CONTEXT..=MAX_CONTEXT).contains(&context_length) {
        return Err((
            "context_length",
            format!("must be {MIN_CONTEXT}..={MAX_CONTEXT} tokens, got {context_length}"),
        ));
    }
    let max_sequences = max_sequences.unwrap_or(1);
    if !(1..=MAX_SEQUENCES).contains(&max_sequences) {
        return Err((
            "max_sequences",
            format!("must be 1..={MAX_SEQUENCES}, got {max_sequences}"),
        ));
    }
    Ok((context_length, max_sequences))
}

fn max_concurrency(value: Option<u32>) -> Result<u32, (&'static str, String)> {
    let max_concurrency = value.unwrap_or(4);
    if !(1..=MAX_CONCURRENCY).contains(&max_concurrency) {
        return Err((
            "max_concurrency",
            format!("must be 1..={MAX_CONCURRENCY}, got {max_concurrency}"),
        ));
    }
    Ok(max_concurrency)
}

/// `idle_ttl`: unset, "", "never" and zero all mean no expiry.
fn idle_ttl(text: Option<&str>) -> Result<Option<std::time::Duration>, (&'static str, String)> {
    Ok(match text {
        None | Some("") | Some("never") => None,
        Some(text) => Some(humantime::parse_duration(text).map_err(|e| {
            (
                "idle_ttl",
                format!("not a duration like \"10m\" or \"never\" ({e}), got {text:?}"),
            )
        })?)
        .filter(|d| !d.is_zero()),
    })
}

/// The longest `stream_interval` a model may have: a stream that says nothing for
/// longer looks stalled.
const MAX_STREAM_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// `stream_interval`: unset and "" mean zero (every token is sent as it comes).
fn stream_interval(text: Option<&str>) -> Result<std::time::Duration, (&'static str, String)> {
    let interval = match text {
        None | Some("") => return Ok(std::time::Duration::ZERO),
        Some(text) => humantime::parse_duration(text).map_err(|e| {
            (
                "stream_interval",
                format!("not a duration like \"20ms\" ({e}), got {text:?}"),
            )
        })?,
    };
    if interval > MAX_STREAM_INTERVAL {
        return Err((
            "stream_interval",
            format!(
                "must be at most {}, got {}",
                humantime::format_duration(MAX_STREAM_INTERVAL),
                humantime::format_duration(interval)
            ),
        ));
    }
    Ok(interval)
}

/// The model's engine: the one it names, or the default for its format; one that cannot
/// read the format, or a llama.cpp switch set (`llama_only`: field, set) on another
/// engine, name the field.
fn engine_of(
    name: Option<&str>,
    llama_only: &[(&'static str, bool)],
    format: ModelFormat,
) -> Result<EngineKind, (&'static str, String)> {
    let engine = EngineKind::resolve(name.unwrap_or(""), format).map_err(|e| ("engine", e))?;
    if engine != EngineKind::LlamaCpp {
        for &(field, set) in llama_only {
            if set {
                return Err((
                    field,
                    format!("is a llama.cpp setting; this model's engine is {engine}"),
                ));
            }
        }
    }
    Ok(engine)
}

/// `kv_budget`: at least one full context (a request may use it all), at most what
/// every sequence at full context would take (more could never be used).
fn kv_budget(
    tokens: Option<u32>,
    context_length: u32,
    max_sequences: u32,
) -> Result<Option<u32>, (&'static str, String)> {
    let Some(tokens) = tokens else {
        return Ok(None);
    };
    let most = u64::from(context_length) * u64::from(max_sequences);
    if tokens < context_length || u64::from(tokens) > most {
        return Err((
            "kv_budget",
            format!(
                "must be {context_length}..={most} tokens (context_length {context_length} to its {max_sequences} sequences at full context), got {tokens}"
            ),
        ));
    }
    Ok(Some(tokens))
}

/// `kv_budget_max`: needs a `kv_budget` to grow from, and lies between it and what
/// every sequence at full context would take.
fn kv_budget_max(
    tokens: Option<u32>,
    budget: Option<u32>,
    context_length: u32,
    max_sequences: u32,
) -> Result<Option<u32>, (&'static str, String)> {
    let Some(tokens) = tokens else {
        return Ok(None);
    };
    let Some(budget) = budget else {
        return Err((
            "kv_budget_max",
            "needs kv_budget, the size it grows from".into(),
        ));
    };
    let most = u64::from(context_length) * u64::from(max_sequences);
    if tokens < budget || u64::from(tokens) > most {
        return Err((
            "kv_budget_max",
            format!(
                "must be {budget}..={most} tokens (kv_budget {budget} to context_length {context_length} for each of its {max_sequences} sequences), got {tokens}"
            ),
        ));
    }
    Ok(Some(tokens))
}

/// A GPU model on a build whose engine cannot reach a GPU is refused here, at start-up,
/// never quietly run on the CPU.
fn gpu_build_check(device: Device, engine: EngineKind) -> Result<(), (&'static str, String)> {
    let (engine_gpu, feature) = match engine {
        EngineKind::LlamaCpp => (modelpool_supervisor::LLAMA_GPU_BUILD, "cuda"),
        EngineKind::MistralRs => (modelpool_supervisor::MISTRALRS_GPU_BUILD, "cuda-mistralrs"),
    };
    if device == Device::Cpu || engine_gpu {
        return Ok(());
    }
    let cpu_only = if crate::CUDA_BUILD {
        ""
    } else {
        "; this build is CPU-only (use \"cpu\" or \"auto\")"
    };
    Err((
        "device",
        format!("{device} with engine {engine} needs modelpool built with the `{feature}` feature{cpu_only}"),
    ))
}

/// `device = "auto"`: the first GPU when this build has CUDA and the machine a GPU,
/// otherwise the CPU.
fn auto_device() -> Device {
    if crate::CUDA_BUILD {
        let probe = modelpool_pool::SystemProbe::new();
        if probe.devices().iter().any(|d| d.device == Device::Cuda(0)) {
            return Device::Cuda(0);
        }
    }
    Device::Cpu
}
