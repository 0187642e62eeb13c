//! Decides what the power step does to a desktop's domain, from what is asked of it
//! (`spec.power`, overridden by the idle policy's `status.reclaimed` while that is set) and what
//! the domain is now (running or not, with a managed save image or not), and what the agent then
//! reports as `Running`. While reclaimed, a domain is never started: Suspend saves its memory
//! with libvirt's managed save after announcing `Reclaiming`, Shutdown powers it off the way
//! `spec.power: Off` does. A managed save image is restored by the next start. A domain libvirt
//! paused on an I/O error is resumed every [`RESUME_EVERY`] while it should run. Pure.

use deskvirt_crds::conditions::Status;
use deskvirt_crds::constants::running_reason::RECLAIMING;
use deskvirt_crds::desktop::{IdleAction, Reclaimed};

use super::reason::Reason;
use super::status::Cond;

/// `Running` reason while a managed save the idle policy asked for keeps failing; the domain
/// still runs.
pub const SUSPEND_FAILED: &str = "SuspendFailed";

/// What the idle policy holds a domain in while `status.reclaimed` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Memory saved to disk by libvirt's managed save; the domain is off.
    Suspend,
    /// Off: ACPI shutdown, forced after the grace.
    Shutdown,
}

/// The hold `status.reclaimed` asks for. Any action other than Suspend keeps the domain off.
pub fn hold(reclaimed: Option<&Reclaimed>) -> Option<Hold> {
    reclaimed.map(|r| match r.action {
        IdleAction::Suspend => Hold::Suspend,
        IdleAction::Shutdown | IdleAction::Delete | IdleAction::None => Hold::Shutdown,
    })
}

/// The domain as the power step sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainView {
    /// A QEMU process exists (running, paused, ...).
    pub active: bool,
    /// A managed save image holds its memory.
    pub managed_save: bool,
    /// libvirt paused it on an I/O error (a full disk, say): resuming is safe, and works once
    /// the cause is gone.
    pub paused_on_io_error: bool,
}

impl DomainView {
    /// The domain as libvirt reports it.
    pub fn of(s: &crate::hypervisor::DomainStatus) -> Self {
        Self {
            active: s.state.is_active(),
            managed_save: s.has_managed_save,
            paused_on_io_error: s.paused == Some(crate::hypervisor::PauseCause::IoError),
        }
    }
}

/// What is known when the power step decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts<'a> {
    /// `status.reclaimed`, as a hold.
    pub hold: Option<Hold>,
    /// `spec.power` is On.
    pub want_on: bool,
    /// The domain; `None` when it is not defined.
    pub domain: Option<DomainView>,
    /// The reason of the `Running` condition the status has now.
    pub running_reason: Option<&'a str>,
    /// The guest went down by itself while power is On (it is not started again until the user
    /// asks).
    pub shut_itself_down: bool,
    /// No resume was tried for [`RESUME_EVERY`] (or ever, by this process).
    pub resume_due: bool,
}

/// How often a domain paused on an I/O error is resumed while it wants to run: a cause that
/// is still there (the disk still full) pauses it again at its next write.
pub const RESUME_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// What to do to the domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// It runs and should: nothing to do.
    KeepRunning,
    /// libvirt paused it on an I/O error and it should run: resume it.
    Resume,
    /// Start it; `restore` when it resumes from its managed save image.
    Start { restore: bool },
    /// The guest shut itself down: it stays off until spec.power goes Off and On again.
    StayOff,
    /// It runs and should not: ACPI shutdown, forced after the grace; `idle` when the idle
    /// policy asks rather than spec.power.
    PowerOff { idle: bool },
    /// Off as spec.power asks; `saved` when a managed save image is kept for the next start.
    Stopped { saved: bool },
    /// Reclaimed Suspend while it runs: report `Reclaiming` first, then save.
    AnnounceSave,
    /// Reclaimed Suspend while it runs, announced: managed save now.
    Save,
    /// Reclaimed Suspend and off; `saved` when its memory is in a managed save image.
    Suspended { saved: bool },
    /// Reclaimed Shutdown and off.
    IdleShutdown,
}

