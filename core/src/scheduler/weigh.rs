//! Which of the hosts that fit is best: Spread prefers the most free capacity left after the
//! desktop is placed, Pack the least; CPU and memory weigh equally as fractions of the host.
//! Equal scores fall to the host name, so the choice never depends on input order.

use std::cmp::Ordering;

use crate::types::Placement;

use super::host::HostView;
use super::request::Request;

/// Parts per million of one dimension; a score is the sum of two.
const PPM: u128 = 1_000_000;

/// Free capacity left on `host` once `request` is placed, as CPU fraction + memory fraction in
/// parts per million (0 = full, 2 000 000 = empty). A dimension the host has none of counts as
/// full.
pub fn free_score(host: &HostView, request: &Request) -> u64 {
    let cap = &host.capacity;
    let free = cap.free(&host.allocated.plus(request));
    fraction(free.vcpus, cap.vcpus()) + fraction(free.memory, cap.memory)
}

fn fraction(free: u64, total: u64) -> u64 {
    if total == 0 {
        return 0;
    }
    // free ≤ total, so the quotient is at most PPM.
    u64::try_from(u128::from(free.min(total)) * PPM / u128::from(total)).unwrap_or(0)
}

/// Orders two candidates (score, name) so that the better one comes first.
pub fn compare(placement: Placement, a: (u64, &str), b: (u64, &str)) -> Ordering {
    let by_score = match placement {
        Placement::Spread => b.0.cmp(&a.0),
        Placement::Pack => a.0.cmp(&b.0),
    };
    by_score.then_with(|| a.1.cmp(b.1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::capacity::{HostCapacity, Usage};
    use crate::scheduler::policy::Ratio;

    const GI: u64 = 1 << 30;

    fn host(cpus: u32, memory_gi: u64) -> HostView {
        HostView::new(
            "h",
            "p",
            HostCapacity {
                physical_cpus: cpus,
                cpu_ratio: Ratio::ONE,
                memory: memory_gi * GI,
                hugepages: 0,
            },
        )
    }

    #[test]
    fn scores_free_fractions_after_placement() {
        assert_eq!(free_score(&host(4, 8), &Request::new(0, 0)), 2_000_000);
        assert_eq!(free_score(&host(4, 8), &Request::new(2, 4 * GI)), 1_000_000);
        let busy = host(4, 8).with_allocated(Usage::of(&[Request::new(2, 0)]));
        assert_eq!(
            free_score(&busy, &Request::new(1, 2 * GI)),
            250_000 + 750_000
        );
        assert_eq!(
            free_score(&host(0, 0), &Request::new(0, 0)),
            0,
            "no capacity counts as full"
        );
    }

    #[test]
    fn spread_prefers_free_pack_prefers_full_names_break_ties() {
        assert_eq!(
            compare(Placement::Spread, (9, "b"), (5, "a")),
            Ordering::Less
        );
        assert_eq!(
            compare(Placement::Pack, (9, "a"), (5, "b")),
            Ordering::Greater
        );
        assert_eq!(
            compare(Placement::Spread, (5, "a"), (5, "b")),
            Ordering::Less
        );
        assert_eq!(compare(Placement::Pack, (5, "a"), (5, "b")), Ordering::Less);
    }
}
