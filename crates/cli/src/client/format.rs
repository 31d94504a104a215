//! Shared rendering for the client commands: byte sizes, "12s ago", wall-clock times,
//! plain-text tables and budget bars, and the JSON form of a model. Kept apart so that
//! every command prints a model, a time or a size the same way.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use modelpool_pool::budget::human_bytes;
use modelpool_proto::v1::{ModelInfo, ModelState};
use serde_json::{json, Value};

const MIB: f64 = (1u64 << 20) as f64;

/// `345.0`: bytes in MiB with one decimal, `-` for none.
pub(crate) fn mib(bytes: u64) -> String {
    if bytes == 0 {
        "-".into()
    } else {
        format!("{:.1}", bytes as f64 / MIB)
    }
}

/// `1.2 GiB`.
pub(crate) fn bytes(b: u64) -> String {
    human_bytes(b)
}

/// Seconds of a protobuf duration (0 when unset).
pub(crate) fn secs(d: Option<&prost_types::Duration>) -> f64 {
    d.map_or(0.0, |d| d.seconds as f64 + f64::from(d.nanos) / 1e9)
}

pub(crate) fn time(ts: Option<&prost_types::Timestamp>) -> Option<SystemTime> {
    ts.and_then(|t| SystemTime::try_from(*t).ok())
}

/// `2025-01-31T12:00:01Z`.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// `12s ago`, `4m ago`, `2h05m ago`, `3d ago`.
pub(crate) fn ago(t: SystemTime) -> String {
    let d = SystemTime::now()
        .duration_since(t)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    match d {
        0 => "just now".into(),
        s if s < 60 => format!("{s}s ago"),
        s if s < 3600 => format!("{}m ago", s / 60),
        s if s < 86_400 => format!("{}h{:02}m ago", s / 3600, s % 3600 / 60),
        s => format!("{}d ago", s / 86_400),
    }
}

/// When a model was last used, or "never" for one that never had a request or load.
pub(crate) fn last_used(m: &ModelInfo) -> String {
    match time(m.last_used.as_ref()) {
        Some(t) if m.loads_started > 0 || m.in_flight_requests > 0 => ago(t),
        _ => "never".into(),
    }
}

/// `12:00:01` in the local time zone (UTC if the zone cannot be read).
pub(crate) fn clock(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let Ok(stamp) = libc::time_t::try_from(secs) else {
        return "??:??:??".into();
    };
    // SAFETY: `tm` is plain old data; localtime_r only writes into it and reads `stamp`.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call; localtime_r is thread-safe.
    let ok = !unsafe { libc::localtime_r(&stamp, &mut tm) }.is_null();
    if ok {
        format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
    } else {
        let day = secs % 86_400;
        format!("{:02}:{:02}:{:02}", day / 3600, day % 3600 / 60, day % 60)
    }
}

/// `ready`, `loading`, ...
pub(crate) fn state_name(s: ModelState) -> String {
    enum_name(s.as_str_name(), "MODEL_STATE_")
}

/// `FINISH_REASON_STOP` -> `stop`.
pub(crate) fn enum_name(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix)
        .unwrap_or(full)
        .to_ascii_lowercase()
}

/// A model has a worker (or is getting or losing one).
pub(crate) fn is_resident(m: &ModelInfo) -> bool {
    m.worker_pid != 0
        || matches!(
            m.state(),
            ModelState::Loading | ModelState::Ready | ModelState::Unloading
        )
}

/// What the worker measured right after its load, or its resident set size when no
/// measurement came back.
pub(crate) fn measured_bytes(m: &ModelInfo) -> u64 {
    if m.load_measured_bytes > 0 {
        m.load_measured_bytes
    } else {
        m.resident_bytes
    }
}

pub(crate) fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// A plain-text table: a header row, then rows; columns whose flag in `right` is true
/// are right-aligned (numbers). Columns are two spaces apart; no trailing blanks.
pub(crate) fn table(header: &[&str], right: &[bool], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let width = widths.get(i).copied().unwrap_or(0);
            let pad = width.saturating_sub(cell.chars().count());
            if i > 0 {
                out.push_str("  ");
            }
            if right.get(i).copied().unwrap_or(false) {
                out.push_str(&" ".repeat(pad));
                out.push_str(cell);
            } else {
                out.push_str(cell);
                out.push_str(&" ".repeat(pad));
            }
        }
        out.trim_end().to_owned()
    };
    let mut lines = vec![line(header.to_vec())];
    lines.extend(
        rows.iter()
            .map(|r| line(r.iter().map(String::as_str).collect())),
    );
    lines.join("\n")
}

