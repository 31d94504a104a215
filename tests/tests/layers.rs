//! The crate layout's one hard rule: only `modelpool-worker` links an engine. The server,
//! its front ends, configuration, the supervisor and the catalogue build without
//! llama.cpp or mistral.rs, so each is asked of cargo's own dependency tree.

use std::process::Command;

/// Crates (as cargo names packages) that carry an engine.
const ENGINE_CRATES: &[&str] = &["mistralrs", "llama-cpp-2", "llama-cpp-sys-2"];

/// The normal (non-dev, non-build) dependencies of `package`, one `name vX` per line.
fn normal_tree(package: &str) -> String {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "-e",
            "normal",
            "--prefix",
            "none",
            "-p",
            package,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("cargo tree prints text")
}

fn engines_in(tree: &str) -> Vec<String> {
    tree.lines()
        .filter(|l| {
            let name = l.split_whitespace().next().unwrap_or("");
            ENGINE_CRATES.contains(&name) || name == "modelpool-worker"
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn only_the_worker_links_an_engine() {
    for package in [
        "modelpool-server",
        "modelpool-supervisor",
        "modelpool-catalog",
        "modelpool-pool",
        "modelpool-fixtures",
    ] {
        let tree = normal_tree(package);
        assert!(
            tree.contains(package),
            "{package} is in its own tree:\n{tree}"
        );
        let found = engines_in(&tree);
        assert!(found.is_empty(), "{package} links an engine: {found:?}");
    }
    // The catalogue is the bottom of the workspace: every other crate may ask it.
    let catalog = normal_tree("modelpool-catalog");
    let inner: Vec<&str> = catalog
        .lines()
        .filter(|l| l.starts_with("modelpool-") && !l.starts_with("modelpool-catalog "))
        .collect();
    assert!(inner.is_empty(), "the catalogue depends on {inner:?}");
    // The check can fail: the worker's own tree has both engines.
    let worker = engines_in(&normal_tree("modelpool-worker"));
    for engine in ["mistralrs", "llama-cpp-2"] {
        assert!(
            worker.iter().any(|l| l.starts_with(engine)),
            "the worker links {engine}: {worker:?}"
        );
    }
}
