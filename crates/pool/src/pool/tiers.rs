//! The storage tiers under a resident model, as the pool uses them: which file a load
//! reads (a spilled copy before the source, a URL downloaded first), spilling a loaded
//! model's file so its next load is cheap, warming files ahead of a load and dropping
//! an evicted model's pages when memory is what it was evicted for.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Inner, Pool};
use crate::events::{EventKind, EvictReason};
use crate::store::{pagecache, path_key, url_key, SpillHow, Store};
use crate::{Backend, BackendError, ModelSpec, PoolError, Quantized, Source};

/// Where a model is, top tier first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// A live worker holds it.
    Resident,
    /// Its file is (almost) all in the page cache: a load reads memory.
    Warm,
    /// A ready-to-load copy sits in the spill directory.
    Spilled,
    /// Only its source has it.
    Source,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Resident => "resident",
            Tier::Warm => "warm",
            Tier::Spilled => "spilled",
            Tier::Source => "source",
        }
    }
}

/// The file a load reads and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Resolved {
    pub file: PathBuf,
    /// The spill directory's key for this model's file.
    pub key: Option<String>,
    /// True when `file` is the spilled copy.
    pub from_spill: bool,
}

/// The file of a model as status sees it, without fetching or touching anything.
pub(super) struct FileView {
    pub file: Option<PathBuf>,
    pub spilled_bytes: u64,
}

fn store<B: Backend>(inner: &Inner<B>) -> Option<&Arc<Store>> {
    inner.config.store.as_ref()
}

/// Finds the file `spec`'s next load reads: the spilled copy when there is one, else
/// the source, downloading a URL source into the spill directory first. A download
/// runs as its own task: a caller that gives up does not waste it for the next one.
pub(super) async fn resolve<B: Backend>(
    inner: &Arc<Inner<B>>,
    spec: &ModelSpec,
) -> Result<Resolved, PoolError> {
    match &spec.source {
        Source::Path(path) => {
            let Some(store) = store(inner) else {
                return Ok(Resolved {
                    file: path.clone(),
                    key: None,
                    from_spill: false,
                });
            };
            // A missing source is reported by the prediction that follows.
            let key = path_key(path).ok();
            if let Some(art) = key.as_deref().and_then(|k| store.lookup(k)) {
                return Ok(Resolved {
                    file: art.path.clone(),
                    key,
                    from_spill: true,
                });
            }
            Ok(Resolved {
                file: path.clone(),
                key,
                from_spill: false,
            })
        }
        Source::Url { url, sha256 } => {
            let Some(store) = store(inner).cloned() else {
                return Err(PoolError::LoadFailed {
                    id: spec.id.clone(),
                    source: BackendError::InvalidModel(format!(
                        "{url} is a URL source, which needs a spill directory ([storage] spill_dir)"
                    )),
                });
            };
            let started = Instant::now();
            let (url, sha256) = (url.clone(), sha256.clone());
            let task = tokio::spawn(async move { store.fetch(&url, &sha256).await });
            let fetched = task.await.map_err(|e| PoolError::LoadFailed {
                id: spec.id.clone(),
                source: BackendError::Failed(format!("download task: {e}")),
            })?;
            let (art, downloaded) = fetched.map_err(|source| {
                let mut st = inner.lock();
                if let Ok(e) = st.entry(&spec.id) {
                    let _ = e.life.fail(source.to_string());
                }
                PoolError::Storage {
                    id: spec.id.clone(),
                    source,
                }
            })?;
            if downloaded {
                let duration = started.elapsed();
                inner.emit(
                    &spec.id,
                    EventKind::Fetched {
                        bytes: art.bytes,
                        duration,
                    },
                );
                inner.emit(
                    &spec.id,
                    EventKind::Spilled {
                        bytes: art.bytes,
                        duration,
                        how: SpillHow::Downloaded.as_str(),
                    },
                );
            }
            Ok(Resolved {
                file: art.path.clone(),
                key: Some(art.key.clone()),
                from_spill: !downloaded,
            })
        }
    }
}

