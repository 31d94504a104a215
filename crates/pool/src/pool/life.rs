//! A model's lifecycle: one enum, and every move between its states as a named method.
//!
//! ```text
//! Registered ──begin_load──▶ Loading ──finish_load──▶ Ready ◀──call_off_drain── Draining
//!     ▲   ▲                    │  │                    │  └──────begin_drain──────▶  │
//!     │   └───abandon_load─────┘  └─fail─▶ Failed      └──begin_unload─▶ Unloading ◀─┘
//!     └──────────────finish_unload──────────────────────────────────────────┘
//! Ready, Draining ──crash──▶ Failed ──begin_load──▶ Loading
//! ```
//!
//! Where the bytes are: a load in progress reserves its predicted charge, a worker holds
//! its measured charge (ready or draining), and a stopping worker keeps its charge until
//! it has exited. A model's bytes are charged in two parts: `charge`, its own, and
//! `mapped`, the pages of a file it maps, which are charged once for all the models
//! mapping that file (see [`crate::sharing`]) for as long as any of them, in any state,
//! maps it.
//!
//! Being removed (`retire`) is not a state: it closes the model's queue, and the model
//! goes on through these states (a load in progress finishes, its queued requests are
//! served) until it is idle and then forgotten.
//!
//! This module does not touch the pool's table, its budgets or tokio tasks: it only
//! moves one model between states, refusing the moves the lifecycle does not allow.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::watch;

use super::LoadOutcome;
use crate::sharing::Mapped;
use crate::Charge;

/// A live worker: ready, or draining for another model.
pub(super) struct Worker<I> {
    pub instance: Arc<I>,
    /// Bytes charged: measured at load plus the KV cache still to grow, less the mapped
    /// pages.
    pub charge: Charge,
    /// Bytes the worker held per device right after loading.
    pub measured: Charge,
    pub loaded_at: SystemTime,
    pub mapped: Option<Mapped>,
}

/// A load in progress; it reserves its predicted bytes.
pub(super) struct Loading {
    pub done: watch::Receiver<LoadOutcome>,
    pub charge: Charge,
    pub mapped: Option<Mapped>,
    /// Its file's pages are still being handed over by the victims it evicted: they
    /// count in `charge` (growing as each victim exits), not as a mapped file, until
    /// the last victim has exited (see `State::finish_unload`).
    pub file_pending: bool,
    /// The error of the failure this load retries, shown until it succeeds.
    pub retrying: Option<String>,
}

pub(super) enum Lifecycle<I> {
    /// No worker: never loaded, or unloaded.
    Registered,
    Loading(Loading),
    Ready(Worker<I>),
    /// Ready, but being drained for `incoming` (a group swap or a pool turn): it takes
    /// no new requests, and stops once those running have finished.
    Draining {
        worker: Worker<I>,
        incoming: String,
    },
    /// Stopping; its bytes stay charged until the worker has exited.
    Unloading {
        charge: Charge,
        mapped: Option<Mapped>,
    },
    /// No worker: its last load failed, or its worker died; the next request loads it
    /// again (after a back-off when it keeps failing).
    Failed {
        error: String,
    },
}

/// The name of a state, for logs, status and the transition table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Registered,
    Loading,
    Ready,
    Draining,
    Unloading,
    Failed,
}

/// A move the lifecycle does not allow; the state is left as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a model cannot go from {from:?} by `{transition}`")]
pub(super) struct Refused {
    pub from: Phase,
    pub transition: &'static str,
}

impl<I> Lifecycle<I> {
    pub fn phase(&self) -> Phase {
        match self {
            Self::Registered => Phase::Registered,
            Self::Loading(_) => Phase::Loading,
            Self::Ready(_) => Phase::Ready,
            Self::Draining { .. } => Phase::Draining,
            Self::Unloading { .. } => Phase::Unloading,
            Self::Failed { .. } => Phase::Failed,
        }
    }

    /// No worker and nothing under way: a request must load it.
    pub fn is_cold(&self) -> bool {
        matches!(self, Self::Registered | Self::Failed { .. })
    }

    pub fn is_loading(&self) -> bool {
        matches!(self, Self::Loading(_))
    }

    pub fn is_unloading(&self) -> bool {
        matches!(self, Self::Unloading { .. })
    }

    /// Its live worker, ready or draining.
    pub fn worker(&self) -> Option<&Worker<I>> {
        match self {
            Self::Ready(w) | Self::Draining { worker: w, .. } => Some(w),
            _ => None,
        }
    }

    /// The model it is draining for.
    pub fn draining_for(&self) -> Option<&str> {
        match self {
            Self::Draining { incoming, .. } => Some(incoming),
            _ => None,
        }
    }

    /// The error of its last failure, while it has not loaded since.
    pub fn last_error(&self) -> Option<&str> {
        match self {
            Self::Failed { error } => Some(error),
            Self::Loading(l) => l.retrying.as_deref(),
            _ => None,
        }
    }

