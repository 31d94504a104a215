//! llama.cpp's own tools as peers for `engines`: `llama-bench` run once per measurement,
//! `llama-server` started on loopback and driven over its HTTP `/completion` endpoint with
//! a small HTTP/1.1 client (which also reads event streams as they arrive, for any
//! loopback server), and the memory of any process read from `/proc/PID/smaps_rollup`.
//! `benches/peers/build.sh` builds the two tools into `.tools/peers/`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// Where `benches/peers/build.sh` puts the tools.
pub fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(".tools")
        .join("peers")
}

/// The path of one peer tool; an error with the command that builds it when missing.
pub fn peer_exe(name: &str) -> anyhow::Result<PathBuf> {
    let exe = peers_dir().join(name);
    if !exe.is_file() {
        bail!(
            "{} is missing: run `just peers` (benches/peers/build.sh)",
            exe.display()
        );
    }
    Ok(exe)
}

/// One `llama-bench` measurement: `-p prompt -n gen -r 1 -o json`; tokens per second.
pub async fn llama_bench(
    model: &Path,
    prompt_tokens: u32,
    gen_tokens: u32,
    threads: u32,
    repack: bool,
) -> anyhow::Result<f64> {
    let out = Command::new(peer_exe("llama-bench")?)
        .arg("-m")
        .arg(model)
        .args([
            "-p",
            &prompt_tokens.to_string(),
            "-n",
            &gen_tokens.to_string(),
        ])
        .args(["-r", "1", "-o", "json", "-t", &threads.to_string()])
        .args(["--repack", if repack { "1" } else { "0" }])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .context("running llama-bench")?;
    if !out.status.success() {
        bail!(
            "llama-bench exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rows: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("llama-bench's JSON output")?;
    rows.get(0)
        .and_then(|r| r.get("avg_ts"))
        .and_then(serde_json::Value::as_f64)
        .context("llama-bench's output has no avg_ts")
}

/// Memory of one process, from `/proc/PID/smaps_rollup`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Smaps {
    pub rss_bytes: u64,
    pub anonymous_bytes: u64,
}

impl Smaps {
    /// Resident pages backed by a file (mapped weights, the binary): Rss - Anonymous.
    pub fn file_bytes(&self) -> u64 {
        self.rss_bytes.saturating_sub(self.anonymous_bytes)
    }
}

pub fn smaps_rollup(pid: u32) -> anyhow::Result<Smaps> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("reading /proc/{pid}/smaps_rollup"))?;
    let field = |name: &str| -> u64 {
        text.lines()
            .find(|l| l.split(':').next() == Some(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    Ok(Smaps {
        rss_bytes: field("Rss"),
        anonymous_bytes: field("Anonymous"),
    })
}

/// A `llama-server` child bound to 127.0.0.1 on a free port; killed when dropped.
pub struct LlamaServer {
    child: Child,
    pub port: u16,
    pub pid: u32,
    pub ready_after: Duration,
}

/// How one `llama-server` is started.
pub struct ServerArgs<'a> {
    pub model: &'a Path,
    /// Total KV cells (`-c`): context per slot x slots.
    pub context_total: u32,
    pub parallel: u32,
    pub threads: u32,
    pub repack: bool,
    /// One KV cache shared by the slots (`--kv-unified`): `context_total` cells that
    /// any slot may use, up to the whole.
    pub kv_unified: bool,
}

impl LlamaServer {
    /// Starts the server and waits until `/health` answers 200.
    pub async fn start(args: &ServerArgs<'_>) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let started = Instant::now();
        let mut cmd = Command::new(peer_exe("llama-server")?);
        cmd.arg("-m")
            .arg(args.model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["-c", &args.context_total.to_string()])
            .args(["--parallel", &args.parallel.to_string()])
            .args(["-t", &args.threads.to_string()])
            .arg(if args.repack {
                "--repack"
            } else {
                "--no-repack"
            })
            .args(args.kv_unified.then_some("--kv-unified"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        // Its LLAMA_ARG_* environment variables would override the flags above.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("LLAMA_ARG_") {
                cmd.env_remove(key);
            }
        }
        let mut child = cmd.spawn().context("starting llama-server")?;
        let pid = child.id().context("llama-server has no pid")?;
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("llama-server exited during startup with {status}");
            }
            if matches!(http(port, "GET", "/health", "").await, Ok((200, _))) {
                break;
            }
            if started.elapsed() > Duration::from_secs(300) {
                bail!("llama-server not ready after 300 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self {
            child,
            port,
            pid,
            ready_after: started.elapsed(),
        })
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }
}

