//! What the pool knows about a model ([`ModelSpec`], [`Footprint`], [`Charge`]), and the
//! contract an inference engine fulfils to make one resident ([`Backend`], [`Instance`]),
//! with its one error, [`BackendError`]. The pool decides with these and the supervisor
//! implements them; this crate holds no state, starts nothing and links no engine.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

pub use modelpool_catalog::{EngineKind, EngineOptions, ModelFormat, NATIVE_PRECISION, PRECISIONS};

/// Quantized weights for a load quantized at load time (the pool decides which,
/// from the spill directory).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Quantized {
    /// Load these already-quantized weights instead of quantizing again.
    Reuse(PathBuf),
    /// Quantize, and write the result here for the next load.
    Write(PathBuf),
}

/// A memory tier the pool budgets: host RAM or one GPU's VRAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Device {
    Cpu,
    Cuda(u32),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("unknown device {s:?}; expected cpu, cuda:N or auto")),
        }
    }
}

/// Bytes charged to each device. A CPU model charges RAM only; a GPU model charges its
/// GPU and the host memory its worker process needs besides.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Charge(pub BTreeMap<Device, u64>);

impl Charge {
    pub fn on(device: Device, bytes: u64) -> Self {
        Self(BTreeMap::from([(device, bytes)]))
    }
    pub fn get(&self, device: Device) -> u64 {
        self.0.get(&device).copied().unwrap_or(0)
    }
    pub fn add(&mut self, other: &Charge) {
        for (d, b) in &other.0 {
            *self.0.entry(*d).or_default() += b;
        }
    }
    /// Sum over devices, for one-number displays.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
    /// `self - other` per device, never below zero.
    pub fn saturating_sub(&self, other: &Charge) -> Charge {
        Charge(
            self.0
                .iter()
                .map(|(d, b)| (*d, b.saturating_sub(other.get(*d))))
                .collect(),
        )
    }
}

/// A model's predicted memory, from its file header and the engine's measured overhead.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Footprint {
    /// Weights as the engine holds them.
    pub weights_bytes: u64,
    /// Bytes of `weights_bytes` that are pages of the model's file mapped shared (as
    /// llama.cpp maps a GGUF's tensors): host memory the page cache holds once, however
    /// many workers map that file. Zero when the engine copies its weights.
    pub mapped_bytes: u64,
    /// KV cache for the configured context and sequences, fully grown.
    pub kv_bytes: u64,
    /// Runtime, tokenizer, buffers: measured per engine.
    pub overhead_bytes: u64,
    /// Scratch memory of a prompt that fills the context (attention mask and
    /// activations of a one-pass prefill).
    pub activation_bytes: u64,
    /// The bytes to reserve, per device.
    pub charge: Charge,
    /// Whether the engine allocates and touches the whole KV cache at load (llama.cpp
    /// clears it), so a measurement right after the load already holds it; otherwise
    /// it grows later (mistral.rs) and is charged on top of that measurement.
    pub kv_resident_at_load: bool,
}

impl Footprint {
    pub fn total_bytes(&self) -> u64 {
        self.charge.total()
    }

    /// Bytes a worker holds right after its load, as predicted: what the pool compares
    /// with its measurement then.
    pub fn at_load_bytes(&self) -> u64 {
        let kv = if self.kv_resident_at_load {
            self.kv_bytes
        } else {
            0
        };
        self.weights_bytes + self.overhead_bytes + kv
    }

    /// Bytes that grow after the load (KV cache grown lazily, prompt scratch), charged
    /// on top of what was measured then.
    pub fn growth_bytes(&self) -> u64 {
        let kv = if self.kv_resident_at_load {
            0
        } else {
            self.kv_bytes
        };
        kv + self.activation_bytes
    }
}

/// Where a model's file comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A file on this machine (local disk or a mounted network share).
    Path(PathBuf),
    /// An `http(s)://` URL, downloaded into the spill directory and kept only when its
    /// sha256 matches.
    Url { url: String, sha256: String },
}

impl Source {
    /// The local path, for a path source.
    pub fn path(&self) -> Option<&std::path::Path> {
        match self {
            Source::Path(p) => Some(p),
            Source::Url { .. } => None,
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Path(p) => write!(f, "{}", p.display()),
            Source::Url { url, .. } => f.write_str(url),
        }
    }
}

impl From<PathBuf> for Source {
    fn from(p: PathBuf) -> Self {
        Source::Path(p)
    }
}

/// A registered model: everything needed to load it.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    /// The id clients name in requests.
    pub id: String,
    /// Where the weights file comes from. A [`Backend`] always sees a
    /// [`Source::Path`]: the pool resolves URLs and spilled copies before a load.
    pub source: Source,
    pub format: ModelFormat,
    /// Where its weights and KV cache live; `auto` is resolved before the pool sees it.
    pub device: Device,
    /// Tokens of context to allocate for.
    pub context_length: u32,
    /// Sequences the engine may batch at once.
    pub max_sequences: u32,
    /// Requests served at once; more wait in the model's queue.
    pub max_concurrency: u32,
    /// A pinned model is never evicted to make room or for idleness.
    pub pinned: bool,
    /// Unload after this long without requests.
    pub idle_ttl: Option<Duration>,
    /// Weight precisions to try, best first, for a model quantized at load
    /// ([`NATIVE_PRECISION`], "q8_0", "q4k", ...): the pool loads the first that fits.
    /// Empty: the precision of the file (GGUF).
    pub precisions: Vec<String>,
    /// The precision of this load: set by the pool on the spec it hands a backend (and
    /// on the one it asks for a footprint), from [`ModelSpec::precisions`].
    pub precision: Option<String>,
    /// Quantized weights to reuse or write: set by the pool like `precision`.
    pub quantized: Option<Quantized>,
    /// The engine that runs it (`None`: the default for the format) and the engine's
    /// own switches, typed by the catalogue. The pool passes them to the backend and
    /// shows the engine's name; it decides nothing by them.
    pub engine: EngineOptions,
}

