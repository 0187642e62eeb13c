//! Decides when a bound desktop moves off its SPICE port: its host said another process listens
//! on it (`Running=False SpicePortBusy`, naming the port), and the desktop still holds that port.
//! The pool's ledger keeps the taken port from every desktop and gives this one the lowest free
//! port; the host redefines the domain with it and starts it.

use deskvirt_core::reasons::AgentReason;
use deskvirt_crds::conditions::find;
use deskvirt_crds::constants::condition::RUNNING;
use deskvirt_crds::desktop::DesktopStatus;

use super::bound::Seen;
use super::status::Owned;
use super::txn::Txn;

/// The port the host says is taken, when it is the one the desktop holds (`current`): a report
/// about a port the desktop has already left moves nothing.
pub fn reported(status: &DesktopStatus, current: Option<u16>) -> Option<u16> {
    let c = find(&status.conditions, RUNNING)?;
    if c.status != "False" || c.reason != AgentReason::SpicePortBusy.as_str() {
        return None;
    }
    let busy = deskvirt_core::spice::busy_port(&c.message)?;
    (Some(busy) == current).then_some(busy)
}

/// Moves the desktop off a port its host reported taken, in the transaction: `want.port`
/// becomes the new one. Returns the old and the new port, or `None` when nothing moved.
pub(super) fn move_off(seen: &Seen<'_>, txn: &mut Txn<'_>, want: &mut Owned) -> Option<(u16, u16)> {
    let (uid, node) = (seen.uid, seen.node.as_str());
    let busy = reported(&seen.status, want.port)?;
    if !seen.holds {
        return None;
    }
    match txn.existing()?.move_port(uid, node, busy) {
        Ok(Some(port)) => {
            want.port = Some(port);
            Some((busy, port))
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(host = node, busy, error = %e, "no other SPICE port for a desktop whose port is taken");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deskvirt_crds::conditions::{Status, condition};
    use k8s_openapi::jiff::Timestamp;

    fn with_running(reason: &str, message: &str) -> DesktopStatus {
        DesktopStatus {
            conditions: vec![condition(
                &[],
                RUNNING,
                Status::False,
                reason,
                message.to_string(),
                Some(1),
                Timestamp::UNIX_EPOCH,
            )],
            ..DesktopStatus::default()
        }
    }

    #[test]
    fn only_a_report_about_the_port_held_now_moves_it() {
        let busy = with_running(
            "SpicePortBusy",
            &deskvirt_core::spice::busy_message(5901, "q"),
        );
        assert_eq!(reported(&busy, Some(5901)), Some(5901));
        assert_eq!(reported(&busy, Some(5902)), None, "moved already");
        assert_eq!(reported(&busy, None), None, "holds no port");
        let failed = with_running(
            "StartFailed",
            &deskvirt_core::spice::busy_message(5901, "q"),
        );
        assert_eq!(reported(&failed, Some(5901)), None);
        let vague = with_running("SpicePortBusy", "something else");
        assert_eq!(reported(&vague, Some(5901)), None);
        assert_eq!(reported(&DesktopStatus::default(), Some(5901)), None);
    }
}