/// One `/completion` answered as a stream.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    /// When the first streamed event (the first token) arrived, from the request's start.
    pub ttft: Duration,
    /// When the last event arrived.
    pub last_event: Duration,
    pub tokens: u32,
}

/// Streams a greedy completion of `prompt` (no prompt cache, so every request processes
/// its prompt as modelpool's do) and times its events.
pub async fn completion(port: u16, prompt: &str, n_predict: u32) -> anyhow::Result<Completion> {
    let body = serde_json::json!({
        "prompt": prompt,
        "n_predict": n_predict,
        "temperature": 0.0,
        "stream": true,
        "cache_prompt": false,
    })
    .to_string();
    let started = Instant::now();
    let mut stream = send(port, "POST", "/completion", &body).await?;
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut first_event = None;
    let mut last_event = Duration::ZERO;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if contains(&buf[..n], b"data: ") {
            last_event = started.elapsed();
            first_event.get_or_insert(last_event);
        }
    }
    let (status, body) = parse_response(&raw)?;
    if status != 200 {
        bail!(
            "llama-server answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let tokens = last_event_field(&body, "tokens_predicted")
        .context("llama-server's stream has no tokens_predicted")?;
    Ok(Completion {
        ttft: first_event.context("llama-server streamed no event")?,
        last_event,
        tokens: tokens as u32,
    })
}

/// `field` of the last `data: {...}` event in an SSE body.
fn last_event_field(body: &[u8], field: &str) -> Option<u64> {
    String::from_utf8_lossy(body)
        .lines()
        .rev()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|j| serde_json::from_str::<serde_json::Value>(j).ok())
        .find_map(|v| v.get(field).and_then(serde_json::Value::as_u64))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Sends one HTTP/1.1 request (`Connection: close`); the stream carries the answer.
async fn send(port: u16, method: &str, path: &str, body: &str) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream.set_nodelay(true)?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    Ok(stream)
}

/// One request, read to its end: (status, body).
pub async fn http(
    port: u16,
    method: &str,
    path: &str,
    body: &str,
) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut stream = send(port, method, path, body).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    parse_response(&raw)
}

/// One server-sent event: the `data:` of its lines (joined by newlines) and when the
/// read that completed it returned.
#[derive(Clone, Debug)]
pub struct SseEvent {
    pub at: Instant,
    pub data: String,
}

/// POSTs `body` (JSON) to `path` on 127.0.0.1:`port` and reads the answer as an event
/// stream to its end, stamping each event as it lands; comments (`: loading ...`) and
/// events without data are skipped. A status other than 200 is an error with the body.
/// Chunked framing (llama-server) and a bare stream (HTTP/1.0 style) are both read.
pub async fn post_events(port: u16, path: &str, body: &str) -> anyhow::Result<Vec<SseEvent>> {
    let mut stream = send(port, "POST", path, body).await?;
    let mut buf = vec![0u8; 64 << 10];
    let mut head = Vec::new();
    let (status, chunked, rest) = loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            bail!("the connection closed before the response headers ended");
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(split) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&head[..split]).to_ascii_lowercase();
            let status: u16 = text
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .context("an HTTP response without a status")?;
            let chunked = text.contains("transfer-encoding: chunked");
            break (status, chunked, head.split_off(split + 4));
        }
    };
    if status != 200 {
        let mut raw = rest;
        stream.read_to_end(&mut raw).await?;
        let body = if chunked {
            dechunk(&raw).unwrap_or(raw)
        } else {
            raw
        };
        bail!(
            "{path} answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let mut reader = EventReader::new(chunked);
    let mut events = Vec::new();
    reader.push(&rest, Instant::now(), &mut events)?;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(events);
        }
        reader.push(&buf[..n], Instant::now(), &mut events)?;
    }
}

