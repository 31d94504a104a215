//! The server's index of saved prefixes: every file under `spill_dir/prefixes/<setting>/`
//! (one setting directory per model file and engine setting), in a moka cache weighed
//! by bytes, so that all of them together stay within `[storage] saved_prefix_budget`:
//! the least recently used go first, their files deleted.
//!
//! Workers write, verify and read the files (`llamacpp::saved`); a restore or a repeated
//! save touches its file. The index learns of them by scanning: at startup, and after
//! each worker has saved what it keeps, before it stops. It never opens a file's
//! contents and never touches the spill directory's other files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use moka::notification::RemovalCause;

/// What the index knows of one file.
#[derive(Clone, Copy, Debug)]
struct Entry {
    bytes: u64,
    used: SystemTime,
}

pub struct SavedPrefixIndex {
    root: PathBuf,
    budget_bytes: u64,
    cache: moka::sync::Cache<PathBuf, Entry>,
}

impl std::fmt::Debug for SavedPrefixIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SavedPrefixIndex")
            .field("root", &self.root)
            .field("budget_bytes", &self.budget_bytes)
            .finish()
    }
}

/// Weight of a file in KiB, at least 1 (moka weighs in u32).
fn weight_kib(bytes: u64) -> u32 {
    bytes.div_ceil(1024).clamp(1, u64::from(u32::MAX)) as u32
}

impl SavedPrefixIndex {
    /// Indexes what `root` holds, deleting the least recently used files beyond
    /// `budget_bytes`.
    pub fn open(root: &Path, budget_bytes: u64) -> Self {
        let cache = moka::sync::Cache::builder()
            .max_capacity(budget_bytes.div_ceil(1024))
            .weigher(|_: &PathBuf, e: &Entry| weight_kib(e.bytes))
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .eviction_listener(|path: std::sync::Arc<PathBuf>, e: Entry, cause| {
                if cause == RemovalCause::Size {
                    tracing::info!(file = %path.display(), bytes = e.bytes,
                        "saved prefix deleted (saved_prefix_budget)");
                    let _ = std::fs::remove_file(path.as_path());
                }
            })
            .build();
        let index = Self {
            root: root.to_path_buf(),
            budget_bytes,
            cache,
        };
        index.rescan();
        index
    }

    /// Brings the index up to date with the directory: new files and files used since
    /// (a later modification time) count as just used, in the order of their use; files
    /// gone are forgotten. Then evicts down to the budget.
    pub fn rescan(&self) {
        let known: HashMap<PathBuf, SystemTime> = self
            .cache
            .iter()
            .map(|(path, e)| ((*path).clone(), e.used))
            .collect();
        let mut on_disk = files(&self.root);
        on_disk.sort_by_key(|(_, e)| e.used);
        let mut seen = std::collections::HashSet::new();
        for (path, entry) in on_disk {
            seen.insert(path.clone());
            if known.get(&path) != Some(&entry.used) {
                self.cache.insert(path, entry);
            }
        }
        for path in known.keys().filter(|p| !seen.contains(*p)) {
            self.cache.invalidate(path);
        }
        self.cache.run_pending_tasks();
    }

    /// Files indexed and their bytes.
    pub fn usage(&self) -> (u64, u64) {
        self.cache.run_pending_tasks();
        let bytes = self.cache.iter().map(|(_, e)| e.bytes).sum();
        (self.cache.entry_count(), bytes)
    }
}

/// The saved-prefix files of every setting directory under `root` (not the temporary
/// files of writes in progress, whose names start with a dot).
fn files(root: &Path) -> Vec<(PathBuf, Entry)> {
    let settings = std::fs::read_dir(root).into_iter().flatten().flatten();
    settings
        .filter(|s| s.file_type().is_ok_and(|t| t.is_dir()))
        .flat_map(|s| std::fs::read_dir(s.path()).into_iter().flatten().flatten())
        .filter(|f| !f.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|f| {
            let m = f.metadata().ok().filter(|m| m.is_file())?;
            let entry = Entry {
                bytes: m.len(),
                used: m.modified().ok()?,
            };
            Some((f.path(), entry))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A file of `kib` KiB last used `at` seconds into the test's clock.
    fn file(dir: &Path, name: &str, kib: usize, at: u64) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, vec![0u8; kib * 1024]).unwrap();
        set_used(&path, at);
        path
    }

    fn set_used(path: &Path, at: u64) {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + at);
        let f = std::fs::File::options().append(true).open(path).unwrap();
        f.set_modified(t).unwrap();
    }

    #[test]
    fn one_budget_holds_every_setting_and_the_least_recently_used_go() {
        let root = tempfile::tempdir().unwrap();
        let (a, b) = (root.path().join("a"), root.path().join("b"));
        let a1 = file(&a, "1.kv", 100, 1);
        let b1 = file(&b, "1.kv", 100, 2);
        let a2 = file(&a, "2.kv", 100, 3);
        let tmp = file(&a, ".3.kv.77.tmp", 100, 0);
        // Room for two: across both settings, the oldest goes at startup.
        let index = SavedPrefixIndex::open(root.path(), 200 * 1024);
        assert!(!a1.exists() && b1.exists() && a2.exists());
        assert!(tmp.exists(), "a write in progress is not the index's");
        assert_eq!(index.usage(), (2, 200 * 1024));

        // b1 restored (touched), then a new save: a2 is now the least recently used.
        set_used(&b1, 4);
        let b2 = file(&b, "2.kv", 100, 5);
        index.rescan();
        assert!(b1.exists() && b2.exists() && !a2.exists());

        // A file deleted behind its back is forgotten; its room is free again.
        std::fs::remove_file(&b1).unwrap();
        index.rescan();
        assert_eq!(index.usage(), (1, 100 * 1024));
        let a3 = file(&a, "3.kv", 100, 6);
        index.rescan();
        assert!(a3.exists() && b2.exists());
    }
}
