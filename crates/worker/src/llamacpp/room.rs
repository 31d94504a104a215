//! Admission by KV room: a sequence starts when the cells its prompt and answer may
//! take fit in the model's one KV cache beside the sequences running, dropping kept
//! prefixes (least recently used first) when that makes the room. Pure, so it is
//! tested without llama.cpp.

/// An idle slot holding kept cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Idle {
    pub slot: i32,
    pub cells: u64,
    pub released_at: u64,
}

/// The idle slots whose kept cells to drop so that `need` more cells fit in `total`
/// beside `running` (cells the running sequences may take) and what idle slots keep;
/// `None` when even dropping all of them leaves too little.
pub(super) fn make_room(total: u64, running: u64, idle: &[Idle], need: u64) -> Option<Vec<i32>> {
    let mut used = running + idle.iter().map(|i| i.cells).sum::<u64>();
    let mut oldest_first: Vec<&Idle> = idle.iter().filter(|i| i.cells > 0).collect();
    oldest_first.sort_by_key(|i| i.released_at);
    let mut dropped = Vec::new();
    for i in oldest_first {
        if used + need <= total {
            break;
        }
        used -= i.cells;
        dropped.push(i.slot);
    }
    (used + need <= total).then_some(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn idle(slot: i32, cells: u64, released_at: u64) -> Idle {
        Idle {
            slot,
            cells,
            released_at,
        }
    }

    #[test]
    fn fits_without_dropping_or_drops_the_oldest_first() {
        let kept = [idle(0, 300, 2), idle(1, 300, 1), idle(2, 0, 0)];
        assert_eq!(make_room(1024, 0, &kept, 400), Some(vec![]));
        assert_eq!(make_room(1024, 200, &kept, 400), Some(vec![1]));
        assert_eq!(make_room(1024, 500, &kept, 500), Some(vec![1, 0]));
        // Running sequences are never dropped: this one waits for them.
        assert_eq!(make_room(1024, 700, &kept, 400), None);
    }

    proptest! {
        /// What it admits fits; what it refuses would not fit even with every kept
        /// prefix dropped; it drops no more than it must.
        #[test]
        fn admits_only_what_fits_and_drops_no_more_than_needed(
            total in 1u64..4096,
            running in 0u64..4096,
            cells in proptest::collection::vec(0u64..1024, 0..6),
            need in 1u64..2048,
        ) {
            let kept: Vec<Idle> = cells
                .iter()
                .enumerate()
                .map(|(i, &c)| idle(i as i32, c, (i as u64 * 7) % 5))
                .collect();
            let all: u64 = kept.iter().map(|i| i.cells).sum();
            match make_room(total, running, &kept, need) {
                Some(dropped) => {
                    let freed: u64 = kept
                        .iter()
                        .filter(|i| dropped.contains(&i.slot))
                        .map(|i| i.cells)
                        .sum();
                    prop_assert!(running + all - freed + need <= total);
                    if let Some(&last) = dropped.last() {
                        let last = kept.iter().find(|i| i.slot == last).unwrap().cells;
                        prop_assert!(running + all - (freed - last) + need > total);
                    }
                }
                None => prop_assert!(running + need > total),
            }
        }
    }
}
