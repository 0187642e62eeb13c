//! The allocation ledger of one pool: SPICE ports per host, MACs across the pool and one subnet
//! per host, rebuilt from recorded bindings when the operator starts and then updated in place by
//! the leader as it binds and releases desktops.

use std::collections::{BTreeMap, BTreeSet};

use crate::scheduler::Request;
use crate::types::{NetworkMode, PortRange};

use super::conflict::{Conflict, Seniority};
use super::macs::{Mac, MacBinding, MacError, MacLedger, MacPrefix};
use super::ports::{PortBinding, PortError, PortLedger};
use super::subnets::{HostSubnet, SubnetBinding, SubnetError, SubnetLedger, SubnetPlan};

/// Why the ledger could not be built or could not bind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// A SPICE port could not be allocated.
    #[error(transparent)]
    Port(#[from] PortError),
    /// A MAC could not be read or allocated.
    #[error(transparent)]
    Mac(#[from] MacError),
    /// The CIDR could not be read or a subnet could not be assigned.
    #[error(transparent)]
    Subnet(#[from] SubnetError),
    /// The pool is in bridge mode, where hosts get no subnet of their own.
    #[error("the pool's network is bridged; hosts get no subnet")]
    NoSubnets,
}

impl LedgerError {
    /// Short category for metrics and Events.
    pub fn category(&self) -> &'static str {
        match self {
            LedgerError::Port(e) => e.category(),
            LedgerError::Mac(e) => e.category(),
            LedgerError::Subnet(e) => e.category(),
            LedgerError::NoSubnets => "NoSubnets",
        }
    }
}

/// What a ledger hands out, read from a pool's spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LedgerConfig {
    /// SPICE ports handed out on each host.
    pub ports: PortRange,
    /// Prefix of generated MACs.
    pub mac_prefix: MacPrefix,
    /// How the CIDR is cut into host subnets; `None` in bridge mode.
    pub subnets: Option<SubnetPlan>,
}

impl LedgerConfig {
    /// Reads the port range, MAC prefix and subnet plan of a pool. A reversed port range is not
    /// an error here: binding reports it, and the scheduler reports `InvalidPortRange`.
    pub fn read(spec: &NetworkSpec<'_>) -> Result<Self, LedgerError> {
        let subnets = match spec.mode {
            NetworkMode::Bridge => None,
            NetworkMode::Nat | NetworkMode::Isolated => {
                Some(SubnetPlan::parse(spec.cidr, spec.node_prefix_length)?)
            }
        };
        Ok(Self {
            ports: spec.ports,
            mac_prefix: spec.mac_prefix.parse()?,
            subnets,
        })
    }
}

/// A pool spec's values a [`LedgerConfig`] is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetworkSpec<'a> {
    /// `spec.network.mode`.
    pub mode: NetworkMode,
    /// `spec.network.cidr`.
    pub cidr: &'a str,
    /// `spec.network.nodePrefixLength`.
    pub node_prefix_length: u8,
    /// `spec.network.macPrefix`.
    pub mac_prefix: &'a str,
    /// `spec.display.spicePorts`.
    pub ports: PortRange,
}

impl NetworkSpec<'_> {
    /// The API's defaults: NAT over 10.200.0.0/16 cut into /24s, MACs under 52:54:00, ports
    /// 5900-6899.
    pub const DEFAULT: NetworkSpec<'static> = NetworkSpec {
        mode: NetworkMode::Nat,
        cidr: "10.200.0.0/16",
        node_prefix_length: 24,
        mac_prefix: "52:54:00",
        ports: PortRange {
            first: 5900,
            last: 6899,
        },
    };
}

/// A desktop's recorded binding (from its status), replayed by [`Ledger::rebuild`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesktopBinding {
    /// Key of the desktop: its UID.
    pub desktop: String,
    /// Age of the desktop; the oldest keeps a contested port or MAC.
    pub seniority: Seniority,
    /// `status.node`.
    pub host: Option<String>,
    /// `status.spice.port`.
    pub port: Option<u16>,
    /// `status.mac`.
    pub mac: Option<String>,
}

