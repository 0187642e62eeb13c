//! A Desktop's phase and summary `Ready`, derived from the operator's binding and idle
//! reclamation, the agent's conditions (`DomainDefined`, `Running`) and the host's heartbeat.
//! Pure.

use deskvirt_crds::conditions::{find, is_true};
use deskvirt_crds::constants::condition::{DOMAIN_DEFINED, RUNNING};
use deskvirt_crds::constants::{idle_reason, running_reason};
use deskvirt_crds::desktop::{IdleAction, Phase, Power};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

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
    /// Every condition on the Desktop (the agent's among them).
    pub conditions: &'a [Condition],
}

/// The derived phase and summary readiness, with the reason and message of `Ready`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Derived {
    pub phase: Phase,
    pub ready: bool,
    pub reason: &'static str,
    pub message: String,
}

/// Derives phase and readiness.
pub fn derive(f: &Facts<'_>) -> Derived {
    let out = |phase: Phase, reason: &'static str, message: String| Derived {
        phase,
        ready: phase == Phase::Running,
        reason,
        message,
    };
    if !f.bound {
        return out(
            Phase::Pending,
            "NotScheduled",
            "not bound to a host yet".into(),
        );
    }
    if !f.host_alive {
        return out(
            Phase::Unknown,
            "HostLost",
            "the host stopped heartbeating; the desktop's real state is not known".into(),
        );
    }
    let defined = find(f.conditions, DOMAIN_DEFINED);
    let running = find(f.conditions, RUNNING);
    match defined {
        None => out(
            Phase::Scheduled,
            "WaitingForHost",
            "bound; the host has not defined the domain yet".into(),
        ),
        Some(c) if c.status == "False" => out(
            Phase::Failed,
            "DefineFailed",
            format!("the host could not define the domain: {}", c.message),
        ),
        Some(c) if c.status != "True" => out(
            Phase::Scheduled,
            "WaitingForHost",
            "the host is defining the domain".into(),
        ),
        Some(_) => {
            if let Some(action) = f.reclaimed
                && let Some(d) = reclaimed(action, running.map(|c| c.reason.as_str()))
            {
                return d;
            }
            if is_true(f.conditions, RUNNING) {
                return out(Phase::Running, "Running", "the desktop runs".into());
            }
            let why = running.map(|c| c.reason.as_str()).unwrap_or("");
            if why == "Suspended" || why == "Saved" {
                return out(Phase::Suspended, "Suspended", "saved to disk".into());
            }
            if why.contains("Fail") || why.contains("Error") {
                let msg = running.map(|c| c.message.clone()).unwrap_or_default();
                return out(Phase::Failed, "StartFailed", msg);
            }
            match f.power {
                Power::Off => out(Phase::Stopped, "Stopped", "powered off by spec".into()),
                Power::On if why == "Shutdown" || why == "Stopped" || why == "IdleShutdown" => {
                    out(Phase::Stopped, "Stopped", "the domain is shut down".into())
                }
                Power::On => out(Phase::Starting, "Starting", "the domain is starting".into()),
            }
        }
    }
}