/// After a load: a model loaded from its source gets a spilled copy in the background
/// (its key is protected from the load's start until its worker stops).
pub(super) fn loaded<B: Backend>(inner: &Arc<Inner<B>>, id: &str, resolved: &Resolved) {
    let (Some(store), Some(key)) = (store(inner), resolved.key.clone()) else {
        return;
    };
    // A model directory (safetensors) is not copied; its quantized weights are.
    let is_dir = resolved.file.is_dir();
    if is_dir || resolved.from_spill || store.lookup(&key).is_some() || !store.should_spill(&key) {
        return;
    }
    let store = Arc::clone(store);
    let weak = Arc::downgrade(inner);
    let (id, file) = (id.to_owned(), resolved.file.clone());
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let outcome = store.spill_file(&key, &file);
        let Some(inner) = weak.upgrade() else { return };
        match outcome {
            Ok((art, how)) => {
                tracing::info!(model = %id, bytes = art.bytes, how = how.as_str(),
                    secs = started.elapsed().as_secs_f64(), "spilled");
                inner.emit(
                    &id,
                    EventKind::Spilled {
                        bytes: art.bytes,
                        duration: started.elapsed(),
                        how: how.as_str(),
                    },
                );
            }
            Err(e) => {
                tracing::warn!(model = %id, error = %e, "spill failed; the model loads from its source");
                inner.emit(
                    &id,
                    EventKind::SpillFailed {
                        error: e.to_string(),
                    },
                );
            }
        }
    });
}

/// Removes the scratch directory a load wrote quantized weights into, for a load whose
/// model was forgotten meanwhile (nothing will keep what it wrote).
pub(super) fn discard_scratch(spec: &ModelSpec) {
    if let Some(Quantized::Write(file)) = &spec.quantized {
        remove_scratch_of(file);
    }
}

/// Removes the scratch directory holding `file`, the quantized weights a load wrote.
fn remove_scratch_of(file: &Path) {
    if let Some(dir) = file.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// After a load quantized at load time: the quantized weights it wrote move into the
/// spill directory (and stay while the model is resident), so the next load skips
/// quantizing; a failed load's scratch directory is removed.
pub(super) fn after_quantized_load<B: Backend>(
    inner: &Arc<Inner<B>>,
    spec: &ModelSpec,
    loaded: bool,
) {
    let Some(store) = store(inner) else { return };
    let key = inner
        .lock()
        .entry(&spec.id)
        .ok()
        .and_then(|e| e.quantized_key.clone());
    let Some(key) = key else { return };
    let file = match &spec.quantized {
        Some(Quantized::Write(file)) => file,
        // Quantized weights that no longer load (another mistral.rs wrote them, or
        // they were replaced under it) must not fail every load after this one: the
        // next load quantizes again and writes fresh ones.
        Some(Quantized::Reuse(file)) if !loaded => {
            tracing::warn!(model = %spec.id, file = %file.display(),
                "load from kept quantized weights failed; discarding them");
            store.remove(&key);
            return;
        }
        _ => return,
    };
    let written_to = file.clone();
    let remove_scratch = move || remove_scratch_of(&written_to);
    let written = if loaded {
        modelpool_catalog::quantized_weights_shards(file)
    } else {
        Vec::new()
    };
    let [file] = written.as_slice() else {
        if loaded {
            tracing::warn!(model = %spec.id, file = %file.display(), shards = written.len(),
                "quantized weights not kept: the worker wrote none, or more than one shard");
        }
        remove_scratch();
        return;
    };
    let store = Arc::clone(store);
    let weak = Arc::downgrade(inner);
    let (id, file) = (spec.id.clone(), file.clone());
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let outcome = store.spill_file(&key, &file);
        remove_scratch();
        let Some(inner) = weak.upgrade() else { return };
        match outcome {
            Ok((art, _)) => {
                tracing::info!(model = %id, bytes = art.bytes, "quantized weights kept for the next load");
                inner.emit(
                    &id,
                    EventKind::Spilled {
                        bytes: art.bytes,
                        duration: started.elapsed(),
                        how: "quantized",
                    },
                );
            }
            Err(e) => {
                tracing::warn!(model = %id, error = %e, "could not keep the quantized weights");
                inner.emit(
                    &id,
                    EventKind::SpillFailed {
                        error: e.to_string(),
                    },
                );
            }
        }
    });
}