/// What a desktop asks the ledger for when it is bound to a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claim<'a> {
    /// Key of the desktop: its UID.
    pub desktop: &'a str,
    /// The host the scheduler chose (or the one already in `status.node`).
    pub host: &'a str,
    /// `spec.network.mac`, when the user fixed one.
    pub fixed_mac: Option<&'a str>,
}

/// What a desktop holds once bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bound {
    /// Its SPICE port on the host.
    pub port: u16,
    /// Its MAC.
    pub mac: Mac,
}

/// What a release freed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// The host and port the desktop held.
    pub port: Option<(String, u16)>,
    /// The MAC it held.
    pub mac: Option<Mac>,
}

/// Ports, MACs and subnets of one pool, and the resizes admitted in it that the recorded
/// bindings may not show yet. When the pool's spec changes, build a new ledger and rebuild it
/// from the recorded bindings: held values stay, conflicts are reported.
#[derive(Clone, Debug)]
pub struct Ledger {
    config: LedgerConfig,
    ports: PortLedger,
    macs: MacLedger,
    subnets: Option<SubnetLedger>,
    /// Sizes admitted by a resize, by desktop, until its recorded allocation says so: two
    /// resizes decided a moment apart each count the other's.
    grown: BTreeMap<String, Request>,
    /// Desktops whose port or admitted size changed since [`Ledger::take_changed`]: what a
    /// reader that keeps its own sums (the operator's charges per host) must count again.
    changed: BTreeSet<String>,
    /// The hosts migrating desktops go to, with the size each is charged there until it
    /// arrives or the migration ends ([`targets`]).
    targets: BTreeMap<String, (String, Request)>,
}

impl Ledger {
    /// An empty ledger.
    pub fn new(config: LedgerConfig) -> Self {
        Self {
            config,
            ports: PortLedger::new(),
            macs: MacLedger::new(config.mac_prefix),
            subnets: config.subnets.map(SubnetLedger::new),
            grown: BTreeMap::new(),
            changed: BTreeSet::new(),
            targets: BTreeMap::new(),
        }
    }

    /// The desktops whose port or admitted size changed since the last call, and forgets them.
    pub fn take_changed(&mut self) -> BTreeSet<String> {
        std::mem::take(&mut self.changed)
    }

    fn touch(&mut self, desktop: &str) {
        if !self.changed.contains(desktop) {
            self.changed.insert(desktop.to_string());
        }
    }

    /// Records that `desktop` was admitted at `size`, before its allocation is recorded.
    pub fn admit_size(&mut self, desktop: &str, size: Request) {
        self.touch(desktop);
        self.grown.insert(desktop.to_string(), size);
    }

    /// What `desktop` was admitted at and is not recorded yet, if anything.
    pub fn admitted_size(&self, desktop: &str) -> Option<Request> {
        self.grown.get(desktop).copied()
    }

    /// `desktop`'s recorded allocation is what its spec asks: whatever the ledger admitted
    /// for it is recorded, or was given up (a revert, a failed write), and no longer counts.
    pub fn size_settled(&mut self, desktop: &str) {
        self.touch(desktop);
        self.grown.remove(desktop);
    }

    /// Carries the admitted sizes of `old` (the ledger this one replaces) over: a rebuild
    /// starts from recorded bindings, which may not show them yet.
    pub fn keep_admitted_sizes(&mut self, old: &Ledger) {
        for (d, size) in &old.grown {
            self.grown.entry(d.clone()).or_insert(*size);
            self.changed.insert(d.clone());
        }
    }

    /// An empty ledger for a pool.
    pub fn read(spec: &NetworkSpec<'_>) -> Result<Self, LedgerError> {
        LedgerConfig::read(spec).map(Self::new)
    }

    /// What the ledger hands out.
    pub fn config(&self) -> LedgerConfig {
        self.config
    }

