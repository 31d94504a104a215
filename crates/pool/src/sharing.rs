//! Weights mapped from a file, shared between workers. llama.cpp maps a GGUF file's
//! tensors instead of copying them: the pages belong to the page cache, and every
//! worker mapping the same file maps the same pages. The pool charges a file's pages
//! once, however many models map it, for as long as any of them (loading, ready or
//! stopping) still maps it. Pure: the pool hands these functions what its models map.

use std::collections::BTreeMap;
use std::path::Path;

use crate::{Charge, Device, Footprint};

/// A file as the kernel knows it: two spellings of one path (a symlink, `..`, a hard
/// link) are one file, and a file replaced under the same path is another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    /// The file `path` names now (following symlinks); `None` when it cannot be read.
    pub fn of(path: &Path) -> Option<FileId> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        Some(FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// Pages of a file a worker maps shared: host memory that the page cache holds once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapped {
    pub file: FileId,
    pub bytes: u64,
}

/// A footprint split into the bytes of the model's own and the pages of `file` it
/// maps (none when the engine copies its weights, or the file is unknown).
pub fn split(footprint: &Footprint, file: Option<FileId>) -> (Charge, Option<Mapped>) {
    let mut own = footprint.charge.clone();
    let ram = own.get(Device::Cpu);
    let bytes = footprint.mapped_bytes.min(ram);
    let (Some(file), true) = (file, bytes > 0) else {
        return (own, None);
    };
    own.0.insert(Device::Cpu, ram - bytes);
    (own, Some(Mapped { file, bytes }))
}

/// Bytes of host memory the files in `mapped` hold: each file once, at the most any of
/// its mappers maps of it.
pub fn mapped_bytes<'a>(mapped: impl IntoIterator<Item = &'a Mapped>) -> u64 {
    let mut files: BTreeMap<FileId, u64> = BTreeMap::new();
    for m in mapped {
        let bytes = files.entry(m.file).or_default();
        *bytes = (*bytes).max(m.bytes);
    }
    files.values().sum()
}

/// Bytes of host memory that would no longer be held if the mappers in `leaving` went
/// and those in `staying` stayed: the files only the leaving ones map.
pub fn released_bytes<'a>(
    leaving: impl IntoIterator<Item = &'a Mapped>,
    staying: impl IntoIterator<Item = &'a Mapped> + Clone,
) -> u64 {
    let leaving: Vec<&Mapped> = leaving.into_iter().collect();
    let both = mapped_bytes(leaving.iter().copied().chain(staying.clone()));
    both - mapped_bytes(staying)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn m(file: u64, bytes: u64) -> Mapped {
        Mapped {
            file: FileId { dev: 1, ino: file },
            bytes,
        }
    }

    #[test]
    fn a_file_mapped_twice_is_charged_once() {
        assert_eq!(mapped_bytes(&[m(1, 100), m(1, 100), m(2, 30)]), 130);
        assert_eq!(mapped_bytes(&[]), 0);
        // Two predictions of one file differ only by rounding: the larger counts.
        assert_eq!(mapped_bytes(&[m(1, 90), m(1, 100)]), 100);
    }

    #[test]
    fn leaving_frees_only_files_nobody_else_maps() {
        let (a, b, c) = (m(1, 100), m(1, 100), m(2, 30));
        assert_eq!(released_bytes(&[a], &[b, c]), 0);
        assert_eq!(released_bytes(&[a, b], &[c]), 100);
        assert_eq!(released_bytes(&[c], &[a, b]), 30);
        assert_eq!(released_bytes(&[a, b, c], &[]), 130);
    }

    #[test]
    fn two_spellings_of_one_file_are_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("model.gguf");
        std::fs::write(&file, b"GGUF").unwrap();
        let link = dir.path().join("link.gguf");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let hard = dir.path().join("hard.gguf");
        std::fs::hard_link(&file, &hard).unwrap();
        let dotted = dir.path().join(".").join("model.gguf");
        let id = FileId::of(&file).unwrap();
        assert_eq!(FileId::of(&link), Some(id));
        assert_eq!(FileId::of(&hard), Some(id));
        assert_eq!(FileId::of(&dotted), Some(id));
        let other = dir.path().join("other.gguf");
        std::fs::write(&other, b"GGUF").unwrap();
        assert_ne!(FileId::of(&other), Some(id));
        assert_eq!(FileId::of(&dir.path().join("missing.gguf")), None);
    }

    proptest! {
        /// Whatever order mappers come and go in, the charge is each file once while
        /// anyone maps it, and nothing once everyone has gone: no byte leaks.
        #[test]
        fn charge_follows_the_mappers_and_returns_to_zero(
            mappers in proptest::collection::vec((0u64..3, 1u64..1000), 0..8),
            order in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let mut left: Vec<Mapped> = mappers.iter().map(|&(f, b)| m(f, b)).collect();
            for i in order {
                if left.is_empty() {
                    break;
                }
                let gone = left.remove(i.index(left.len()));
                let before = mapped_bytes(left.iter().chain([&gone]));
                let freed = released_bytes([&gone], &left);
                prop_assert_eq!(before - freed, mapped_bytes(&left));
                // Freed: what only it mapped of its file (all of it when it was the
                // file's last mapper).
                let max_of = |v: &[&Mapped]| {
                    v.iter().filter(|o| o.file == gone.file).map(|o| o.bytes).max().unwrap_or(0)
                };
                let others: Vec<&Mapped> = left.iter().collect();
                let with: Vec<&Mapped> = left.iter().chain([&gone]).collect();
                prop_assert_eq!(freed, max_of(&with) - max_of(&others));
                for f in 0..3 {
                    let max = left.iter().filter(|o| o.file.ino == f).map(|o| o.bytes).max();
                    let alone = mapped_bytes(left.iter().filter(|o| o.file.ino == f));
                    prop_assert_eq!(alone, max.unwrap_or(0));
                }
            }
            let all_gone = released_bytes(&left, &[]);
            prop_assert_eq!(all_gone, mapped_bytes(&left));
            prop_assert_eq!(released_bytes(&left, &left), 0);
        }
    }
}
