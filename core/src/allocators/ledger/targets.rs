//! A migrating desktop's second place in a pool's ledger: the port it will listen on at the
//! target host, held (by [`migration_holder`]) from the moment the target is chosen, so no
//! desktop of the pool gets it, and the size the target is charged meanwhile. When the desktop
//! arrives, that port becomes its own and the source's is freed; when the migration ends
//! otherwise, the target's is freed and nothing else changes. A move into another pool holds
//! its place in the target pool's ledger, with a MAC of that pool as well ([`Ledger::reserve_entry`]);
//! on arrival both become the desktop's own there ([`Ledger::complete_entry`]), and the source
//! pool's ledger lets its binding go.

use super::{Ledger, LedgerError};
use crate::allocators::macs::Mac;
use crate::scheduler::Request;

/// How the ledger's holder of a migration target's port begins: no UID looks like it.
const MIGRATION: &str = "migration:";

/// The ledger's holder of the port a migration of `desktop` reserved on its target.
pub fn migration_holder(desktop: &str) -> String {
    format!("{MIGRATION}{desktop}")
}

/// A reservation on a migration's target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target<'a> {
    pub host: &'a str,
    pub port: u16,
    /// What the target is charged for the desktop until it arrives or the migration ends.
    pub size: Request,
}

impl Ledger {
    /// Reserves a port on `host` for a migration of `desktop` and charges `size` there: the
    /// port it holds there already, else the lowest free one. A reservation on another host is
    /// given up first. Refused when `host` is the one the desktop holds its own port on.
    pub fn reserve_target(
        &mut self,
        desktop: &str,
        host: &str,
        size: Request,
    ) -> Result<u16, LedgerError> {
        if let Some((own, port)) = self.ports.port_of(desktop)
            && own == host
        {
            return Err(crate::allocators::PortError::BoundElsewhere {
                desktop: desktop.to_owned(),
                host: own.to_owned(),
                port,
            }
            .into());
        }
        if self.target_of(desktop).is_some_and(|t| t.host != host) {
            self.release_target(desktop);
        }
        let port = self
            .ports
            .allocate(&migration_holder(desktop), host, self.config.ports)?;
        self.touch(desktop);
        self.targets
            .insert(desktop.to_string(), (host.to_string(), size));
        Ok(port)
    }

    /// Records a reservation made before this ledger was built (a migration's status says
    /// `host` and `port`): held again unless another holder has that port, or the desktop's own
    /// port is on `host`. Returns whether it is held.
    pub fn adopt_target(&mut self, desktop: &str, host: &str, port: u16, size: Request) -> bool {
        if self
            .ports
            .port_of(desktop)
            .is_some_and(|(own, _)| own == host)
        {
            return false;
        }
        if !self.ports.adopt(&migration_holder(desktop), host, port) {
            return false;
        }
        self.touch(desktop);
        self.targets
            .insert(desktop.to_string(), (host.to_string(), size));
        true
    }

