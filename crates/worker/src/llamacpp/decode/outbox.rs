//! One sequence's way out of the decode thread. Each chunk sent wakes the worker's
//! relay, then the server and the client, and on a small machine each wake-up takes a
//! core from the decode's OpenMP team; a model that decodes faster than its
//! `stream_interval` has the text of its fast tokens held and sent with the next chunk.
//! The first chunk and the last are never held. Sees only text: no llama.cpp here.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::Step;
use crate::EngineError;

pub(super) struct Outbox {
    out: mpsc::Sender<Result<Step, EngineError>>,
    interval: Duration,
    /// Text of steps not yet sent.
    held: String,
    sent_at: Option<Instant>,
}

impl Outbox {
    pub fn new(out: mpsc::Sender<Result<Step, EngineError>>, interval: Duration) -> Self {
        Self {
            out,
            interval,
            held: String::new(),
            sent_at: None,
        }
    }

    /// Sends `step` with any text held before it, or holds its text when the last chunk
    /// went out less than the interval before `now`.
    pub fn send(&mut self, mut step: Step, now: Instant) {
        if step.finish.is_none() && !due(self.sent_at, now, self.interval) {
            self.held.push_str(&step.text);
            return;
        }
        if !self.held.is_empty() {
            self.held.push_str(&step.text);
            step.text = std::mem::take(&mut self.held);
        }
        self.sent_at = Some(now);
        // The channel holds every step a sequence can produce (max_tokens + 1), so it
        // is never full; a closed one is a client gone, freed at the next step.
        let _ = self.out.try_send(Ok(step));
    }

    /// Ends the stream with `e`; held text is dropped with it.
    pub fn fail(&self, e: EngineError) {
        let _ = self.out.try_send(Err(e));
    }

    /// The client went away.
    pub fn is_closed(&self) -> bool {
        self.out.is_closed()
    }
}

/// Whether a chunk may go at `now`: the first always, later ones `interval` apart.
fn due(sent_at: Option<Instant>, now: Instant, interval: Duration) -> bool {
    sent_at.is_none_or(|t| now.saturating_duration_since(t) >= interval)
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelpool_proto::v1::FinishReason;

    fn step(text: &str, finish: Option<FinishReason>) -> Step {
        Step {
            text: text.into(),
            finish,
            completion_tokens: 0,
            cached_tokens: 0,
        }
    }

    fn texts(rx: &mut mpsc::Receiver<Result<Step, EngineError>>) -> Vec<String> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .map(|s| s.expect("a step").text)
            .collect()
    }

    #[test]
    fn zero_interval_sends_every_step() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut outbox = Outbox::new(tx, Duration::ZERO);
        let t = Instant::now();
        for s in ["a", "b", "c"] {
            outbox.send(step(s, None), t);
        }
        assert_eq!(texts(&mut rx), ["a", "b", "c"]);
    }

    #[test]
    fn fast_steps_are_held_until_the_interval_passes_and_the_last_goes_at_once() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut outbox = Outbox::new(tx, Duration::from_millis(20));
        let t = Instant::now();
        let ms = |n| t + Duration::from_millis(n);
        outbox.send(step("The", None), ms(0));
        outbox.send(step(" cat", None), ms(7));
        outbox.send(step(" sat", None), ms(14));
        outbox.send(step(" on", None), ms(21));
        outbox.send(step(" the", None), ms(28));
        outbox.send(step(" mat.", Some(FinishReason::Stop)), ms(30));
        assert_eq!(texts(&mut rx), ["The", " cat sat on", " the mat."]);
    }

    #[test]
    fn slow_steps_are_never_held() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut outbox = Outbox::new(tx, Duration::from_millis(20));
        let t = Instant::now();
        for (i, s) in ["a", "b", "c"].into_iter().enumerate() {
            outbox.send(step(s, None), t + Duration::from_millis(100 * i as u64));
        }
        assert_eq!(texts(&mut rx), ["a", "b", "c"]);
    }
}
