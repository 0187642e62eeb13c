//! Decides a Desktop's phase and its summary `Ready` from the operator's binding and idle
//! reclamation, the host's heartbeat, the declared power and the agent's `DomainDefined` and
//! `Running` conditions. The agent's reasons are read as the closed set [`AgentReason`],
//! never by substring.

use crate::reasons::{AgentReason, ReadyReason};
use crate::types::{IdleAction, Phase, Power};

/// One condition as the phase reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cond<'a> {
    /// `True`, `False` or `Unknown`.
    pub status: &'a str,
    pub reason: &'a str,
    pub message: &'a str,
}

impl Cond<'_> {
    fn agent_reason(&self) -> Option<AgentReason> {
        AgentReason::parse(self.reason)
    }
}

/// What the phase is derived from.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    /// Bound to a host (`status.node` set).
    pub bound: bool,
    /// The host's heartbeat is fresh.
    pub host_alive: bool,
    /// Declared power.
    pub power: Power,
    /// The idle policy's action recorded in `status.reclaimed`, if any.
    pub reclaimed: Option<IdleAction>,
    /// The agent's `DomainDefined`.
    pub defined: Option<Cond<'a>>,
    /// The agent's `Running`.
    pub running: Option<Cond<'a>>,
}

/// The derived phase and summary readiness, with the reason and message of `Ready`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Derived {
    pub phase: Phase,
    pub ready: bool,
    pub reason: &'static str,
    pub message: String,
}

fn out(phase: Phase, reason: ReadyReason, message: impl Into<String>) -> Derived {
    Derived {
        phase,
        ready: phase == Phase::Running,
        reason: reason.as_str(),
        message: message.into(),
    }
}

/// Whether the agent's reason says something failed (as opposed to waiting or progress).
fn failed(r: AgentReason) -> bool {
    matches!(
        r,
        AgentReason::DefineFailed
            | AgentReason::DiskPreparationFailed
            | AgentReason::DiskIoFailed
            | AgentReason::KubeApiFailed
            | AgentReason::LibvirtFailed
            | AgentReason::StartFailed
            | AgentReason::SuspendFailed
    )
}

/// Derives phase and readiness.
pub fn derive(f: &Facts<'_>) -> Derived {
    if !f.bound {
        return out(
            Phase::Pending,
            ReadyReason::NotScheduled,
            "not bound to a host yet",
        );
    }
    if !f.host_alive {
        return out(
            Phase::Unknown,
            ReadyReason::HostLost,
            "the host stopped heartbeating; the desktop's real state is not known",
        );
    }
    match f.defined {
        None => out(
            Phase::Scheduled,
            ReadyReason::WaitingForHost,
            "bound; the host has not defined the domain yet",
        ),
        // Shut down on its old host by a Cold move: its new host boots it once bound there.
        Some(c) if c.agent_reason() == Some(AgentReason::MovedCold) => out(
            Phase::Scheduled,
            ReadyReason::WaitingForHost,
            "moved cold: its new host boots it",
        ),
        // Ready names the host's own reason (BaseImageMissing, DiskDirMissing, ...) when it is
        // one of the agent's; DefineFailed otherwise.
        Some(c) if c.status == "False" => Derived {
            phase: Phase::Failed,
            ready: false,
            reason: c
                .agent_reason()
                .map_or(ReadyReason::DefineFailed.as_str(), AgentReason::as_str),
            message: format!("the host could not define the domain: {}", c.message),
        },
        Some(c) if c.status != "True" => match c.agent_reason().filter(|r| r.is_warning()) {
            // A failure the host retries, shown once it keeps coming back.
            Some(r) => Derived {
                phase: Phase::Scheduled,
                ready: false,
                reason: r.as_str(),
                message: format!("the host keeps retrying: {}", c.message),
            },
            None => out(
                Phase::Scheduled,
                ReadyReason::WaitingForHost,
                "the host is defining the domain",
            ),
        },
        Some(_) => defined(f),
    }
}

