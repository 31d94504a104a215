//! Admission by KV room, for the decode thread: what a sequence may take, and making
//! that room (see `llamacpp::room`).

use super::super::room;
use super::{Decoder, Pending};

impl Decoder<'_> {
    /// Cells `p` may take: its prompt and answer, capped by the context.
    pub(super) fn reserve(&self, p: &Pending) -> u64 {
        let most = p.tokens.len() as u64 + u64::from(p.max_tokens);
        most.min(u64::from(self.context_length))
    }

    /// Makes room in the KV cache for a sequence that may take `need` cells in `slot`,
    /// dropping what other idle slots keep (least recently used first) if it must;
    /// false when it cannot fit beside the sequences running.
    pub(super) fn make_kv_room(&mut self, slot: i32, need: u64) -> bool {
        let running = self.active.iter().map(|s| s.reserved).sum();
        let idle: Vec<room::Idle> = self
            .free_slots
            .iter()
            .filter(|&&s| s != slot)
            .map(|&s| room::Idle {
                slot: s,
                cells: self.caches[s as usize].tokens.len() as u64,
                released_at: self.caches[s as usize].released_at,
            })
            .collect();
        match room::make_room(self.kv_cells, running, &idle, need) {
            Some(dropped) => {
                dropped.into_iter().for_each(|s| self.clear_slot(s));
                true
            }
            None => false,
        }
    }
}
