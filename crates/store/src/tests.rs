//! The spill store on a real directory: scanning at startup, spilling, checksums, the
//! byte budget and its LRU evictions, protection of artifacts models are using.

use std::fs;
use std::path::{Path, PathBuf};

use super::*;

fn source(dir: &Path, name: &str, len: usize) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, vec![name.len() as u8; len]).unwrap();
    path
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn spilled_files_survive_a_restart_and_garbage_does_not() {
    let root = tempfile::tempdir().unwrap();
    let spill = root.path().join("spill");
    let src = source(root.path(), "a.gguf", 10_000);
    let key = path_key(&src).unwrap();
    {
        let (store, report) = Store::open(&spill, 1 << 20).unwrap();
        assert_eq!(report, ScanReport::default());
        let (art, how) = store.spill_file(&key, &src).unwrap();
        assert_eq!(how, SpillHow::Linked, "same file system: a hard link");
        assert_eq!(art.bytes, 10_000);
        assert_eq!(store.usage().used_bytes, 10_000);
    }
    let flipped = source(root.path(), "b.gguf", 5_000);
    let flipped_key = path_key(&flipped).unwrap();
    {
        let (store, _) = Store::open(&spill, 1 << 20).unwrap();
        let (art, _) = store.spill_file(&flipped_key, &flipped).unwrap();
        // Break the hard link, then change one byte: same size, wrong checksum.
        fs::remove_file(&art.path).unwrap();
        let mut bytes = fs::read(&flipped).unwrap();
        bytes[100] ^= 1;
        fs::write(&art.path, bytes).unwrap();
    }
    // What a crash, a bit flip and a stranger leave behind.
    fs::write(spill.join(format!(".{key}.1-2.tmp")), b"partial").unwrap();
    let bad = "p-0123456789abcdef0123456789abcdef";
    fs::write(spill.join(format!("{bad}.gguf")), b"no record").unwrap();
    fs::write(spill.join("p-ffff.json"), b"{}").unwrap();
    fs::write(spill.join("notes.txt"), b"?").unwrap();
    // The workers' saved prefixes are theirs to manage: left alone.
    fs::create_dir_all(spill.join(SAVED_PREFIXES_DIR).join("0123")).unwrap();
    fs::write(spill.join(SAVED_PREFIXES_DIR).join("0123/a.kv"), b"x").unwrap();
    let (store, report) = Store::open(&spill, 1 << 20).unwrap();
    assert_eq!(report.kept, 1, "{report:?}");
    assert_eq!(report.partial, 1, "{report:?}");
    assert_eq!(
        report.corrupt, 3,
        "no record, record without data, bad checksum: {report:?}"
    );
    assert_eq!(report.unknown, 1, "{report:?}");
    assert_eq!(store.lookup(&key).unwrap().bytes, 10_000);
    assert!(store.lookup(&flipped_key).is_none());
    assert_eq!(
        names(&spill),
        vec![
            MARKER.to_owned(),
            format!("{key}.gguf"),
            format!("{key}.json"),
            SAVED_PREFIXES_DIR.to_owned(),
        ]
    );
    assert!(spill.join(SAVED_PREFIXES_DIR).join("0123/a.kv").exists());
}

#[test]
fn a_directory_modelpool_did_not_create_is_refused() {
    let root = tempfile::tempdir().unwrap();
    fs::write(root.path().join("precious.txt"), b"x").unwrap();
    let err = Store::open(root.path(), 1 << 20).unwrap_err();
    assert!(err.to_string().contains("did not write"), "{err}");
    assert!(root.path().join("precious.txt").exists());
}