    /// Replaces the ledger's contents with the recorded bindings of the pool's desktops and hosts,
    /// oldest first, and returns every claim it refused: each duplicate exactly once, as the
    /// younger claim. The ledger left behind holds no conflict; the operator re-allocates each
    /// loser with [`Ledger::bind`] (or [`Ledger::assign_subnet`]) and records an Event.
    pub fn rebuild(
        &mut self,
        desktops: impl IntoIterator<Item = DesktopBinding>,
        hosts: impl IntoIterator<Item = SubnetBinding>,
    ) -> Vec<Conflict> {
        let mut conflicts = Vec::new();
        // Migration targets are not in the recorded bindings: their holders re-reserve them.
        for d in std::mem::take(&mut self.targets).into_keys() {
            self.changed.insert(d);
        }
        // In bridge mode recorded subnets are left over from an earlier mode; nothing to keep.
        if let Some(subnets) = &mut self.subnets {
            conflicts.extend(subnets.rebuild(hosts));
        }
        let mut ports = Vec::new();
        let mut macs = Vec::new();
        for d in desktops {
            self.changed.insert(d.desktop.clone());
            match (&d.host, d.port) {
                (Some(host), Some(port)) => ports.push(PortBinding {
                    desktop: d.desktop.clone(),
                    seniority: d.seniority.clone(),
                    host: host.clone(),
                    port,
                }),
                (None, Some(port)) => conflicts.push(Conflict::Invalid {
                    owner: d.desktop.clone(),
                    value: port.to_string(),
                    problem: "a SPICE port is recorded without a host".into(),
                }),
                (_, None) => {}
            }
            if let Some(mac) = d.mac {
                macs.push(MacBinding {
                    desktop: d.desktop,
                    seniority: d.seniority,
                    mac,
                });
            }
        }
        conflicts.extend(self.ports.rebuild(ports));
        conflicts.extend(self.macs.rebuild(macs));
        conflicts
    }

    /// Gives the desktop of `claim` a port on its host and a MAC; idempotent, so binding again
    /// returns what it holds. Either both are held afterwards or the ledger is unchanged.
    pub fn bind(&mut self, claim: &Claim<'_>) -> Result<Bound, LedgerError> {
        self.touch(claim.desktop);
        let had_port = self.ports.port_of(claim.desktop).is_some();
        let port = self
            .ports
            .allocate(claim.desktop, claim.host, self.config.ports)?;
        match self.macs.allocate(claim.desktop, claim.fixed_mac) {
            Ok(mac) => Ok(Bound { port, mac }),
            Err(e) => {
                if !had_port {
                    self.ports.release(claim.desktop);
                }
                Err(e.into())
            }
        }
    }

    /// Makes the ledger hold exactly the binding recorded in a desktop's status (for when a
    /// write the ledger gave up on landed after all). Refused (`false`, nothing changed) when
    /// another desktop holds the port or the MAC.
    pub fn adopt(&mut self, desktop: &str, host: &str, port: u16, mac: &str) -> bool {
        let port_free = self
            .ports
            .holder(host, port)
            .is_none_or(|holder| holder == desktop);
        let mac_free = mac
            .parse::<Mac>()
            .is_ok_and(|m| self.macs.holder(m).is_none_or(|holder| holder == desktop));
        if !(port_free && mac_free) {
            return false;
        }
        self.touch(desktop);
        self.ports.adopt(desktop, host, port) && self.macs.adopt(desktop, mac)
    }

    /// Whether the ledger holds exactly this binding for `desktop`.
    pub fn holds(&self, desktop: &str, host: &str, port: u16, mac: &str) -> bool {
        self.port_of(desktop) == Some((host, port))
            && self
                .mac_of(desktop)
                .is_some_and(|m| mac.parse::<Mac>().is_ok_and(|r| r == m))
    }

    /// Frees the port and MAC of a deleted desktop, and the port a migration of it reserved.
    pub fn release(&mut self, desktop: &str) -> Released {
        self.touch(desktop);
        self.grown.remove(desktop);
        self.release_target(desktop);
        Released {
            port: self.ports.release(desktop),
            mac: self.macs.release(desktop),
        }
    }

    /// Frees only the port of `desktop`: its resources went back to the pool (idle
    /// reclamation) while it keeps its MAC and its host.
    pub fn release_port(&mut self, desktop: &str) -> Option<(String, u16)> {
        self.touch(desktop);
        self.grown.remove(desktop);
        self.ports.release(desktop)
    }

