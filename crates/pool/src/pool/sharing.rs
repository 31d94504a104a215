//! The pool's books for weights mapped from a shared file (see [`crate::sharing`]):
//! which file pages each model maps, which pages its leaving frees, and which model
//! status shows them on.
//!
//! A model's slot carries its own bytes and, apart, the pages of the file it maps. A
//! file's pages are charged once while any model maps it, loading, ready or stopping.
//! Status charges them to one of those models, the file's holder: the ready model that
//! has been ready longest, else one stopping, else one loading (ties by id). The others
//! show only their own bytes; when the holder goes, the next takes the pages over.

pub(super) use crate::sharing::split;
use crate::sharing::{released_bytes, FileId, Mapped};

use super::life::Phase;
use super::state::{Lifecycle, Loading, State};

impl<I> State<I> {
    /// The file pages of every model that maps a file, with its id.
    fn mappers(&self) -> impl Iterator<Item = (&String, &Mapped)> {
        self.models
            .iter()
            .filter_map(|(id, e)| Some((id, e.life.mapped()?)))
    }

    /// Files mapped outside the ready models: by loads in progress, workers still
    /// exiting, and models whose turn is under way (all but `except`'s own).
    pub fn held_files(&self, except: &str) -> Vec<Mapped> {
        self.models
            .iter()
            .filter_map(|(id, e)| match &e.life {
                Lifecycle::Loading(Loading {
                    mapped,
                    file_pending: false,
                    ..
                })
                | Lifecycle::Unloading { mapped, .. } => *mapped,
                life if life.is_cold() && id != except && e.turn.is_some() => {
                    split(e.prediction.as_ref()?, e.file_id).1
                }
                _ => None,
            })
            .collect()
    }

    /// Bytes of `mapped`'s file that no model maps any more (a worker that mapped it
    /// has just exited and left its slot).
    pub fn unmapped_bytes(&self, mapped: Option<&Mapped>) -> u64 {
        let others: Vec<&Mapped> = self.mappers().map(|(_, m)| m).collect();
        released_bytes(mapped, others)
    }

    /// Bytes of file pages that stopping `victims` frees: the files no other model
    /// maps, nor the model `incoming` that they make room for.
    pub fn files_freed_by(&self, victims: &[String], incoming: Option<&Mapped>) -> u64 {
        let (leaving, staying): (Vec<_>, Vec<_>) =
            self.mappers().partition(|(id, _)| victims.contains(id));
        let staying = staying.into_iter().map(|(_, m)| m).chain(incoming);
        released_bytes(leaving.into_iter().map(|(_, m)| m), staying)
    }

    /// The model status charges `file`'s pages to (see the module's docs).
    fn file_holder(&self, file: FileId) -> Option<&str> {
        self.models
            .iter()
            .filter_map(|(id, e)| {
                e.life.mapped().filter(|m| m.file == file)?;
                let rank = match e.life.phase() {
                    Phase::Ready | Phase::Draining => 0,
                    Phase::Unloading => 1,
                    _ => 2,
                };
                Some(((rank, e.ready_since, id), id.as_str()))
            })
            .min_by(|a, b| a.0.cmp(&b.0))
            .map(|(_, id)| id)
    }

    /// Bytes of a mapped file charged to `id` in status: its file's pages when it is
    /// the file's holder, else nothing.
    pub fn file_bytes_shown_on(&self, id: &str) -> u64 {
        let Some(mapped) = self.models.get(id).and_then(|e| e.life.mapped()) else {
            return 0;
        };
        if self.file_holder(mapped.file) != Some(id) {
            return 0;
        }
        // The largest of its mappers' figures: what the books charge for the file.
        self.mappers()
            .filter(|(_, m)| m.file == mapped.file)
            .map(|(_, m)| m.bytes)
            .max()
            .unwrap_or(0)
    }

    /// Whether a model other than `id`, and not among `leaving`, maps `file` now.
    pub fn mapped_by_staying(&self, id: &str, file: FileId, leaving: &[String]) -> bool {
        self.mappers()
            .any(|(m, mapped)| m != id && !leaving.contains(m) && mapped.file == file)
    }

    /// Whether a model other than `id` maps `file` now.
    pub fn mapped_by_another(&self, id: &str, file: FileId) -> bool {
        self.mappers()
            .any(|(m, mapped)| m != id && mapped.file == file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Charge, Device, Footprint};

    #[test]
    fn a_footprint_splits_into_its_own_bytes_and_its_file_pages() {
        let file = FileId { dev: 1, ino: 2 };
        let fp = Footprint {
            weights_bytes: 70,
            mapped_bytes: 70,
            charge: Charge::on(Device::Cpu, 100),
            ..Footprint::default()
        };
        let (own, mapped) = split(&fp, Some(file));
        assert_eq!(own, Charge::on(Device::Cpu, 30));
        assert_eq!(mapped, Some(Mapped { file, bytes: 70 }));
        // Unknown file, or copied weights: all its own.
        assert_eq!(split(&fp, None), (fp.charge.clone(), None));
        let copied = Footprint {
            mapped_bytes: 0,
            ..fp.clone()
        };
        assert_eq!(split(&copied, Some(file)), (fp.charge.clone(), None));
        // Never more pages than the RAM it is charged.
        let odd = Footprint {
            mapped_bytes: 500,
            ..fp
        };
        assert_eq!(split(&odd, Some(file)).1, Some(Mapped { file, bytes: 100 }));
    }
}
