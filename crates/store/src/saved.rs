//! Saved prefixes: the KV state of a slot's kept cells written to a directory when the
//! model is stopped, so that a request after the model's next load can restore it
//! instead of prefilling. This module is the file format and the directory's index,
//! with no llama.cpp call in it; the decode thread captures and restores the states.
//!
//! One file per prefix, `<hash of its tokens>.kv`:
//!
//! ```text
//! "MPKVSEQ1" | u32 key length | key | u32 token count | tokens (i32 each)
//!            | u64 state length | state | sha256 of everything before it
//! ```
//!
//! (integers little-endian). The key names what a state is only valid for: the model
//! file, the engine's build and the context settings. A file is never trusted: its
//! header must parse and carry this model's key before its tokens are indexed, and
//! its whole checksum must match before its state reaches llama.cpp. A file that
//! fails either is deleted. Files are written under a temporary name and renamed, and
//! the directory is kept under a byte budget by dropping the least recently used.

use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::{hex, StoreError};

/// The saved-prefix directory (one subdirectory per model file and setting) and the
/// bytes each subdirectory may hold.
#[derive(Clone, Debug)]
pub struct SavedPrefixes {
    pub dir: PathBuf,
    pub budget_bytes: u64,
}

const MAGIC: &[u8; 8] = b"MPKVSEQ1";
const SUFFIX: &str = "kv";
/// Longest key read from a header, so a foreign file cannot make the index allocate.
const KEY_MAX_BYTES: u32 = 4096;
/// A temporary file older than this was left by a worker stopped mid-write.
const STALE_TMP: std::time::Duration = std::time::Duration::from_secs(60);

/// A saved prefix found in the directory.
#[derive(Clone, Debug, PartialEq)]
pub struct SavedPrefix {
    pub path: PathBuf,
    pub tokens: Vec<i32>,
}

/// Bytes read from each end of a model file for its digest.
const DIGEST_SPAN_BYTES: u64 = 16 << 20;

/// A digest of a model file's content: its size and sha256 over its first and last
/// 16 MiB (the header, tensor table and the embedding and output weights that GGUF
/// writers put at the ends), so the same weights match under any path or copy, and a
/// file rewritten in place does not. ~6 ms from the page cache.
pub fn file_digest(path: &Path) -> io::Result<String> {
    use std::io::{Seek, SeekFrom};
    let mut f = File::open(path)?;
    let size = f.metadata()?.len();
    let mut h = Sha256::new();
    h.update(size.to_le_bytes());
    let mut buf = vec![0u8; DIGEST_SPAN_BYTES.min(size) as usize];
    f.read_exact(&mut buf)?;
    h.update(&buf);
    let tail = DIGEST_SPAN_BYTES.min(size);
    f.seek(SeekFrom::Start(size - tail))?;
    f.read_exact(&mut buf[..tail as usize])?;
    h.update(&buf[..tail as usize]);
    Ok(format!("{}/{size}", hex(&h.finalize()[..16])))
}

/// The file name of a prefix of `tokens`.
pub fn file_name(tokens: &[i32]) -> String {
    let mut h = Sha256::new();
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    format!("{}.{SUFFIX}", hex(&h.finalize()[..12]))
}

