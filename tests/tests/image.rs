//! The CPU image (deploy/Dockerfile), built with buildah by scripts/image.sh and run
//! for real: the server starts inside the image's root file system as the image's
//! user, with the image's own configuration and the model mounted where the Kubernetes
//! manifests mount it; grpcurl from the host lists, checks health and chats; the root
//! file system is unchanged afterwards (only the volumes and the socket directory are
//! written); SIGTERM drains and the server exits 0.
//!
//! `buildah run --isolation chroot` shares the host's network, so the API and metrics
//! are bound to 127.0.0.1 (environment overrides, as a Pod would set them).
//!
//! Needs root, buildah and debootstrap (Debian packages). Without them the test says so
//! and passes, except under CI (`CI=true`), where `.ci/run` installs them and their
//! absence fails it.

use std::collections::BTreeMap;
use std::hash::Hasher;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use modelpool_tests::{
    free_port, grpcurl_path, model_path, modelpool_exe, process_alive, repo_root,
};

/// The image this test builds: deploy/Dockerfile's `prebuilt` stage around the
/// `modelpool-testbin` cargo built for this test (the same program as `modelpool`:
/// it calls the same entry point), so the test costs no second cargo build with
/// other features; `just image` builds modelpool:0.1.0 the same way.
const IMAGE: &str = "modelpool:test";
/// The working container this test runs the image in.
const CONTAINER: &str = "modelpool-image-test";
/// The user deploy/Dockerfile creates and the manifests run as.
const USER_ID: u32 = 10001;
/// Where deploy/k8s/base/deployment.yaml mounts the models, the spill directory, the
/// worker sockets and /tmp.
const MODELS: &str = "/models";
const SPILL: &str = "/var/lib/modelpool/spill";
const SOCKETS: &str = "/run/modelpool";
const TMP: &str = "/tmp";
/// Shared libraries the binary loads (ldd inside the image): glibc, the C++ runtime
/// and OpenMP for llama.cpp. deploy/README.md lists the same.
const RUNTIME_LIBRARIES: &[&str] = &[
    "ld-linux-x86-64.so.2",
    "libc.so.6",
    "libgcc_s.so.1",
    "libgomp.so.1",
    "libm.so.6",
    "libstdc++.so.6",
];

/// Why this host cannot run the test, if it cannot.
fn missing_prerequisite() -> Option<String> {
    for tool in ["buildah", "debootstrap"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!(
                "{tool} is not installed (Debian: apt-get install buildah debootstrap)"
            ));
        }
    }
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    (uid != 0).then(|| format!("buildah's vfs storage needs root here (euid {uid})"))
}

