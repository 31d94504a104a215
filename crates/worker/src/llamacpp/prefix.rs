//! Which KV cells a new sequence can reuse: pure bookkeeping of what each slot's cells
//! hold, with no llama.cpp call in it (the decode thread acts on its answers).
//!
//! A slot's cells keep the tokens of its last sequence after that sequence ends (the
//! cache is sized for `context_length` cells per slot, so kept cells never crowd out
//! a running sequence). A new prompt takes a free slot that is its own conversation's
//! (the prompt starts with the slot's last prompt: a next turn, or the same request
//! again) or an unused one, else the free slot used least recently, so the freshest
//! conversations keep their cells longest. It starts
//! from the longest prefix any slot shares with it, shared in as cells of its slot
//! when they are another slot's, and prefills only the rest.

use std::cmp::Reverse;

/// What one slot's KV cells hold: the tokens at positions `0..tokens.len()`.
#[derive(Debug)]
pub(super) struct SlotCache<T> {
    pub tokens: Vec<T>,
    /// When its last sequence ended, on the decoder's own clock (0: never used).
    pub released_at: u64,
    /// Tokens of the prompt of its last sequence (0: not known).
    pub prompt_len: usize,
}

impl<T> Default for SlotCache<T> {
    fn default() -> Self {
        Self {
            tokens: Vec::new(),
            released_at: 0,
            prompt_len: 0,
        }
    }
}

impl<T: PartialEq> SlotCache<T> {
    /// Whether `prompt` goes on from this slot's cells: they are empty, or `prompt`
    /// starts with the slot's last prompt (what follows it in the cells, the last
    /// answer, may be replaced).
    fn continued_by(&self, prompt: &[T]) -> bool {
        self.tokens.is_empty()
            || (self.prompt_len > 0
                && self.prompt_len <= self.tokens.len()
                && prompt.starts_with(&self.tokens[..self.prompt_len]))
    }
}

/// Tokens at the start of `a` and `b` that are equal.
pub(super) fn common_prefix<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Tokens of `prompt` a slot holding `cached` lets a sequence skip: the shared prefix,
/// less one token when it is the whole prompt (the last prompt token must be decoded
/// again for its logits).
pub(super) fn reusable<T: PartialEq>(cached: &[T], prompt: &[T]) -> usize {
    common_prefix(cached, prompt).min(prompt.len().saturating_sub(1))
}

/// Where a new sequence goes and what it starts from.
#[derive(Debug, PartialEq)]
pub(super) struct Choice {
    pub slot: i32,
    /// Tokens the slot's own cells let the sequence skip.
    pub reuse: usize,
    /// Another slot (free or busy) whose cells share more: its slot and the tokens its
    /// first cells give; they are shared into `slot` (cells shared between sequences
    /// cost no memory in a unified cache).
    pub copy_from: Option<(i32, usize)>,
}

impl Choice {
    /// Tokens the sequence skips.
    pub fn skipped(&self) -> usize {
        self.copy_from.map_or(self.reuse, |(_, n)| n)
    }
}

/// The free slot for `prompt`: one it continues (its own conversation's, which it
/// reuses most, or an unused one), else the slot released longest ago; and the slot,
/// free or busy, that shares the longest prefix when that is another. `None` when no
/// slot is free.
pub(super) fn choose<T: PartialEq>(
    free: &[i32],
    caches: &[SlotCache<T>],
    prompt: &[T],
) -> Option<Choice> {
    let (slot, reuse) = free
        .iter()
        .map(|&slot| {
            let cache = &caches[slot as usize];
            let reuse = reusable(&cache.tokens, prompt);
            let own = cache.continued_by(prompt);
            let rank = (!own, Reverse(if own { reuse } else { 0 }));
            (slot, reuse, rank, cache.released_at)
        })
        .min_by_key(|&(_, _, rank, released_at)| (rank, released_at))
        .map(|(slot, reuse, _, _)| (slot, reuse))?;
    let copy_from = (0..caches.len() as i32)
        .filter(|&other| other != slot)
        .map(|other| (other, reusable(&caches[other as usize].tokens, prompt)))
        .filter(|&(_, n)| n > reuse)
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)));
    Some(Choice {
        slot,
        reuse,
        copy_from,
    })
}