fn header(key: &str, tokens: &[i32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + key.len() + tokens.len() * 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(&(tokens.len() as u32).to_le_bytes());
    for t in tokens {
        out.extend_from_slice(&t.to_le_bytes());
    }
    out
}

/// Writes a prefix's `state` into `dir` (temporary name, then rename); returns its path
/// and size.
pub fn write(dir: &Path, key: &str, tokens: &[i32], state: &[u8]) -> io::Result<(PathBuf, u64)> {
    let path = dir.join(file_name(tokens));
    let tmp = dir.join(format!(".{}.{}.tmp", file_name(tokens), std::process::id()));
    let mut h = Sha256::new();
    let head = header(key, tokens);
    let len = (state.len() as u64).to_le_bytes();
    let mut f = io::BufWriter::new(File::create(&tmp)?);
    for part in [&head[..], &len[..], state] {
        h.update(part);
        f.write_all(part)?;
    }
    f.write_all(&h.finalize())?;
    f.into_inner().map_err(|e| e.into_error())?.sync_data()?;
    fs::rename(&tmp, &path)?;
    let size = (head.len() + 8 + state.len() + 32) as u64;
    Ok((path, size))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

/// Reads a header (magic, key, tokens) from `r`, checking the key and the length.
fn read_header(r: &mut impl Read, key: &str, max_tokens: u32) -> Result<Vec<i32>, StoreError> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(StoreError::NotSavedPrefix);
    }
    let key_len = read_u32(r)?;
    if key_len != key.len() as u32 || key_len > KEY_MAX_BYTES {
        return Err(StoreError::ForeignPrefix);
    }
    let mut found = vec![0u8; key_len as usize];
    r.read_exact(&mut found)?;
    if found != key.as_bytes() {
        return Err(StoreError::ForeignPrefix);
    }
    let n = read_u32(r)?;
    if n > max_tokens {
        return Err(StoreError::PrefixTooLong {
            tokens: n,
            limit: max_tokens,
        });
    }
    let mut raw = vec![0u8; n as usize * 4];
    r.read_exact(&mut raw)?;
    Ok(raw
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Reads the whole file at `path` and returns its tokens and state once its checksum
/// matches.
pub fn read(path: &Path, key: &str, max_tokens: u32) -> Result<(Vec<i32>, Vec<u8>), StoreError> {
    let bytes = fs::read(path)?;
    if bytes.len() < 32 {
        return Err(StoreError::PrefixCorrupt);
    }
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    if Sha256::digest(body).as_slice() != sum {
        return Err(StoreError::PrefixCorrupt);
    }
    let mut r = body;
    let tokens = read_header(&mut r, key, max_tokens)?;
    let mut len = [0u8; 8];
    r.read_exact(&mut len)?;
    if u64::from_le_bytes(len) != r.len() as u64 {
        return Err(StoreError::PrefixCorrupt);
    }
    Ok((tokens, r.to_vec()))
}

/// The saved prefixes in `dir` for `key`, deleting every file that is not one (a
/// foreign key, a bad header, a leftover temporary file).
pub fn index(dir: &Path, key: &str, max_tokens: u32) -> Vec<SavedPrefix> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            // Another worker's write in progress, unless it is old.
            let age = entry.metadata().and_then(|m| m.modified()).ok();
            let age = age.and_then(|t| t.elapsed().ok()).unwrap_or_default();
            if age > STALE_TMP {
                let _ = fs::remove_file(&path);
            }
            continue;
        }
        let header = if name.ends_with(&format!(".{SUFFIX}")) {
            File::open(&path)
                .map_err(StoreError::from)
                .and_then(|f| read_header(&mut BufReader::new(f), key, max_tokens))
        } else {
            Err(StoreError::NotSavedPrefix)
        };
        match header {
            Ok(tokens) => found.push(SavedPrefix { path, tokens }),
            Err(e) => {
                tracing::warn!(file = %path.display(), "dropping a saved prefix: {e}");
                let _ = fs::remove_file(&path);
            }
        }
    }
    found
}

/// Deletes the least recently used files of `dir` (by modification time; a restore
/// touches its file) until the rest fit `budget_bytes`; returns the paths deleted.
pub fn prune(dir: &Path, budget_bytes: u64) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<(SystemTime, u64, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            let used = m.modified().ok()?;
            m.is_file().then(|| (used, m.len(), e.path()))
        })
        .collect();
    files.sort_by_key(|f| std::cmp::Reverse(f.0));
    let mut kept = 0u64;
    let mut dropped = Vec::new();
    for (_, size, path) in files {
        if kept + size <= budget_bytes {
            kept += size;
        } else if fs::remove_file(&path).is_ok() {
            dropped.push(path);
        }
    }
    dropped
}

