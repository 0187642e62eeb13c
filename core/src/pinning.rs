//! Decides which host CPUs a desktop with dedicated CPUs is pinned to, the one rule the
//! scheduler's capacity and the host's pinning share: the host keeps its first `reserved`
//! threads (the pool's `reserved.cpu`), and the desktops bound there that ask for dedicated
//! CPUs share out the rest in order of age (oldest first, then UID), each taking a contiguous
//! run.

/// A desktop asking for dedicated CPUs on a host.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pinned<'a> {
    /// Creation time, in seconds since the epoch (`None` sorts first).
    pub created: Option<i64>,
    /// UID, to order desktops created in the same second.
    pub uid: &'a str,
    /// vCPUs, one thread each.
    pub vcpus: u32,
}

/// Why a desktop's dedicated CPUs do not fit on the host.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{wanted} dedicated CPUs do not fit: this host has {threads} threads, the first {reserved} stay \
     with the host and {taken} are dedicated to older desktops"
)]
pub struct PinShortfall {
    pub wanted: u32,
    pub threads: u32,
    pub reserved: u32,
    pub taken: u32,
}

/// Threads a host offers for pinning: all but the reserved ones.
pub fn pinnable(threads: u32, reserved: u32) -> u32 {
    threads.saturating_sub(reserved)
}

/// The threads `me` (one of `desktops`, or added to them) is pinned to.
pub fn pin(
    threads: u32,
    reserved: u32,
    desktops: &[Pinned<'_>],
    me: &Pinned<'_>,
) -> Result<Vec<u32>, PinShortfall> {
    let mut all: Vec<&Pinned<'_>> = desktops.iter().filter(|d| d.uid != me.uid).collect();
    all.push(me);
    all.sort();
    let mut next = reserved.min(threads);
    for d in all {
        let end = next.saturating_add(d.vcpus);
        if d.uid == me.uid {
            if end > threads {
                return Err(PinShortfall {
                    wanted: me.vcpus,
                    threads,
                    reserved,
                    taken: next.saturating_sub(reserved),
                });
            }
            return Ok((next..end).collect());
        }
        next = end;
    }
    Ok(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(created: i64, uid: &str, vcpus: u32) -> Pinned<'_> {
        Pinned {
            created: Some(created),
            uid,
            vcpus,
        }
    }

    #[test]
    fn the_reserved_threads_stay_with_the_host_and_the_oldest_pin_first() {
        let all = [d(2, "b", 2), d(1, "a", 2)];
        assert_eq!(pin(8, 1, &all, &all[1]), Ok(vec![1, 2]));
        assert_eq!(pin(8, 1, &all, &all[0]), Ok(vec![3, 4]));
        assert_eq!(pin(8, 2, &all, &all[1]), Ok(vec![2, 3]));
        assert_eq!(pin(8, 0, &all, &all[1]), Ok(vec![0, 1]));
    }

    #[test]
    fn what_the_scheduler_counts_is_what_the_host_can_pin() {
        for reserved in 0..4 {
            let threads = 8;
            let fits = d(1, "a", pinnable(threads, reserved));
            assert!(
                pin(threads, reserved, &[], &fits).is_ok(),
                "reserved {reserved}"
            );
            let over = d(1, "a", pinnable(threads, reserved) + 1);
            assert!(
                pin(threads, reserved, &[], &over).is_err(),
                "reserved {reserved}"
            );
        }
    }

    #[test]
    fn a_shortfall_says_what_is_taken() {
        let all = [d(1, "a", 6), d(2, "b", 2)];
        let e = pin(8, 1, &all, &all[1]).err();
        assert_eq!(
            e.map(|e| e.to_string()).as_deref(),
            Some(
                "2 dedicated CPUs do not fit: this host has 8 threads, the first 1 stay with \
                 the host and 6 are dedicated to older desktops"
            )
        );
    }
}
