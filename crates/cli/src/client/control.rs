//! The operator's commands over `modelpool.v1.ModelControl`: `models`, `status`, `load`,
//! `evict`, `pin`/`unpin`, `register`/`unregister` and `watch`. Each is one RPC (or one
//! stream) rendered for people, or as JSON with `--json`.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use modelpool_proto::v1::model_control_client::ModelControlClient;
use modelpool_proto::v1::pool_event::Kind;
use modelpool_proto::v1::{
    EvictModelRequest, GetPoolStatusRequest, ListModelsRequest, LoadModelRequest, ModelInfo,
    PinModelRequest, PoolStatus, RegisterModelRequest, ReloadConfigRequest, UnpinModelRequest,
    UnregisterModelRequest, WatchEventsRequest,
};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::events::{event_json, event_line};
use super::format::{
    bar, bytes, is_resident, last_used, measured_bytes, mib, model_json, secs, state_name, table,
    yes_no,
};
use super::{connect, say, say_json, Authed, Bearer, Conn, Failure, RegisterArgs};

/// Cells of the budget bar in `status`.
const BAR_WIDTH: usize = 32;

async fn client(conn: &Conn) -> Result<ModelControlClient<Authed>, Failure> {
    let bearer = Bearer::new(conn.token.as_deref())?;
    Ok(ModelControlClient::with_interceptor(
        connect(conn).await?,
        bearer,
    ))
}

pub(super) async fn models(conn: &Conn) -> Result<(), Failure> {
    let list = client(conn)
        .await?
        .list_models(ListModelsRequest {})
        .await?
        .into_inner();
    if conn.json {
        let models: Vec<Value> = list.models.iter().map(model_json).collect();
        return say_json(&json!({ "models": models }));
    }
    if list.models.is_empty() {
        return say("no models registered");
    }
    let rows: Vec<Vec<String>> = list
        .models
        .iter()
        .map(|m| {
            vec![
                m.id.clone(),
                state_name(m.state()),
                m.tier.clone(),
                // A model quantized at load shows its precision beside its device.
                if m.precision.is_empty() {
                    m.device.clone()
                } else {
                    format!("{} {}", m.device, m.precision)
                },
                yes_no(m.pinned).into(),
                mib(m.resident_bytes),
                mib(m.page_cache_bytes),
                mib(m.charged_bytes),
                m.in_flight_requests.to_string(),
                m.waiting_requests.to_string(),
                last_used(m),
            ]
        })
        .collect();
    say(table(
        &[
            "ID",
            "STATE",
            "TIER",
            "DEVICE",
            "PINNED",
            "RESIDENT MiB",
            "PAGE CACHE MiB",
            "CHARGED MiB",
            "IN FLIGHT",
            "WAITING",
            "LAST USED",
        ],
        &[
            false, false, false, false, false, true, true, true, true, true, false,
        ],
        &rows,
    ))
}

pub(super) async fn status(conn: &Conn) -> Result<(), Failure> {
    let s = client(conn)
        .await?
        .get_pool_status(GetPoolStatusRequest {})
        .await?
        .into_inner();
    if conn.json {
        return say_json(&status_json(&s));
    }
    say_devices(&s)?;
    say_spill_groups_and_turns(&s)?;
    waits(&s.models)?;
    say_resident(&s.models)
}

/// `status --json`: devices, models, spill directory, turns and groups.
fn status_json(s: &PoolStatus) -> Value {
    let devices: Vec<Value> = s
        .devices
        .iter()
        .map(|d| {
            json!({
                "device": d.device,
                "name": d.name,
                "total_bytes": d.total_bytes,
                "available_bytes": d.available_bytes,
                "budget_bytes": d.budget_bytes,
                "used_bytes": d.used_bytes,
                "reserved_bytes": d.reserved_bytes,
                "free_bytes": d.free_bytes,
            })
        })
        .collect();
    let models: Vec<Value> = s.models.iter().map(model_json).collect();
    let reason = Some(s.gpu_absent_reason.as_str()).filter(|r| !r.is_empty());
    let spill = s.spill.as_ref().map(|p| {
        json!({
            "dir": p.dir,
            "budget_bytes": p.budget_bytes,
            "used_bytes": p.used_bytes,
            "artifacts": p.artifacts,
            "held_bytes": p.held_bytes,
        })
    });
    json!({
        "devices": devices,
        "models": models,
        "gpu_absent_reason": reason,
        "spill": spill,
        "turns_total": s.turns_total,
        "turns_last_minute": s.turns_last_minute,
        "groups": s.groups.iter().map(|g| json!({
            "name": g.name,
            "members": g.members,
            "max_resident": g.max_resident,
            "resident": g.resident,
            "resident_bytes": g.resident_bytes,
            "budget_bytes": g.budget_bytes,
            "swaps_total": g.swaps_total,
            "swaps_last_minute": g.swaps_last_minute,
        })).collect::<Vec<_>>(),
    })
}

