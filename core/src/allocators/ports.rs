//! Which SPICE port each desktop holds on its host: the lowest free port of the pool's range,
//! one owner per (host, port), the same port for the same desktop until it is released.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

use crate::types::PortRange;

use super::conflict::{Conflict, Resource, Seniority};

/// Why a port could not be handed out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    /// The pool's range is reversed.
    #[error("SPICE port range {first}-{last} is reversed")]
    InvalidRange {
        /// First port of the range.
        first: u16,
        /// Last port of the range.
        last: u16,
    },
    /// Every port of the range is held on the host.
    #[error(
        "all {count} SPICE ports {first}-{last} on host {host} are in use",
        count = u32::from(last.saturating_sub(*first)) + 1
    )]
    Exhausted {
        /// The host.
        host: String,
        /// First port of the range.
        first: u16,
        /// Last port of the range.
        last: u16,
    },
    /// The desktop already holds a port on another host; release it first.
    #[error("desktop {desktop} already holds port {port} on host {host}")]
    BoundElsewhere {
        /// Key of the desktop.
        desktop: String,
        /// The host where it holds a port.
        host: String,
        /// The port it holds.
        port: u16,
    },
}

impl PortError {
    /// Short category for metrics and Events.
    pub fn category(&self) -> &'static str {
        match self {
            PortError::InvalidRange { .. } => "InvalidPortRange",
            PortError::Exhausted { .. } => "PortsExhausted",
            PortError::BoundElsewhere { .. } => "BoundElsewhere",
        }
    }
}

/// A port recorded in a desktop's status, replayed by [`PortLedger::rebuild`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortBinding {
    /// Key of the desktop (its UID).
    pub desktop: String,
    /// Age of the desktop; the oldest keeps a contested port.
    pub seniority: Seniority,
    /// The host the desktop is bound to.
    pub host: String,
    /// The port it holds there.
    pub port: u16,
}

/// The SPICE ports held on every host of a pool.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortLedger {
    hosts: BTreeMap<String, BTreeMap<u16, String>>,
    desktops: BTreeMap<String, (String, u16)>,
}