/// Marks `path` as just used, for [`prune`].
pub fn touch(path: &Path) {
    if let Ok(f) = File::options().append(true).open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().expect("a temporary directory")
    }

    #[test]
    fn a_written_prefix_reads_back_and_is_indexed() {
        let d = dir();
        let (path, size) = write(d.path(), "model-a", &[1, 2, 3], b"state bytes").unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), size);
        let (tokens, state) = read(&path, "model-a", 100).unwrap();
        assert_eq!(
            (tokens.as_slice(), state.as_slice()),
            (&[1, 2, 3][..], &b"state bytes"[..])
        );
        let found = index(d.path(), "model-a", 100);
        assert_eq!(
            found,
            vec![SavedPrefix {
                path,
                tokens: vec![1, 2, 3]
            }]
        );
    }

    #[test]
    fn truncated_corrupted_and_foreign_files_are_refused_and_dropped() {
        let d = dir();
        let (path, size) = write(d.path(), "model-a", &[1, 2, 3], &[7u8; 64]).unwrap();
        let mut bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..size as usize - 10]).unwrap();
        assert!(matches!(
            read(&path, "model-a", 100),
            Err(StoreError::PrefixCorrupt)
        ));
        bytes[40] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            read(&path, "model-a", 100),
            Err(StoreError::PrefixCorrupt)
        ));
        // Another model's file is left out of the index and deleted with the junk.
        let (other, _) = write(d.path(), "model-b", &[9], b"x").unwrap();
        fs::write(d.path().join("junk.kv"), b"MPKV").unwrap();
        let fresh_tmp = d.path().join(".half.kv.1.tmp");
        fs::write(&fresh_tmp, b"MPKVSEQ1").unwrap();
        let stale_tmp = d.path().join(".half.kv.2.tmp");
        let old = SystemTime::now() - 2 * STALE_TMP;
        File::create(&stale_tmp).unwrap().set_modified(old).unwrap();
        let found = index(d.path(), "model-a", 100);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(!other.exists() && !stale_tmp.exists());
        assert!(fresh_tmp.exists(), "another worker may be writing it");
        fs::remove_file(&fresh_tmp).unwrap();
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
        // A prefix longer than the context is not this model's either.
        assert!(index(d.path(), "model-a", 2).is_empty());
        assert!(!path.exists());
    }

    #[test]
    fn the_digest_follows_the_content_not_the_path() {
        let d = dir();
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let (a, b) = (d.path().join("a.gguf"), d.path().join("b.gguf"));
        fs::write(&a, &bytes).unwrap();
        fs::write(&b, &bytes).unwrap();
        assert_eq!(file_digest(&a).unwrap(), file_digest(&b).unwrap());
        let mut changed = bytes.clone();
        changed[50_000] ^= 1;
        fs::write(&b, &changed).unwrap();
        assert_ne!(file_digest(&a).unwrap(), file_digest(&b).unwrap());
        fs::write(&b, &bytes[..99_999]).unwrap();
        assert_ne!(file_digest(&a).unwrap(), file_digest(&b).unwrap());
    }

    #[test]
    fn prune_keeps_the_most_recently_used_within_the_budget() {
        let d = dir();
        let t0 = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        let mut paths = Vec::new();
        for (i, tokens) in [[1], [2], [3]].iter().enumerate() {
            let (p, _) = write(d.path(), "k", tokens, &[0u8; 100]).unwrap();
            let f = File::options().append(true).open(&p).unwrap();
            f.set_modified(t0 + std::time::Duration::from_secs(i as u64))
                .unwrap();
            paths.push(p);
        }
        touch(&paths[0]);
        let size = fs::metadata(&paths[0]).unwrap().len();
        let dropped = prune(d.path(), 2 * size);
        assert_eq!(dropped, vec![paths[1].clone()]);
        assert!(paths[0].exists() && paths[2].exists());
        assert_eq!(prune(d.path(), 0).len(), 2);
    }
}
