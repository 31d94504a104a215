//! The spill directory: the NVMe-backed tier under resident models, and the only crate
//! that lays out files in it. It must not decide what is resident (the pool does), start
//! a worker (the supervisor does) or link an inference engine.
//!
//! Per model it keeps the ready-to-load file (hard-linked when the source is on the same
//! file system, copied when it is not, downloaded and checksummed when the source is an
//! `http(s)://` URL), so that reloading an evicted model never goes back to a slow or
//! remote source. A moka cache weighted by bytes indexes the artifacts and evicts the
//! least recently used when the directory is over its byte budget; the artifact of a
//! resident model is never deleted (the eviction listener parks it until its model
//! stops). Beside them, under [`SAVED_PREFIXES_DIR`], live the saved KV prefixes of
//! llama.cpp models: their file format ([`saved`]) and the server's index that keeps
//! them within their budget ([`saved_index`]). [`pagecache`] asks the kernel what of a
//! file is cached. Every failure is a [`StoreError`].
//!
//! Crash safety: every file is written under a temporary name, fsynced, then renamed,
//! and a small JSON record with its size and sha256 sits beside it. At startup the
//! directory is scanned: temporary files, files without a record and files whose size
//! or checksum disagree with their record are deleted.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use moka::notification::RemovalCause;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use modelpool_catalog::units::human_bytes;

mod fetch;
pub mod pagecache;
pub mod saved;
pub mod saved_index;

pub use saved::SavedPrefixes;
pub use saved_index::SavedPrefixIndex;

/// The file that marks a directory as modelpool's own; nothing else is ever deleted.
pub const MARKER: &str = "MODELPOOL_SPILL_DIR";
/// The subdirectory where llama.cpp workers save the KV state of kept prefixes. The
/// workers write and verify its files and the engine's saved-prefix index keeps them
/// within their budget; the store leaves it alone.
pub const SAVED_PREFIXES_DIR: &str = "prefixes";
const DATA_EXT: &str = "gguf";
/// Quantized weights a load wrote, named as their engine expects.
const QUANTIZED_EXT: &str = modelpool_catalog::QUANTIZED_WEIGHTS_EXT;
const META_EXT: &str = "json";
const TMP_EXT: &str = "tmp";
/// After a failed spill (a full disk, an I/O error), the same file is not tried again
/// for this long.
const SPILL_RETRY_AFTER: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("spill directory {dir}: {reason}")]
    Dir { dir: String, reason: String },
    #[error("no space left in the spill directory {dir} after {} of {}; the partial file was removed", human_bytes(*written_bytes), human_bytes(*total_bytes))]
    NoSpace {
        dir: String,
        written_bytes: u64,
        total_bytes: u64,
    },
    #[error("{what} is {}, more than the whole spill budget of {}", human_bytes(*size_bytes), human_bytes(*budget_bytes))]
    TooLarge {
        what: String,
        size_bytes: u64,
        budget_bytes: u64,
    },
    #[error("downloading {url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("checksum mismatch for {url}: expected sha256 {expected}, got {actual}; the download was discarded")]
    Checksum {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("spill directory i/o: {0}")]
    Io(String),
    #[error("not a saved prefix (bad magic)")]
    NotSavedPrefix,
    #[error("a saved prefix for another model or setting")]
    ForeignPrefix,
    #[error("the saved prefix holds {tokens} tokens; this model's context is {limit}")]
    PrefixTooLong { tokens: u32, limit: u32 },
    #[error("saved prefix checksum mismatch: truncated or corrupted")]
    PrefixCorrupt,
}

impl From<io::Error> for StoreError {
    fn from(e: io::Error) -> Self {
        io_err(e)
    }
}

/// One ready-to-load file in the spill directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    pub key: String,
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: String,
}

/// How an artifact came to be, for events and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpillHow {
    Linked,
    Copied,
    Downloaded,
}

impl SpillHow {
    pub fn as_str(self) -> &'static str {
        match self {
            SpillHow::Linked => "linked",
            SpillHow::Copied => "copied",
            SpillHow::Downloaded => "downloaded",
        }
    }
}

/// What the startup scan found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScanReport {
    pub kept: usize,
    pub kept_bytes: u64,
    /// Temporary files left by a crash or a full disk.
    pub partial: usize,
    /// Files without a record, records without a file, size or checksum mismatches.
    pub corrupt: usize,
    /// Anything else (unknown names, directories).
    pub unknown: usize,
}

/// The spill directory's usage now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreUsage {
    pub budget_bytes: u64,
    pub used_bytes: u64,
    pub artifacts: u64,
    /// Bytes of artifacts kept past the budget because their models are resident.
    pub held_bytes: u64,
}

