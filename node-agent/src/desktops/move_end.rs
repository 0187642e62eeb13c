//! Decides how a live move whose libvirt call failed really ended, from the domain as this
//! host sees it afterwards. libvirt undefines the source only once the target runs the domain,
//! so a domain gone from here moved (an error after the switch-over, such as the confirm step's,
//! must not make this host start it again from the shared disk); one still running stays here;
//! one paused was left so by a post-copy that broke (its memory is split between the hosts:
//! an admin recovers or destroys it); one shut off stopped during the move.

use crate::hypervisor::DomainState;

/// How the move ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The domain left this host: it runs on the target (report Completed).
    Moved,
    /// The domain runs here as before (report Failed).
    RunsHere,
    /// The domain is paused here (report Failed, saying an admin must act).
    PausedHere,
    /// The domain is defined here and not running (report Failed).
    StoppedHere,
}

/// How the move ended, from the domain's state here (`None`: not defined here).
pub fn ended(here: Option<DomainState>) -> Ended {
    match here {
        None => Ended::Moved,
        Some(DomainState::Paused) => Ended::PausedHere,
        Some(s) if s.is_active() => Ended::RunsHere,
        Some(_) => Ended::StoppedHere,
    }
}

/// What the report says, after libvirt's error `error`.
pub fn message(how: Ended, error: &str) -> String {
    match how {
        Ended::Moved => format!(
            "libvirt reported an error after the domain left this host; it runs on the target: \
             {error}"
        ),
        Ended::RunsHere => error.to_string(),
        Ended::PausedHere => format!(
            "the move broke after the guest had switched over (post-copy): it is paused on this \
             host and its memory may be split between the hosts; an admin recovers it \
             (virsh migrate --postcopy-resume) or destroys it: {error}"
        ),
        Ended::StoppedHere => format!("the guest stopped during the move: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_domain_here_after_the_error_says_how_the_move_ended() {
        assert_eq!(ended(None), Ended::Moved);
        assert_eq!(ended(Some(DomainState::Running)), Ended::RunsHere);
        assert_eq!(ended(Some(DomainState::Paused)), Ended::PausedHere);
        assert_eq!(ended(Some(DomainState::ShutOff)), Ended::StoppedHere);
        assert!(message(Ended::PausedHere, "e").contains("paused on this host"));
        assert_eq!(message(Ended::RunsHere, "e"), "e");
    }
}