fn buildah() -> Command {
    let mut cmd = Command::new("buildah");
    // The same storage scripts/image.sh builds into (buildah 1.28 reads no
    // STORAGE_DRIVER from the environment).
    let driver = std::env::var("STORAGE_DRIVER").unwrap_or_else(|_| "vfs".into());
    cmd.args(["--storage-driver", &driver]);
    cmd
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn buildah_ok(args: &[&str]) -> String {
    ok(
        buildah().args(args).output().expect("buildah runs"),
        &format!("buildah {args:?}"),
    )
}

/// The working container and its mount, removed whatever happens.
struct WorkingContainer {
    rootfs: PathBuf,
}

impl WorkingContainer {
    fn from_image() -> Self {
        let _ = buildah().args(["rm", CONTAINER]).output();
        buildah_ok(&[
            "from",
            "--pull=never",
            "--quiet",
            "--name",
            CONTAINER,
            IMAGE,
        ]);
        let rootfs = PathBuf::from(buildah_ok(&["mount", CONTAINER]).trim());
        Self { rootfs }
    }
}

impl Drop for WorkingContainer {
    fn drop(&mut self) {
        let _ = buildah().args(["umount", CONTAINER]).output();
        let _ = buildah().args(["rm", CONTAINER]).output();
    }
}

/// `buildah run` in the working container, chroot isolation, no capabilities.
fn run_in_container(env: &[String], volumes: &[String], argv: &[String]) -> Command {
    let mut cmd = buildah();
    cmd.args(["run", "--isolation", "chroot", "--cap-drop", "all"]);
    for e in env {
        cmd.args(["--env", e]);
    }
    for v in volumes {
        cmd.args(["--volume", v]);
    }
    cmd.arg(CONTAINER).arg("--").args(argv);
    cmd
}

/// One entry of a root file system listing: type and mode, owner, size, mtime and a
/// hash of the contents (or of the link target).
type Listing = BTreeMap<String, (u32, u32, u32, u64, i64, i64, u64)>;

/// Lists `root` recursively, leaving out `skip` (absolute paths inside the image).
fn listing(root: &Path, skip: &[&str]) -> Listing {
    fn walk(root: &Path, dir: &Path, skip: &[&str], out: &mut Listing) {
        for entry in std::fs::read_dir(dir).expect("readable directory") {
            let path = entry.expect("directory entry").path();
            let inside = format!("/{}", path.strip_prefix(root).unwrap().display());
            if skip.contains(&inside.as_str()) {
                continue;
            }
            let meta = std::fs::symlink_metadata(&path).expect("metadata");
            // A directory's entries are listed themselves; its mtime also moves when
            // buildah adds and removes its own mount points (/run) on each run.
            let (mtime, mtime_nsec) = if meta.is_dir() {
                (0, 0)
            } else {
                (meta.mtime(), meta.mtime_nsec())
            };
            let mut hash = std::collections::hash_map::DefaultHasher::new();
            if meta.file_type().is_symlink() {
                hash.write(
                    std::fs::read_link(&path)
                        .unwrap()
                        .as_os_str()
                        .as_encoded_bytes(),
                );
            } else if meta.is_file() {
                hash.write(&std::fs::read(&path).expect("readable file"));
            }
            out.insert(
                inside,
                (
                    meta.mode(),
                    meta.uid(),
                    meta.gid(),
                    meta.len(),
                    mtime,
                    mtime_nsec,
                    hash.finish(),
                ),
            );
            if meta.is_dir() {
                walk(root, &path, skip, out);
            }
        }
    }
    let mut out = Listing::new();
    walk(root, root, skip, &mut out);
    out
}

fn differences(before: &Listing, after: &Listing) -> Vec<String> {
    let mut diff = Vec::new();
    for (path, entry) in after {
        match before.get(path) {
            None => diff.push(format!("created {path}")),
            Some(was) if was != entry => diff.push(format!("changed {path}")),
            Some(_) => {}
        }
    }
    diff.extend(
        before
            .keys()
            .filter(|p| !after.contains_key(*p))
            .map(|p| format!("removed {p}")),
    );
    diff
}

/// Every process below `pid`, parents first.
fn descendants(pid: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let ppid: u32 = after.split(' ').nth(1).unwrap().parse().unwrap();
        parent_of.push((p, ppid));
    }
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parent_of
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    found.remove(0);
    found
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn uids(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `grpcurl -plaintext ARGS` against `addr`, stdout or the failure.
fn grpcurl(addr: &str, data: Option<&str>, args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new(grpcurl_path());
    cmd.arg("-plaintext");
    if let Some(d) = data {
        cmd.args(["-d", d]);
    }
    let out = cmd.arg(addr).args(args).output().expect("grpcurl runs");
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn log_of(dir: &Path) -> String {
    let read = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap_or_default();
    format!("stdout:\n{}\nstderr:\n{}", read("stdout"), read("stderr"))
}

/// Waits up to `limit` for `child` to exit.
fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// A host directory for a volume, owned by the image's user.
fn volume_dir(parent: &Path, name: &str, mode: u32) -> PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(USER_ID), Some(USER_ID)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
    dir
}

/// The image's ENTRYPOINT and CMD, and its user.
fn image_command() -> (Vec<String>, String) {
    let inspect: serde_json::Value =
        serde_json::from_str(&buildah_ok(&["inspect", "--type", "image", IMAGE])).unwrap();
    let config = &inspect["OCIv1"]["config"];
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    };
    let mut argv = strings(&config["Entrypoint"]);
    argv.extend(strings(&config["Cmd"]));
    let user = config["User"].as_str().unwrap_or_default().to_string();
    for volume in [MODELS, SPILL] {
        assert!(
            config["Volumes"].get(volume).is_some(),
            "{volume} not a volume: {config}"
        );
    }
    (argv, user)
}

/// The sonames `ldd` resolves for the binary inside the image; none may be missing.
fn runtime_libraries() -> Vec<String> {
    let out = run_in_container(&[], &[], &["ldd".into(), "/usr/local/bin/modelpool".into()])
        .output()
        .expect("buildah runs");
    let text = ok(out, "ldd inside the image");
    assert!(
        !text.contains("not found"),
        "libraries missing from the image:\n{text}"
    );
    let mut names: Vec<String> = text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| !n.starts_with("linux-vdso"))
        .map(|n| n.rsplit('/').next().unwrap().to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn image_serves_a_chat_as_its_user_and_writes_only_its_volumes() {
    if let Some(reason) = missing_prerequisite() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("the image test must run under CI: {reason}");
        }
        eprintln!("skipping the image test: {reason}");
        return;
    }
    let started = Instant::now();
    let build = Command::new(repo_root().join("scripts/image.sh"))
        .arg("--binary")
        .arg(modelpool_exe())
        .args(["--tag", IMAGE])
        .output()
        .expect("scripts/image.sh runs");
    let said = String::from_utf8_lossy(&build.stderr).into_owned();
    ok(build, "scripts/image.sh");
    eprintln!("image built in {:.1?}:\n{said}", started.elapsed());

    let (argv, user) = image_command();
    assert_eq!(user, format!("{USER_ID}:{USER_ID}"), "the image's user");
    assert!(
        argv.contains(&"/etc/modelpool/modelpool.toml".to_string()),
        "{argv:?}"
    );
    let container = WorkingContainer::from_image();
    let libraries = runtime_libraries();
    assert_eq!(libraries, RUNTIME_LIBRARIES, "update deploy/README.md too");

    let host = tempfile::tempdir().unwrap();
    let spill = volume_dir(host.path(), "spill", 0o755);
    let sockets = volume_dir(host.path(), "run", 0o700);
    let tmp = volume_dir(host.path(), "tmp", 0o1777);
    let logs = host.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let models = model_path().parent().unwrap().to_path_buf();
    let volumes = [
        format!("{}:{MODELS}:ro", models.display()),
        format!("{}:{SPILL}", spill.display()),
        format!("{}:{SOCKETS}", sockets.display()),
        format!("{}:{TMP}", tmp.display()),
    ];
    let (port, metrics_port) = (free_port(), free_port());
    let env = [
        format!("MODELPOOL__SERVER__LISTEN=127.0.0.1:{port}"),
        format!("MODELPOOL__SERVER__METRICS_LISTEN=127.0.0.1:{metrics_port}"),
        // What the Downward API gives for the manifest's 2Gi limit.
        "MODELPOOL__POOL__MEMORY_LIMIT=2147483648".to_string(),
    ];
    let skip = ["/proc", "/sys", "/dev", MODELS, SPILL, SOCKETS, TMP];
    // buildah puts its own mount points (hosts, resolv.conf) in place on a first run.
    run_in_container(&env, &volumes, &["true".into()])
        .output()
        .map(|o| ok(o, "a first run"))
        .unwrap();
    let before = listing(&container.rootfs, &skip);

    let ran = Instant::now();
    let mut child = run_in_container(&env, &volumes, &argv)
        .stdout(std::fs::File::create(logs.join("stdout")).unwrap())
        .stderr(std::fs::File::create(logs.join("stderr")).unwrap())
        .spawn()
        .expect("buildah run starts");
    let addr = format!("127.0.0.1:{port}");
    let mut health = Err(String::new());
    for _ in 0..600 {
        health = grpcurl(&addr, None, &["grpc.health.v1.Health/Check"]);
        if health.is_ok() || child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let health = health.unwrap_or_else(|e| panic!("no health answer ({e}):\n{}", log_of(&logs)));
    assert!(health.contains("SERVING"), "{health}");

    let list = grpcurl(&addr, None, &["list"]).unwrap();
    for service in [
        "modelpool.v1.Inference",
        "modelpool.v1.ModelControl",
        "grpc.health.v1.Health",
    ] {
        assert!(list.contains(service), "{service} missing from {list}");
    }
    let chat = grpcurl(
        &addr,
        Some(r#"{"model":"smollm2","messages":[{"role":"ROLE_SYSTEM","content":"You are a helpful assistant."},{"role":"ROLE_USER","content":"What is the capital of France?"}],"sampling":{"maxTokens":32,"temperature":0}}"#),
        &["modelpool.v1.Inference/Chat"],
    )
    .unwrap_or_else(|e| panic!("chat failed ({e}):\n{}", log_of(&logs)));
    let chunks: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&chat)
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("grpcurl prints JSON objects");
    assert!(chunks.len() > 1, "one chunk is not a stream: {chat}");
    let text: String = chunks.iter().filter_map(|c| c["text"].as_str()).collect();
    assert!(text.contains("Paris"), "{chat}");

    // The server and its worker run as the image's user.
    let tree = descendants(child.id());
    let server = *tree
        .iter()
        .find(|p| comm(**p) == "modelpool")
        .unwrap_or_else(|| panic!("no modelpool process under buildah: {tree:?}"));
    let workers: Vec<u32> = descendants(server);
    assert!(!workers.is_empty(), "no worker under the server");
    for pid in std::iter::once(server).chain(workers.iter().copied()) {
        assert_eq!(
            uids(pid),
            format!("{USER_ID} {USER_ID} {USER_ID} {USER_ID}"),
            "pid {pid}"
        );
    }

    // SAFETY: kill has no memory-safety preconditions; server is our descendant.
    assert_eq!(unsafe { libc::kill(server as i32, libc::SIGTERM) }, 0);
    let status = wait_exit(&mut child, Duration::from_secs(120)).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("still running 120 s after SIGTERM:\n{}", log_of(&logs))
    });
    assert!(
        status.success(),
        "exit {status} after SIGTERM:\n{}",
        log_of(&logs)
    );
    assert!(log_of(&logs).contains("draining"), "{}", log_of(&logs));
    for pid in workers {
        assert!(!process_alive(pid), "worker {pid} outlived the server");
    }
    eprintln!("image ran, chatted and stopped in {:.1?}", ran.elapsed());

    let written = differences(&before, &listing(&container.rootfs, &skip));
    assert!(
        written.is_empty(),
        "written outside the volumes: {written:#?}"
    );
    drop(container);
}