/// One budget bar per device, and why there is no GPU tier, if there is none.
fn say_devices(s: &PoolStatus) -> Result<(), Failure> {
    let dev_width = s.devices.iter().map(|d| d.device.len()).max().unwrap_or(0);
    let name_width = s
        .devices
        .iter()
        .map(|d| d.name.chars().count())
        .max()
        .unwrap_or(0);
    for d in &s.devices {
        say(format!(
            "{:dev_width$}  {:name_width$}  [{}] used {}  reserved {}  free {}  of budget {}",
            d.device,
            d.name,
            bar(d.used_bytes, d.reserved_bytes, d.budget_bytes, BAR_WIDTH),
            bytes(d.used_bytes),
            bytes(d.reserved_bytes),
            bytes(d.free_bytes),
            bytes(d.budget_bytes),
        ))?;
    }
    if !s.gpu_absent_reason.is_empty() {
        say(format!("no GPU tier: {}", s.gpu_absent_reason))?;
    }
    Ok(())
}

/// The spill directory's fill, each group's residents and swaps, and the turns given.
fn say_spill_groups_and_turns(s: &PoolStatus) -> Result<(), Failure> {
    if let Some(p) = &s.spill {
        say(format!(
            "spill  {}  [{}] {} artifact(s), {} of budget {}{}",
            p.dir,
            bar(p.used_bytes, 0, p.budget_bytes, BAR_WIDTH),
            p.artifacts,
            bytes(p.used_bytes),
            bytes(p.budget_bytes),
            if p.held_bytes > 0 {
                format!(
                    " ({} held past it for resident models)",
                    bytes(p.held_bytes)
                )
            } else {
                String::new()
            }
        ))?;
    }
    for g in &s.groups {
        say(format!(
            "group {}  {}/{} resident [{}]  {} swaps ({} in the last minute)  members: {}",
            g.name,
            g.resident.len(),
            g.max_resident,
            g.resident.join(", "),
            g.swaps_total,
            g.swaps_last_minute,
            g.members.join(", "),
        ))?;
    }
    if s.turns_total > 0 {
        say(format!(
            "turns  {} given to models that waited for room ({} in the last minute)",
            s.turns_total, s.turns_last_minute
        ))?;
    }
    Ok(())
}

/// The table of resident models, or that there is none.
fn say_resident(models: &[ModelInfo]) -> Result<(), Failure> {
    let resident: Vec<&ModelInfo> = models.iter().filter(|m| is_resident(m)).collect();
    if resident.is_empty() {
        return say("no model resident");
    }
    let rows: Vec<Vec<String>> = resident
        .iter()
        .map(|m| {
            vec![
                m.id.clone(),
                m.device.clone(),
                state_name(m.state()),
                mib(measured_bytes(m)),
                mib(m.predicted.as_ref().map_or(0, |f| f.total_bytes)),
                mib(m.charged_bytes),
                last_used(m),
                m.in_flight_requests.to_string(),
            ]
        })
        .collect();
    say("")?;
    say(table(
        &[
            "RESIDENT",
            "DEVICE",
            "STATE",
            "MEASURED MiB",
            "PREDICTED MiB",
            "CHARGED MiB",
            "LAST USED",
            "IN FLIGHT",
        ],
        &[false, false, false, true, true, true, false, true],
        &rows,
    ))
}

/// Models whose requests wait for room or a turn, or that drain for another's turn.
fn waits(models: &[ModelInfo]) -> Result<(), Failure> {
    let rows: Vec<Vec<String>> = models
        .iter()
        .filter(|m| !m.waiting_reason.is_empty())
        .map(|m| {
            let waited = m
                .waiting_for
                .as_ref()
                .map_or_else(|| "-".to_owned(), |d| format!("{:.1}s", secs(Some(d))));
            vec![
                m.id.clone(),
                m.waiting_requests.to_string(),
                waited,
                m.waiting_reason.clone(),
            ]
        })
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    say("")?;
    say(table(
        &["WAITING", "REQUESTS", "FOR", "WHY"],
        &[false, true, true, false],
        &rows,
    ))
}

/// A progress bar for one load on stderr, fed by the pool's `load_progress` events:
/// the stage as its message, and elapsed time against the model's last load time
/// (the forecast the server sends) as its position. Nothing is drawn when stderr is
/// not a terminal or output is JSON.
pub(super) struct LoadBar {
    task: Option<JoinHandle<()>>,
}

