//! Live reload of the configuration (SIGHUP or the `ReloadConfig` RPC): the model list
//! and the pool's budgets change without a restart. A new file is validated whole
//! before anything changes; a removed or changed model is drained first.

use std::collections::BTreeMap;
use std::sync::Arc;

use modelpool_pool::{Device, ModelSpec, Pool, PoolError, SystemProbe};
use modelpool_supervisor::WorkerBackend;

use crate::config::Settings;
use crate::error::ServerError;

/// What a reload changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub unchanged: usize,
    /// Budgets now in force, per device.
    pub budgets: Vec<(Device, u64)>,
    /// Settings that differ but only take effect after a restart.
    pub restart_needed: Vec<String>,
}

/// Holds the settings in force and applies new ones, one reload at a time.
pub struct Reloader {
    pool: Pool<WorkerBackend>,
    current: tokio::sync::Mutex<Settings>,
}

impl Reloader {
    pub fn new(pool: Pool<WorkerBackend>, settings: Settings) -> Self {
        Self {
            pool,
            current: tokio::sync::Mutex::new(settings),
        }
    }

    /// Re-reads the file the server was started with (and the environment) and
    /// applies it.
    pub async fn reload(&self) -> Result<ReloadReport, ServerError> {
        let mut current = self.current.lock().await;
        let path = current.source.clone().ok_or(ServerError::NoConfigFile)?;
        let new =
            Settings::load(Some(&path)).map_err(|e| ServerError::ReloadRejected(Box::new(e)))?;
        self.apply(&mut current, new).await
    }

    async fn apply(
        &self,
        current: &mut Settings,
        new: Settings,
    ) -> Result<ReloadReport, ServerError> {
        let next = by_id(&new.models);
        let mut report = model_changes(&by_id(&current.models), &next);
        // Validate whole before touching anything: an added id must be free.
        for id in &report.added {
            if self.pool.get(id).is_ok() {
                return Err(ServerError::ReloadConflict { id: id.clone() });
            }
        }
        report.restart_needed = restart_needed(current, &new);
        // Drain what goes away or changes, all at once, then register the new specs.
        self.retire(
            report.removed.iter().chain(&report.changed),
            current.drain_timeout,
        )
        .await?;
        for id in report.added.iter().chain(&report.changed) {
            let spec = (*next[id.as_str()]).clone();
            self.pool
                .register(spec)
                .map_err(|source| ServerError::ReloadApply {
                    id: id.clone(),
                    source: Box::new(source),
                })?;
        }
        report.budgets = self.apply_budgets(&new);
        tracing::info!(
            added = ?report.added, removed = ?report.removed, changed = ?report.changed,
            unchanged = report.unchanged, "configuration reloaded"
        );
        *current = new;
        Ok(report)
    }

    /// Retires `ids` from the pool, all at once, each drained for up to `drain`; an id
    /// the pool no longer has is already gone.
    async fn retire(
        &self,
        ids: impl Iterator<Item = &String>,
        drain: std::time::Duration,
    ) -> Result<(), ServerError> {
        let leaving: Vec<&String> = ids.collect();
        let results = futures::future::join_all(
            leaving
                .iter()
                .map(|id| async move { (id, self.pool.retire(id, drain).await) }),
        )
        .await;
        for (id, result) in results {
            match result {
                Ok(()) | Err(PoolError::NotFound { .. }) => {}
                Err(source) => {
                    return Err(ServerError::ReloadApply {
                        id: (*id).clone(),
                        source: Box::new(source),
                    })
                }
            }
        }
        Ok(())
    }

    /// Sets the budgets `new` gives each device the machine has; returns them.
    fn apply_budgets(&self, new: &Settings) -> Vec<(Device, u64)> {
        let probe = SystemProbe::new();
        let budgets = crate::app::pool_config(&new.pool, &probe).budgets;
        for (device, bytes) in &budgets {
            self.pool.set_budget(*device, *bytes);
        }
        budgets.into_iter().collect()
    }
}

fn by_id(models: &[ModelSpec]) -> BTreeMap<&str, &ModelSpec> {
    models.iter().map(|m| (m.id.as_str(), m)).collect()
}

/// The models `next` adds, changes and keeps, and those of `old` it removes.
fn model_changes(
    old: &BTreeMap<&str, &ModelSpec>,
    next: &BTreeMap<&str, &ModelSpec>,
) -> ReloadReport {
    let mut report = ReloadReport::default();
    for (id, spec) in next {
        match old.get(id) {
            None => report.added.push((*id).to_owned()),
            Some(o) if *o != *spec => report.changed.push((*id).to_owned()),
            Some(_) => report.unchanged += 1,
        }
    }
    report.removed = old
        .keys()
        .filter(|id| !next.contains_key(*id))
        .map(|id| (*id).to_owned())
        .collect();
    report
}

/// The keys that differ between `current` and `new` but only take effect after a
/// restart, each logged.
fn restart_needed(current: &Settings, new: &Settings) -> Vec<String> {
    let mut keys = Vec::new();
    for (key, differs) in [
        ("server.listen", current.listen != new.listen),
        (
            "server.metrics_listen",
            current.metrics_listen != new.metrics_listen,
        ),
        (
            "server.openai_listen",
            current.openai_listen != new.openai_listen,
        ),
        (
            "server.drain_timeout",
            current.drain_timeout != new.drain_timeout,
        ),
        (
            "workers.load_timeout",
            current.load_timeout != new.load_timeout,
        ),
        (
            "workers.runtime_dir",
            current.runtime_dir != new.runtime_dir,
        ),
        ("workers.exe", current.worker_exe != new.worker_exe),
        ("workers.load_nice", current.load_nice != new.load_nice),
        (
            "workers.huge_pages_from",
            current.huge_pages_from_bytes != new.huge_pages_from_bytes,
        ),
        (
            "pool.reserve",
            current.pool.reserve_bytes != new.pool.reserve_bytes,
        ),
        (
            "pool.queue_depth",
            current.pool.queue_depth != new.pool.queue_depth,
        ),
        (
            "pool.queue_timeout",
            current.pool.queue_timeout != new.pool.queue_timeout,
        ),
        ("pool.turns", current.pool.turns != new.pool.turns),
        ("auth", current.auth != new.auth),
        ("groups", current.groups != new.groups),
        ("storage", current.storage != new.storage),
        (
            "pool.max_loads_in_flight",
            current.pool.max_loads_in_flight != new.pool.max_loads_in_flight,
        ),
    ] {
        if differs {
            tracing::warn!(
                key,
                "changed in the configuration; takes effect after a restart"
            );
            keys.push(key.to_owned());
        }
    }
    keys
}

/// Reloads on every SIGHUP that `hup` receives until the returned task is aborted.
/// Make `hup` before the server starts: until then SIGHUP's default action ends the
/// process.
pub fn reload_on_sighup(
    mut hup: tokio::signal::unix::Signal,
    reloader: Arc<Reloader>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the configuration");
            if let Err(e) = reloader.reload().await {
                tracing::error!("{e}");
            }
        }
    })
}