/// Splits a body that arrives piece by piece into events, undoing chunked framing.
struct EventReader {
    chunked: bool,
    /// Framed bytes not yet decoded (chunked only).
    framed: Vec<u8>,
    /// Decoded bytes not yet part of a whole event.
    text: Vec<u8>,
}

impl EventReader {
    fn new(chunked: bool) -> Self {
        Self {
            chunked,
            framed: Vec::new(),
            text: Vec::new(),
        }
    }

    fn push(&mut self, bytes: &[u8], at: Instant, out: &mut Vec<SseEvent>) -> anyhow::Result<()> {
        if self.chunked {
            self.framed.extend_from_slice(bytes);
            self.unframe()?;
        } else {
            self.text.extend_from_slice(bytes);
        }
        while let Some(end) = self.text.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = self.text.drain(..end + 2).collect();
            let data: Vec<&str> = std::str::from_utf8(&event)
                .context("an event that is not UTF-8")?
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                out.push(SseEvent {
                    at,
                    data: data.join("\n"),
                });
            }
        }
        Ok(())
    }

    /// Moves every whole chunk from `framed` to `text`.
    fn unframe(&mut self) -> anyhow::Result<()> {
        while let Some(line_end) = self.framed.windows(2).position(|w| w == b"\r\n") {
            let size_text = String::from_utf8_lossy(&self.framed[..line_end]);
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .with_context(|| format!("chunk size {size_text:?}"))?;
            let end = line_end + 2 + size;
            if size == 0 || self.framed.len() < end + 2 {
                return Ok(());
            }
            self.text.extend_from_slice(&self.framed[line_end + 2..end]);
            self.framed.drain(..end + 2);
        }
        Ok(())
    }
}

/// Status and body (de-chunked when chunked) of a whole HTTP/1.1 response.
fn parse_response(raw: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("an HTTP response without the end of its headers")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("an HTTP response without a status")?;
    let body = &raw[split + 4..];
    if head.contains("transfer-encoding: chunked") {
        Ok((status, dechunk(body)?))
    } else {
        Ok((status, body.to_vec()))
    }
}

fn dechunk(mut body: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("a chunk without its size line")?;
        let size_text = String::from_utf8_lossy(&body[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("chunk size {size_text:?}"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size {
            bail!("a chunk of {size} bytes cut at {}", body.len());
        }
        out.extend_from_slice(&body[..size]);
        body = body.get(size + 2..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_sse_body_yields_the_last_events_field() {
        let pieces = ["data: {\"a\":1", "}\n\ndata: {\"tokens_predicted\":7}\n\n"];
        let mut raw = String::from("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        for p in pieces {
            raw += &format!("{:x}\r\n{p}\r\n", p.len());
        }
        raw += "0\r\n\r\n";
        let (status, body) = parse_response(raw.as_bytes()).unwrap();
        assert_eq!(status, 200);
        assert_eq!(last_event_field(&body, "tokens_predicted"), Some(7));
    }

    #[test]
    fn events_come_whole_from_chunks_cut_anywhere() {
        let body = ": loading m\n\ndata: {\"a\":1}\n\ndata: [DONE]\n\n";
        let framed = format!(
            "7\r\n{}\r\n{:x}\r\n{}\r\n0\r\n\r\n",
            &body[..7],
            body.len() - 7,
            &body[7..]
        );
        for cut in 0..framed.len() {
            let (mut reader, mut events) = (EventReader::new(true), Vec::new());
            reader
                .push(&framed.as_bytes()[..cut], Instant::now(), &mut events)
                .unwrap();
            reader
                .push(&framed.as_bytes()[cut..], Instant::now(), &mut events)
                .unwrap();
            let data: Vec<&str> = events.iter().map(|e| e.data.as_str()).collect();
            assert_eq!(data, ["{\"a\":1}", "[DONE]"], "cut at {cut}");
        }
        let (mut reader, mut events) = (EventReader::new(false), Vec::new());
        reader
            .push(body.as_bytes(), Instant::now(), &mut events)
            .unwrap();
        assert_eq!(events.len(), 2);
    }

    #[test]
    fn a_cut_chunk_is_an_error() {
        assert!(dechunk(b"10\r\nshort").is_err());
    }
}