impl LoadBar {
    /// Subscribes to the pool's events before the load is requested, so no stage is
    /// missed.
    pub(super) async fn start(conn: &Conn, id: &str) -> Self {
        if conn.json || !std::io::stderr().is_terminal() {
            return Self { task: None };
        }
        let Ok(mut c) = client(conn).await else {
            return Self { task: None };
        };
        let Ok(stream) = c.watch_events(WatchEventsRequest {}).await else {
            return Self { task: None };
        };
        let mut stream = stream.into_inner();
        let id = id.to_owned();
        let task = tokio::spawn(async move {
            let bar = indicatif::ProgressBar::new(1000);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {prefix} [{bar:30}] {elapsed_precise} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(format!("loading {id}"));
            bar.enable_steady_tick(Duration::from_millis(100));
            let started = Instant::now();
            let mut expected: Option<Duration> = None;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    msg = stream.message() => {
                        let Ok(Some(ev)) = msg else { break };
                        if ev.model != id {
                            continue;
                        }
                        match ev.kind {
                            Some(Kind::LoadStarted(k)) => {
                                expected = k.expected_duration.and_then(|d| Duration::try_from(d).ok());
                                bar.set_message("admitted");
                            }
                            Some(Kind::LoadProgress(k)) => {
                                expected = expected.or(k.expected_duration.and_then(|d| Duration::try_from(d).ok()));
                                bar.set_message(k.stage);
                            }
                            Some(Kind::LoadFinished(_)) | Some(Kind::LoadFailed(_)) => break,
                            _ => {}
                        }
                    }
                    _ = tick.tick() => {}
                }
                // Without a forecast the bar creeps towards the middle; with one it
                // follows elapsed / expected, never claiming done before the end.
                let expected = expected.unwrap_or(Duration::from_secs(4));
                let fraction = (started.elapsed().as_secs_f64() / expected.as_secs_f64()).min(0.95);
                bar.set_position((fraction * 1000.0) as u64);
            }
            bar.finish_and_clear();
        });
        Self { task: Some(task) }
    }

    /// Lets the bar see the load's last event (briefly), then erases it.
    pub(super) async fn stop(mut self) {
        if let Some(mut task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_millis(500), &mut task).await;
            task.abort();
            let _ = task.await;
        }
    }
}