    /// Its bytes charged: reserved by a load, held by a worker, or held until exit.
    pub fn charge(&self) -> Option<&Charge> {
        match self {
            Self::Loading(l) => Some(&l.charge),
            Self::Ready(w) | Self::Draining { worker: w, .. } => Some(&w.charge),
            Self::Unloading { charge, .. } => Some(charge),
            Self::Registered | Self::Failed { .. } => None,
        }
    }

    /// The file pages it maps (or will, or still does).
    pub fn mapped(&self) -> Option<&Mapped> {
        match self {
            Self::Loading(Loading {
                file_pending: true, ..
            }) => None,
            Self::Loading(l) => l.mapped.as_ref(),
            Self::Ready(w) | Self::Draining { worker: w, .. } => w.mapped.as_ref(),
            Self::Unloading { mapped, .. } => mapped.as_ref(),
            Self::Registered | Self::Failed { .. } => None,
        }
    }

    fn refuse<T>(&self, transition: &'static str) -> Result<T, Refused> {
        Err(Refused {
            from: self.phase(),
            transition,
        })
    }

    /// Registered or Failed -> Loading (a failure's error stays shown while it retries).
    pub fn begin_load(&mut self, mut loading: Loading) -> Result<(), Refused> {
        match std::mem::replace(self, Self::Registered) {
            Self::Registered => {}
            Self::Failed { error } => loading.retrying = Some(error),
            other => {
                *self = other;
                return self.refuse("begin_load");
            }
        }
        *self = Self::Loading(loading);
        Ok(())
    }

    /// Loading -> Ready.
    pub fn finish_load(&mut self, worker: Worker<I>) -> Result<(), Refused> {
        if !self.is_loading() {
            return self.refuse("finish_load");
        }
        *self = Self::Ready(worker);
        Ok(())
    }

    /// Loading -> Registered: the load finished into a pool that is shutting down.
    pub fn abandon_load(&mut self) -> Result<(), Refused> {
        if !self.is_loading() {
            return self.refuse("abandon_load");
        }
        *self = Self::Registered;
        Ok(())
    }

    /// Registered, Loading or Failed -> Failed: a load (or what precedes it: reading
    /// the model's header, fetching it) failed. A model with a worker keeps it.
    pub fn fail(&mut self, error: String) -> Result<(), Refused> {
        if !(self.is_cold() || self.is_loading()) {
            return self.refuse("fail");
        }
        *self = Self::Failed { error };
        Ok(())
    }

    /// Ready or Draining -> Failed: its worker died on its own. Hands back the worker's
    /// books, to release.
    pub fn crash(&mut self, error: String) -> Result<Worker<I>, Refused> {
        match std::mem::replace(self, Self::Failed { error }) {
            Self::Ready(w) | Self::Draining { worker: w, .. } => Ok(w),
            other => {
                *self = other;
                self.refuse("crash")
            }
        }
    }

    /// Ready -> Draining for `incoming`.
    pub fn begin_drain(&mut self, incoming: &str) -> Result<(), Refused> {
        match std::mem::replace(self, Self::Registered) {
            Self::Ready(worker) => {
                *self = Self::Draining {
                    worker,
                    incoming: incoming.to_owned(),
                };
                Ok(())
            }
            other => {
                *self = other;
                self.refuse("begin_drain")
            }
        }
    }

    /// Draining -> Ready: the model it drained for no longer needs its room. Only a
    /// drain for `incoming` is called off, when one is named.
    pub fn call_off_drain(&mut self, incoming: Option<&str>) -> Result<(), Refused> {
        let matches = self
            .draining_for()
            .is_some_and(|d| incoming.is_none_or(|i| i == d));
        if !matches {
            return self.refuse("call_off_drain");
        }
        let Self::Draining { worker, .. } = std::mem::replace(self, Self::Registered) else {
            unreachable!("checked above");
        };
        *self = Self::Ready(worker);
        Ok(())
    }

    /// Ready or Draining -> Unloading: its bytes stay charged until the worker exits.
    /// Hands back the worker to stop and its charge.
    pub fn begin_unload(&mut self) -> Result<(Arc<I>, Charge), Refused> {
        match std::mem::replace(self, Self::Registered) {
            Self::Ready(w) | Self::Draining { worker: w, .. } => {
                *self = Self::Unloading {
                    charge: w.charge.clone(),
                    mapped: w.mapped,
                };
                Ok((w.instance, w.charge))
            }
            other => {
                *self = other;
                self.refuse("begin_unload")
            }
        }
    }