    /// Moves `desktop` off `busy`, a port on `host` that another process there listens on: the
    /// port stays held (by [`busy_holder`]), so no desktop of the pool gets it while this
    /// ledger lives, and the desktop gets the lowest free one. `Ok(None)` when the desktop does
    /// not hold `busy` on `host` (it has moved already); when no other port is free, it keeps
    /// `busy` and the error says so.
    pub fn move_port(
        &mut self,
        desktop: &str,
        host: &str,
        busy: u16,
    ) -> Result<Option<u16>, LedgerError> {
        if self.ports.port_of(desktop) != Some((host, busy)) {
            return Ok(None);
        }
        self.touch(desktop);
        self.ports.release(desktop);
        let blocker = busy_holder(host, busy);
        self.ports.adopt(&blocker, host, busy);
        match self.ports.allocate(desktop, host, self.config.ports) {
            Ok(port) => Ok(Some(port)),
            Err(e) => {
                self.ports.release(&blocker);
                self.ports.adopt(desktop, host, busy);
                Err(e.into())
            }
        }
    }

    /// How many ports of `host` another process listens on ([`Ledger::move_port`]).
    pub fn ports_taken(&self, host: &str) -> u32 {
        // The holders of taken ports are keyed by host ([`busy_holder`]): read just this host's.
        let taken = self.ports.holders_prefixed(&format!("{BUSY}{host}:"));
        u32::try_from(taken).unwrap_or(u32::MAX)
    }

    /// A port on `host` for a desktop whose port was released: the one it holds, else
    /// `preferred` (the port it had) when free and in the range, else the lowest free one.
    pub fn restore_port(
        &mut self,
        desktop: &str,
        host: &str,
        preferred: Option<u16>,
    ) -> Result<u16, LedgerError> {
        self.touch(desktop);
        Ok(self
            .ports
            .allocate_preferring(desktop, host, self.config.ports, preferred)?)
    }

    /// The subnet of `host`: the one it holds, else the lowest free one.
    pub fn assign_subnet(&mut self, host: &str) -> Result<HostSubnet, LedgerError> {
        let subnets = self.subnets.as_mut().ok_or(LedgerError::NoSubnets)?;
        Ok(subnets.assign(host)?)
    }

    /// Frees the subnet of a host that left the pool.
    pub fn release_host(&mut self, host: &str) -> Option<HostSubnet> {
        self.subnets.as_mut()?.release(host)
    }

    /// The host and port `desktop` holds.
    pub fn port_of(&self, desktop: &str) -> Option<(&str, u16)> {
        self.ports.port_of(desktop)
    }

    /// The MAC `desktop` holds.
    pub fn mac_of(&self, desktop: &str) -> Option<Mac> {
        self.macs.mac_of(desktop)
    }

    /// The subnet `host` holds.
    pub fn subnet_of(&self, host: &str) -> Option<HostSubnet> {
        self.subnets.as_ref()?.subnet_of(host)
    }

    /// How many ports of the pool's range are held on `host` (for the scheduler's `HostView`).
    pub fn ports_in_use(&self, host: &str) -> u32 {
        self.ports.in_use(host, self.config.ports)
    }

    /// The port ledger, read-only.
    pub fn ports(&self) -> &PortLedger {
        &self.ports
    }

    /// The MAC ledger, read-only.
    pub fn macs(&self) -> &MacLedger {
        &self.macs
    }

    /// The subnet ledger, read-only; `None` in bridge mode.
    pub fn subnets(&self) -> Option<&SubnetLedger> {
        self.subnets.as_ref()
    }
}

mod targets;
pub use targets::{Target, migration_holder};

/// How the ledger's holder of a port another process listens on begins: no UID looks like it.
const BUSY: &str = "busy-port:";

