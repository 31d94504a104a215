//! The warm tier: how much of a model file sits in the OS page cache (`mincore`), and
//! asking the kernel to read a file ahead (`WILLNEED` + `readahead`) or to drop it
//! (`DONTNEED`).
//!
//! Page-cache pages are not charged to any worker, yet they decide whether a reload
//! reads the disk or memory. Reporting them per model makes the warm tier visible;
//! dropping an evicted model's pages under memory pressure keeps the budget honest.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// One flag per page of `file` (`len` bytes): whether it is in the page cache now, and
/// the page size.
fn residency(file: &File, len: u64) -> io::Result<(Vec<bool>, usize)> {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    if len == 0 {
        return Ok((Vec::new(), page));
    }
    let len_usize = usize::try_from(len).map_err(|_| io::Error::other("file too large"))?;
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
    Ok((vec.into_iter().map(|b| b & 1 == 1).collect(), page))
}

/// Bytes of `path` resident in the page cache now (a multiple of the page size, capped
/// at the file's length).
pub fn cached_bytes(path: &Path) -> io::Result<u64> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let (pages, page) = residency(&file, len)?;
    let resident = pages.iter().filter(|r| **r).count() as u64;
    Ok((resident * page as u64).min(len))
}

/// Reads `path` into the page cache and returns once it is there (the next load of the
/// model then reads memory, not the disk). Only the parts not cached already are read:
/// a warm 4 GiB file costs a `mincore` call, not 4 GiB of copying on a CPU that the
/// models being served need.
pub fn prefetch(path: &Path) -> io::Result<()> {
    const CHUNK: usize = 4 << 20;
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    // WILLNEED lets the kernel issue large reads ahead; reading the missing chunks then
    // guarantees residency even where the hint is ignored (some sandboxes, some file
    // systems) and tells the caller when it is done.
    advise(&file, libc::POSIX_FADV_WILLNEED)?;
    let mut buf = Vec::new();
    // Pages can still be missing after one pass (seen once in six full test runs here:
    // 2 of SmolLM2's 24,015 pages, most likely counted resident by mincore while the
    // hint's readahead was in flight); a second look reads whatever the first skipped.
    for _ in 0..2 {
        let (pages, page) = residency(&file, len)?;
        let per_chunk = (CHUNK / page).max(1);
        let mut read_any = false;
        for (i, chunk) in pages.chunks(per_chunk).enumerate() {
            if chunk.iter().all(|r| *r) {
                continue;
            }
            buf.resize(CHUNK, 0);
            let offset = (i * per_chunk * page) as u64;
            let want = (len - offset).min(CHUNK as u64) as usize;
            read_at(&file, &mut buf[..want], offset)?;
            read_any = true;
        }
        if !read_any {
            break;
        }
    }
    Ok(())
}

/// Reads `buf.len()` bytes at `offset` (fewer at the end of the file).
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
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

    /// Why the kernel would keep a clean file's pages in `dir` after DONTNEED, if it does
    /// (tmpfs, overlays of it, some network and FUSE file systems): a probe file advised
    /// with a raw `posix_fadvise`, so a fault in [`drop_cached`] fails the test below
    /// rather than skipping it.
    fn kernel_keeps_pages_in(dir: &Path) -> Option<String> {
        let path = dir.join("probe");
        let mut f = File::create(&path).ok()?;
        f.write_all(&vec![1u8; 1 << 20]).ok()?;
        f.sync_all().ok()?;
        // SAFETY: plain syscall on an open descriptor; length 0 means the whole file.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let kept = cached_bytes(&path).ok()?;
        (kept > 0).then(|| {
            format!(
                "the kernel kept {kept} bytes of a probe file in the page cache after \
                 POSIX_FADV_DONTNEED in {}",
                dir.display()
            )
        })
    }

    #[test]
    fn a_file_just_read_is_cached_and_dropping_it_empties_the_count() {
        // tmpfs pages cannot be dropped, so use a directory on the real disk.
        let dir = tempfile::tempdir_in(std::env::var("CARGO_MANIFEST_DIR").unwrap()).unwrap();
        if let Some(why) = kernel_keeps_pages_in(dir.path()) {
            let test = std::thread::current().name().unwrap_or("").to_owned();
            let _ = writeln!(std::io::stderr(), "skipped: {test}: {why}");
            return;
        }
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