impl ModelSpec {
    /// The engine it runs in: the one it names, or the default for its format.
    pub fn engine_kind(&self) -> Result<EngineKind, String> {
        self.engine.resolve(self.format)
    }

    /// Cells of the model's KV cache: llama.cpp's `kv_budget_tokens`, or `context_length` for
    /// each of `max_sequences`.
    pub fn kv_cells(&self) -> u64 {
        self.engine.llama_cpp.kv_budget_tokens.map_or_else(
            || u64::from(self.context_length) * u64::from(self.max_sequences.max(1)),
            u64::from,
        )
    }

    /// The local file a backend loads (see [`ModelSpec::source`]).
    pub fn local_file(&self) -> Result<&std::path::Path, BackendError> {
        self.source.path().ok_or_else(|| {
            BackendError::InvalidModel(format!(
                "model `{}`: {} has not been fetched to a local file",
                self.id, self.source
            ))
        })
    }

    /// The precisions a load may use, best first; `[None]` for a model whose files fix
    /// it.
    pub fn candidate_precisions(&self) -> Vec<Option<String>> {
        if self.precisions.is_empty() {
            vec![None]
        } else {
            self.precisions.iter().cloned().map(Some).collect()
        }
    }

    /// This spec loaded at `precision` (`None`: as stored).
    pub fn at_precision(&self, precision: &Option<String>) -> Self {
        Self {
            precision: precision.clone(),
            ..self.clone()
        }
    }

    /// A spec with the defaults the server uses for fields a config leaves out.
    pub fn new(id: impl Into<String>, source: impl Into<PathBuf>) -> Self {
        Self {
            id: id.into(),
            source: Source::Path(source.into()),
            format: ModelFormat::Gguf,
            device: Device::Cpu,
            context_length: 4096,
            max_sequences: 1,
            max_concurrency: 4,
            pinned: false,
            idle_ttl: None,
            precisions: Vec::new(),
            precision: None,
            quantized: None,
            engine: EngineOptions::default(),
        }
    }
}

/// Why a backend could not make a model resident.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// The model's files are unusable (missing, not a model, unsupported); retrying
    /// will not help.
    #[error("{0}")]
    InvalidModel(String),
    /// The load did not finish in time.
    #[error("{0}")]
    Timeout(String),
    /// The worker failed for another reason (crashed, could not start).
    #[error("{0}")]
    Failed(String),
}

/// A resident model: one live worker.
pub trait Instance: Send + Sync + 'static {
    /// Operating-system process id of the worker, if it is a process.
    fn pid(&self) -> Option<u32>;
    /// Bytes of memory the worker holds right now.
    fn resident_bytes(&self) -> u64;
    /// The most bytes the worker has held at once.
    fn peak_bytes(&self) -> u64 {
        self.resident_bytes()
    }
    /// Stops the worker and returns once its memory is released.
    fn shutdown(&self) -> impl Future<Output = ()> + Send;
    /// Resolves when the worker has ended, for whatever reason, saying how ("killed by
    /// signal 9"). The pool watches it to notice crashes.
    fn exited(&self) -> impl Future<Output = String> + Send;
}

/// Makes models resident. The server implements it with worker processes; tests with
/// fakes.
pub trait Backend: Send + Sync + 'static {
    type Instance: Instance;
    /// Predicts what loading `spec` will cost, before anything is loaded.
    fn footprint(&self, spec: &ModelSpec) -> Result<Footprint, BackendError>;
    /// Predicts `spec` at each of `precisions` (its candidates, best first). A backend
    /// that reads files to predict overrides it to read them once.
    fn footprints(
        &self,
        spec: &ModelSpec,
        precisions: &[Option<String>],
    ) -> Result<Vec<Footprint>, BackendError> {
        precisions
            .iter()
            .map(|precision| self.footprint(&spec.at_precision(precision)))
            .collect()
    }
    /// Makes `spec` resident, reporting each stage it reaches ("starting worker",
    /// "loading weights", ...) to `progress`.
    fn load(
        &self,
        spec: &ModelSpec,
        progress: Progress,
    ) -> impl Future<Output = Result<Self::Instance, BackendError>> + Send;
}

/// A shared backend is a backend: the pool may own an `Arc` of one that its owner
/// also keeps (tests count its loads through it).
impl<B: Backend> Backend for std::sync::Arc<B> {
    type Instance = B::Instance;
    fn footprint(&self, spec: &ModelSpec) -> Result<Footprint, BackendError> {
        (**self).footprint(spec)
    }
    fn footprints(
        &self,
        spec: &ModelSpec,
        precisions: &[Option<String>],
    ) -> Result<Vec<Footprint>, BackendError> {
        (**self).footprints(spec, precisions)
    }
    fn load(
        &self,
        spec: &ModelSpec,
        progress: Progress,
    ) -> impl Future<Output = Result<Self::Instance, BackendError>> + Send {
        (**self).load(spec, progress)
    }
}

/// Where a backend reports the stages of a load; the pool turns them into events.
pub type Progress = std::sync::Arc<dyn Fn(&str) + Send + Sync>;
