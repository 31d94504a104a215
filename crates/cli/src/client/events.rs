//! Pool events as people and scripts read them: one line each for `modelpool watch`,
//! one JSON object each for `--json`.

use modelpool_proto::v1::pool_event::{self, Kind};
use modelpool_proto::v1::PoolEvent;
use serde_json::{json, Value};

use super::format::{bytes, clock, rfc3339, secs, time};

/// `12:00:01 load_finished smollm2 1.21 s predicted 350.1 MiB measured 345.8 MiB`.
pub(crate) fn event_line(e: &PoolEvent) -> String {
    let at = time(e.time.as_ref()).map_or_else(|| "--:--:--".into(), clock);
    let model = &e.model;
    let what = match &e.kind {
        None => format!("unknown {model}"),
        Some(Kind::Registered(_)) => format!("registered {model}"),
        Some(Kind::Unregistered(_)) => format!("unregistered {model}"),
        Some(Kind::LoadStarted(k)) => load_started_line(model, k),
        Some(Kind::LoadProgress(k)) => format!(
            "load_progress {model} {:.2} s: {}",
            secs(k.elapsed.as_ref()),
            k.stage
        ),
        Some(Kind::LoadFinished(k)) => format!(
            "load_finished {model} {:.2} s predicted {} measured {}",
            secs(k.duration.as_ref()),
            bytes(k.predicted_bytes),
            bytes(k.measured_bytes)
        ),
        Some(Kind::LoadFailed(k)) => format!(
            "load_failed {model} after {:.2} s: {}",
            secs(k.duration.as_ref()),
            k.error
        ),
        Some(Kind::Evicted(k)) => format!(
            "evicted {model} ({}) freed {}",
            evicted_why(k),
            bytes(k.freed_bytes)
        ),
        Some(Kind::Pinned(_)) => format!("pinned {model}"),
        Some(Kind::Unpinned(_)) => format!("unpinned {model}"),
        Some(Kind::BudgetChanged(k)) => {
            format!(
                "budget_changed {} budget {}",
                k.device,
                bytes(k.budget_bytes)
            )
        }
        Some(Kind::Fetched(k)) => format!(
            "fetched {model} {} in {:.2} s",
            bytes(k.bytes),
            secs(k.duration.as_ref())
        ),
        Some(Kind::Spilled(k)) => format!(
            "spilled {model} {} ({}) in {:.2} s",
            bytes(k.bytes),
            k.how,
            secs(k.duration.as_ref())
        ),
        Some(Kind::SpillFailed(k)) => format!("spill_failed {model}: {}", k.error),
        Some(Kind::SwapStarted(k)) => format!(
            "swap_started {model} into group {} (out: {})",
            k.group,
            k.outgoing.join(", ")
        ),
        Some(Kind::SwapFinished(k)) => format!(
            "swap_finished {model} in group {} after {:.2} s, {}",
            k.group,
            secs(k.duration.as_ref()),
            bytes(k.bytes)
        ),
        Some(Kind::TurnStarted(k)) => format!(
            "turn_started {model} after waiting {:.2} s for room (draining: {})",
            secs(k.waited.as_ref()),
            k.outgoing.join(", ")
        ),
        Some(Kind::TurnFinished(k)) => format!(
            "turn_finished {model} ready {:.2} s into its turn ({:.2} s waited before it)",
            secs(k.duration.as_ref()),
            secs(k.waited.as_ref())
        ),
        Some(Kind::Missed(n)) => format!("missed {n} events (this watcher fell behind)"),
    };
    format!("{at} {what}")
}

/// `load_started smollm2 at q8_0 predicted 350.1 MiB kv_budget 8192 (grown from 4096)`;
/// the precision and KV budget only where set.
fn load_started_line(model: &str, k: &pool_event::LoadStarted) -> String {
    let at = if k.precision.is_empty() {
        String::new()
    } else {
        format!(" at {}", k.precision)
    };
    let kv = match (k.kv_budget_tokens, k.kv_budget_grown_from) {
        (0, _) => String::new(),
        (t, 0) => format!(" kv_budget {t}"),
        (t, from) => format!(" kv_budget {t} (grown from {from})"),
    };
    format!(
        "load_started {model}{at} predicted {}{kv}",
        bytes(k.predicted_bytes)
    )
}

/// Why a model was evicted: the reason, with its detail where that says more.
fn evicted_why(k: &pool_event::Evicted) -> String {
    if k.detail.is_empty() || k.detail == k.reason {
        k.reason.clone()
    } else {
        format!("{}: {}", k.reason, k.detail)
    }
}

/// One event as a JSON object: `time`, `model`, `event` and the event's own fields.
pub(crate) fn event_json(e: &PoolEvent) -> Value {
    let (name, fields) = event_fields(e.kind.as_ref());
    let mut out = json!({
        "time": time(e.time.as_ref()).map(rfc3339),
        "model": e.model,
        "event": name,
    });
    if let (Value::Object(out), Value::Object(fields)) = (&mut out, fields) {
        out.extend(fields);
    }
    out
}