#[derive(Serialize, Deserialize)]
struct Record {
    version: u32,
    key: String,
    bytes: u64,
    sha256: String,
    origin: String,
}

struct Shared {
    /// Keys of artifacts whose models are resident (never deleted), with how many
    /// resident models use each: several ids may share one source file.
    protected: Mutex<HashMap<String, usize>>,
    /// Protected artifacts the index evicted for room; back in it once released.
    held: Mutex<HashMap<String, Arc<Artifact>>>,
}

/// The spill directory and its index. Cheap to share behind an `Arc`.
pub struct Store {
    dir: PathBuf,
    budget_bytes: u64,
    index: moka::sync::Cache<String, Arc<Artifact>>,
    shared: Arc<Shared>,
    /// One download at a time per key.
    fetching: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Keys whose last spill failed, and when: not retried for [`SPILL_RETRY_AFTER`], so
    /// a full disk does not cost a failed copy at every load.
    failed: Mutex<HashMap<String, Instant>>,
    client: reqwest::Client,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .field("budget_bytes", &self.budget_bytes)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Index weights are KiB so that a u32 weight covers artifacts up to 4 TiB.
fn weight_kib(bytes: u64) -> u32 {
    bytes.div_ceil(1024).min(u32::MAX as u64) as u32
}

/// The key of a URL source: its content checksum.
pub fn url_key(sha256: &str) -> String {
    format!("u-{}", sha256.to_ascii_lowercase())
}

/// The key of a local file: its canonical path, length and modification time, so a
/// replaced source file never reloads a stale copy. For a model directory, the name,
/// length and modification time of every file in it: a weights file rewritten in
/// place changes the key even though the directory itself did not change.
pub fn path_key(path: &Path) -> io::Result<String> {
    let canonical = fs::canonicalize(path)?;
    let meta = fs::metadata(&canonical)?;
    let mut h = Sha256::new();
    h.update(canonical.as_os_str().as_encoded_bytes());
    hash_meta(&mut h, &meta)?;
    if meta.is_dir() {
        let mut files: Vec<_> = fs::read_dir(&canonical)?
            .filter_map(|e| e.ok())
            .filter_map(|e| Some((e.file_name(), e.metadata().ok()?)))
            .filter(|(_, m)| m.is_file())
            .collect();
        files.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, meta) in files {
            h.update([0]);
            h.update(name.as_encoded_bytes());
            hash_meta(&mut h, &meta)?;
        }
    }
    Ok(format!("p-{}", &hex(&h.finalize())[..32]))
}

fn hash_meta(h: &mut Sha256, meta: &fs::Metadata) -> io::Result<()> {
    let mtime = meta
        .modified()?
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    h.update([0]);
    h.update(meta.len().to_le_bytes());
    h.update(mtime.to_le_bytes());
    Ok(())
}

/// The key of the quantized weights of the model at `source_key` at `precision`.
pub fn quantized_key(source_key: &str, precision: &str) -> String {
    let mut h = Sha256::new();
    h.update(source_key.as_bytes());
    h.update([0]);
    h.update(precision.to_ascii_lowercase().as_bytes());
    format!("q-{}", &hex(&h.finalize())[..32])
}

/// The extension of an artifact's data file.
fn data_ext(key: &str) -> &'static str {
    if key.starts_with("q-") {
        QUANTIZED_EXT
    } else {
        DATA_EXT
    }
}