/// A desktop whose domain is defined.
fn defined(f: &Facts<'_>) -> Derived {
    let running = f.running;
    let why = running.and_then(|c| c.agent_reason());
    if let Some(action) = f.reclaimed
        && let Some(d) = reclaimed(action, running.map(|c| c.reason), why)
    {
        return d;
    }
    if running.is_some_and(|c| c.status == "True") {
        return out(Phase::Running, ReadyReason::Running, "the desktop runs");
    }
    // "Saved": an earlier agent's name for Suspended.
    if why == Some(AgentReason::Suspended) || running.is_some_and(|c| c.reason == "Saved") {
        return out(Phase::Suspended, ReadyReason::Suspended, "saved to disk");
    }
    // Not a failure of the desktop: the operator moves it to another port, and it starts.
    if let Some(c) = running
        && why == Some(AgentReason::SpicePortBusy)
    {
        return Derived {
            phase: Phase::Starting,
            ready: false,
            reason: ReadyReason::SpicePortBusy.as_str(),
            message: c.message.to_string(),
        };
    }
    // A template waits for the capture of its disk, then starts.
    if let Some(c) = running
        && why == Some(AgentReason::Capturing)
    {
        return Derived {
            phase: Phase::Starting,
            ready: false,
            reason: AgentReason::Capturing.as_str(),
            message: c.message.to_string(),
        };
    }
    // Not usable while paused; the agent's message says whether it resumes it by itself.
    if let Some(c) = running
        && why == Some(AgentReason::Paused)
    {
        return Derived {
            phase: Phase::Failed,
            ready: false,
            reason: ReadyReason::Paused.as_str(),
            message: c.message.to_string(),
        };
    }
    if let Some(c) = running
        && why.is_some_and(failed)
    {
        return out(Phase::Failed, ReadyReason::StartFailed, c.message);
    }
    let stopped = matches!(
        why,
        Some(AgentReason::Shutdown | AgentReason::Stopped | AgentReason::IdleShutdown)
    );
    match f.power {
        Power::Off => out(Phase::Stopped, ReadyReason::Stopped, "powered off by spec"),
        Power::On if stopped => out(
            Phase::Stopped,
            ReadyReason::Stopped,
            "the domain is shut down",
        ),
        Power::On => out(
            Phase::Starting,
            ReadyReason::Starting,
            "the domain is starting",
        ),
    }
}

