//! Helpers shared by the benchmark binaries: each binary doubles as its own worker
//! (`<bench> worker ...`), starts the real server in-process, and reports medians and
//! percentiles.

use std::path::Path;

pub mod peers;
pub mod svg;
pub mod timing;

use modelpool_server::{RunningServer, Settings};

/// When this process was started as a worker, runs it and exits; otherwise returns.
pub fn run_as_worker_if_asked() {
    if std::env::args().nth(1).as_deref() == Some("worker") {
        let code = modelpool_cli::main();
        std::process::exit(if code == std::process::ExitCode::SUCCESS {
            0
        } else {
            1
        });
    }
}

/// Starts a server on loopback with `model` registered as `id`, this binary as worker.
pub async fn start_server(
    model: &Path,
    id: &str,
    runtime_dir: &Path,
) -> anyhow::Result<RunningServer> {
    start_server_with(
        model,
        id,
        runtime_dir,
        "context_length = 4096\nmax_sequences = 1\n",
    )
    .await
}

/// As [`start_server`], with `model_keys` (TOML lines) in the model's table.
pub async fn start_server_with(
    model: &Path,
    id: &str,
    runtime_dir: &Path,
    model_keys: &str,
) -> anyhow::Result<RunningServer> {
    start_server_with_workers(model, id, runtime_dir, "", model_keys).await
}

/// As [`start_server_with`], with `worker_keys` (TOML lines) in `[workers]` too.
pub async fn start_server_with_workers(
    model: &Path,
    id: &str,
    runtime_dir: &Path,
    worker_keys: &str,
    model_keys: &str,
) -> anyhow::Result<RunningServer> {
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[workers]\nruntime_dir = \"{}\"\nexe = \"{}\"\n{worker_keys}\n\
         [[models]]\nid = \"{id}\"\npath = \"{}\"\n{model_keys}",
        runtime_dir.display(),
        std::env::current_exe()?.display(),
        model.display()
    );
    let settings = Settings::from_toml(&toml, Path::new("/"))?;
    Ok(modelpool_server::start(settings).await?)
}

/// The value at quantile `q` (0..=1) of `v`, nearest rank.
pub fn percentile(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((v.len() as f64 - 1.0) * q).round() as usize;
    v[rank.min(v.len() - 1)]
}

pub fn median(v: &[f64]) -> f64 {
    percentile(v, 0.5)
}

/// MemAvailable of this machine, in bytes.
pub fn mem_available_bytes() -> u64 {
    meminfo_bytes("MemAvailable")
}

/// One field of /proc/meminfo ("MemAvailable", "Shmem", ...), in bytes.
pub fn meminfo_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.split(':').next() == Some(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The host's transparent-huge-page settings as the kernel shows them (`enabled` and
/// `defrag` under /sys/kernel/mm/transparent_hugepage), for reports.
pub fn thp_settings() -> String {
    let read = |name: &str| {
        std::fs::read_to_string(format!("/sys/kernel/mm/transparent_hugepage/{name}"))
            .map_or_else(|e| format!("unreadable ({e})"), |s| s.trim().to_owned())
    };
    format!("enabled: {}; defrag: {}", read("enabled"), read("defrag"))
}

/// Bytes of `pid`'s memory the kernel backs with transparent huge pages
/// (AnonHugePages in /proc/PID/smaps_rollup); 0 when unreadable.
pub fn anon_huge_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("AnonHugePages:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Threads of this process.
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

/// Reads `file` to its end through `buf`, returning bytes per second.
pub fn read_through_bps(mut file: impl std::io::Read, buf: &mut [u8]) -> std::io::Result<f64> {
    let started = std::time::Instant::now();
    let mut total = 0u64;
    loop {
        let n = file.read(buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// Reads `path` through with O_DIRECT (the disk, not the page cache); bytes per second.
pub fn direct_read_bps(path: &Path) -> anyhow::Result<f64> {
    use anyhow::Context;
    use std::os::unix::fs::OpenOptionsExt;
    const CHUNK: usize = 8 << 20;
    const ALIGN: usize = 4096;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .with_context(|| format!("opening {} with O_DIRECT", path.display()))?;
    let mut raw = vec![0u8; CHUNK + ALIGN];
    let offset = raw.as_ptr().align_offset(ALIGN);
    Ok(read_through_bps(file, &mut raw[offset..offset + CHUNK])?)
}

/// Reads `path` through twice, timing the second (page-cache) read; bytes per second.
pub fn cached_read_bps(path: &Path) -> anyhow::Result<f64> {
    modelpool_pool::store::pagecache::prefetch(path)?;
    Ok(read_through_bps(
        std::fs::File::open(path)?,
        &mut vec![0u8; 8 << 20],
    )?)
}

/// Page faults of process `pid` so far: (minor, major), from /proc/PID/stat.
pub fn page_faults(pid: u32) -> anyhow::Result<(u64, u64)> {
    use anyhow::Context;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at the state, field 3.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> anyhow::Result<u64> {
        Ok(fields.get(n - 3).context("short /proc/PID/stat")?.parse()?)
    };
    Ok((field(10)?, field(12)?))
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

pub use modelpool_fixtures::{dequant, free_disk_bytes, synth};
pub use modelpool_pool::memory::huge_advised_bytes;

/// A modelpool.v1 generation of `model` on a raw `prompt`, greedy, up to `max_tokens`:
/// the request every decode comparison sends.
pub fn greedy_request(
    model: &str,
    prompt: impl Into<String>,
    max_tokens: u32,
) -> modelpool_proto::v1::GenerateRequest {
    modelpool_proto::v1::GenerateRequest {
        model: model.into(),
        prompt: prompt.into(),
        sampling: Some(modelpool_proto::v1::SamplingParams {
            max_tokens: Some(max_tokens),
            temperature: Some(0.0),
            ..Default::default()
        }),
    }
}