/// A one-line spinner with elapsed seconds on stderr while a call is pending; nothing
/// at all when stderr is not a terminal.
pub(super) struct Spinner {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

fn draw(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = write!(err, "\r\x1b[2K{text}");
    let _ = err.flush();
}

impl Spinner {
    pub(super) fn start(label: String) -> Self {
        if !std::io::stderr().is_terminal() {
            return Self {
                stop: None,
                task: None,
            };
        }
        const FRAMES: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
        let (tx, mut rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut frame = 0;
            loop {
                tokio::select! {
                    _ = &mut rx => break,
                    _ = tick.tick() => {}
                }
                let elapsed = started.elapsed().as_secs_f64();
                draw(&format!(
                    "{} {label} {elapsed:.1} s",
                    FRAMES[frame % FRAMES.len()]
                ));
                frame += 1;
            }
            draw("");
        });
        Self {
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Stops and erases the line.
    pub(super) async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

pub(super) async fn load(
    conn: &Conn,
    id: String,
    pin: bool,
    prefetch: bool,
) -> Result<(), Failure> {
    let mut c = client(conn).await?;
    let bar = LoadBar::start(conn, &id).await;
    let result = c
        .load_model(LoadModelRequest {
            id: id.clone(),
            pin,
            prefetch,
        })
        .await;
    bar.stop().await;
    let r = result?.into_inner();
    let took = secs(r.load_time.as_ref());
    let model = r.model.unwrap_or_default();
    if prefetch {
        if conn.json {
            return say_json(&json!({
                "id": id,
                "prefetched": true,
                "prefetch_time_s": took,
                "model": model_json(&model),
            }));
        }
        return say(format!(
            "prefetched {id} in {took:.2} s: {} of {} in the page cache (tier {})",
            bytes(model.page_cache_bytes),
            bytes(model.file_bytes),
            model.tier
        ));
    }
    if conn.json {
        return say_json(&json!({
            "id": id,
            "loaded": took > 0.0,
            "load_time_s": took,
            "pinned": model.pinned,
            "model": model_json(&model),
        }));
    }
    let what = format!(
        "worker pid {}, {}",
        model.worker_pid,
        bytes(measured_bytes(&model))
    );
    let pinned = if pin { ", pinned" } else { "" };
    if took > 0.0 {
        say(format!("loaded {id} in {took:.2} s ({what}){pinned}"))
    } else {
        say(format!("{id} was resident already ({what}){pinned}"))
    }
}

pub(super) async fn evict(conn: &Conn, id: String) -> Result<(), Failure> {
    let r = client(conn)
        .await?
        .evict_model(EvictModelRequest { id: id.clone() })
        .await?
        .into_inner();
    if conn.json {
        return say_json(&json!({ "id": id, "evicted": r.evicted }));
    }
    if r.evicted {
        say(format!("evicted {id}"))
    } else {
        say(format!("{id} was not resident"))
    }
}

pub(super) async fn pin(conn: &Conn, id: String, pinned: bool) -> Result<(), Failure> {
    let mut c = client(conn).await?;
    let model = if pinned {
        c.pin_model(PinModelRequest { id: id.clone() }).await?
    } else {
        c.unpin_model(UnpinModelRequest { id: id.clone() }).await?
    }
    .into_inner();
    if conn.json {
        return say_json(&model_json(&model));
    }
    say(format!(
        "{} {id}",
        if pinned { "pinned" } else { "unpinned" }
    ))
}

pub(super) async fn register(args: RegisterArgs) -> Result<(), Failure> {
    // The server resolves nothing against its own directory: send an absolute path.
    let path = match &args.path {
        Some(p) => {
            let path = std::path::absolute(p)
                .map_err(|e| Failure::Message(format!("--path {}: {e}", p.display())))?;
            path.to_str()
                .ok_or_else(|| Failure::Message(format!("--path {}: not UTF-8", path.display())))?
                .to_owned()
        }
        None => String::new(),
    };
    let idle_ttl = proto_duration("--idle-ttl", args.idle_ttl)?;
    let stream_interval = proto_duration("--stream-interval", args.stream_interval)?;
    let request = RegisterModelRequest {
        id: args.id,
        path,
        format: String::new(),
        device: args.device.unwrap_or_default(),
        context_length: args.context_length,
        max_sequences: args.max_sequences,
        max_concurrency: args.max_concurrency,
        pinned: args.pinned,
        idle_ttl,
        url: args.url.unwrap_or_default(),
        sha256: args.sha256.unwrap_or_default(),
        precisions: args.precisions,
        engine: args.engine.unwrap_or_default(),
        repack: args.repack,
        mlock: args.mlock,
        prefix_cache: args.prefix_cache,
        kv_budget: args.kv_budget,
        kv_budget_max: args.kv_budget_max,
        stream_interval,
    };
    let model = client(&args.conn)
        .await?
        .register_model(request)
        .await?
        .into_inner();
    if args.conn.json {
        return say_json(&model_json(&model));
    }
    say(format!(
        "registered {} ({}, {}, {} tokens of context{})",
        model.id,
        model.source,
        model.device,
        model.context_length,
        if model.pinned { ", pinned" } else { "" }
    ))
}

/// A flag's duration for the wire; one too large for it names the flag.
fn proto_duration(
    flag: &str,
    d: Option<std::time::Duration>,
) -> Result<Option<prost_types::Duration>, Failure> {
    d.map(|d| {
        prost_types::Duration::try_from(d).map_err(|e| Failure::Message(format!("{flag}: {e}")))
    })
    .transpose()
}

pub(super) async fn unregister(conn: &Conn, id: String) -> Result<(), Failure> {
    client(conn)
        .await?
        .unregister_model(UnregisterModelRequest { id: id.clone() })
        .await?;
    if conn.json {
        return say_json(&json!({ "id": id, "unregistered": true }));
    }
    say(format!("unregistered {id}"))
}

pub(super) async fn reload(conn: &Conn) -> Result<(), Failure> {
    let r = client(conn)
        .await?
        .reload_config(ReloadConfigRequest {})
        .await?
        .into_inner();
    if conn.json {
        let budgets: Vec<Value> = r
            .budgets
            .iter()
            .map(|b| json!({ "device": b.device, "budget_bytes": b.budget_bytes }))
            .collect();
        return say_json(&json!({
            "added": r.added, "removed": r.removed, "changed": r.changed,
            "unchanged": r.unchanged, "budgets": budgets, "restart_needed": r.restart_needed,
        }));
    }
    let list = |v: &[String]| {
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.join(", ")
        }
    };
    say(format!(
        "reloaded: added {}; removed {}; changed {}; {} unchanged",
        list(&r.added),
        list(&r.removed),
        list(&r.changed),
        r.unchanged
    ))?;
    if !r.restart_needed.is_empty() {
        say(format!(
            "takes effect after a restart: {}",
            r.restart_needed.join(", ")
        ))?;
    }
    Ok(())
}

pub(super) async fn watch(conn: &Conn) -> Result<(), Failure> {
    let mut stream = client(conn)
        .await?
        .watch_events(WatchEventsRequest {})
        .await?
        .into_inner();
    // The server has subscribed by now: every event from here on is printed.
    eprintln!(
        "watching pool events at {} (Ctrl-C to stop)",
        super::server_url(&conn.addr)
    );
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let next = tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            next = stream.message() => next?,
        };
        let Some(event) = next else {
            eprintln!("the server ended the event stream");
            return Ok(());
        };
        if conn.json {
            say(event_json(&event))?;
        } else {
            say(event_line(&event))?;
        }
    }
}
