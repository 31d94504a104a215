//! Downloads an `http(s)://` model source straight into the spill directory, hashing it
//! as it arrives; the file is kept only when its sha256 matches the configured one.

use std::sync::Arc;
use std::time::Instant;

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::{hex, secs, url_key, Artifact, Store, StoreError, TempFile};
use modelpool_catalog::units::human_bytes;

impl Store {
    /// The artifact for `url`, downloading it first unless the directory has it. One
    /// download runs per URL at a time; callers that arrive during it wait and share it.
    pub async fn fetch(
        &self,
        url: &str,
        sha256: &str,
    ) -> Result<(Arc<Artifact>, bool), StoreError> {
        let key = url_key(sha256);
        let guard = self.fetch_lock(&key);
        let _one_at_a_time = guard.lock().await;
        if let Some(found) = self.lookup(&key) {
            return Ok((found, false));
        }
        let started = Instant::now();
        let fetch_err = |reason: String| StoreError::Fetch {
            url: url.to_owned(),
            reason,
        };
        let mut response = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| fetch_err(format!("{e:#}")))?;
        if !response.status().is_success() {
            return Err(fetch_err(format!("server answered {}", response.status())));
        }
        let expected_len = response.content_length();
        if let Some(len) = expected_len {
            self.check_size(url, len)?;
        }
        let total = expected_len.unwrap_or(0);
        let mut tmp = TempFile::new(&self.dir, &key);
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp.path)
            .await
            .map_err(super::io_err)?;
        let mut hasher = Sha256::new();
        let mut written = 0u64;
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| fetch_err(format!("after {}: {e:#}", human_bytes(written))))?
        {
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(|e| self.write_error(e, written, total))?;
            written += chunk.len() as u64;
            if written > self.budget_bytes {
                self.check_size(url, written)?;
            }
        }
        file.sync_all()
            .await
            .map_err(|e| self.write_error(e, written, total))?;
        drop(file);
        if let Some(len) = expected_len.filter(|len| *len != written) {
            return Err(fetch_err(format!(
                "connection ended after {written} of {len} bytes"
            )));
        }
        let actual = hex(&hasher.finalize());
        if !actual.eq_ignore_ascii_case(sha256) {
            return Err(StoreError::Checksum {
                url: url.to_owned(),
                expected: sha256.to_ascii_lowercase(),
                actual,
            });
        }
        let art = self.commit(&key, &mut tmp, written, actual, url)?;
        tracing::info!(%url, bytes = written, secs = secs(started), "model downloaded into the spill directory");
        Ok((art, true))
    }
}
