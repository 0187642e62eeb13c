//! How many migrations may hold a target at once: per pool, oldest first, and per host,
//! counting those leaving a host and those arriving on it (they share its link and memory
//! bandwidth). A migration over a limit waits (Pending, Queued); it never fails for it.

/// The limits in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Migrations holding a target at once in one pool.
    pub per_pool: u32,
    /// Migrations holding a target at once per host, leaving and arriving together.
    pub per_host: u32,
}

/// A migration of the pool that holds a target now (Scheduling or Running).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Active<'a> {
    pub source: &'a str,
    pub target: &'a str,
}

/// The migrations of one pool that compete with the one being decided.
#[derive(Clone, Copy, Debug)]
pub struct Slots<'a> {
    pub limits: Limits,
    /// Those holding a target.
    pub active: &'a [Active<'a>],
    /// Older migrations of the pool still waiting for a slot (not refused for another reason):
    /// they go first.
    pub older_waiting: usize,
}

impl Slots<'_> {
    /// Whether a migration may take a slot of its pool now; else why it waits, in words.
    pub fn pool_slot(&self) -> Result<(), String> {
        let taken = self.active.len() + self.older_waiting;
        if taken < self.limits.per_pool as usize {
            return Ok(());
        }
        Err(format!(
            "the pool moves at most {} desktops at once; {} are moving and {} older migrations wait",
            self.limits.per_pool,
            self.active.len(),
            self.older_waiting
        ))
    }

    /// Whether `host` is already in as many migrations as it may be.
    pub fn host_full(&self, host: &str) -> bool {
        let busy = self
            .active
            .iter()
            .filter(|a| a.source == host || a.target == host)
            .count();
        busy >= self.limits.per_host as usize
    }

    /// Why a desktop on `source` waits for its host, if it does.
    pub fn source_slot(&self, source: &str) -> Result<(), String> {
        if !self.host_full(source) {
            return Ok(());
        }
        Err(format!(
            "{source} is in as many migrations as it may be at once ({})",
            self.limits.per_host
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        per_pool: 2,
        per_host: 1,
    };

    #[test]
    fn a_pool_moves_at_most_its_limit_and_older_waiters_go_first() {
        let one = [Active {
            source: "h1",
            target: "h2",
        }];
        let slots = |active, older_waiting| Slots {
            limits: LIMITS,
            active,
            older_waiting,
        };
        assert!(slots(&[], 0).pool_slot().is_ok());
        assert!(slots(&one, 0).pool_slot().is_ok());
        let two = [
            one[0],
            Active {
                source: "h3",
                target: "h4",
            },
        ];
        let full = slots(&two, 0).pool_slot();
        assert!(full.is_err_and(|m| m.contains("at most 2")));
        assert!(
            slots(&one, 1).pool_slot().is_err(),
            "an older waiter takes the last slot first"
        );
    }

    #[test]
    fn a_host_counts_both_directions() {
        let active = [Active {
            source: "h1",
            target: "h2",
        }];
        let slots = Slots {
            limits: LIMITS,
            active: &active,
            older_waiting: 0,
        };
        assert!(slots.host_full("h1"), "leaving");
        assert!(slots.host_full("h2"), "arriving");
        assert!(!slots.host_full("h3"));
        assert!(slots.source_slot("h2").is_err());
        assert!(slots.source_slot("h3").is_ok());
    }
}
