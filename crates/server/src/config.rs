//! Settings: a TOML file plus `MODELPOOL__SECTION__KEY` environment overrides, read with
//! the `config` crate and validated into typed values. Every error names the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use modelpool_pool::{ModelFormat, ModelSpec};
use serde::Deserialize;

/// Exit code for an unusable configuration (EX_USAGE).
pub const EXIT_CONFIG: i32 = 64;

const MIN_CONTEXT: u32 = 16;
const MAX_CONTEXT: u32 = 1 << 20;
const MAX_SEQUENCES: u32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration: {0}")]
    Read(String),
    #[error("invalid configuration: `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// Validated settings of a `modelpool serve`.
#[derive(Clone, Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    /// How long in-flight streams may run after SIGTERM before they are cut.
    pub drain_timeout: Duration,
    /// A worker not ready after this long is killed.
    pub load_timeout: Duration,
    /// Where the private socket directory is created.
    pub runtime_dir: PathBuf,
    /// The binary that runs workers; the running executable when unset.
    pub worker_exe: Option<PathBuf>,
    pub models: Vec<ModelSpec>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    workers: RawWorkers,
    #[serde(default)]
    models: Vec<RawModel>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    drain_timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawWorkers {
    load_timeout: Option<String>,
    runtime_dir: Option<PathBuf>,
    exe: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    id: String,
    path: PathBuf,
    format: Option<String>,
    context_length: Option<u32>,
    max_sequences: Option<u32>,
}

impl Settings {
    /// Reads `file` (if any) and the environment, then validates.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(f) = file {
            if !f.is_file() {
                return Err(ConfigError::Read(format!("{} does not exist", f.display())));
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
            .map_err(|e| ConfigError::Read(e.to_string()))?;
        let base = file
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        Self::validate(raw, &base)
    }

    /// Parses a TOML string (no environment), resolving relative paths against `base`.
    pub fn from_toml(text: &str, base: &Path) -> Result<Self, ConfigError> {
        let raw: RawSettings = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError::Read(e.to_string()))?;
        Self::validate(raw, base)
    }

    fn validate(raw: RawSettings, base: &Path) -> Result<Self, ConfigError> {
        let listen = raw
            .server
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
        let drain_timeout = duration("server.drain_timeout", raw.server.drain_timeout, "30s")?;
        let load_timeout = duration("workers.load_timeout", raw.workers.load_timeout, "120s")?;
        if load_timeout.is_zero() {
            return Err(invalid("workers.load_timeout", "must be above zero"));
        }
        let mut models: Vec<ModelSpec> = Vec::with_capacity(raw.models.len());
        for (i, m) in raw.models.into_iter().enumerate() {
            let key = |k: &str| format!("models[{i}].{k}");
            if m.id.is_empty()
                || m.id.len() > 128
                || !m
                    .id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:/".contains(c))
            {
                return Err(invalid(
                    key("id"),
                    format!(
                        "must be 1-128 characters of [A-Za-z0-9-_.:/], got {:?}",
                        m.id
                    ),
                ));
            }
            if models.iter().any(|o| o.id == m.id) {
                return Err(invalid(key("id"), format!("duplicate id {:?}", m.id)));
            }
            let format = match m.format.as_deref().unwrap_or("gguf") {
                "gguf" => ModelFormat::Gguf,
                other => {
                    return Err(invalid(
                        key("format"),
                        format!("unsupported format {other:?}; supported: gguf"),
                    ))
                }
            };
            let context_length = m.context_length.unwrap_or(4096);
            if !(MIN_CONTEXT..=MAX_CONTEXT).contains(&context_length) {
                return Err(invalid(
                    key("context_length"),
                    format!("must be {MIN_CONTEXT}..={MAX_CONTEXT} tokens, got {context_length}"),
                ));
            }
            let max_sequences = m.max_sequences.unwrap_or(4);
            if !(1..=MAX_SEQUENCES).contains(&max_sequences) {
                return Err(invalid(
                    key("max_sequences"),
                    format!("must be 1..={MAX_SEQUENCES}, got {max_sequences}"),
                ));
            }
            let source = if m.path.is_absolute() {
                m.path
            } else {
                base.join(m.path)
            };
            models.push(ModelSpec {
                id: m.id,
                source,
                format,
                context_length,
                max_sequences,
            });
        }
        Ok(Settings {
            listen,
            drain_timeout,
            load_timeout,
            runtime_dir: raw.workers.runtime_dir.unwrap_or_else(std::env::temp_dir),
            worker_exe: raw.workers.exe,
            models,
        })
    }
}

fn duration(key: &str, value: Option<String>, default: &str) -> Result<Duration, ConfigError> {
    let text = value.as_deref().unwrap_or(default);
    humantime::parse_duration(text).map_err(|e| {
        invalid(
            key,
            format!("not a duration like \"30s\" or \"2m\" ({e}), got {text:?}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_relative_paths() {
        let s = Settings::from_toml(
            "[[models]]\nid = \"m\"\npath = \"x.gguf\"\n",
            Path::new("/etc/modelpool"),
        )
        .unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(s.drain_timeout, Duration::from_secs(30));
        assert_eq!(s.models[0].source, PathBuf::from("/etc/modelpool/x.gguf"));
        assert_eq!(s.models[0].context_length, 4096);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[server]\nlisten = \"nope\"", "server.listen"),
            ("[server]\ndrain_timeout = \"soon\"", "server.drain_timeout"),
            (
                "[[models]]\nid = \"a\"\npath = \"a\"\ncontext_length = 1",
                "models[0].context_length",
            ),
            (
                "[[models]]\nid = \"a\"\npath = \"a\"\n[[models]]\nid = \"a\"\npath = \"b\"",
                "models[1].id",
            ),
            (
                "[[models]]\nid = \"a\"\npath = \"a\"\nformat = \"onnx\"",
                "models[0].format",
            ),
        ];
        for (toml, key) in cases {
            let err = Settings::from_toml(toml, Path::new("/"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("`{key}`")), "{toml:?} gave {err}");
        }
        let err = Settings::from_toml("[server]\nlisten_addr = 1", Path::new("/"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen_addr"), "{err}");
    }
}
