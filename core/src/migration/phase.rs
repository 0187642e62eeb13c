//! Which phase changes a migration may make: forward only, Pending → Scheduling → Running →
//! Succeeded, Failed from any phase that has not ended, and an ended migration never changes
//! again. A controller checks each change it plans against this before writing it.

use super::MigrationPhase::{self, Failed, Pending, Running, Scheduling, Succeeded};

/// Whether a migration in phase `from` may be written in phase `to` (writing the same phase
/// again is allowed: a pass that changes only the conditions).
pub const fn allowed(from: MigrationPhase, to: MigrationPhase) -> bool {
    if from.is_terminal() {
        return from as u8 == to as u8;
    }
    matches!(
        (from, to),
        (Pending, Pending | Scheduling | Failed)
            | (Scheduling, Scheduling | Running | Failed)
            | (Running, Running | Succeeded | Failed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [MigrationPhase; 5] = [Pending, Scheduling, Running, Succeeded, Failed];

    #[test]
    fn a_migration_moves_forward_one_phase_at_a_time() {
        assert!(allowed(Pending, Scheduling));
        assert!(allowed(Scheduling, Running));
        assert!(allowed(Running, Succeeded));
        assert!(!allowed(Pending, Running), "not without a target");
        assert!(
            !allowed(Scheduling, Succeeded),
            "not without the source moving it"
        );
        assert!(!allowed(Running, Scheduling));
        assert!(!allowed(Scheduling, Pending));
    }

    #[test]
    fn any_phase_that_has_not_ended_may_fail_and_an_ended_one_never_changes() {
        for from in ALL {
            assert!(allowed(from, from), "{from:?} written again");
            if !from.is_terminal() {
                assert!(allowed(from, Failed), "{from:?} → Failed");
                continue;
            }
            for to in ALL.into_iter().filter(|to| *to != from) {
                assert!(!allowed(from, to), "{from:?} → {to:?}");
            }
        }
    }

    #[test]
    fn only_scheduling_and_running_hold_a_target() {
        let holding: Vec<_> = ALL.into_iter().filter(|p| p.holds_target()).collect();
        assert_eq!(holding, [Scheduling, Running]);
    }
}