    /// Unloading -> Registered: the worker has exited. Hands back the bytes it held.
    pub fn finish_unload(&mut self) -> Result<(Charge, Option<Mapped>), Refused> {
        match std::mem::replace(self, Self::Registered) {
            Self::Unloading { charge, mapped } => Ok((charge, mapped)),
            other => {
                *self = other;
                self.refuse("finish_unload")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;

    type L = Lifecycle<()>;

    fn loading() -> Loading {
        let (_tx, done) = watch::channel(None);
        Loading {
            done,
            charge: Charge::on(Device::Cpu, 10),
            mapped: None,
            file_pending: false,
            retrying: None,
        }
    }

    fn worker() -> Worker<()> {
        Worker {
            instance: Arc::new(()),
            charge: Charge::on(Device::Cpu, 7),
            measured: Charge::on(Device::Cpu, 6),
            loaded_at: SystemTime::now(),
            mapped: None,
        }
    }

    fn at(phase: Phase) -> L {
        match phase {
            Phase::Registered => L::Registered,
            Phase::Loading => L::Loading(loading()),
            Phase::Ready => L::Ready(worker()),
            Phase::Draining => L::Draining {
                worker: worker(),
                incoming: "b".into(),
            },
            Phase::Unloading => L::Unloading {
                charge: Charge::on(Device::Cpu, 7),
                mapped: None,
            },
            Phase::Failed => L::Failed {
                error: "boom".into(),
            },
        }
    }

    type Move = (&'static str, fn(&mut L) -> Result<(), Refused>);

    const MOVES: [Move; 9] = [
        ("begin_load", |l| l.begin_load(loading())),
        ("finish_load", |l| l.finish_load(worker())),
        ("abandon_load", |l| l.abandon_load()),
        ("fail", |l| l.fail("e".into())),
        ("crash", |l| l.crash("e".into()).map(drop)),
        ("begin_drain", |l| l.begin_drain("b")),
        ("call_off_drain", |l| l.call_off_drain(None)),
        ("begin_unload", |l| l.begin_unload().map(drop)),
        ("finish_unload", |l| l.finish_unload().map(drop)),
    ];

    const PHASES: [Phase; 6] = [
        Phase::Registered,
        Phase::Loading,
        Phase::Ready,
        Phase::Draining,
        Phase::Unloading,
        Phase::Failed,
    ];

    /// Every state against every move: where it leads, or that it is refused and the
    /// state stays as it was.
    #[test]
    fn every_transition_is_allowed_or_refused_as_the_table_says() {
        use Phase::*;
        let allowed: &[(Phase, &str, Phase)] = &[
            (Registered, "begin_load", Loading),
            (Failed, "begin_load", Loading),
            (Loading, "finish_load", Ready),
            (Loading, "abandon_load", Registered),
            (Registered, "fail", Failed),
            (Loading, "fail", Failed),
            (Failed, "fail", Failed),
            (Ready, "crash", Failed),
            (Draining, "crash", Failed),
            (Ready, "begin_drain", Draining),
            (Draining, "call_off_drain", Ready),
            (Ready, "begin_unload", Unloading),
            (Draining, "begin_unload", Unloading),
            (Unloading, "finish_unload", Registered),
        ];
        let mut seen = 0;
        for from in PHASES {
            for (name, apply) in MOVES {
                let mut life = at(from);
                let result = apply(&mut life);
                match allowed.iter().find(|(f, n, _)| *f == from && *n == name) {
                    Some((_, _, to)) => {
                        assert_eq!(result, Ok(()), "{from:?} by {name}");
                        assert_eq!(life.phase(), *to, "{from:?} by {name}");
                        seen += 1;
                    }
                    None => {
                        let refused = Refused {
                            from,
                            transition: name,
                        };
                        assert_eq!(result, Err(refused), "{from:?} by {name}");
                        assert_eq!(life.phase(), from, "a refused move leaves the state");
                    }
                }
            }
        }
        assert_eq!(seen, allowed.len(), "every allowed move is a real one");
    }

    #[test]
    fn a_retried_load_shows_the_failure_until_it_succeeds() {
        let mut life = at(Phase::Failed);
        assert_eq!(life.last_error(), Some("boom"));
        life.begin_load(loading()).unwrap();
        assert_eq!(life.last_error(), Some("boom"));
        life.finish_load(worker()).unwrap();
        assert_eq!(life.last_error(), None);
        let error = "worker exited unexpectedly".to_owned();
        let worker = life.crash(error.clone()).unwrap();
        assert_eq!(
            worker.charge.total(),
            7,
            "the crashed worker's bytes come back"
        );
        assert_eq!(life.last_error(), Some(error.as_str()));
    }

    #[test]
    fn only_the_named_drain_is_called_off() {
        let mut life = at(Phase::Draining);
        assert_eq!(life.draining_for(), Some("b"));
        assert!(life.call_off_drain(Some("c")).is_err());
        assert_eq!(life.phase(), Phase::Draining);
        life.call_off_drain(Some("b")).unwrap();
        assert_eq!(life.phase(), Phase::Ready);
        assert_eq!(life.draining_for(), None);
    }

    #[test]
    fn bytes_stay_charged_from_load_to_exit() {
        assert_eq!(at(Phase::Registered).charge(), None);
        assert_eq!(at(Phase::Failed).charge(), None);
        assert_eq!(at(Phase::Loading).charge().map(Charge::total), Some(10));
        let mut life = at(Phase::Draining);
        assert_eq!(life.charge().map(Charge::total), Some(7));
        let (_, charge) = life.begin_unload().unwrap();
        assert_eq!(charge.total(), 7);
        assert_eq!(life.charge().map(Charge::total), Some(7));
        let (released, _) = life.finish_unload().unwrap();
        assert_eq!(released.total(), 7);
        assert_eq!(life.charge(), None);
    }
}
