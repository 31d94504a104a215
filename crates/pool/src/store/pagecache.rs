//! The warm tier: how much of a model file sits in the OS page cache (`mincore`), and
//! asking the kernel to read a file ahead (`WILLNEED` + `readahead`) or to drop it
//! (`DONTNEED`).
//!
//! Page-cache pages are not charged to any worker, yet they decide whether a reload
//! reads the disk or memory. Reporting them per model makes the warm tier visible;
//! dropping an evicted model's pages under memory pressure keeps the budget honest.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::Path;

/// Bytes of `path` resident in the page cache now (a multiple of the page size, capped
/// at the file's length).
pub fn cached_bytes(path: &Path) -> io::Result<u64> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(0);
    }
    let len_usize = usize::try_from(len).map_err(|_| io::Error::other("file too large"))?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    let pages = len_usize.div_ceil(page);
    // SAFETY: a read-only shared mapping of a file we hold open; it is unmapped below
    // and never dereferenced, only passed to mincore.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len_usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let mut vec = vec![0u8; pages];
    // SAFETY: `addr` maps `len_usize` bytes and `vec` has one byte per page of it.
    let rc = unsafe { libc::mincore(addr, len_usize, vec.as_mut_ptr()) };
    let err = io::Error::last_os_error();
    // SAFETY: unmapping exactly the mapping made above.
    unsafe { libc::munmap(addr, len_usize) };
    if rc != 0 {
        return Err(err);
    }
    let resident = vec.iter().filter(|b| **b & 1 == 1).count() as u64;
    Ok((resident * page as u64).min(len))
}

/// Reads `path` into the page cache and returns once it is there (the next load of the
/// model then reads memory, not the disk).
pub fn prefetch(path: &Path) -> io::Result<()> {
    let mut file = File::open(path)?;
    // WILLNEED lets the kernel issue large reads ahead; reading the file through then
    // guarantees residency even where the hint is ignored (some sandboxes, some file
    // systems) and tells the caller when it is done.
    advise(&file, libc::POSIX_FADV_WILLNEED)?;
    let mut buf = vec![0u8; 4 << 20];
    while file.read(&mut buf)? > 0 {}
    Ok(())
}

/// Drops `path`'s clean pages from the page cache.
pub fn drop_cached(path: &Path) -> io::Result<()> {
    advise(&File::open(path)?, libc::POSIX_FADV_DONTNEED)
}

fn advise(file: &File, advice: libc::c_int) -> io::Result<()> {
    // SAFETY: plain syscall on an open descriptor; offset 0, length 0 means the whole file.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, advice) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_file_just_read_is_cached_and_dropping_it_empties_the_count() {
        // tmpfs pages cannot be dropped, so use a directory on the real disk.
        let dir = tempfile::tempdir_in(std::env::var("CARGO_MANIFEST_DIR").unwrap()).unwrap();
        let path = dir.path().join("f");
        let mut f = File::create(&path).unwrap();
        f.write_all(&vec![7u8; 1 << 20]).unwrap();
        f.sync_all().unwrap();
        drop(f);
        drop_cached(&path).unwrap();
        let after_drop = cached_bytes(&path).unwrap();
        prefetch(&path).unwrap();
        let after_prefetch = cached_bytes(&path).unwrap();
        assert_eq!(after_prefetch, 1 << 20);
        assert!(
            after_drop < after_prefetch,
            "{after_drop} !< {after_prefetch}"
        );
        assert_eq!(cached_bytes(&dir.path().join("missing")).ok(), None);
    }
}