/// A free slot for a prompt that reuses nothing (the prefix cache is off): the one
/// freed first, its cells cleared when taken. `None` when no slot is free.
pub(super) fn fresh(free: &[i32]) -> Option<Choice> {
    free.first().map(|&slot| Choice {
        slot,
        reuse: 0,
        copy_from: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A slot whose cells hold `tokens`, all of them its last prompt.
    fn cache(tokens: &[i32], released_at: u64) -> SlotCache<i32> {
        answered(tokens, tokens.len(), released_at)
    }

    /// A slot whose cells hold `tokens`, the first `prompt_len` its last prompt.
    fn answered(tokens: &[i32], prompt_len: usize, released_at: u64) -> SlotCache<i32> {
        SlotCache {
            tokens: tokens.to_vec(),
            released_at,
            prompt_len,
        }
    }

    #[test]
    fn a_whole_cached_prompt_still_decodes_its_last_token() {
        assert_eq!(reusable(&[1, 2, 3, 4], &[1, 2, 3]), 2);
        assert_eq!(reusable(&[1, 2, 3], &[1, 2, 3]), 2);
        assert_eq!(reusable(&[1, 2, 3], &[1, 2, 3, 4, 5]), 3);
        assert_eq!(reusable(&[1, 9, 3], &[1, 2, 3, 4, 5]), 1);
        assert_eq!(reusable::<i32>(&[], &[1]), 0);
        assert_eq!(reusable(&[1], &[1]), 0);
    }

    fn choice(slot: i32, reuse: usize, copy_from: Option<(i32, usize)>) -> Option<Choice> {
        Some(Choice {
            slot,
            reuse,
            copy_from,
        })
    }

    #[test]
    fn a_conversation_goes_on_in_its_own_slot() {
        // Slot 1 asked [1, 2] and answered [3, 4]; slot 0 asked [1, 2, 9].
        let caches = [
            cache(&[1, 2, 9], 5),
            answered(&[1, 2, 3, 4], 2, 1),
            cache(&[], 0),
        ];
        // The next turn: the whole of slot 1 is a prefix of it.
        assert_eq!(
            choose(&[0, 1, 2], &caches, &[1, 2, 3, 4, 5]),
            choice(1, 4, None)
        );
        // The same request again (or another answer to it): slot 1 still, its answer
        // cells given up.
        assert_eq!(choose(&[0, 1, 2], &caches, &[1, 2]), choice(1, 1, None));
        assert_eq!(choose(&[0, 1, 2], &caches, &[1, 2, 7]), choice(1, 2, None));
    }

    #[test]
    fn a_new_conversation_takes_an_unused_slot_and_shares_the_common_prefix() {
        let caches = [cache(&[1, 2, 9, 9], 5), cache(&[7, 7], 1), cache(&[], 0)];
        // Neither slot 0 nor 1 holds a prompt this one starts with: the unused slot,
        // sharing slot 0's first two cells.
        assert_eq!(
            choose(&[0, 1, 2], &caches, &[1, 2, 3]),
            choice(2, 0, Some((0, 2)))
        );
        // The best source may be busy: sharing its finished cells is still right.
        assert_eq!(
            choose(&[1, 2], &caches, &[1, 2, 3]),
            choice(2, 0, Some((0, 2)))
        );
        // No slot it goes on from: the one released longest ago, whatever it shares.
        assert_eq!(choose(&[0, 1], &caches, &[5]), choice(1, 0, None));
        assert_eq!(
            choose(&[0, 1], &caches, &[1, 2, 3]),
            choice(1, 0, Some((0, 2)))
        );
        let tied = [cache(&[7], 5), cache(&[8], 2)];
        assert_eq!(choose(&[0, 1], &tied, &[5]), choice(1, 0, None));
        assert_eq!(choose(&[], &caches, &[1]), None);
    }

    proptest! {
        #[test]
        fn the_choice_is_free_loses_least_and_skips_the_most_shared(
            slots in proptest::collection::vec(
                (proptest::collection::vec(0..3i32, 0..8), 0..9usize, 0..50u64), 1..6),
            free_mask in proptest::collection::vec(any::<bool>(), 6),
            prompt in proptest::collection::vec(0..3i32, 1..10),
        ) {
            let caches: Vec<_> = slots
                .iter()
                .map(|(t, prompt, at)| answered(t, (*prompt).min(t.len()), *at))
                .collect();
            let free: Vec<i32> = (0..caches.len() as i32)
                .filter(|&s| free_mask[s as usize])
                .collect();
            let lossy = |s: i32| !caches[s as usize].continued_by(&prompt);
            match choose(&free, &caches, &prompt) {
                None => prop_assert!(free.is_empty()),
                Some(c) => {
                    prop_assert!(free.contains(&c.slot));
                    if lossy(c.slot) {
                        prop_assert!(free.iter().all(|&o| lossy(o)));
                        let released = |s: i32| caches[s as usize].released_at;
                        prop_assert!(free.iter().all(|&o| released(o) >= released(c.slot)));
                    }
                    let skipped = c.skipped();
                    prop_assert!(skipped < prompt.len());
                    let source = c.copy_from.map_or(c.slot, |(s, _)| s);
                    prop_assert_eq!(&caches[source as usize].tokens[..skipped], &prompt[..skipped]);
                    for other in &caches {
                        prop_assert!(reusable(&other.tokens, &prompt) <= skipped);
                    }
                }
            }
        }
    }
}
