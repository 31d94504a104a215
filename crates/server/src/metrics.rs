//! Prometheus metrics: counters and histograms fed by the request path and the pool's
//! event stream, gauges read from the pool at scrape time, served as the text
//! exposition format on a separate plain-HTTP port (`server.metrics_listen`), away
//! from the gRPC port.
//!
//! The registry is small and hand-written on purpose: a handful of families, no
//! dependency whose features would ripple into the inference engine's build.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use modelpool_pool::{EventKind, Pool, SlotState};
use modelpool_supervisor::WorkerBackend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::broadcast::error::RecvError;

/// Label values, in the order of the family's label names.
type Labels = Vec<String>;

/// Upper bounds (seconds) for load durations.
const LOAD_BUCKETS: &[f64] = &[0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0];
/// Upper bounds (seconds) for time to first token and cold-start waits.
const LATENCY_BUCKETS: &[f64] = &[0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Upper bounds (seconds) between two tokens.
const TOKEN_BUCKETS: &[f64] = &[0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28];

struct Counter {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    values: Mutex<BTreeMap<Labels, f64>>,
}

impl Counter {
    const fn new(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Self {
        Self {
            name,
            help,
            labels,
            values: Mutex::new(BTreeMap::new()),
        }
    }

    fn add(&self, labels: &[&str], by: f64) {
        let key = labels.iter().map(|s| (*s).to_owned()).collect();
        *lock(&self.values).entry(key).or_default() += by;
    }

    fn render(&self, out: &mut String) {
        header(out, self.name, self.help, "counter");
        for (labels, v) in lock(&self.values).iter() {
            sample(out, self.name, self.labels, labels, None, *v);
        }
    }
}

#[derive(Clone, Default)]
struct HistogramData {
    /// Cumulative counts per bucket bound, plus +Inf last.
    buckets: Vec<u64>,
    sum: f64,
    count: u64,
}

struct Histogram {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    bounds: &'static [f64],
    values: Mutex<BTreeMap<Labels, HistogramData>>,
}

impl Histogram {
    const fn new(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        bounds: &'static [f64],
    ) -> Self {
        Self {
            name,
            help,
            labels,
            bounds,
            values: Mutex::new(BTreeMap::new()),
        }
    }

    fn observe(&self, labels: &[&str], seconds: f64) {
        let key = labels.iter().map(|s| (*s).to_owned()).collect();
        let mut values = lock(&self.values);
        let h = values.entry(key).or_insert_with(|| HistogramData {
            buckets: vec![0; self.bounds.len() + 1],
            ..Default::default()
        });
        for (i, bound) in self.bounds.iter().enumerate() {
            if seconds <= *bound {
                h.buckets[i] += 1;
            }
        }
        h.buckets[self.bounds.len()] += 1;
        h.sum += seconds;
        h.count += 1;
    }

    fn render(&self, out: &mut String) {
        header(out, self.name, self.help, "histogram");
        let bucket = format!("{}_bucket", self.name);
        for (labels, h) in lock(&self.values).iter() {
            for (i, n) in h.buckets.iter().enumerate() {
                let le = self
                    .bounds
                    .get(i)
                    .map_or_else(|| "+Inf".to_owned(), |b| b.to_string());
                sample(out, &bucket, self.labels, labels, Some(&le), *n as f64);
            }
            sample(
                out,
                &format!("{}_sum", self.name),
                self.labels,
                labels,
                None,
                h.sum,
            );
            sample(
                out,
                &format!("{}_count", self.name),
                self.labels,
                labels,
                None,
                h.count as f64,
            );
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn sample(
    out: &mut String,
    name: &str,
    names: &[&str],
    values: &[String],
    le: Option<&str>,
    v: f64,
) {
    out.push_str(name);
    let mut pairs: Vec<String> = names
        .iter()
        .zip(values)
        .map(|(n, v)| format!("{n}=\"{}\"", escape(v)))
        .collect();
    if let Some(le) = le {
        pairs.push(format!("le=\"{le}\""));
    }
    if !pairs.is_empty() {
        let _ = write!(out, "{{{}}}", pairs.join(","));
    }
    let _ = writeln!(out, " {v}");
}

/// Everything modelpool exports.
pub struct Metrics {
    requests: Counter,
    loads: Counter,
    load_duration: Histogram,
    evictions: Counter,
    worker_restarts: Counter,
    cold_starts: Counter,
    cold_start_wait: Histogram,
    generated_tokens: Counter,
    time_to_first_token: Histogram,
    inter_token: Histogram,
    turns: Counter,
    turn_duration: Histogram,
    /// Models loaded at least once, to count later loads as worker restarts.
    loaded_before: Mutex<std::collections::BTreeSet<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self {
            requests: Counter::new(
                "modelpool_requests_total",
                "Inference requests by model and gRPC status code.",
                &["model", "code"],
            ),
            loads: Counter::new(
                "modelpool_loads_total",
                "Model loads by result (ok, error).",
                &["model", "result"],
            ),
            load_duration: Histogram::new(
                "modelpool_load_duration_seconds",
                "Time from load start to a ready worker.",
                &["model"],
                LOAD_BUCKETS,
            ),
            evictions: Counter::new(
                "modelpool_evictions_total",
                "Models stopped, by reason (lru, idle_ttl, requested, shutdown).",
                &["model", "reason"],
            ),
            worker_restarts: Counter::new(
                "modelpool_worker_restarts_total",
                "Worker processes started for a model after its first.",
                &["model"],
            ),
            cold_starts: Counter::new(
                "modelpool_cold_start_requests_total",
                "Requests that found their model cold and waited for a load.",
                &["model"],
            ),
            cold_start_wait: Histogram::new(
                "modelpool_cold_start_wait_seconds",
                "Latency a cold start added to a request.",
                &["model"],
                LATENCY_BUCKETS,
            ),
            generated_tokens: Counter::new(
                "modelpool_generated_tokens_total",
                "Completion tokens streamed to clients.",
                &["model"],
            ),
            time_to_first_token: Histogram::new(
                "modelpool_time_to_first_token_seconds",
                "From request arrival to the first token sent.",
                &["model"],
                LATENCY_BUCKETS,
            ),
            inter_token: Histogram::new(
                "modelpool_inter_token_latency_seconds",
                "Between two consecutive streamed chunks of one request.",
                &["model"],
                TOKEN_BUCKETS,
            ),
            turns: Counter::new(
                "modelpool_turns_total",
                "Turns given to a model whose requests waited for room (busy models drained for it).",
                &["model"],
            ),
            turn_duration: Histogram::new(
                "modelpool_turn_duration_seconds",
                "From a turn's start (its victims draining) to its model ready.",
                &["model"],
                LOAD_BUCKETS,
            ),
            loaded_before: Mutex::new(Default::default()),
        }
    }

    pub fn request_done(&self, model: &str, code: tonic::Code) {
        self.requests.add(&[model, &format!("{code:?}")], 1.0);
    }

    pub fn cold_start(&self, model: &str, waited: Duration) {
        self.cold_starts.add(&[model], 1.0);
        self.cold_start_wait.observe(&[model], waited.as_secs_f64());
    }

    pub fn first_token(&self, model: &str, after: Duration) {
        self.time_to_first_token
            .observe(&[model], after.as_secs_f64());
    }

    pub fn chunk(&self, model: &str, tokens: u64, since_previous: Option<Duration>) {
        if tokens > 0 {
            self.generated_tokens.add(&[model], tokens as f64);
        }
        if let Some(gap) = since_previous {
            self.inter_token.observe(&[model], gap.as_secs_f64());
        }
    }

    fn event(&self, model: &str, kind: &EventKind) {
        match kind {
            EventKind::LoadFinished { duration, .. } => {
                self.loads.add(&[model, "ok"], 1.0);
                self.load_duration.observe(&[model], duration.as_secs_f64());
                if !lock(&self.loaded_before).insert(model.to_owned()) {
                    self.worker_restarts.add(&[model], 1.0);
                }
            }
            EventKind::LoadFailed { duration, .. } => {
                self.loads.add(&[model, "error"], 1.0);
                self.load_duration.observe(&[model], duration.as_secs_f64());
            }
            EventKind::Evicted { reason, .. } => {
                let reason = crate::control::evict_reason_label(reason);
                self.evictions.add(&[model, reason], 1.0);
            }
            EventKind::TurnStarted { .. } => self.turns.add(&[model], 1.0),
            EventKind::TurnFinished { duration, .. } => {
                self.turn_duration.observe(&[model], duration.as_secs_f64());
            }
            _ => {}
        }
    }

    /// The whole exposition: counters and histograms, then gauges read from `pool`.
    pub fn render(&self, pool: &Pool<WorkerBackend>) -> String {
        let mut out = String::with_capacity(8192);
        self.requests.render(&mut out);
        self.loads.render(&mut out);
        self.load_duration.render(&mut out);
        self.evictions.render(&mut out);
        self.worker_restarts.render(&mut out);
        self.cold_starts.render(&mut out);
        self.cold_start_wait.render(&mut out);
        self.generated_tokens.render(&mut out);
        self.time_to_first_token.render(&mut out);
        self.inter_token.render(&mut out);
        self.turns.render(&mut out);
        self.turn_duration.render(&mut out);
        render_gauges(&mut out, pool);
        out
    }
}

/// A gauge family read from one status row: name, help, and the value.
type Gauge<T> = (&'static str, &'static str, fn(&T) -> u64);

fn render_gauges(out: &mut String, pool: &Pool<WorkerBackend>) {
    let status = pool.status();
    render_device_gauges(out, &status.devices);
    render_resident_bytes(out, &status.models);
    render_model_gauges(out, &status.models);
    render_waits(out, &status.models);
}

/// Budget, use, reservations and room, per device.
fn render_device_gauges(out: &mut String, devices: &[modelpool_pool::DeviceStatus]) {
    let dev = |d: &modelpool_pool::DeviceStatus| vec![d.device.to_string()];
    let device_gauges: [Gauge<modelpool_pool::DeviceStatus>; 5] = [
        (
            "modelpool_budget_bytes",
            "Bytes the pool may fill with models, per device.",
            |d| d.budget_bytes,
        ),
        (
            "modelpool_used_bytes",
            "Bytes charged by resident models, per device.",
            |d| d.used_bytes,
        ),
        (
            "modelpool_reserved_bytes",
            "Bytes held by loads in progress and exiting workers.",
            |d| d.reserved_bytes,
        ),
        (
            "modelpool_free_bytes",
            "Room for another model now, per device.",
            |d| d.free_bytes,
        ),
        (
            "modelpool_device_available_bytes",
            "Bytes the machine reports available.",
            |d| d.available_bytes,
        ),
    ];
    for (name, help, get) in device_gauges {
        header(out, name, help, "gauge");
        for d in devices {
            sample(out, name, &["device"], &dev(d), None, get(d) as f64);
        }
    }
}

/// Bytes each ready model's worker holds.
fn render_resident_bytes(out: &mut String, models: &[modelpool_pool::ModelSnapshot]) {
    header(
        out,
        "modelpool_resident_bytes",
        "Bytes a model's worker holds, by device and tier.",
        "gauge",
    );
    for m in models.iter().filter(|m| m.state == SlotState::Ready) {
        let labels = vec![
            m.spec.id.clone(),
            m.spec.device.to_string(),
            "resident".to_owned(),
        ];
        sample(
            out,
            "modelpool_resident_bytes",
            &["model", "device", "tier"],
            &labels,
            None,
            m.resident_bytes as f64,
        );
    }
}

/// Requests in flight, requests waiting and bytes charged, per model.
fn render_model_gauges(out: &mut String, models: &[modelpool_pool::ModelSnapshot]) {
    let per_model: [Gauge<modelpool_pool::ModelSnapshot>; 3] = [
        (
            "modelpool_in_flight_requests",
            "Requests holding a lease on the model.",
            |m| u64::from(m.in_flight),
        ),
        (
            "modelpool_queue_depth",
            "Requests waiting for a slot or a load.",
            |m| u64::from(m.waiting),
        ),
        (
            "modelpool_charged_bytes",
            "Bytes charged against budgets for the model.",
            |m| m.charged_bytes,
        ),
    ];
    for (name, help, get) in per_model {
        header(out, name, help, "gauge");
        for m in models {
            sample(
                out,
                name,
                &["model"],
                std::slice::from_ref(&m.spec.id),
                None,
                get(m) as f64,
            );
        }
    }
}

/// Requests waiting for room, by why: "room", "turn" (another model's turn first, or
/// min_residency), "draining" (their model gives its turn to another), and how long.
fn render_waits(out: &mut String, models: &[modelpool_pool::ModelSnapshot]) {
    let name = "modelpool_waiting_requests";
    header(
        out,
        name,
        "Requests waiting, by why: room, turn, draining.",
        "gauge",
    );
    for m in models {
        let why = m.waiting_reason.as_deref().unwrap_or_default();
        for (reason, prefix) in [
            ("room", "waiting for room"),
            ("turn", "waiting for its turn"),
            ("draining", "draining for"),
        ] {
            let n = if why.starts_with(prefix) {
                m.waiting
            } else {
                0
            };
            let labels = [m.spec.id.clone(), reason.to_owned()];
            sample(out, name, &["model", "reason"], &labels, None, f64::from(n));
        }
    }
    let name = "modelpool_room_wait_seconds";
    header(
        out,
        name,
        "How long a model's requests have waited for room.",
        "gauge",
    );
    for m in models {
        let labels = std::slice::from_ref(&m.spec.id);
        sample(
            out,
            name,
            &["model"],
            labels,
            None,
            m.waiting_for.as_secs_f64(),
        );
    }
}

/// Feeds pool events into `metrics` until the pool's event channel closes.
pub fn follow_pool(metrics: Arc<Metrics>, pool: &Pool<WorkerBackend>) {
    let mut rx = pool.subscribe();
    tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok(ev) => metrics.event(&ev.model, &ev.kind),
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "metrics missed pool events")
                }
                Err(RecvError::Closed) => return,
            }
        }
    });
}