/// A reclaimed desktop, by the agent's `Running` reason: done (Suspended, IdleShutdown), or on
/// its way (Reclaiming, or still running); `None` for anything else (a failure stays a failure).
fn reclaimed(action: IdleAction, text: Option<&str>, why: Option<AgentReason>) -> Option<Derived> {
    let target = if action == IdleAction::Suspend {
        Phase::Suspended
    } else {
        Phase::Stopped
    };
    let derived = |phase, reason: ReadyReason, message: &str| Derived {
        phase,
        ready: false,
        reason: reason.as_str(),
        message: message.to_string(),
    };
    match (text, why) {
        (_, Some(AgentReason::Suspended)) => Some(derived(
            Phase::Suspended,
            ReadyReason::IdleTimeout,
            "suspended by the idle policy; wake it with the deskvirt.io/wake annotation",
        )),
        (_, Some(AgentReason::IdleShutdown)) => Some(derived(
            Phase::Stopped,
            ReadyReason::IdleTimeout,
            "shut down by the idle policy; wake it with the deskvirt.io/wake annotation",
        )),
        (_, Some(AgentReason::Reclaiming | AgentReason::Running)) | (None, _) => Some(derived(
            target,
            ReadyReason::Reclaiming,
            if action == IdleAction::Suspend {
                "the host is suspending the desktop for the idle policy"
            } else {
                "the host is shutting the desktop down for the idle policy"
            },
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c<'a>(status: &'a str, reason: &'a str) -> Option<Cond<'a>> {
        Some(Cond {
            status,
            reason,
            message: "m",
        })
    }

    fn facts<'a>(defined: Option<Cond<'a>>, running: Option<Cond<'a>>) -> Facts<'a> {
        Facts {
            bound: true,
            host_alive: true,
            power: Power::On,
            reclaimed: None,
            defined,
            running,
        }
    }

    fn phase(f: Facts<'_>) -> Phase {
        derive(&f).phase
    }

    #[test]
    fn phases() {
        let defined = c("True", "Defined");
        assert_eq!(
            phase(Facts {
                bound: false,
                ..facts(None, None)
            }),
            Phase::Pending
        );
        assert_eq!(phase(facts(None, None)), Phase::Scheduled);
        let f = facts(defined, c("True", "Running"));
        assert_eq!(phase(f), Phase::Running);
        assert!(derive(&f).ready);
        assert_eq!(
            phase(Facts {
                host_alive: false,
                ..f
            }),
            Phase::Unknown
        );
        let stopped = facts(defined, c("False", "Shutdown"));
        assert_eq!(
            phase(Facts {
                power: Power::Off,
                ..stopped
            }),
            Phase::Stopped
        );
        assert_eq!(phase(stopped), Phase::Stopped);
        assert_eq!(phase(facts(defined, None)), Phase::Starting);
        assert_eq!(
            phase(facts(c("False", "DefineFailed"), None)),
            Phase::Failed
        );
        assert_eq!(
            phase(facts(defined, c("False", "Suspended"))),
            Phase::Suspended
        );
        assert_eq!(phase(facts(defined, c("False", "Saved"))), Phase::Suspended);
        assert_eq!(
            phase(facts(defined, c("False", "StartFailed"))),
            Phase::Failed
        );
        assert_eq!(
            phase(facts(defined, c("Unknown", "LibvirtFailed"))),
            Phase::Failed
        );
        // Shut down on its old host by a Cold move: waiting for the new host, not running.
        let moved = c("Unknown", "MovedCold");
        let d = derive(&facts(moved, c("False", "MovedCold")));
        assert_eq!(
            (d.phase, d.ready, d.reason),
            (Phase::Scheduled, false, "WaitingForHost")
        );
        let paused = derive(&facts(defined, c("False", "Paused")));
        assert_eq!(
            (paused.phase, paused.ready, paused.reason),
            (Phase::Failed, false, "Paused")
        );
        // A SPICE port taken on the host is the operator's to fix: starting, not failed.
        let busy = derive(&facts(defined, c("False", "SpicePortBusy")));
        assert_eq!(
            (busy.phase, busy.ready, busy.reason),
            (Phase::Starting, false, "SpicePortBusy")
        );
    }

    #[test]
    fn reasons_are_read_whole_never_by_substring() {
        let defined = c("True", "Defined");
        // A reason the set does not know is not a failure for containing "Fail".
        assert_eq!(
            phase(facts(defined, c("False", "NotFailedYet"))),
            Phase::Starting
        );
        // Waiting on libvirt is not a failure either.
        assert_eq!(
            phase(facts(defined, c("Unknown", "LibvirtUnavailable"))),
            Phase::Starting
        );
    }

    #[test]
    fn a_permanent_failure_shows_the_hosts_reason() {
        let d = derive(&facts(c("False", "BaseImageMissing"), None));
        assert_eq!(
            (d.phase, d.ready, d.reason),
            (Phase::Failed, false, "BaseImageMissing")
        );
        assert_eq!(d.message, "the host could not define the domain: m");
        let d = derive(&facts(c("False", "SomethingNew"), None));
        assert_eq!((d.phase, d.reason), (Phase::Failed, "DefineFailed"));
    }

    #[test]
    fn a_retried_failure_shows_the_hosts_reason() {
        let d = derive(&facts(c("Unknown", "DiskToolTimeout"), None));
        assert_eq!((d.phase, d.reason), (Phase::Scheduled, "DiskToolTimeout"));
        assert_eq!(d.message, "the host keeps retrying: m");
        let d = derive(&facts(c("Unknown", "WaitingForPool"), None));
        assert_eq!(d.reason, "WaitingForHost");
    }

    #[test]
    fn reclaimed_desktops() {
        let defined = c("True", "Defined");
        let of = |action, status: &'static str, reason: &'static str, alive: bool| {
            derive(&Facts {
                host_alive: alive,
                reclaimed: Some(action),
                ..facts(defined, c(status, reason))
            })
        };
        let d = of(IdleAction::Suspend, "False", "Suspended", true);
        assert_eq!(
            (d.phase, d.ready, d.reason),
            (Phase::Suspended, false, "IdleTimeout")
        );
        let d = of(IdleAction::Shutdown, "False", "IdleShutdown", true);
        assert_eq!(
            (d.phase, d.ready, d.reason),
            (Phase::Stopped, false, "IdleTimeout")
        );
        let d = of(IdleAction::Suspend, "False", "Reclaiming", true);
        assert_eq!(
            (d.phase, d.ready, d.reason),
            (Phase::Suspended, false, "Reclaiming")
        );
        let d = of(IdleAction::Shutdown, "True", "Running", true);
        assert_eq!(
            (d.phase, d.ready, d.reason),
            (Phase::Stopped, false, "Reclaiming")
        );
        assert_eq!(
            of(IdleAction::Suspend, "False", "SuspendFailed", true).phase,
            Phase::Failed
        );
        assert_eq!(
            of(IdleAction::Suspend, "False", "Suspended", false).phase,
            Phase::Unknown
        );
    }
}