/// The power step for `f`.
pub fn decide(f: &Facts<'_>) -> Step {
    let active = f.domain.is_some_and(|d| d.active);
    let saved = f.domain.is_some_and(|d| d.managed_save);
    match f.hold {
        Some(Hold::Suspend) if active => {
            if matches!(f.running_reason, Some(RECLAIMING | SUSPEND_FAILED)) {
                Step::Save
            } else {
                Step::AnnounceSave
            }
        }
        Some(Hold::Suspend) => Step::Suspended { saved },
        Some(Hold::Shutdown) if active => Step::PowerOff { idle: true },
        Some(Hold::Shutdown) => Step::IdleShutdown,
        None if f.want_on && active => {
            if f.domain.is_some_and(|d| d.paused_on_io_error) && f.resume_due {
                Step::Resume
            } else {
                Step::KeepRunning
            }
        }
        None if f.want_on => {
            if f.domain.is_some() && !saved && f.shut_itself_down {
                Step::StayOff
            } else {
                Step::Start { restore: saved }
            }
        }
        None if active => Step::PowerOff { idle: false },
        None => Step::Stopped { saved },
    }
}

/// `Running` while the domain is saved or shut down for the idle policy.
pub fn reclaiming(save: bool) -> Cond {
    let message = if save {
        "saving the guest's memory to disk for the idle policy"
    } else {
        "shutting the guest down for the idle policy"
    };
    Cond::new(Status::False, Reason::Reclaiming, message)
}

/// `Running` of a desktop the idle policy suspended.
pub fn suspended(saved: bool) -> Cond {
    let message = if saved {
        "suspended by the idle policy: the guest's memory is saved on this host and is restored when the desktop wakes"
    } else {
        "suspended by the idle policy: the domain was already off, so there was no memory to save; it boots when the desktop wakes"
    };
    Cond::new(Status::False, Reason::Suspended, message)
}

/// `Running` of a desktop the idle policy shut down.
pub fn idle_shutdown() -> Cond {
    Cond::new(
        Status::False,
        Reason::IdleShutdown,
        "shut down by the idle policy; it boots when the desktop wakes",
    )
}

/// `Running` when a managed save the idle policy asked for failed; the domain still runs.
pub fn suspend_failed(message: &str) -> Cond {
    Cond::new(
        Status::True,
        Reason::SuspendFailed,
        format!("the idle policy's suspend failed, the domain still runs: {message}"),
    )
}