/// `#####+++.........`: `width` cells of the budget, `#` used, `+` reserved, `.` free.
/// Any non-zero amount gets at least one cell; an overdrawn budget fills the bar.
pub(crate) fn bar(used: u64, reserved: u64, budget: u64, width: usize) -> String {
    let cells = |b: u64| -> usize {
        if b == 0 {
            0
        } else if budget == 0 {
            width
        } else {
            ((b as f64 / budget as f64) * width as f64).round().max(1.0) as usize
        }
    };
    let u = cells(used).min(width);
    let r = cells(reserved).min(width - u);
    format!(
        "{}{}{}",
        "#".repeat(u),
        "+".repeat(r),
        ".".repeat(width - u - r)
    )
}

/// A model as `--json` shows it everywhere.
pub(crate) fn model_json(m: &ModelInfo) -> Value {
    let nonzero = |b: u64| if b == 0 { Value::Null } else { json!(b) };
    let last_used = time(m.last_used.as_ref());
    json!({
        "id": m.id,
        "source": m.source,
        "format": enum_name(m.format().as_str_name(), "MODEL_FORMAT_"),
        "state": state_name(m.state()),
        "resident": is_resident(m),
        "tier": m.tier,
        "precision": if m.precision.is_empty() { Value::Null } else { json!(m.precision) },
        "precisions": m.precisions,
        "file": m.file,
        "file_bytes": m.file_bytes,
        "page_cache_bytes": m.page_cache_bytes,
        "spilled_bytes": m.spilled_bytes,
        "device": m.device,
        "pinned": m.pinned,
        "context_length": m.context_length,
        "max_sequences": m.max_sequences,
        "max_concurrency": m.max_concurrency,
        "idle_ttl_s": m.idle_ttl.as_ref().map(|d| secs(Some(d))),
        "worker_pid": if m.worker_pid == 0 { Value::Null } else { json!(m.worker_pid) },
        "resident_bytes": m.resident_bytes,
        "peak_bytes": m.peak_bytes,
        "charged_bytes": m.charged_bytes,
        "load_measured_bytes": nonzero(m.load_measured_bytes),
        "predicted": m.predicted.as_ref().map(|f| json!({
            "weights_bytes": f.weights_bytes,
            "kv_cache_bytes": f.kv_cache_bytes,
            "activation_bytes": f.activation_bytes,
            "overhead_bytes": f.overhead_bytes,
            "total_bytes": f.total_bytes,
        })),
        "prediction_error_percent": if m.load_measured_bytes == 0 {
            Value::Null
        } else {
            json!(m.prediction_error_percent)
        },
        "in_flight_requests": m.in_flight_requests,
        "waiting_requests": m.waiting_requests,
        "waiting_reason": if m.waiting_reason.is_empty() { Value::Null } else { json!(m.waiting_reason) },
        "waiting_for_s": m.waiting_for.as_ref().map(|d| secs(Some(d))),
        "last_used": last_used.map(rfc3339),
        "last_used_ago_s": last_used.map(|t| {
            SystemTime::now().duration_since(t).unwrap_or_default().as_secs_f64()
        }),
        "loaded_at": time(m.loaded_at.as_ref()).map(rfc3339),
        "loads_started": m.loads_started,
        "last_error": if m.last_error.is_empty() { Value::Null } else { json!(m.last_error) },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_show_used_reserved_and_free() {
        assert_eq!(bar(0, 0, 100, 10), "..........");
        assert_eq!(bar(50, 20, 100, 10), "#####++...");
        assert_eq!(bar(1, 0, 1000, 10), "#.........");
        assert_eq!(bar(300, 50, 100, 10), "##########");
        assert_eq!(bar(5, 0, 0, 4), "####");
    }

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["ID", "MiB"],
            &[false, true],
            &[
                vec!["a".into(), "1.0".into()],
                vec!["long".into(), "345.0".into()],
            ],
        );
        assert_eq!(t, "ID      MiB\na       1.0\nlong  345.0");
    }

    #[test]
    fn ages_read_naturally() {
        let now = SystemTime::now();
        assert_eq!(ago(now - Duration::from_secs(12)), "12s ago");
        assert_eq!(ago(now - Duration::from_secs(3 * 60 + 5)), "3m ago");
        assert_eq!(
            ago(now - Duration::from_secs(2 * 3600 + 5 * 60)),
            "2h05m ago"
        );
        assert_eq!(mib(345 << 20), "345.0");
        assert_eq!(mib(0), "-");
        assert_eq!(clock(now).len(), 8);
    }
}