fn valid_key(key: &str) -> bool {
    (key.starts_with("u-") || key.starts_with("p-") || key.starts_with("q-"))
        && key.len() <= 66
        && key[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// `bytes` as lowercase hexadecimal.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn io_err(e: io::Error) -> StoreError {
    StoreError::Io(e.to_string())
}

/// Removes a temporary file unless the write it belongs to succeeded, so a failed or
/// cancelled spill never leaves a partial file behind.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl TempFile {
    fn new(dir: &Path, key: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        Self {
            path: dir.join(format!(".{key}.{}-{nanos}.{TMP_EXT}", std::process::id())),
            keep: false,
        }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn sha256_file(path: &Path) -> io::Result<(u64, String)> {
    let mut file = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, hex(&h.finalize())))
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Store {
    /// Opens (creating it if needed) the spill directory, discards what a crash or a
    /// full disk left half-written or corrupt, and indexes the rest. Reads every
    /// artifact once to verify its checksum: call it from a blocking context.
    pub fn open(dir: &Path, budget_bytes: u64) -> Result<(Self, ScanReport), StoreError> {
        let dir_err = |reason: String| StoreError::Dir {
            dir: dir.display().to_string(),
            reason,
        };
        fs::create_dir_all(dir).map_err(|e| dir_err(e.to_string()))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| dir_err(e.to_string()))?;
        let marker = dir.join(MARKER);
        let entries: Vec<PathBuf> = fs::read_dir(dir)
            .map_err(|e| dir_err(e.to_string()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        if !marker.exists() {
            if !entries.is_empty() {
                return Err(dir_err(format!(
                    "holds {} entries that modelpool did not write (no {MARKER} file); \
                     point spill_dir at an empty directory or one modelpool created",
                    entries.len()
                )));
            }
            fs::write(
                &marker,
                b"modelpool spill directory; its contents are managed\n",
            )
            .map_err(|e| dir_err(e.to_string()))?;
        }
        let shared = Arc::new(Shared {
            protected: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
        });
        let listener_shared = Arc::clone(&shared);
        let index = moka::sync::Cache::builder()
            .max_capacity(budget_bytes.div_ceil(1024))
            .weigher(|_k: &String, a: &Arc<Artifact>| weight_kib(a.bytes))
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .eviction_listener(move |key: Arc<String>, art: Arc<Artifact>, cause| {
                if cause != RemovalCause::Size {
                    return;
                }
                if lock(&listener_shared.protected).contains_key(key.as_str()) {
                    lock(&listener_shared.held).insert((*key).clone(), art);
                    return;
                }
                tracing::info!(key = %key, bytes = art.bytes, "spill artifact evicted (spill budget)");
                remove_artifact(&art.path);
            })
            .build();
        let store = Self {
            dir: dir.to_path_buf(),
            budget_bytes,
            index,
            shared,
            fetching: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
            client: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .build()
                .map_err(|e| dir_err(format!("http client: {e}")))?,
        };
        let report = store.scan(entries);
        tracing::info!(dir = %dir.display(), kept = report.kept, kept_bytes = report.kept_bytes,
            partial = report.partial, corrupt = report.corrupt, unknown = report.unknown,
            "spill directory scanned");
        Ok((store, report))
    }

    fn scan(&self, entries: Vec<PathBuf>) -> ScanReport {
        let mut report = ScanReport::default();
        let mut data = Vec::new();
        let mut records = HashSet::new();
        for path in entries {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name == MARKER || name == SAVED_PREFIXES_DIR {
                continue;
            }
            let (stem, ext) = name.rsplit_once('.').unwrap_or((&name, ""));
            let is_file = path
                .symlink_metadata()
                .map(|m| m.is_file())
                .unwrap_or(false);
            match ext {
                TMP_EXT if is_file => {
                    tracing::warn!(file = %path.display(), "removing partial spill file");
                    report.partial += 1;
                    let _ = fs::remove_file(&path);
                }
                DATA_EXT | QUANTIZED_EXT if is_file && valid_key(stem) && ext == data_ext(stem) => {
                    data.push((stem.to_owned(), path))
                }
                META_EXT if is_file && valid_key(stem) => {
                    records.insert(stem.to_owned());
                }
                _ => {
                    tracing::warn!(entry = %path.display(), "removing unknown entry in the spill directory");
                    report.unknown += 1;
                    let _ = if path.is_dir() && !path.is_symlink() {
                        fs::remove_dir_all(&path)
                    } else {
                        fs::remove_file(&path)
                    };
                }
            }
        }
        for (key, path) in data {
            records.remove(&key);
            match self.verify(&key, &path) {
                Ok(art) => {
                    report.kept += 1;
                    report.kept_bytes += art.bytes;
                    self.index.insert(key, Arc::new(art));
                }
                Err(reason) => {
                    tracing::warn!(file = %path.display(), %reason, "removing corrupt spill artifact");
                    report.corrupt += 1;
                    remove_artifact(&path);
                }
            }
        }
        for orphan in records {
            report.corrupt += 1;
            let _ = fs::remove_file(self.dir.join(format!("{orphan}.{META_EXT}")));
        }
        self.settle();
        report
    }

    fn verify(&self, key: &str, path: &Path) -> Result<Artifact, String> {
        let text = fs::read_to_string(path.with_extension(META_EXT))
            .map_err(|e| format!("no record: {e}"))?;
        let record: Record =
            serde_json::from_str(&text).map_err(|e| format!("unreadable record: {e}"))?;
        if record.key != key {
            return Err(format!("record names key {}", record.key));
        }
        let len = fs::metadata(path).map_err(|e| e.to_string())?.len();
        if len != record.bytes {
            return Err(format!("{len} bytes on disk, record says {}", record.bytes));
        }
        let (_, sha256) = sha256_file(path).map_err(|e| e.to_string())?;
        if sha256 != record.sha256 {
            return Err(format!(
                "sha256 {sha256} on disk, record says {}",
                record.sha256
            ));
        }
        Ok(Artifact {
            key: key.to_owned(),
            path: path.to_path_buf(),
            bytes: len,
            sha256,
        })
    }

    /// A fresh scratch directory name for a worker to write `key`'s quantized weights
    /// into, and the file in it to write; [`Store::spill_file`] takes the file in, and
    /// a crash leaves only a directory the next startup scan removes.
    pub fn scratch_path(&self, key: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        self.dir
            .join(format!(".{key}.{}-{nanos}.{TMP_EXT}", std::process::id()))
            .join(format!("model.{QUANTIZED_EXT}"))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn budget_bytes(&self) -> u64 {
        self.budget_bytes
    }

    /// The artifact for `key`, if the directory has it; marks it recently used.
    pub fn lookup(&self, key: &str) -> Option<Arc<Artifact>> {
        let found = self
            .index
            .get(key)
            .or_else(|| lock(&self.shared.held).get(key).cloned())?;
        if found.path.is_file() {
            Some(found)
        } else {
            // Deleted behind our back: forget it.
            self.index.invalidate(key);
            lock(&self.shared.held).remove(key);
            None
        }
    }

    /// Like [`lookup`](Self::lookup) without touching the LRU order (for status).
    pub fn peek(&self, key: &str) -> Option<Arc<Artifact>> {
        self.index
            .iter()
            .find(|(k, _)| k.as_str() == key)
            .map(|(_, a)| a)
            .or_else(|| lock(&self.shared.held).get(key).cloned())
    }

    /// Keeps `key`'s artifact while a model using it is resident (counted: models
    /// registered under several ids share one artifact).
    pub fn protect(&self, key: &str) {
        *lock(&self.shared.protected)
            .entry(key.to_owned())
            .or_insert(0) += 1;
    }

    /// One model using `key`'s artifact stopped; when it was the last, the index may
    /// evict the artifact again.
    pub fn release(&self, key: &str) {
        {
            let mut protected = lock(&self.shared.protected);
            match protected.get_mut(key) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    return;
                }
                _ => {
                    protected.remove(key);
                }
            }
        }
        let parked = lock(&self.shared.held).remove(key);
        if let Some(art) = parked {
            self.index.insert(key.to_owned(), art);
            self.settle();
        }
    }

    /// Brings the index under budget. When it evicted a protected artifact, that one is
    /// parked by the listener; putting it back makes it most recently used, so the next
    /// round evicts the least recently used unprotected artifact instead. Ends when the
    /// index fits or only protected artifacts are left (then they stay, over budget,
    /// and `usage().held_bytes` says so).
    fn settle(&self) {
        self.index.run_pending_tasks();
        loop {
            let parked: Vec<(String, Arc<Artifact>)> = lock(&self.shared.held).drain().collect();
            if parked.is_empty() {
                return;
            }
            let before = self.index.entry_count() + parked.len() as u64;
            for (k, a) in parked {
                self.index.insert(k, a);
            }
            self.index.run_pending_tasks();
            let after = self.index.entry_count() + lock(&self.shared.held).len() as u64;
            if after == before {
                // Nothing unprotected was left to evict.
                return;
            }
        }
    }

    pub fn usage(&self) -> StoreUsage {
        self.index.run_pending_tasks();
        let mut usage = StoreUsage {
            budget_bytes: self.budget_bytes,
            ..StoreUsage::default()
        };
        for (_, a) in self.index.iter() {
            usage.used_bytes += a.bytes;
            usage.artifacts += 1;
        }
        for a in lock(&self.shared.held).values() {
            usage.used_bytes += a.bytes;
            usage.held_bytes += a.bytes;
            usage.artifacts += 1;
        }
        usage
    }

    fn check_size(&self, what: &str, bytes: u64) -> Result<(), StoreError> {
        if bytes > self.budget_bytes {
            return Err(StoreError::TooLarge {
                what: what.to_owned(),
                size_bytes: bytes,
                budget_bytes: self.budget_bytes,
            });
        }
        Ok(())
    }

    /// Whether spilling `key` is worth trying now (no recent failure).
    pub fn should_spill(&self, key: &str) -> bool {
        lock(&self.failed)
            .get(key)
            .is_none_or(|t| t.elapsed() >= SPILL_RETRY_AFTER)
    }

    /// Puts a local model file into the directory under `key` (a hard link when it is
    /// on the same file system, else a copy), unless it is there already. Blocking. A
    /// failure is remembered (see [`should_spill`](Self::should_spill)).
    pub fn spill_file(
        &self,
        key: &str,
        src: &Path,
    ) -> Result<(Arc<Artifact>, SpillHow), StoreError> {
        let outcome = self.spill_file_once(key, src);
        let mut failed = lock(&self.failed);
        match &outcome {
            Ok(_) => failed.remove(key),
            Err(_) => failed.insert(key.to_owned(), Instant::now()),
        };
        outcome
    }

    fn spill_file_once(
        &self,
        key: &str,
        src: &Path,
    ) -> Result<(Arc<Artifact>, SpillHow), StoreError> {
        if let Some(found) = self.lookup(key) {
            return Ok((found, SpillHow::Linked));
        }
        let total = fs::metadata(src).map_err(io_err)?.len();
        self.check_size(&src.display().to_string(), total)?;
        let mut tmp = TempFile::new(&self.dir, key);
        let how = if fs::hard_link(src, &tmp.path).is_ok() {
            SpillHow::Linked
        } else {
            self.copy_into(src, &tmp.path, total)?;
            SpillHow::Copied
        };
        let (bytes, sha256) = sha256_file(&tmp.path).map_err(io_err)?;
        let art = self.commit(key, &mut tmp, bytes, sha256, &src.display().to_string())?;
        Ok((art, how))
    }

    fn copy_into(&self, src: &Path, dst: &Path, total: u64) -> Result<(), StoreError> {
        let mut from = File::open(src).map_err(io_err)?;
        let mut to = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dst)
            .map_err(io_err)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut written = 0u64;
        loop {
            let n = from.read(&mut buf).map_err(io_err)?;
            if n == 0 {
                break;
            }
            to.write_all(&buf[..n])
                .map_err(|e| self.write_error(e, written, total))?;
            written += n as u64;
        }
        to.sync_all()
            .map_err(|e| self.write_error(e, written, total))
    }

    fn write_error(&self, e: io::Error, written: u64, total: u64) -> StoreError {
        if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) {
            StoreError::NoSpace {
                dir: self.dir.display().to_string(),
                written_bytes: written,
                total_bytes: total,
            }
        } else {
            io_err(e)
        }
    }

    /// Renames a fully written, fsynced temporary file to its final name, writes its
    /// record the same way, and indexes it.
    fn commit(
        &self,
        key: &str,
        tmp: &mut TempFile,
        bytes: u64,
        sha256: String,
        origin: &str,
    ) -> Result<Arc<Artifact>, StoreError> {
        let path = self.dir.join(format!("{key}.{}", data_ext(key)));
        let record = Record {
            version: 1,
            key: key.to_owned(),
            bytes,
            sha256: sha256.clone(),
            origin: origin.to_owned(),
        };
        let mut record_tmp = TempFile::new(&self.dir, &format!("{key}-record"));
        {
            let mut f = File::create(&record_tmp.path).map_err(io_err)?;
            let text =
                serde_json::to_vec_pretty(&record).map_err(|e| StoreError::Io(e.to_string()))?;
            f.write_all(&text)
                .and_then(|_| f.sync_all())
                .map_err(|e| self.write_error(e, 0, text.len() as u64))?;
        }
        // Data first, record last: a crash in between leaves data without a record,
        // which the next scan deletes.
        fs::rename(&tmp.path, &path).map_err(io_err)?;
        tmp.keep = true;
        fs::rename(&record_tmp.path, path.with_extension(META_EXT)).map_err(io_err)?;
        record_tmp.keep = true;
        fsync_dir(&self.dir).map_err(io_err)?;
        let art = Arc::new(Artifact {
            key: key.to_owned(),
            path,
            bytes,
            sha256,
        });
        self.index.insert(key.to_owned(), Arc::clone(&art));
        self.settle();
        Ok(art)
    }

    /// Removes `key`'s artifact (for a model whose source changed or went away).
    pub fn remove(&self, key: &str) {
        let art = self
            .index
            .remove(key)
            .or_else(|| lock(&self.shared.held).remove(key));
        if let Some(art) = art {
            remove_artifact(&art.path);
        }
    }

    fn fetch_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        Arc::clone(lock(&self.fetching).entry(key.to_owned()).or_default())
    }
}

fn remove_artifact(path: &Path) {
    let _ = fs::remove_file(path.with_extension(META_EXT));
    let _ = fs::remove_file(path);
}

/// Seconds since `started`, for logs.
pub(crate) fn secs(started: Instant) -> f64 {
    started.elapsed().as_secs_f64()
}

#[cfg(test)]
mod tests;
