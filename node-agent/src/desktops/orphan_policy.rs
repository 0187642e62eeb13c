//! Decides what an orphan domain holds and what the pool's orphan policy does to it: its SPICE
//! port and MAC read from its XML, when its grace period is over, and the next step (nothing,
//! an ACPI shutdown, a hard power-off after the shutdown grace, or undefining it once off; the
//! disk is never touched). Pure.

use std::time::Duration;

use deskvirt_crds::resource_pool::OrphanAction;

use crate::domain::read::{attribute, walk};

/// The SPICE port and the first NIC's MAC of a domain XML.
pub fn spice_port_and_mac(xml: &str) -> (Option<u16>, Option<String>) {
    let mut port = None;
    let mut mac = None;
    let _ = walk(xml, |path, attrs| {
        let tail: Vec<&str> = path.iter().rev().take(2).map(String::as_str).collect();
        match tail.as_slice() {
            ["graphics", "devices"] if attribute(attrs, "type") == Some("spice") => {
                port = port.or_else(|| {
                    attribute(attrs, "port")
                        .and_then(|p| p.parse::<u16>().ok())
                        .filter(|p| *p > 0)
                });
            }
            ["mac", "interface"] if mac.is_none() => {
                mac = attribute(attrs, "address").map(str::to_ascii_lowercase);
            }
            _ => {}
        }
    });
    (port, mac)
}

/// The next thing done to an orphan domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing (reported only, within its grace period, or done).
    Keep,
    /// Ask the guest to shut down.
    Shutdown,
    /// Power it off: the guest did not shut down within the grace.
    PowerOff,
    /// Undefine the stopped domain (its disk stays).
    Undefine,
}

/// Decides from the pool's `action`, whether the grace period is over (`due`), whether the
/// domain runs, and how long ago this agent asked it to shut down.
pub fn decide(
    action: OrphanAction,
    due: bool,
    active: bool,
    shutdown_asked: Option<Duration>,
    grace: Duration,
) -> Step {
    if !due || action == OrphanAction::Report {
        return Step::Keep;
    }
    match (active, shutdown_asked) {
        (true, None) => Step::Shutdown,
        (true, Some(asked)) if asked >= grace => Step::PowerOff,
        (true, Some(_)) => Step::Keep,
        (false, _) if action == OrphanAction::Undefine => Step::Undefine,
        (false, _) => Step::Keep,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(60);

    #[test]
    fn reads_port_and_mac_of_a_live_domain() {
        let xml = r#"<domain><devices>
            <interface type="network"><mac address="52:54:00:AB:CD:EF"/></interface>
            <graphics type="vnc" port="5900"/>
            <graphics type="spice" port="45121" autoport="no"/>
        </devices></domain>"#;
        assert_eq!(
            spice_port_and_mac(xml),
            (Some(45121), Some("52:54:00:ab:cd:ef".into()))
        );
        assert_eq!(spice_port_and_mac("<domain/>"), (None, None));
        assert_eq!(spice_port_and_mac("<domain"), (None, None));
    }

    #[test]
    fn report_and_the_grace_period_keep_it() {
        for action in [
            OrphanAction::Report,
            OrphanAction::Stop,
            OrphanAction::Undefine,
        ] {
            assert_eq!(decide(action, false, true, None, GRACE), Step::Keep);
        }
        assert_eq!(
            decide(OrphanAction::Report, true, true, None, GRACE),
            Step::Keep
        );
    }

    #[test]
    fn stop_shuts_down_then_powers_off() {
        let stop = OrphanAction::Stop;
        assert_eq!(decide(stop, true, true, None, GRACE), Step::Shutdown);
        let soon = Some(Duration::from_secs(5));
        assert_eq!(decide(stop, true, true, soon, GRACE), Step::Keep);
        assert_eq!(decide(stop, true, true, Some(GRACE), GRACE), Step::PowerOff);
        assert_eq!(decide(stop, true, false, None, GRACE), Step::Keep);
    }

    #[test]
    fn undefine_waits_for_it_to_be_off() {
        let undefine = OrphanAction::Undefine;
        assert_eq!(decide(undefine, true, true, None, GRACE), Step::Shutdown);
        assert_eq!(decide(undefine, true, false, None, GRACE), Step::Undefine);
    }
}