    /// What a migration of `desktop` holds on its target.
    pub fn target_of(&self, desktop: &str) -> Option<Target<'_>> {
        let (host, size) = self.targets.get(desktop)?;
        let (_, port) = self.ports.port_of(&migration_holder(desktop))?;
        Some(Target {
            host,
            port,
            size: *size,
        })
    }

    /// Every migration target held: desktop, and what it holds.
    pub fn targets(&self) -> impl Iterator<Item = (&str, Target<'_>)> {
        self.targets
            .keys()
            .filter_map(|d| Some((d.as_str(), self.target_of(d)?)))
    }

    /// Gives up the target of a migration of `desktop` that ended without moving it: its port,
    /// charge and (a move from another pool) MAC there. Returns the host and port freed.
    pub fn release_target(&mut self, desktop: &str) -> Option<(String, u16)> {
        self.targets.remove(desktop)?;
        self.touch(desktop);
        self.macs.release(&migration_holder(desktop));
        self.ports.release(&migration_holder(desktop))
    }

    /// Reserves a place in this pool for a migration of `desktop` from another pool: a port on
    /// `host` and the charge of `size` there ([`Self::reserve_target`]), and a MAC of this
    /// pool (`fixed`, when the desktop's spec fixes one). What it holds already is kept; on a
    /// refusal nothing is held.
    pub fn reserve_entry(
        &mut self,
        desktop: &str,
        host: &str,
        size: Request,
        fixed: Option<&str>,
    ) -> Result<(u16, Mac), LedgerError> {
        let port = self.reserve_target(desktop, host, size)?;
        match self.macs.allocate(&migration_holder(desktop), fixed) {
            Ok(mac) => Ok((port, mac)),
            Err(e) => {
                self.release_target(desktop);
                Err(e.into())
            }
        }
    }

    /// Records a place reserved for a move from another pool before this ledger was built (a
    /// migration's status says `host`, `port` and `mac`): held again unless another holder has
    /// the port or the MAC. Returns whether it is held.
    pub fn adopt_entry(
        &mut self,
        desktop: &str,
        host: &str,
        port: u16,
        mac: &str,
        size: Request,
    ) -> bool {
        if !self.adopt_target(desktop, host, port, size) {
            return false;
        }
        if !self.macs.adopt(&migration_holder(desktop), mac) {
            self.release_target(desktop);
            return false;
        }
        true
    }

    /// The MAC a migration of `desktop` from another pool holds here.
    pub fn entry_mac(&self, desktop: &str) -> Option<Mac> {
        self.macs.mac_of(&migration_holder(desktop))
    }

    /// The desktop moved in from another pool arrived: the port and MAC reserved for it become
    /// its own, and its charge here is the desktop's. Returns its host, port and MAC; `None`
    /// (nothing changed) when no such place is held.
    pub fn complete_entry(&mut self, desktop: &str) -> Option<(String, u16, Mac)> {
        let (host, port) = {
            let t = self.target_of(desktop)?;
            (t.host.to_string(), t.port)
        };
        let mac = self.entry_mac(desktop)?;
        self.targets.remove(desktop);
        self.touch(desktop);
        self.ports.release(&migration_holder(desktop));
        self.macs.release(&migration_holder(desktop));
        self.ports.adopt(desktop, &host, port);
        self.macs.adopt(desktop, &mac.to_string());
        Some((host, port, mac))
    }

    /// The desktop arrived on its target: the target's port becomes its own, its charge there
    /// is the desktop's, and the port it held on the source is freed (returned).
    pub fn complete_target(&mut self, desktop: &str) -> Option<(String, u16)> {
        let (host, port) = {
            let t = self.target_of(desktop)?;
            (t.host.to_string(), t.port)
        };
        self.targets.remove(desktop);
        self.touch(desktop);
        self.ports.release(&migration_holder(desktop));
        let source = self.ports.release(desktop);
        self.ports.adopt(desktop, &host, port);
        source
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocators::NetworkSpec;
    use crate::allocators::ledger::{Claim, LedgerConfig};
    use crate::types::{NetworkMode, PortRange};

    const GI: u64 = 1 << 30;
    const SIZE: Request = Request::new(2, 2 * GI);

    fn ledger() -> Ledger {
        let spec = NetworkSpec {
            mode: NetworkMode::Bridge,
            cidr: "",
            node_prefix_length: 24,
            mac_prefix: "52:54:00",
            ports: PortRange {
                first: 5900,
                last: 5902,
            },
        };
        Ledger::new(LedgerConfig::read(&spec).unwrap_or_else(|e| panic!("{e}")))
    }

    fn bound(l: &mut Ledger, desktop: &str, host: &str) -> u16 {
        let claim = Claim {
            desktop,
            host,
            fixed_mac: None,
        };
        l.bind(&claim).unwrap_or_else(|e| panic!("{e}")).port
    }

    #[test]
    fn a_target_port_is_held_against_every_other_desktop_and_counted() {
        let mut l = ledger();
        assert_eq!(bound(&mut l, "a", "h1"), 5900);
        assert_eq!(l.reserve_target("a", "h2", SIZE).ok(), Some(5900));
        assert_eq!(
            l.reserve_target("a", "h2", SIZE).ok(),
            Some(5900),
            "again: same port"
        );
        assert_eq!(
            bound(&mut l, "b", "h2"),
            5901,
            "the target's port is not handed out"
        );
        assert_eq!(l.ports_in_use("h2"), 2);
        let t = l.target_of("a").map(|t| (t.host, t.port, t.size));
        assert_eq!(t, Some(("h2", 5900, SIZE)));
        assert_eq!(l.targets().count(), 1);
        assert!(l.take_changed().contains("a"), "charges are counted again");
    }

    #[test]
    fn the_source_is_refused_and_another_target_replaces_the_first() {
        let mut l = ledger();
        bound(&mut l, "a", "h1");
        assert!(l.reserve_target("a", "h1", SIZE).is_err());
        assert_eq!(l.reserve_target("a", "h2", SIZE).ok(), Some(5900));
        assert_eq!(l.reserve_target("a", "h3", SIZE).ok(), Some(5900));
        assert_eq!(l.ports_in_use("h2"), 0, "the first target's port is freed");
    }

    #[test]
    fn an_ended_migration_frees_only_the_target_and_an_arrival_frees_only_the_source() {
        let mut l = ledger();
        bound(&mut l, "a", "h1");
        l.reserve_target("a", "h2", SIZE).ok();
        assert_eq!(l.release_target("a"), Some(("h2".into(), 5900)));
        assert_eq!(
            l.port_of("a"),
            Some(("h1", 5900)),
            "the desktop keeps its own"
        );
        assert_eq!(l.release_target("a"), None);

        bound(&mut l, "b", "h2");
        assert_eq!(l.reserve_target("a", "h2", SIZE).ok(), Some(5901));
        assert_eq!(l.complete_target("a"), Some(("h1".into(), 5900)));
        assert_eq!(l.port_of("a"), Some(("h2", 5901)));
        assert_eq!(l.target_of("a"), None);
        assert_eq!(l.ports_in_use("h1"), 0);
        assert_eq!(l.ports_in_use("h2"), 2);
    }

    #[test]
    fn a_rebuilt_ledger_takes_back_a_recorded_target_unless_its_port_is_taken() {
        let mut l = ledger();
        bound(&mut l, "a", "h1");
        bound(&mut l, "b", "h2");
        assert!(!l.adopt_target("a", "h2", 5900, SIZE), "b holds it");
        assert!(
            !l.adopt_target("a", "h1", 5901, SIZE),
            "the desktop's own host"
        );
        assert!(l.adopt_target("a", "h2", 5901, SIZE));
        assert!(l.adopt_target("a", "h2", 5901, SIZE), "again: still held");
        assert_eq!(l.target_of("a").map(|t| t.port), Some(5901));
        assert_eq!(bound(&mut l, "c", "h2"), 5902);
    }

    #[test]
    fn deleting_a_migrating_desktop_frees_both_ports() {
        let mut l = ledger();
        bound(&mut l, "a", "h1");
        l.reserve_target("a", "h2", SIZE).ok();
        l.release("a");
        assert_eq!((l.ports_in_use("h1"), l.ports_in_use("h2")), (0, 0));
        assert_eq!(l.targets().count(), 0);
    }

    #[test]
    fn a_move_from_another_pool_holds_a_port_and_a_mac_that_become_the_desktops_own() {
        let mut l = ledger();
        bound(&mut l, "b", "h2");
        let (port, mac) = l
            .reserve_entry("a", "h2", SIZE, None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(port, 5901);
        assert_eq!(l.entry_mac("a"), Some(mac));
        assert_ne!(l.mac_of("b"), Some(mac));
        // Reserved again: the same port and MAC.
        assert_eq!(
            l.reserve_entry("a", "h2", SIZE, None).ok(),
            Some((5901, mac))
        );
        assert_eq!(bound(&mut l, "c", "h2"), 5902, "the reserved port is held");
        assert_ne!(l.mac_of("c"), Some(mac), "and so is the MAC");
        // Arrived: the desktop holds them itself, and nothing is held for the move.
        assert_eq!(l.complete_entry("a"), Some(("h2".into(), 5901, mac)));
        assert_eq!(l.port_of("a"), Some(("h2", 5901)));
        assert_eq!(l.mac_of("a"), Some(mac));
        assert_eq!((l.target_of("a"), l.entry_mac("a")), (None, None));
        assert_eq!(l.complete_entry("a"), None, "once");
    }

    #[test]
    fn an_ended_move_from_another_pool_frees_its_port_and_mac_and_a_rebuild_takes_them_back() {
        let mut l = ledger();
        let (port, mac) = l
            .reserve_entry("a", "h2", SIZE, None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(l.release_target("a"), Some(("h2".into(), port)));
        assert_eq!(l.entry_mac("a"), None);
        assert_eq!(l.macs().len(), 0);
        let text = mac.to_string();
        assert!(l.adopt_entry("a", "h2", port, &text, SIZE));
        assert_eq!(l.entry_mac("a"), Some(mac));
        // A MAC another desktop holds is not taken back, and then neither is the port.
        let mut other = ledger();
        let claim = Claim {
            desktop: "b",
            host: "h1",
            fixed_mac: Some(text.as_str()),
        };
        other.bind(&claim).unwrap_or_else(|e| panic!("{e}"));
        assert!(!other.adopt_entry("a", "h2", port, &text, SIZE));
        assert_eq!(other.target_of("a"), None);
        // A MAC the spec fixes, held by another desktop, refuses the reservation whole.
        assert!(
            other
                .reserve_entry("a", "h2", SIZE, Some(text.as_str()))
                .is_err()
        );
        assert_eq!(other.ports_in_use("h2"), 0);
    }
}