/// A reclaimed desktop, by the agent's `Running` reason: done (Suspended, IdleShutdown), or on
/// its way (Reclaiming, or still running); `None` for anything else (a failure stays a failure).
fn reclaimed(action: IdleAction, running: Option<&str>) -> Option<Derived> {
    let target = if action == IdleAction::Suspend {
        Phase::Suspended
    } else {
        Phase::Stopped
    };
    let derived = |phase, reason, message: &str| Derived {
        phase,
        ready: false,
        reason,
        message: message.to_string(),
    };
    match running {
        Some(running_reason::SUSPENDED) => Some(derived(
            Phase::Suspended,
            idle_reason::IDLE_TIMEOUT,
            "suspended by the idle policy; wake it with the deskvirt.io/wake annotation",
        )),
        Some(running_reason::IDLE_SHUTDOWN) => Some(derived(
            Phase::Stopped,
            idle_reason::IDLE_TIMEOUT,
            "shut down by the idle policy; wake it with the deskvirt.io/wake annotation",
        )),
        Some(running_reason::RECLAIMING | running_reason::RUNNING) | None => Some(derived(
            target,
            running_reason::RECLAIMING,
            if action == IdleAction::Suspend {
                "the host is suspending the desktop for the idle policy"
            } else {
                "the host is shutting the desktop down for the idle policy"
            },
        )),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deskvirt_crds::conditions::{Status, condition};
    use k8s_openapi::jiff::Timestamp;

    fn c(t: &str, s: Status, reason: &str) -> Condition {
        condition(&[], t, s, reason, "", None, Timestamp::UNIX_EPOCH)
    }

    fn phase(bound: bool, alive: bool, power: Power, conds: &[Condition]) -> Phase {
        derive(&Facts {
            bound,
            host_alive: alive,
            power,
            reclaimed: None,
            conditions: conds,
        })
        .phase
    }

    #[test]
    fn phases() {
        let on = Power::On;
        assert_eq!(phase(false, true, on, &[]), Phase::Pending);
        assert_eq!(phase(true, true, on, &[]), Phase::Scheduled);
        let defined = c(DOMAIN_DEFINED, Status::True, "Defined");
        let running = c(RUNNING, Status::True, "Running");
        let both = [defined.clone(), running];
        assert_eq!(phase(true, true, on, &both), Phase::Running);
        assert!(
            derive(&Facts {
                bound: true,
                host_alive: true,
                power: on,
                reclaimed: None,
                conditions: &both
            })
            .ready
        );
        assert_eq!(phase(true, false, on, &both), Phase::Unknown);
        let stopped = [defined.clone(), c(RUNNING, Status::False, "Shutdown")];
        assert_eq!(phase(true, true, Power::Off, &stopped), Phase::Stopped);
        assert_eq!(
            phase(true, true, on, std::slice::from_ref(&defined)),
            Phase::Starting
        );
        let failed = [c(DOMAIN_DEFINED, Status::False, "DefineFailed")];
        assert_eq!(phase(true, true, on, &failed), Phase::Failed);
        let saved = [defined, c(RUNNING, Status::False, "Suspended")];
        assert_eq!(phase(true, true, on, &saved), Phase::Suspended);
    }

    #[test]
    fn reclaimed_desktops() {
        let defined = c(DOMAIN_DEFINED, Status::True, "Defined");
        let of = |action, reason: &str, ok: bool, alive: bool| {
            let running = if ok { Status::True } else { Status::False };
            derive(&Facts {
                bound: true,
                host_alive: alive,
                power: Power::On,
                reclaimed: Some(action),
                conditions: &[defined.clone(), c(RUNNING, running, reason)],
            })
        };
        let d = of(IdleAction::Suspend, "Suspended", false, true);
        assert_eq!(
            (d.phase, d.ready, d.reason),
            (Phase::Suspended, false, "IdleTimeout")
        );
        let d = of(IdleAction::Shutdown, "IdleShutdown", false, true);
        assert_eq!(
            (d.phase, d.ready, d.reason),
            (Phase::Stopped, false, "IdleTimeout")
        );
        let d = of(IdleAction::Suspend, "Reclaiming", false, true);
        assert_eq!(
            (d.phase, d.ready, d.reason),
            (Phase::Suspended, false, "Reclaiming")
        );
        let d = of(IdleAction::Shutdown, "Running", true, true);
        assert_eq!(
            (d.phase, d.ready, d.reason),
            (Phase::Stopped, false, "Reclaiming")
        );
        assert_eq!(
            of(IdleAction::Suspend, "SaveFailed", false, true).phase,
            Phase::Failed
        );
        assert_eq!(
            of(IdleAction::Suspend, "Suspended", false, false).phase,
            Phase::Unknown
        );
    }
}