/// The ledger's holder of a port another process listens on.
pub fn busy_holder(host: &str, port: u16) -> String {
    format!("{BUSY}{host}:{port}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocators::conflict::Resource;

    /// A pool spec with a small port range, so exhaustion is easy to reach.
    fn spec(first: u16, last: u16) -> NetworkSpec<'static> {
        NetworkSpec {
            ports: PortRange { first, last },
            ..NetworkSpec::DEFAULT
        }
    }

    fn ledger(first: u16, last: u16) -> Ledger {
        match Ledger::read(&spec(first, last)) {
            Ok(l) => l,
            Err(e) => panic!("default pool spec must give a ledger: {e}"),
        }
    }

    #[test]
    fn every_change_of_a_port_or_size_is_named_once() {
        let mut l = ledger(5900, 5901);
        let claim = |d| Claim {
            desktop: d,
            host: "h",
            fixed_mac: None,
        };
        assert!(l.bind(&claim("a")).is_ok());
        assert!(l.bind(&claim("b")).is_ok());
        l.admit_size("c", Request::new(1, 1 << 30));
        let names = |l: &mut Ledger| l.take_changed().into_iter().collect::<Vec<_>>();
        assert_eq!(names(&mut l), ["a", "b", "c"]);
        assert_eq!(names(&mut l), Vec::<String>::new());
        assert!(l.move_port("a", "h", 5900).is_err(), "no port is free");
        l.release_port("b");
        assert_eq!(l.restore_port("b", "h", None), Ok(5901));
        l.size_settled("c");
        l.release("a");
        assert_eq!(names(&mut l), ["a", "b", "c"]);
    }

    #[test]
    fn an_admitted_size_counts_until_settled_released_or_its_resources_released() {
        let gib = 1 << 30;
        let grown = Request::new(2, 5 * gib);
        let mut l = ledger(5900, 5910);
        assert_eq!(l.admitted_size("a"), None);
        l.admit_size("a", grown);
        assert_eq!(l.admitted_size("a"), Some(grown));
        // A rebuilt ledger keeps it.
        let mut rebuilt = ledger(5900, 5920);
        rebuilt.keep_admitted_sizes(&l);
        assert_eq!(rebuilt.admitted_size("a"), Some(grown));
        l.size_settled("a");
        assert_eq!(l.admitted_size("a"), None);
        for release in [
            |l: &mut Ledger| drop(l.release("b")),
            |l: &mut Ledger| drop(l.release_port("b")),
        ] {
            l.admit_size("b", grown);
            release(&mut l);
            assert_eq!(l.admitted_size("b"), None);
        }
    }

    fn claim<'a>(desktop: &'a str, host: &'a str) -> Claim<'a> {
        Claim {
            desktop,
            host,
            fixed_mac: None,
        }
    }

    fn recorded(desktop: &str, created: i64, host: &str, port: u16, mac: &str) -> DesktopBinding {
        DesktopBinding {
            desktop: desktop.into(),
            seniority: Seniority::new(created, desktop),
            host: Some(host.into()),
            port: Some(port),
            mac: Some(mac.into()),
        }
    }

    #[test]
    fn a_port_taken_on_the_host_is_left_to_its_taker() -> Result<(), LedgerError> {
        let mut l = ledger(5900, 5902);
        let a = l.bind(&claim("a", "h1"))?;
        let b = l.bind(&claim("b", "h1"))?;
        assert_eq!((a.port, b.port), (5900, 5901));
        let mac = l.mac_of("a");
        assert_eq!(l.move_port("a", "h1", 5900)?, Some(5902));
        assert_eq!(l.port_of("a"), Some(("h1", 5902)));
        assert_eq!(l.mac_of("a"), mac, "the MAC stays");
        assert_eq!(
            l.ports().holder("h1", 5900),
            Some(busy_holder("h1", 5900).as_str())
        );
        assert_eq!(l.ports_in_use("h1"), 3, "the taken port is not free");
        assert_eq!((l.ports_taken("h1"), l.ports_taken("h2")), (1, 0));
        // A report about a port the desktop no longer holds moves nothing.
        assert_eq!(l.move_port("a", "h1", 5900)?, None);
        assert_eq!(l.move_port("a", "h2", 5902)?, None);
        // Nothing else free: the desktop keeps its port, and the error says why.
        let err = l.move_port("b", "h1", 5901);
        assert!(err.is_err(), "{err:?}");
        assert_eq!(l.port_of("b"), Some(("h1", 5901)));
        assert_eq!(l.ports().holder("h1", 5901), Some("b"));
        // Another desktop never gets the taken port; on another host it is free.
        l.release("b");
        let c = l.bind(&claim("c", "h1"))?;
        assert_eq!(c.port, 5901);
        assert_eq!(l.bind(&claim("d", "h2"))?.port, 5900);
        Ok(())
    }

    #[test]
    fn reads_the_pool_spec() -> Result<(), LedgerError> {
        let l = ledger(5900, 5999);
        assert_eq!(
            l.config().ports,
            PortRange {
                first: 5900,
                last: 5999
            }
        );
        assert_eq!(l.config().mac_prefix.to_string(), "52:54:00");
        assert!(l.subnets().is_some());

        let mut bridged = spec(5900, 5999);
        bridged.mode = NetworkMode::Bridge;
        let mut l = Ledger::read(&bridged)?;
        assert_eq!(l.assign_subnet("h"), Err(LedgerError::NoSubnets));

        let mut broken = spec(5900, 5999);
        broken.mac_prefix = "01:00:5e";
        assert_eq!(
            Ledger::read(&broken).map(|_| ()).map_err(|e| e.category()),
            Err("InvalidMACPrefix")
        );
        broken = spec(5900, 5999);
        broken.cidr = "10.0.0.1/8";
        assert_eq!(
            Ledger::read(&broken).map(|_| ()).map_err(|e| e.category()),
            Err("InvalidCIDR")
        );
        Ok(())
    }

    #[test]
    fn binds_idempotently_and_releases() -> Result<(), LedgerError> {
        let mut l = ledger(5900, 5999);
        let a = l.bind(&claim("a", "h1"))?;
        assert_eq!(a.port, 5900);
        assert_eq!(l.bind(&claim("a", "h1"))?, a);
        let b = l.bind(&claim("b", "h1"))?;
        assert_eq!(b.port, 5901);
        assert_ne!(a.mac, b.mac);
        assert_eq!(l.ports_in_use("h1"), 2);
        assert_eq!(
            l.release("a"),
            Released {
                port: Some(("h1".into(), 5900)),
                mac: Some(a.mac)
            }
        );
        assert_eq!(l.release("a"), Released::default(), "release is idempotent");
        assert_eq!(l.ports_in_use("h1"), 1);
        Ok(())
    }

    #[test]
    fn a_failed_mac_leaves_no_port_behind() -> Result<(), LedgerError> {
        let mut l = ledger(5900, 5999);
        l.bind(&Claim {
            desktop: "a",
            host: "h",
            fixed_mac: Some("02:00:00:00:00:01"),
        })?;
        let err = l.bind(&Claim {
            desktop: "b",
            host: "h",
            fixed_mac: Some("02:00:00:00:00:01"),
        });
        assert!(matches!(
            err,
            Err(LedgerError::Mac(MacError::Collision { .. }))
        ));
        assert_eq!(l.port_of("b"), None);
        assert_eq!(l.ports_in_use("h"), 1);
        Ok(())
    }

    #[test]
    fn port_exhaustion_is_reported() -> Result<(), LedgerError> {
        let mut l = ledger(5900, 5900);
        l.bind(&claim("a", "h"))?;
        let err = l.bind(&claim("b", "h"));
        assert_eq!(
            err.as_ref().map_err(LedgerError::category),
            Err("PortsExhausted")
        );
        assert_eq!(l.mac_of("b"), None);
        Ok(())
    }

    #[test]
    fn rebuild_reports_port_mac_and_subnet_conflicts() -> Result<(), LedgerError> {
        let mut l = ledger(5900, 5999);
        let conflicts = l.rebuild(
            [
                recorded("old", 1, "h1", 5900, "52:54:00:00:00:01"),
                recorded("young", 2, "h1", 5900, "52:54:00:00:00:01"),
                recorded("ok", 3, "h1", 5901, "52:54:00:00:00:02"),
                DesktopBinding {
                    desktop: "orphan-port".into(),
                    seniority: Seniority::new(4, "orphan-port"),
                    port: Some(5905),
                    ..DesktopBinding::default()
                },
            ],
            [
                SubnetBinding {
                    host: "h1".into(),
                    seniority: Seniority::new(1, "h1"),
                    subnet: "10.200.0.0/24".into(),
                },
                SubnetBinding {
                    host: "h2".into(),
                    seniority: Seniority::new(2, "h2"),
                    subnet: "10.200.0.0/24".into(),
                },
            ],
        );
        let mut summary: Vec<(String, &str)> = conflicts
            .iter()
            .map(|c| {
                let what = match c {
                    Conflict::Taken {
                        resource: Resource::Port { .. },
                        ..
                    } => "port".to_owned(),
                    Conflict::Taken {
                        resource: Resource::Mac(_),
                        ..
                    } => "mac".to_owned(),
                    Conflict::Taken {
                        resource: Resource::Subnet(_),
                        ..
                    } => "subnet".to_owned(),
                    Conflict::Invalid { .. } => "invalid".to_owned(),
                };
                (what, c.loser())
            })
            .collect();
        summary.sort();
        assert_eq!(
            summary,
            [
                ("invalid".to_owned(), "orphan-port"),
                ("mac".to_owned(), "young"),
                ("port".to_owned(), "young"),
                ("subnet".to_owned(), "h2"),
            ]
        );
        // Re-homing the losers gives them fresh, unique values.
        let young = l.bind(&claim("young", "h1"))?;
        assert_eq!(young.port, 5902);
        assert_ne!(Some(young.mac), l.mac_of("old"));
        assert_eq!(l.assign_subnet("h2")?.to_string(), "10.200.1.0/24");
        Ok(())
    }

    #[test]
    fn adopts_a_recorded_binding_only_when_free() -> Result<(), LedgerError> {
        let mut l = ledger(5900, 5910);
        let a = l.bind(&claim("a", "h1"))?;
        // A write the ledger gave up on landed: "b" holds 5905 on h2 with this MAC.
        let mac = "52:54:00:00:00:42";
        assert!(!l.holds("b", "h2", 5905, mac));
        assert!(l.adopt("b", "h2", 5905, mac));
        assert!(l.holds("b", "h2", 5905, mac));
        // Adopting replaces what the ledger held for the desktop.
        assert!(l.adopt("b", "h1", 5906, mac));
        assert_eq!(l.port_of("b"), Some(("h1", 5906)));
        assert_eq!(l.ports_in_use("h2"), 0);
        // Another desktop's port or MAC is never taken over; nothing changes then.
        assert!(!l.adopt("c", "h1", a.port, "52:54:00:00:00:43"));
        assert!(!l.adopt("c", "h1", 5907, &a.mac.to_string()));
        assert!(!l.adopt("c", "h1", 5907, "not-a-mac"));
        assert_eq!(l.port_of("c"), None);
        assert_eq!(l.mac_of("c"), None);
        Ok(())
    }

    #[test]
    fn a_reclaimed_desktop_gives_back_its_port_and_keeps_its_mac() -> Result<(), LedgerError> {
        let mut l = ledger(5900, 5910);
        let a = l.bind(&claim("a", "h1"))?;
        let b = l.bind(&claim("b", "h1"))?;
        assert_eq!((a.port, b.port), (5900, 5901));
        assert_eq!(l.release_port("b"), Some(("h1".into(), 5901)));
        assert_eq!(l.ports_in_use("h1"), 1);
        assert_eq!(l.mac_of("b"), Some(b.mac));
        // Someone else takes the lowest free port meanwhile.
        assert_eq!(l.bind(&claim("c", "h1"))?.port, 5901);
        // Its old port is taken: the lowest free one.
        assert_eq!(l.restore_port("b", "h1", Some(5901))?, 5902);
        assert_eq!(l.release_port("b"), Some(("h1".into(), 5902)));
        assert_eq!(l.release_port("c"), Some(("h1".into(), 5901)));
        // Free again, and not the lowest: still preferred.
        assert_eq!(l.release_port("a"), Some(("h1".into(), 5900)));
        assert_eq!(l.restore_port("b", "h1", Some(5901))?, 5901);
        // Idempotent while held; a preference outside the range is ignored.
        assert_eq!(l.restore_port("b", "h1", Some(5905))?, 5901);
        assert_eq!(l.restore_port("a", "h1", Some(6000))?, 5900);
        assert_eq!(l.mac_of("b"), Some(b.mac));
        Ok(())
    }
}