/// Largest request head accepted on the metrics port.
const MAX_REQUEST_BYTES: usize = 8192;

/// Serves `GET /metrics` on `listener` until the task is dropped. One request per
/// connection; anything else gets 404 or 405.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, pool: Pool<WorkerBackend>) {
    loop {
        let Ok((mut socket, peer)) = listener.accept().await else {
            continue;
        };
        let metrics = Arc::clone(&metrics);
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(1024);
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST_BYTES {
                    let n = socket.read(&mut chunk).await?;
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let head = String::from_utf8_lossy(&buf);
            let mut parts = head.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (status, body) = match (method, path.split('?').next().unwrap_or("")) {
                ("GET", "/metrics") => {
                    let render = tokio::task::spawn_blocking(move || metrics.render(&pool)).await;
                    match render {
                        Ok(text) => ("200 OK", text),
                        Err(e) => ("500 Internal Server Error", format!("render failed: {e}\n")),
                    }
                }
                ("GET", _) => ("404 Not Found", "only /metrics is served here\n".to_owned()),
                _ => ("405 Method Not Allowed", "GET /metrics\n".to_owned()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            if let Err(e) = socket.write_all(response.as_bytes()).await {
                tracing::debug!(%peer, error = %e, "metrics response not sent");
            }
            let _ = socket.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_format() {
        let c = Counter::new("x_total", "Help.", &["model"]);
        c.add(&["a\"b"], 2.0);
        let h = Histogram::new("y_seconds", "Help.", &["model"], &[0.1, 1.0]);
        h.observe(&["m"], 0.5);
        let mut out = String::new();
        c.render(&mut out);
        h.render(&mut out);
        assert!(
            out.contains("# TYPE x_total counter\nx_total{model=\"a\\\"b\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("y_seconds_bucket{model=\"m\",le=\"0.1\"} 0\n"),
            "{out}"
        );
        assert!(
            out.contains("y_seconds_bucket{model=\"m\",le=\"1\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("y_seconds_bucket{model=\"m\",le=\"+Inf\"} 1\n"),
            "{out}"
        );
        assert!(out.contains("y_seconds_count{model=\"m\"} 1\n"), "{out}");
    }
}