/// `Running` when powered off by spec.power.
pub fn stopped(saved: bool) -> Cond {
    let message = if saved {
        "powered off (spec.power is Off); the disk and the memory saved by the idle policy are kept, and the next start restores it"
    } else {
        "powered off (spec.power is Off); the disk is kept"
    };
    Cond::new(Status::False, Reason::Stopped, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use deskvirt_crds::constants::running_reason::{IDLE_SHUTDOWN, SUSPENDED};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    const RUNNING: Option<DomainView> = Some(DomainView {
        active: true,
        managed_save: false,
        paused_on_io_error: false,
    });
    const OFF: Option<DomainView> = Some(DomainView {
        active: false,
        managed_save: false,
        paused_on_io_error: false,
    });
    const SAVED: Option<DomainView> = Some(DomainView {
        active: false,
        managed_save: true,
        paused_on_io_error: false,
    });
    const PAUSED_ON_IO: Option<DomainView> = Some(DomainView {
        active: true,
        managed_save: false,
        paused_on_io_error: true,
    });

    fn facts(hold: Option<Hold>, want_on: bool, domain: Option<DomainView>) -> Facts<'static> {
        Facts {
            hold,
            want_on,
            domain,
            running_reason: None,
            shut_itself_down: false,
            resume_due: true,
        }
    }

    #[test]
    fn a_domain_paused_on_an_io_error_is_resumed_at_most_every_so_often() {
        assert_eq!(decide(&facts(None, true, PAUSED_ON_IO)), Step::Resume);
        let not_yet = Facts {
            resume_due: false,
            ..facts(None, true, PAUSED_ON_IO)
        };
        assert_eq!(decide(&not_yet), Step::KeepRunning);
        // Off wanted, or held by the idle policy: no resume.
        assert_eq!(
            decide(&facts(None, false, PAUSED_ON_IO)),
            Step::PowerOff { idle: false }
        );
        assert_eq!(
            decide(&facts(Some(Hold::Shutdown), true, PAUSED_ON_IO)),
            Step::PowerOff { idle: true }
        );
    }

    #[test]
    fn reclaimed_actions_map_to_holds() {
        let reclaimed = |action| Reclaimed {
            action,
            at: Time(Timestamp::UNIX_EPOCH),
            port: Some(5900),
        };
        assert_eq!(hold(None), None);
        assert_eq!(
            hold(Some(&reclaimed(IdleAction::Suspend))),
            Some(Hold::Suspend)
        );
        for action in [IdleAction::Shutdown, IdleAction::Delete, IdleAction::None] {
            assert_eq!(hold(Some(&reclaimed(action))), Some(Hold::Shutdown));
        }
    }

    #[test]
    fn suspend_announces_then_saves_and_never_starts() {
        for want_on in [true, false] {
            let mut f = facts(Some(Hold::Suspend), want_on, RUNNING);
            assert_eq!(decide(&f), Step::AnnounceSave);
            f.running_reason = Some("Running");
            assert_eq!(decide(&f), Step::AnnounceSave);
            f.running_reason = Some(RECLAIMING);
            assert_eq!(decide(&f), Step::Save);
            f.running_reason = Some(SUSPEND_FAILED);
            assert_eq!(decide(&f), Step::Save, "a failed save is tried again");
            // Off with a save image (also what an agent restart finds): Suspended.
            let f = facts(Some(Hold::Suspend), want_on, SAVED);
            assert_eq!(decide(&f), Step::Suspended { saved: true });
            let f = facts(Some(Hold::Suspend), want_on, OFF);
            assert_eq!(decide(&f), Step::Suspended { saved: false });
            let f = facts(Some(Hold::Suspend), want_on, None);
            assert_eq!(decide(&f), Step::Suspended { saved: false });
        }
    }

    #[test]
    fn shutdown_powers_off_and_never_starts() {
        for want_on in [true, false] {
            let f = facts(Some(Hold::Shutdown), want_on, RUNNING);
            assert_eq!(decide(&f), Step::PowerOff { idle: true });
            for domain in [OFF, SAVED, None] {
                let f = facts(Some(Hold::Shutdown), want_on, domain);
                assert_eq!(decide(&f), Step::IdleShutdown);
            }
        }
    }

    #[test]
    fn without_a_hold_power_decides_and_a_save_image_is_restored() {
        assert_eq!(decide(&facts(None, true, RUNNING)), Step::KeepRunning);
        assert_eq!(
            decide(&facts(None, true, OFF)),
            Step::Start { restore: false }
        );
        assert_eq!(
            decide(&facts(None, true, None)),
            Step::Start { restore: false }
        );
        // A wake: off with a save image, power On.
        assert_eq!(
            decide(&facts(None, true, SAVED)),
            Step::Start { restore: true }
        );
        assert_eq!(
            decide(&facts(None, false, RUNNING)),
            Step::PowerOff { idle: false }
        );
        assert_eq!(
            decide(&facts(None, false, OFF)),
            Step::Stopped { saved: false }
        );
        assert_eq!(
            decide(&facts(None, false, SAVED)),
            Step::Stopped { saved: true }
        );
    }

    #[test]
    fn a_guest_that_shut_itself_down_stays_off_unless_its_memory_is_saved() {
        let mut f = facts(None, true, OFF);
        f.shut_itself_down = true;
        assert_eq!(decide(&f), Step::StayOff);
        f.domain = SAVED;
        assert_eq!(decide(&f), Step::Start { restore: true });
        f.domain = None;
        assert_eq!(decide(&f), Step::Start { restore: false });
    }

    #[test]
    fn conditions_carry_the_reasons_the_operator_reads() {
        assert_eq!(reclaiming(true).reason.as_str(), RECLAIMING);
        assert_eq!(reclaiming(false).status, Status::False);
        assert_eq!(suspended(true).reason.as_str(), SUSPENDED);
        assert_eq!(idle_shutdown().reason.as_str(), IDLE_SHUTDOWN);
        assert_eq!(suspend_failed("no").status, Status::True);
        assert!(stopped(true).message.contains("memory"));
    }
}
