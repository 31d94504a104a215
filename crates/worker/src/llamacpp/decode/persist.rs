//! The decode thread's side of saved prefixes (see [`crate::llamacpp::saved`]): it
//! writes what idle slots keep when the server asks before stopping the worker, and
//! restores a saved prefix into a slot when that beats what the cells hold.

use std::path::{Path, PathBuf};

use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::LlamaStateSeqFlags;
use sha2::{Digest, Sha256};

use super::Decoder;
use crate::llamacpp::prefix;
use crate::llamacpp::SavedPrefixes;
use modelpool_store::hex;
use modelpool_store::saved::{self, SavedPrefix};

/// Prefixes shorter than this are cheaper to prefill again than to write and read.
const MIN_SAVED_TOKENS: usize = 32;

/// The saved prefixes of one model under one setting.
pub(in crate::llamacpp) struct Saved {
    dir: PathBuf,
    key: String,
    budget_bytes: u64,
    prefixes: Vec<SavedPrefix>,
}

/// What a save wrote.
#[derive(Debug, Default, Clone, Copy)]
pub(in crate::llamacpp) struct SaveReport {
    pub prefixes: u32,
    pub bytes: u64,
}

impl Saved {
    /// The directory under `config.dir` for this model file and setting, indexed (it
    /// is made at the first save).
    pub fn open(config: &SavedPrefixes, key: String, context_length: u32) -> Self {
        let dir = config.dir.join(hex(&Sha256::digest(key.as_bytes())[..8]));
        let prefixes = saved::index(&dir, &key, context_length);
        tracing::info!(dir = %dir.display(), saved = prefixes.len(), "saved prefixes indexed");
        Self {
            dir,
            key,
            budget_bytes: config.budget_bytes,
            prefixes,
        }
    }

    /// The saved prefix that lets `prompt` skip the most tokens, and how many.
    fn best(&self, prompt: &[LlamaToken]) -> Option<(usize, usize)> {
        let prompt: Vec<i32> = prompt.iter().map(|t| t.0).collect();
        self.prefixes
            .iter()
            .map(|p| prefix::reusable(&p.tokens, &prompt))
            .enumerate()
            .max_by_key(|&(_, n)| n)
    }
}

impl Decoder<'_> {
    /// Publishes how many prefixes are saved and their bytes, for the worker's stats.
    pub(super) fn publish_saved(&self) {
        let Some(saved) = self.saved.as_ref() else {
            return;
        };
        let bytes: u64 = saved
            .prefixes
            .iter()
            .filter_map(|p| std::fs::metadata(&p.path).ok())
            .map(|m| m.len())
            .sum();
        let c = &self.counters;
        c.saved_prefixes.store(
            saved.prefixes.len() as u32,
            std::sync::atomic::Ordering::Relaxed,
        );
        c.saved_prefix_bytes
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Restores into `slot` a saved prefix of `prompt` longer than the `reuse` tokens
    /// the slot's cells already give it; returns the tokens the slot now lets it skip.
    /// A file that fails its checks is deleted and the next best one tried.
    pub(super) fn restore_saved(
        &mut self,
        slot: i32,
        prompt: &[LlamaToken],
        reuse: usize,
    ) -> usize {
        loop {
            let Some(saved) = self.saved.as_mut() else {
                return reuse;
            };
            let Some((i, gain)) = saved.best(prompt).filter(|&(_, n)| n > reuse) else {
                return reuse;
            };
            let path = saved.prefixes[i].path.clone();
            match self.restore_file(slot, &path) {
                Ok(()) => {
                    saved::touch(&path);
                    self.counters
                        .restored_prefixes_total
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::debug!(slot, tokens = gain, "saved prefix restored");
                    return gain;
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), "dropping a saved prefix: {e}");
                    let _ = std::fs::remove_file(&path);
                    if let Some(saved) = self.saved.as_mut() {
                        saved.prefixes.retain(|p| p.path != path);
                    }
                    self.publish_saved();
                }
            }
        }
    }

    /// Loads the state in `path` into `slot`, replacing what its cells held; on an
    /// error the slot is left empty.
    fn restore_file(&mut self, slot: i32, path: &Path) -> Result<(), String> {
        let saved = self.saved.as_ref().expect("restoring needs saved prefixes");
        let read = saved::read(path, &saved.key, self.context_length);
        self.clear_slot(slot);
        let (tokens, state) = read.map_err(|e| e.to_string())?;
        // SAFETY: `state` is what `state_seq_get_data_ext` wrote for a context of this
        // model file and setting (the key) and its checksum matched, so llama.cpp reads
        // a buffer of its own making; it checks the layout again as it reads.
        let ok = unsafe {
            self.ctx
                .state_seq_set_data_ext(&state, slot, LlamaStateSeqFlags::empty())
        };
        if !ok {
            let _ = self.ctx.clear_kv_cache_seq(Some(slot as u32), None, None);
            return Err("llama.cpp refused the state".into());
        }
        self.caches[slot as usize].tokens = tokens.into_iter().map(LlamaToken).collect();
        Ok(())
    }

    /// Writes what every idle slot keeps (most recently used first) and keeps the
    /// directory within its budget.
    pub(super) fn save_prefixes(&mut self) -> SaveReport {
        let mut report = SaveReport::default();
        let Some(saved) = self.saved.as_ref() else {
            return report;
        };
        if let Err(e) = std::fs::create_dir_all(&saved.dir) {
            tracing::warn!(dir = %saved.dir.display(), "saving prefixes: {e}");
            return report;
        }
        let mut slots: Vec<i32> = self.free_slots.clone();
        slots.sort_by_key(|&s| std::cmp::Reverse(self.caches[s as usize].released_at));
        let mut written = Vec::new();
        for slot in slots {
            let tokens: Vec<i32> = self.caches[slot as usize]
                .tokens
                .iter()
                .map(|t| t.0)
                .collect();
            if tokens.len() < MIN_SAVED_TOKENS {
                continue;
            }
            let path = saved.dir.join(saved::file_name(&tokens));
            if path.exists() {
                saved::touch(&path);
                continue;
            }
            let flags = LlamaStateSeqFlags::empty();
            let size = self.ctx.state_seq_get_size_ext(slot, flags);
            if size as u64 > saved.budget_bytes {
                continue;
            }
            let mut state = vec![0u8; size];
            // SAFETY: `state` holds the size llama.cpp reported for this sequence.
            let n = unsafe {
                self.ctx
                    .state_seq_get_data_ext(state.as_mut_ptr(), slot, flags)
            };
            if n != size {
                tracing::warn!(slot, size, n, "llama.cpp wrote a state of another size");
                continue;
            }
            match saved::write(&saved.dir, &saved.key, &tokens, &state) {
                Ok((path, bytes)) => {
                    report.prefixes += 1;
                    report.bytes += bytes;
                    written.push(SavedPrefix { path, tokens });
                }
                Err(e) => tracing::warn!(dir = %saved.dir.display(), "saving a prefix: {e}"),
            }
        }
        let dropped = saved::prune(&saved.dir, saved.budget_bytes);
        if let Some(saved) = self.saved.as_mut() {
            saved.prefixes.extend(written);
            saved.prefixes.retain(|p| !dropped.contains(&p.path));
        }
        self.publish_saved();
        report
    }
}
