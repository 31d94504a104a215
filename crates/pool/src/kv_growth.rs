//! When a model's KV budget grows: a pure decision, taken at each load of a model whose
//! configuration allows it (`kv_budget_max`). The pool then admits the grown size only
//! into room that is spare (no model stopped for it), so a bigger cache is never paid for
//! by another model, leased or idle; when room is wanted, the next load is back at the
//! configured budget.

/// The KV budget (tokens) a load should ask for beyond `base_tokens`, or `None` to keep
/// it: grown to `max_tokens` when `demand` (requests at once, waiting or running, at the
/// model's busiest since its previous load began) exceeds the full-context requests
/// `base_tokens` holds.
pub fn grown_budget(
    base_tokens: u32,
    max_tokens: u32,
    context_length: u32,
    demand: u32,
) -> Option<u32> {
    if max_tokens <= base_tokens || context_length == 0 {
        return None;
    }
    let held = base_tokens / context_length;
    (demand > held).then_some(max_tokens)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn grows_only_past_what_the_budget_holds_at_full_context() {
        // 4096 cells hold two 2048-token requests.
        assert_eq!(grown_budget(4096, 8192, 2048, 1), None);
        assert_eq!(grown_budget(4096, 8192, 2048, 2), None);
        assert_eq!(grown_budget(4096, 8192, 2048, 3), Some(8192));
        // No room to grow into.
        assert_eq!(grown_budget(4096, 4096, 2048, 9), None);
        assert_eq!(grown_budget(4096, 2048, 2048, 9), None);
    }

    proptest! {
        #[test]
        fn a_grown_budget_stays_within_its_bounds(
            base in 1u32..100_000,
            max in 1u32..200_000,
            ctx in 1u32..50_000,
            demand in 0u32..64,
        ) {
            if let Some(t) = grown_budget(base, max, ctx, demand) {
                prop_assert!(t > base && t <= max);
                prop_assert!(demand > base / ctx);
            }
            // More demand never shrinks the decision.
            if grown_budget(base, max, ctx, demand).is_some() {
                prop_assert!(grown_budget(base, max, ctx, demand + 1).is_some());
            }
        }
    }
}
