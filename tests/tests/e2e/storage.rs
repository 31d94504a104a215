//! Storage tiers: URL sources downloaded once into the spill directory, reloads that
//! never touch the source again, checksums, garbage at startup, a full spill disk,
//! prefetch into the page cache and dropping an evicted model's pages.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use modelpool_proto::v1::model_control_client::ModelControlClient;
use modelpool_proto::v1::pool_event::Kind;
use modelpool_proto::v1::{
    EvictModelRequest, GetPoolStatusRequest, LoadModelRequest, ModelState, WatchEventsRequest,
};
use modelpool_tests::{
    ask_capital, chat, greedy, model_path, model_toml, modelpool_exe, next_event, serial,
    settings_toml, skipped, ServeChild, TestServer,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

/// sha256 of the SmolLM2 file (scripts/fetch-models.sh checks the same).
const MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// A deliberately slow loopback HTTP server for one file, counting the requests it
/// gets: the model's "remote source".
struct SlowSource {
    url: String,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl SlowSource {
    async fn serve(file: PathBuf) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/models/smollm2.gguf",
            listener.local_addr().unwrap()
        );
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&requests);
        let task = tokio::spawn(async move {
            let body = Arc::new(tokio::fs::read(&file).await.unwrap());
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let body = Arc::clone(&body);
                tokio::spawn(async move {
                    let mut head = vec![0u8; 4096];
                    let _ = sock.read(&mut head).await;
                    let header = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    if sock.write_all(header.as_bytes()).await.is_err() {
                        return;
                    }
                    // About 100 MB/s: a slow network share, not loopback speed.
                    for chunk in body.chunks(4 << 20) {
                        if sock.write_all(chunk).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(40)).await;
                    }
                });
            }
        });
        Self {
            url,
            requests,
            task,
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for SlowSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn url_model(id: &str, url: &str, sha256: &str) -> String {
    format!("[[models]]\nid = \"{id}\"\nurl = \"{url}\"\nsha256 = \"{sha256}\"\ncontext_length = 2048\n")
}

fn storage(spill: &Path, budget: &str) -> String {
    format!(
        "[storage]\nspill_dir = \"{}\"\nspill_budget = \"{budget}\"\n",
        spill.display()
    )
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_model_is_downloaded_once_and_reloads_from_the_spill_dir() {
    let source = SlowSource::serve(model_path()).await;
    let spill = tempfile::tempdir().unwrap();
    let models = url_model("remote", &source.url, MODEL_SHA256);
    let t = TestServer::start_with(|rt| settings_toml(&storage(spill.path(), "1GiB"), &models, rt))
        .await;
    let mut control = t.control();
    let mut events = t.events().await;
    assert_eq!(t.model("remote").await.tier, "source");

    assert!(t.ask_capital("remote").await.contains("Paris"));
    assert_eq!(source.requests(), 1);
    let m = t.model("remote").await;
    assert_eq!((m.tier.as_str(), m.spilled_bytes), ("resident", 98_362_432));
    assert!(
        m.file.starts_with(&spill.path().display().to_string()),
        "{}",
        m.file
    );
    let status = t.pool_status().await;
    let usage = status.spill.expect("spill status");
    assert_eq!((usage.artifacts, usage.used_bytes), (1, 98_362_432));

    control
        .evict_model(EvictModelRequest {
            id: "remote".into(),
        })
        .await
        .unwrap();
    let m = t.model("remote").await;
    assert!(m.tier == "warm" || m.tier == "spilled", "{}", m.tier);
    assert!(t.ask_capital("remote").await.contains("Paris"));
    assert_eq!(source.requests(), 1, "the reload read the spill directory");

    let mut fetched = 0;
    let mut loads = 0;
    while loads < 2 {
        let e = next_event(&mut events, Duration::from_secs(30)).await;
        match e.kind {
            Some(Kind::Fetched(f)) => {
                assert_eq!(f.bytes, 98_362_432);
                fetched += 1;
            }
            Some(Kind::LoadFinished(_)) => loads += 1,
            _ => {}
        }
    }
    assert_eq!(fetched, 1);
    t.stop().await;

    // A new server over the same directory verifies the artifact and uses it.
    let t = TestServer::start_with(|rt| settings_toml(&storage(spill.path(), "1GiB"), &models, rt))
        .await;
    assert_eq!(t.model("remote").await.spilled_bytes, 98_362_432);
    assert!(t.ask_capital("remote").await.contains("Paris"));
    assert_eq!(source.requests(), 1, "after a restart too");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_with_the_wrong_checksum_is_refused_and_leaves_nothing() {
    let source = SlowSource::serve(model_path()).await;
    let spill = tempfile::tempdir().unwrap();
    let wrong = "0".repeat(64);
    let models = url_model("remote", &source.url, &wrong);
    let t = TestServer::start_with(|rt| settings_toml(&storage(spill.path(), "1GiB"), &models, rt))
        .await;
    let err = t
        .inference()
        .chat(chat("remote", "Hi", greedy(4)))
        .await
        .expect_err("the bytes are not the model asked for");
    assert_eq!(err.code(), Code::DataLoss, "{}", err.message());
    assert!(
        err.message().contains("checksum mismatch")
            && err.message().contains(&wrong)
            && err.message().contains(MODEL_SHA256),
        "{}",
        err.message()
    );
    assert_eq!(listing(spill.path()), vec!["MODELPOOL_SPILL_DIR"]);
    let m = t.model("remote").await;
    assert_eq!((m.state(), m.worker_pid), (ModelState::Failed, 0));
    assert!(
        m.last_error.contains("checksum mismatch"),
        "{}",
        m.last_error
    );
    t.assert_nothing_charged().await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_the_spill_dir_is_discarded_at_startup() {
    let spill = tempfile::tempdir().unwrap();
    let d = spill.path();
    std::fs::write(d.join("MODELPOOL_SPILL_DIR"), b"").unwrap();
    // A download cut by a crash, a file without its record, a record without its file,
    // a file whose checksum disagrees with its record, and a stranger.
    std::fs::write(d.join(".u-00.123-456.tmp"), vec![1u8; 1000]).unwrap();
    let k1 = format!("u-{}", "1".repeat(64));
    std::fs::write(d.join(format!("{k1}.gguf")), b"GGUF").unwrap();
    let k2 = format!("u-{}", "2".repeat(64));
    std::fs::write(d.join(format!("{k2}.json")), b"{}").unwrap();
    let k3 = format!("u-{MODEL_SHA256}");
    std::fs::write(d.join(format!("{k3}.gguf")), vec![0u8; 4096]).unwrap();
    std::fs::write(
        d.join(format!("{k3}.json")),
        format!(
            r#"{{"version":1,"key":"{k3}","bytes":4096,"sha256":"{MODEL_SHA256}","origin":"x"}}"#
        ),
    )
    .unwrap();
    std::fs::create_dir(d.join("junk")).unwrap();
    let models = model_toml("smollm2", "context_length = 2048\n");
    let t = TestServer::start_with(|rt| settings_toml(&storage(d, "1GiB"), &models, rt)).await;
    assert_eq!(listing(d), vec!["MODELPOOL_SPILL_DIR"]);
    let usage = t.pool_status().await.spill.unwrap();
    assert_eq!((usage.artifacts, usage.used_bytes), (0, 0));
    // The path model still serves, and its file is spilled (hard-linked) after load.
    assert!(t.ask_capital("smollm2").await.contains("Paris"));
    // In the background, hashed as it goes: a busy machine only makes that slower.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut spilled = false;
    while !spilled && std::time::Instant::now() < deadline {
        spilled = t.model("smollm2").await.spilled_bytes == 98_362_432;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(spilled, "the loaded model's file was spilled");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_warms_the_page_cache_and_eviction_for_room_drops_it() {
    // Two distinct files (hard links would share pages) on the real disk.
    // (tmpfs pages cannot be dropped, and /tmp may be tmpfs: use the checkout's disk.)
    let dir = tempfile::tempdir_in(modelpool_tests::repo_root()).unwrap();
    if let Err(why) = modelpool_tests::page_cache_drops_in(dir.path()) {
        return skipped(&why);
    }
    let a = dir.path().join("a.gguf");
    let b = dir.path().join("b.gguf");
    std::fs::copy(model_path(), &a).unwrap();
    std::fs::copy(model_path(), &b).unwrap();
    let one_fits = modelpool_tests::predicted_bytes(2048) * 3 / 2;
    if let Err(why) = modelpool_tests::memory_for_budget(one_fits) {
        return skipped(&why);
    }
    let models = format!(
        "[[models]]\nid = \"a\"\npath = \"{}\"\ncontext_length = 2048\n\
         [[models]]\nid = \"b\"\npath = \"{}\"\ncontext_length = 2048\n",
        a.display(),
        b.display()
    );
    let t = TestServer::start_with(|rt| {
        settings_toml(&format!("ram_budget = \"{one_fits}\"\n"), &models, rt)
    })
    .await;
    let mut control = t.control();
    // Start cold: the copies' pages were just written; write them back, then drop them
    // (dirty pages cannot be dropped).
    for f in [&a, &b] {
        std::fs::File::open(f).unwrap().sync_all().unwrap();
        modelpool_pool::store::pagecache::drop_cached(f).unwrap();
    }
    assert!(t.model("a").await.page_cache_bytes < 10 << 20);
    let r = control
        .load_model(LoadModelRequest {
            id: "a".into(),
            prefetch: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let m = r.model.unwrap();
    assert_eq!(
        m.state(),
        ModelState::Registered,
        "prefetch starts no worker"
    );
    assert_eq!(
        (m.tier.as_str(), m.page_cache_bytes),
        ("warm", m.file_bytes)
    );

    assert!(t.ask_capital("a").await.contains("Paris"));
    // `b` needs the room: `a` is evicted for it, and its pages go with it.
    assert!(t.ask_capital("b").await.contains("Paris"));
    let m = t.model("a").await;
    assert_eq!(m.state(), ModelState::Registered);
    assert!(
        m.page_cache_bytes < m.file_bytes / 10,
        "{} of {} still cached",
        m.page_cache_bytes,
        m.file_bytes
    );
    assert_eq!(m.tier, "source");
    let err = control
        .load_model(LoadModelRequest {
            id: "a".into(),
            prefetch: true,
            pin: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    t.stop().await;
}

/// Whether this host lets an unprivileged process mount a tmpfs on `dir` in a user and
/// mount namespace of its own (`unshare --user --map-root-user --mount`): user
/// namespaces may be disabled by sysctl, or refused by a container's seccomp profile.
fn private_tmpfs_mounts(dir: &Path) -> Result<(), String> {
    let script = format!(
        "mount -t tmpfs -o size=1m modelpool-probe '{}'",
        dir.display()
    );
    let out = std::process::Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "sh", "-c", &script])
        .output()
        .map_err(|e| format!("cannot run unshare(1): {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "this host refuses a private tmpfs mount in a user namespace \
         (`unshare --user --map-root-user --mount` then `mount -t tmpfs`: {}, {})",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

/// The spill directory on a 16 MiB file system of its own (a tmpfs mounted in a
/// private mount namespace): copying the 94 MiB model into it runs out of space.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spill_disk_removes_the_partial_copy_and_the_model_still_serves() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let spill = dir.path().join("spill");
    std::fs::create_dir(&spill).unwrap();
    if let Err(why) = private_tmpfs_mounts(&spill) {
        return skipped(&why);
    }
    let config = dir.path().join("modelpool.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"\"\n\
             [workers]\nruntime_dir = \"{}\"\n{}{}",
            dir.path().display(),
            storage(&spill, "10GiB"),
            model_toml("smollm2", "context_length = 2048\n"),
        ),
    )
    .unwrap();
    let script = format!(
        "mount -t tmpfs -o size=16m modelpool-test-spill '{}' && exec '{}' serve --config '{}'",
        spill.display(),
        modelpool_exe().display(),
        config.display()
    );
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--user", "--map-root-user", "--mount", "sh", "-c", &script])
        .stdout(std::process::Stdio::null());
    let mut server = ServeChild::spawn(cmd).await;
    let channel = server.connect().await;
    let mut control = ModelControlClient::new(channel.clone());
    let mut events = control
        .watch_events(WatchEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(ask_capital(channel.clone(), "smollm2")
        .await
        .contains("Paris"));
    let error = loop {
        let e = tokio::time::timeout(Duration::from_secs(30), events.message())
            .await
            .expect("a spill outcome within 30 s")
            .unwrap()
            .unwrap();
        match e.kind {
            Some(Kind::SpillFailed(f)) => break f.error,
            Some(Kind::Spilled(s)) => panic!("spilled {} bytes into 16 MiB?", s.bytes),
            _ => {}
        }
    };
    assert!(error.contains("no space left"), "{error}");
    // The server's own view of the directory (its mount namespace): the marker only.
    let seen = PathBuf::from(format!("/proc/{}/root", server.pid()))
        .join(spill.strip_prefix("/").unwrap());
    assert_eq!(listing(&seen), vec!["MODELPOOL_SPILL_DIR"]);
    let status = control
        .get_pool_status(GetPoolStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.spill.unwrap().used_bytes, 0);
    // Evicted and asked again: it loads from its source.
    control
        .evict_model(EvictModelRequest {
            id: "smollm2".into(),
        })
        .await
        .unwrap();
    assert!(ask_capital(channel, "smollm2").await.contains("Paris"));
    server.signal(libc::SIGTERM);
    let status = server.wait().await;
    assert!(status.success(), "{status:?}");
}