/// After a worker stopped: its artifact may be evicted again, and when it was stopped
/// for memory, its file's pages leave the page cache too.
pub(super) fn stopped<B: Backend>(
    inner: &Inner<B>,
    resolved: Option<&Resolved>,
    quantized_key: Option<&str>,
    reason: &EvictReason,
) {
    if let (Some(store), Some(key)) = (store(inner), quantized_key) {
        store.release(key);
    }
    let Some(resolved) = resolved else { return };
    if let (Some(store), Some(key)) = (store(inner), &resolved.key) {
        store.release(key);
    }
    if matches!(reason, EvictReason::MakeRoom { .. }) {
        if let Err(e) = pagecache::drop_cached(&resolved.file) {
            tracing::debug!(file = %resolved.file.display(), error = %e, "could not drop cached pages");
        }
    }
}

/// Reads `file` into the page cache on a blocking thread; errors only logged.
pub(super) async fn warm(file: PathBuf) {
    let shown = file.display().to_string();
    let res = tokio::task::spawn_blocking(move || pagecache::prefetch(&file)).await;
    if let Ok(Err(e)) = res {
        tracing::debug!(file = %shown, error = %e, "prefetch failed");
    }
}

/// What status shows of a model's file: the file its next load reads and the bytes of
/// its spilled copy.
pub(super) fn view<B: Backend>(
    inner: &Inner<B>,
    spec: &ModelSpec,
    resolved: Option<&Resolved>,
) -> FileView {
    let key = match &spec.source {
        Source::Path(p) => resolved
            .and_then(|r| r.key.clone())
            .or_else(|| store(inner).and(path_key(p).ok())),
        Source::Url { sha256, .. } => Some(url_key(sha256)),
    };
    let spilled = key
        .as_deref()
        .and_then(|k| store(inner).and_then(|s| s.peek(k)));
    let file = match (&spilled, &spec.source) {
        (Some(a), _) => Some(a.path.clone()),
        (None, Source::Path(p)) => Some(p.clone()),
        (None, Source::Url { .. }) => None,
    };
    FileView {
        file,
        spilled_bytes: spilled.map_or(0, |a| a.bytes),
    }
}

/// Bytes of `file` in the page cache and its length (zeros when unreadable).
pub(super) fn cache_residency(file: &Path) -> (u64, u64) {
    let len = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    (pagecache::cached_bytes(file).unwrap_or(0), len)
}

impl<B: Backend> Pool<B> {
    /// Reads `id`'s file into the page cache without starting a worker (downloading a
    /// URL source first), so its next load reads memory. Returns the bytes cached and
    /// the file's length, and how long it took.
    pub async fn prefetch(&self, id: &str) -> Result<(u64, u64, Duration), PoolError> {
        let started = Instant::now();
        let spec = self.inner.lock().entry(id)?.spec.clone();
        let resolved = resolve(&self.inner, &spec).await?;
        warm(resolved.file.clone()).await;
        let (cached, len) = cache_residency(&resolved.file);
        Ok((cached, len, started.elapsed()))
    }

    /// The spill directory's usage, when there is one.
    pub fn store_usage(&self) -> Option<crate::StoreUsage> {
        store(&self.inner).map(|s| s.usage())
    }
}