#[test]
fn over_budget_the_least_recently_used_goes_but_never_a_protected_one() {
    let root = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(&root.path().join("spill"), 25 << 10).unwrap();
    let mut keys = Vec::new();
    for name in ["a", "bb", "ccc"] {
        let src = source(root.path(), name, 10 << 10);
        let key = path_key(&src).unwrap();
        keys.push(key.clone());
        // `a` is resident: protected.
        if name == "a" {
            store.protect(&key);
        }
        store.spill_file(&key, &src).unwrap();
    }
    // 30 KiB in a 25 KiB budget: the LRU one (`a`) is protected, so `bb` goes.
    assert!(store.lookup(&keys[0]).is_some(), "protected artifact kept");
    assert!(
        store.lookup(&keys[1]).is_none(),
        "unprotected LRU artifact evicted"
    );
    assert!(store.lookup(&keys[2]).is_some());
    let usage = store.usage();
    assert_eq!(usage.artifacts, 2);
    assert_eq!(usage.used_bytes, 20 << 10);
    // Two models share `a`: one stopping leaves it protected, so a new artifact that
    // overflows the budget evicts another one.
    store.protect(&keys[0]);
    store.release(&keys[0]);
    let dd = source(root.path(), "dddd", 10 << 10);
    let dd_key = path_key(&dd).unwrap();
    store.spill_file(&dd_key, &dd).unwrap();
    assert!(
        store.lookup(&keys[0]).is_some(),
        "still protected by the other model"
    );
    assert!(
        store.lookup(&keys[2]).is_none(),
        "the unprotected LRU one went"
    );
    // Released by the last model too, `a` competes again; nothing is over budget now.
    store.release(&keys[0]);
    assert!(store.lookup(&keys[0]).is_some());
    assert_eq!(store.usage().held_bytes, 0);
}

#[test]
fn a_file_larger_than_the_budget_is_not_spilled_and_leaves_nothing() {
    let root = tempfile::tempdir().unwrap();
    let spill = root.path().join("spill");
    let (store, _) = Store::open(&spill, 1000).unwrap();
    let src = source(root.path(), "big", 5000);
    let key = path_key(&src).unwrap();
    assert!(store.should_spill(&key));
    let err = store.spill_file(&key, &src).unwrap_err();
    assert!(matches!(err, StoreError::TooLarge { .. }), "{err}");
    assert!(
        !store.should_spill(&key),
        "a failed spill is not retried at once"
    );
    assert_eq!(names(&spill), vec![MARKER.to_owned()]);
}

#[test]
fn keys_change_when_the_source_file_changes() {
    let root = tempfile::tempdir().unwrap();
    let src = source(root.path(), "m", 100);
    let before = path_key(&src).unwrap();
    // A new length: the key changes whatever the file system's timestamp granularity.
    fs::write(&src, vec![1u8; 101]).unwrap();
    assert_ne!(before, path_key(&src).unwrap());
    assert!(valid_key(&before));
    assert!(valid_key(&url_key(&"A".repeat(64))));
    assert!(!valid_key("p-../../etc"));
}

#[test]
fn a_directory_key_changes_when_a_file_in_it_is_rewritten_in_place() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("model");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("config.json"), b"{}").unwrap();
    fs::write(dir.join("model.safetensors"), vec![0u8; 64]).unwrap();
    let before = path_key(&dir).unwrap();
    assert_eq!(
        before,
        path_key(&dir).unwrap(),
        "stable while nothing changes"
    );
    // Same length, same directory entries: only the file's mtime moves. A rewrite within
    // one tick of the file system's timestamp clock (a jiffy on ext4, 2 s on FAT) would
    // keep it, so the rewrite sets it one second on, as a later rewrite would.
    let file = fs::OpenOptions::new()
        .write(true)
        .open(dir.join("model.safetensors"))
        .unwrap();
    let mtime = file.metadata().unwrap().modified().unwrap();
    (&file).write_all(&[1u8; 64]).unwrap();
    file.set_modified(mtime + std::time::Duration::from_secs(1))
        .unwrap();
    assert_ne!(before, path_key(&dir).unwrap());
    let q = quantized_key(&before, "Q8_0");
    assert!(valid_key(&q));
    assert_eq!(q, quantized_key(&before, "q8_0"));
    assert_ne!(q, quantized_key(&before, "q4_0"));
}