impl PortLedger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    /// The port of `desktop` on `host`: the one it already holds, else the lowest free port of
    /// `range`. A port held from an earlier, different range is kept, so a range change never
    /// moves a running desktop.
    pub fn allocate(
        &mut self,
        desktop: &str,
        host: &str,
        range: PortRange,
    ) -> Result<u16, PortError> {
        if let Some((bound_host, port)) = self.desktops.get(desktop) {
            if bound_host == host {
                return Ok(*port);
            }
            return Err(PortError::BoundElsewhere {
                desktop: desktop.to_owned(),
                host: bound_host.clone(),
                port: *port,
            });
        }
        if range.is_empty() {
            return Err(PortError::InvalidRange {
                first: range.first,
                last: range.last,
            });
        }
        let port = self
            .lowest_free(host, range)
            .ok_or_else(|| PortError::Exhausted {
                host: host.to_owned(),
                first: range.first,
                last: range.last,
            })?;
        self.insert(desktop, host, port);
        Ok(port)
    }

    /// Like [`PortLedger::allocate`], but a desktop that holds no port gets `preferred` when it
    /// is in `range` and free on `host` (a woken desktop takes back the port it had).
    pub fn allocate_preferring(
        &mut self,
        desktop: &str,
        host: &str,
        range: PortRange,
        preferred: Option<u16>,
    ) -> Result<u16, PortError> {
        if self.desktops.contains_key(desktop) || range.is_empty() {
            return self.allocate(desktop, host, range);
        }
        match preferred {
            Some(p)
                if (range.first..=range.last).contains(&p) && self.holder(host, p).is_none() =>
            {
                self.insert(desktop, host, p);
                Ok(p)
            }
            _ => self.allocate(desktop, host, range),
        }
    }

    /// Records that `desktop` holds `port` on `host` (as its status says), replacing what the
    /// ledger held for it. Refused (`false`, nothing changed) when another desktop holds it.
    pub fn adopt(&mut self, desktop: &str, host: &str, port: u16) -> bool {
        match self.holder(host, port) {
            Some(holder) => holder == desktop,
            None => {
                self.release(desktop);
                self.insert(desktop, host, port);
                true
            }
        }
    }

    /// Frees the port of `desktop`, returning the host and port it held.
    pub fn release(&mut self, desktop: &str) -> Option<(String, u16)> {
        let (host, port) = self.desktops.remove(desktop)?;
        if let Some(ports) = self.hosts.get_mut(&host) {
            ports.remove(&port);
            if ports.is_empty() {
                self.hosts.remove(&host);
            }
        }
        Some((host, port))
    }

    /// The host and port `desktop` holds.
    pub fn port_of(&self, desktop: &str) -> Option<(&str, u16)> {
        self.desktops
            .get(desktop)
            .map(|(host, port)| (host.as_str(), *port))
    }

    /// Key of the desktop holding `port` on `host`.
    pub fn holder(&self, host: &str, port: u16) -> Option<&str> {
        self.hosts.get(host)?.get(&port).map(String::as_str)
    }

    /// Every port held on `host`, with its holder.
    pub fn held_on(&self, host: &str) -> impl Iterator<Item = (u16, &str)> + '_ {
        self.hosts
            .get(host)
            .into_iter()
            .flat_map(|ports| ports.iter().map(|(p, h)| (*p, h.as_str())))
    }

    /// How many ports of `range` are held on `host`.
    pub fn in_use(&self, host: &str, range: PortRange) -> u32 {
        if range.is_empty() {
            return 0;
        }
        self.hosts.get(host).map_or(0, |ports| {
            let inside = |p: Option<(&u16, &String)>| {
                p.is_some_and(|(p, _)| (range.first..=range.last).contains(p))
            };
            // Ports held from an earlier range are the exception: only then are they counted one
            // by one (placement asks this of every host of the pool on each bind).
            let n = if inside(ports.first_key_value()) && inside(ports.last_key_value()) {
                ports.len()
            } else {
                ports.range(range.first..=range.last).count()
            };
            u32::try_from(n).unwrap_or(u32::MAX)
        })
    }

    /// How many holders whose key begins with `prefix` hold a port (in key order, so this
    /// reads only those).
    pub fn holders_prefixed(&self, prefix: &str) -> usize {
        use std::ops::Bound;
        self.desktops
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .count()
    }

    /// How many desktops hold a port.
    pub fn len(&self) -> usize {
        self.desktops.len()
    }

    /// Whether no desktop holds a port.
    pub fn is_empty(&self) -> bool {
        self.desktops.is_empty()
    }

    /// Every (desktop, host, port) held, ordered by host then port.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str, u16)> + '_ {
        self.hosts.iter().flat_map(|(host, ports)| {
            ports
                .iter()
                .map(move |(port, desktop)| (desktop.as_str(), host.as_str(), *port))
        })
    }

    /// Replaces the ledger's contents with `bindings`, oldest first. A binding whose (host, port)
    /// an older one holds is refused and reported as [`Conflict::Taken`]; a desktop listed twice
    /// keeps its oldest binding and the rest are reported as [`Conflict::Invalid`].
    pub fn rebuild(&mut self, bindings: impl IntoIterator<Item = PortBinding>) -> Vec<Conflict> {
        self.hosts.clear();
        self.desktops.clear();
        let mut sorted: Vec<PortBinding> = bindings.into_iter().collect();
        sorted.sort_by(|a, b| {
            (&a.seniority, &a.desktop, &a.host, a.port).cmp(&(
                &b.seniority,
                &b.desktop,
                &b.host,
                b.port,
            ))
        });
        let mut conflicts = Vec::new();
        for b in sorted {
            if let Some((host, port)) = self.desktops.get(&b.desktop) {
                if *host != b.host || *port != b.port {
                    conflicts.push(Conflict::Invalid {
                        owner: b.desktop,
                        value: format!("{}:{}", b.host, b.port),
                        problem: format!(
                            "the desktop is already recorded with port {port} on host {host}"
                        ),
                    });
                }
                continue;
            }
            if let Some(holder) = self.holder(&b.host, b.port) {
                conflicts.push(Conflict::Taken {
                    resource: Resource::Port {
                        host: b.host,
                        port: b.port,
                    },
                    holder: holder.to_owned(),
                    loser: b.desktop,
                });
                continue;
            }
            self.insert(&b.desktop, &b.host, b.port);
        }
        conflicts
    }

    fn insert(&mut self, desktop: &str, host: &str, port: u16) {
        self.desktops
            .insert(desktop.to_owned(), (host.to_owned(), port));
        match self.hosts.entry(host.to_owned()) {
            Entry::Occupied(mut e) => {
                e.get_mut().insert(port, desktop.to_owned());
            }
            Entry::Vacant(e) => {
                e.insert(BTreeMap::from([(port, desktop.to_owned())]));
            }
        }
    }

    /// The lowest port of `range` nobody holds on `host`; walks only the held ports.
    fn lowest_free(&self, host: &str, range: PortRange) -> Option<u16> {
        let mut next = u32::from(range.first);
        if let Some(held) = self.hosts.get(host) {
            for port in held
                .range(range.first..=range.last)
                .map(|(p, _)| u32::from(*p))
            {
                if port != next {
                    break;
                }
                next += 1;
            }
        }
        u16::try_from(next).ok().filter(|p| *p <= range.last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(first: u16, last: u16) -> PortRange {
        PortRange { first, last }
    }

    fn binding(desktop: &str, created: i64, host: &str, port: u16) -> PortBinding {
        PortBinding {
            desktop: desktop.into(),
            seniority: Seniority::new(created, desktop),
            host: host.into(),
            port,
        }
    }

    #[test]
    fn hands_out_the_lowest_free_port_per_host() -> Result<(), PortError> {
        let mut l = PortLedger::new();
        let r = range(5900, 5999);
        assert_eq!(l.allocate("a", "h1", r)?, 5900);
        assert_eq!(l.allocate("b", "h1", r)?, 5901);
        assert_eq!(l.allocate("c", "h2", r)?, 5900, "ports are per host");
        assert_eq!(l.release("a"), Some(("h1".into(), 5900)));
        assert_eq!(
            l.allocate("d", "h1", r)?,
            5900,
            "a released port is reused first"
        );
        assert_eq!(l.in_use("h1", r), 2);
        Ok(())
    }

    #[test]
    fn ports_in_use_count_only_those_of_the_range() -> Result<(), PortError> {
        let mut l = PortLedger::new();
        let (old, new) = (range(5900, 5999), range(6000, 6099));
        assert_eq!(l.allocate("a", "h1", old)?, 5900);
        assert_eq!(l.allocate("b", "h1", new)?, 6000);
        assert_eq!(l.allocate("c", "h1", new)?, 6001);
        assert_eq!(
            l.in_use("h1", new),
            2,
            "a port of an earlier range is not counted"
        );
        assert_eq!(l.in_use("h1", old), 1);
        assert_eq!(l.in_use("h1", range(5900, 6099)), 3);
        assert_eq!(l.in_use("h2", new), 0);
        l.release("a");
        assert_eq!(l.in_use("h1", new), 2);
        Ok(())
    }

    #[test]
    fn holders_are_counted_by_the_beginning_of_their_key() -> Result<(), PortError> {
        let mut l = PortLedger::new();
        let r = range(5900, 5999);
        for d in ["x:h1:1", "x:h1:2", "x:h10:1", "y:h1:1", "x:h"] {
            l.allocate(d, "h", r)?;
        }
        assert_eq!(l.holders_prefixed("x:h1:"), 2);
        assert_eq!(l.holders_prefixed("x:h"), 4);
        assert_eq!(l.holders_prefixed("z"), 0);
        Ok(())
    }

    #[test]
    fn same_desktop_gets_the_same_port() -> Result<(), PortError> {
        let mut l = PortLedger::new();
        let r = range(5900, 5901);
        let first = l.allocate("a", "h1", r)?;
        assert_eq!(l.allocate("a", "h1", r)?, first);
        assert_eq!(
            l.allocate("a", "h1", range(7000, 7010))?,
            first,
            "range change keeps the port"
        );
        assert_eq!(l.len(), 1);
        Ok(())
    }

    #[test]
    fn refuses_a_second_host_for_one_desktop() -> Result<(), PortError> {
        let mut l = PortLedger::new();
        l.allocate("a", "h1", range(5900, 5901))?;
        assert_eq!(
            l.allocate("a", "h2", range(5900, 5901)),
            Err(PortError::BoundElsewhere {
                desktop: "a".into(),
                host: "h1".into(),
                port: 5900
            })
        );
        Ok(())
    }

    #[test]
    fn exhaustion_and_reversed_range_are_errors() -> Result<(), PortError> {
        let mut l = PortLedger::new();
        let r = range(5900, 5901);
        l.allocate("a", "h1", r)?;
        l.allocate("b", "h1", r)?;
        let err = l.allocate("c", "h1", r);
        assert_eq!(
            err,
            Err(PortError::Exhausted {
                host: "h1".into(),
                first: 5900,
                last: 5901
            })
        );
        assert_eq!(
            err.map_err(|e| e.to_string()),
            Err("all 2 SPICE ports 5900-5901 on host h1 are in use".into())
        );
        assert_eq!(
            l.allocate("c", "h1", range(6000, 5999)),
            Err(PortError::InvalidRange {
                first: 6000,
                last: 5999
            })
        );
        Ok(())
    }

    #[test]
    fn the_top_of_the_port_space_does_not_overflow() -> Result<(), PortError> {
        let mut l = PortLedger::new();
        let r = range(65535, 65535);
        assert_eq!(l.allocate("a", "h", r)?, 65535);
        assert!(matches!(
            l.allocate("b", "h", r),
            Err(PortError::Exhausted { .. })
        ));
        Ok(())
    }

    #[test]
    fn fills_gaps_left_by_a_rebuild() -> Result<(), PortError> {
        let mut l = PortLedger::new();
        let conflicts = l.rebuild([binding("a", 1, "h", 5900), binding("b", 2, "h", 5902)]);
        assert!(conflicts.is_empty());
        assert_eq!(l.allocate("c", "h", range(5900, 5910))?, 5901);
        assert_eq!(l.allocate("d", "h", range(5900, 5910))?, 5903);
        Ok(())
    }

    #[test]
    fn rebuild_keeps_the_older_binding_and_reports_the_younger() {
        let mut l = PortLedger::new();
        let conflicts = l.rebuild([
            binding("young", 20, "h", 5900),
            binding("old", 10, "h", 5900),
            binding("other-host", 30, "h2", 5900),
        ]);
        assert_eq!(
            conflicts,
            vec![Conflict::Taken {
                resource: Resource::Port {
                    host: "h".into(),
                    port: 5900
                },
                holder: "old".into(),
                loser: "young".into(),
            }]
        );
        assert_eq!(l.holder("h", 5900), Some("old"));
        assert_eq!(l.port_of("young"), None);
        assert_eq!(l.port_of("other-host"), Some(("h2", 5900)));
    }

    #[test]
    fn rebuild_replaces_previous_contents() {
        let mut l = PortLedger::new();
        l.rebuild([binding("a", 1, "h", 5900)]);
        l.rebuild([binding("b", 1, "h", 5901)]);
        assert_eq!(l.iter().collect::<Vec<_>>(), vec![("b", "h", 5901)]);
    }

    #[test]
    fn a_desktop_listed_twice_keeps_one_binding() {
        let mut l = PortLedger::new();
        let conflicts = l.rebuild([binding("a", 1, "h", 5900), binding("a", 1, "h", 5901)]);
        assert_eq!(conflicts.len(), 1);
        assert_eq!(conflicts[0].loser(), "a");
        assert_eq!(l.len(), 1);
        assert_eq!(l.port_of("a"), Some(("h", 5900)));
    }
}