/// An event's name and its own fields, as a JSON object.
fn event_fields(kind: Option<&Kind>) -> (&'static str, Value) {
    match kind {
        None => ("unknown", json!({})),
        Some(Kind::Registered(_)) => ("registered", json!({})),
        Some(Kind::Unregistered(_)) => ("unregistered", json!({})),
        Some(Kind::LoadStarted(k)) => (
            "load_started",
            json!({
                "predicted_bytes": k.predicted_bytes,
                "precision": (!k.precision.is_empty()).then_some(&k.precision),
                "kv_budget_tokens": (k.kv_budget_tokens > 0).then_some(k.kv_budget_tokens),
                "kv_budget_grown_from": (k.kv_budget_grown_from > 0).then_some(k.kv_budget_grown_from),
            }),
        ),
        Some(Kind::LoadProgress(k)) => (
            "load_progress",
            json!({
                "stage": k.stage,
                "elapsed_s": secs(k.elapsed.as_ref()),
                "expected_s": k.expected_duration.as_ref().map(|d| secs(Some(d))),
            }),
        ),
        Some(Kind::LoadFinished(k)) => (
            "load_finished",
            json!({
                "duration_s": secs(k.duration.as_ref()),
                "predicted_bytes": k.predicted_bytes,
                "measured_bytes": k.measured_bytes,
            }),
        ),
        Some(Kind::LoadFailed(k)) => (
            "load_failed",
            json!({ "duration_s": secs(k.duration.as_ref()), "error": k.error }),
        ),
        Some(Kind::Evicted(k)) => (
            "evicted",
            json!({ "reason": k.reason, "detail": k.detail, "freed_bytes": k.freed_bytes }),
        ),
        Some(Kind::Pinned(_)) => ("pinned", json!({})),
        Some(Kind::Unpinned(_)) => ("unpinned", json!({})),
        Some(Kind::BudgetChanged(k)) => (
            "budget_changed",
            json!({ "device": k.device, "budget_bytes": k.budget_bytes }),
        ),
        Some(Kind::Fetched(k)) => (
            "fetched",
            json!({ "bytes": k.bytes, "duration_s": secs(k.duration.as_ref()) }),
        ),
        Some(Kind::Spilled(k)) => (
            "spilled",
            json!({ "bytes": k.bytes, "how": k.how, "duration_s": secs(k.duration.as_ref()) }),
        ),
        Some(Kind::SpillFailed(k)) => ("spill_failed", json!({ "error": k.error })),
        Some(Kind::SwapStarted(k)) => (
            "swap_started",
            json!({ "group": k.group, "outgoing": k.outgoing }),
        ),
        Some(Kind::SwapFinished(k)) => (
            "swap_finished",
            json!({ "group": k.group, "duration_s": secs(k.duration.as_ref()), "bytes": k.bytes }),
        ),
        Some(Kind::TurnStarted(k)) => (
            "turn_started",
            json!({ "outgoing": k.outgoing, "waited_s": secs(k.waited.as_ref()) }),
        ),
        Some(Kind::TurnFinished(k)) => (
            "turn_finished",
            json!({ "duration_s": secs(k.duration.as_ref()), "waited_s": secs(k.waited.as_ref()) }),
        ),
        Some(Kind::Missed(n)) => ("missed", json!({ "missed": n })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelpool_proto::v1::pool_event;

    fn ev(model: &str, kind: Kind) -> PoolEvent {
        PoolEvent {
            time: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
            model: model.into(),
            kind: Some(kind),
        }
    }

    #[test]
    fn a_load_at_a_chosen_precision_says_so() {
        let e = ev(
            "st",
            Kind::LoadStarted(pool_event::LoadStarted {
                predicted_bytes: 200 << 20,
                expected_duration: None,
                precision: "q8_0".into(),
                ..Default::default()
            }),
        );
        assert!(
            event_line(&e).ends_with(" load_started st at q8_0 predicted 200.0 MiB"),
            "{}",
            event_line(&e)
        );
        assert_eq!(event_json(&e)["precision"], "q8_0");
    }

    #[test]
    fn a_load_whose_kv_budget_grew_says_from_what() {
        let e = ev(
            "st",
            Kind::LoadStarted(pool_event::LoadStarted {
                predicted_bytes: 200 << 20,
                kv_budget_tokens: 8192,
                kv_budget_grown_from: 2048,
                ..Default::default()
            }),
        );
        assert!(
            event_line(&e).ends_with(" predicted 200.0 MiB kv_budget 8192 (grown from 2048)"),
            "{}",
            event_line(&e)
        );
        assert_eq!(event_json(&e)["kv_budget_grown_from"], 2048);
    }

    #[test]
    fn events_read_as_one_line() {
        let e = ev(
            "b",
            Kind::Evicted(pool_event::Evicted {
                reason: "lru".into(),
                detail: "making room for `c`".into(),
                freed_bytes: 480 << 20,
            }),
        );
        let line = event_line(&e);
        assert!(
            line.ends_with(" evicted b (lru: making room for `c`) freed 480.0 MiB"),
            "{line}"
        );
        let e = ev(
            "smollm2",
            Kind::LoadFinished(pool_event::LoadFinished {
                duration: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 210_000_000,
                }),
                predicted_bytes: 350 << 20,
                measured_bytes: 345 << 20,
            }),
        );
        assert!(event_line(&e)
            .ends_with(" load_finished smollm2 1.21 s predicted 350.0 MiB measured 345.0 MiB"));
        let j = event_json(&e);
        assert_eq!(j["event"], "load_finished");
        assert_eq!(j["model"], "smollm2");
        assert_eq!(j["measured_bytes"], 345u64 << 20);
    }
}
