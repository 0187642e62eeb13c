//! Decides what each host is charged, one desktop at a time: a desktop's charge (its host and
//! size) replaces the one it had, and only the hosts it left and joined are summed again, so
//! reading a host's usage never walks the pool's desktops.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use super::{Request, Usage};

/// FNV-1a as a `Hasher`: UIDs and host names are short, chosen by the apiserver and admins, and
/// looked up once per host on every placement, where SipHash costs more than the lookup.
#[derive(Clone, Copy, Debug)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// A map keyed by short names, hashed with [`Fnv`].
type Names<V> = HashMap<String, V, BuildHasherDefault<Fnv>>;

/// The desktops each host is charged for, and their sum.
#[derive(Clone, Debug, Default)]
struct HostCharges {
    desktops: BTreeMap<String, Request>,
    sum: Usage,
}

/// What each host is charged, kept one desktop at a time.
#[derive(Clone, Debug, Default)]
pub struct ChargeIndex {
    /// The host each charged desktop counts on, by desktop.
    hosts_of: Names<String>,
    hosts: Names<HostCharges>,
}

impl ChargeIndex {
    /// An index that charges nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `desktop` count `size` on `host`, or nothing (`None`). Returns whether that
    /// changed anything.
    pub fn set(&mut self, desktop: &str, charge: Option<(&str, Request)>) -> bool {
        if self.charge_of(desktop) == charge {
            return false;
        }
        if let Some(host) = self.hosts_of.remove(desktop)
            && let Some(h) = self.hosts.get_mut(&host)
        {
            h.desktops.remove(desktop);
            if h.desktops.is_empty() {
                self.hosts.remove(&host);
            } else {
                h.sum = Usage::of(h.desktops.values());
            }
        }
        if let Some((host, size)) = charge {
            self.hosts_of.insert(desktop.to_string(), host.to_string());
            let h = self.hosts.entry(host.to_string()).or_default();
            h.desktops.insert(desktop.to_string(), size);
            h.sum = Usage::of(h.desktops.values());
        }
        true
    }

    /// Where `desktop` counts, and how much.
    pub fn charge_of(&self, desktop: &str) -> Option<(&str, Request)> {
        let host = self.hosts_of.get(desktop)?;
        let size = self.hosts.get(host)?.desktops.get(desktop)?;
        Some((host.as_str(), *size))
    }

    /// What the desktops charged to `host` hold together.
    pub fn on(&self, host: &str) -> Usage {
        self.hosts.get(host).map(|h| h.sum).unwrap_or_default()
    }

    /// What the desktops charged to `host`, all but `except`, hold together.
    pub fn on_except(&self, host: &str, except: &str) -> Usage {
        match self.hosts.get(host) {
            Some(h) if h.desktops.contains_key(except) => Usage::of(
                h.desktops
                    .iter()
                    .filter(|(d, _)| *d != except)
                    .map(|(_, r)| r),
            ),
            Some(h) => h.sum,
            None => Usage::default(),
        }
    }

    /// The desktops charged anywhere.
    pub fn desktops(&self) -> impl Iterator<Item = &str> {
        self.hosts_of.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GI: u64 = 1 << 30;

    #[test]
    fn a_desktop_that_moves_leaves_its_old_host() {
        let mut index = ChargeIndex::new();
        assert!(index.set("a", Some(("h1", Request::new(2, 4 * GI)))));
        assert!(index.set("b", Some(("h1", Request::new(1, GI)))));
        assert!(!index.set("b", Some(("h1", Request::new(1, GI)))));
        assert_eq!(index.on("h1").memory, 5 * GI);
        assert!(index.set("a", Some(("h2", Request::new(2, 4 * GI)))));
        assert_eq!((index.on("h1").memory, index.on("h2").memory), (GI, 4 * GI));
        assert_eq!(index.on_except("h1", "b"), Usage::default());
        assert!(index.set("b", None));
        assert_eq!(index.on("h1"), Usage::default());
        assert_eq!(index.desktops().collect::<Vec<_>>(), ["a"]);
    }

    fn op() -> impl Strategy<Value = (u8, Option<(u8, u32, u64, bool)>)> {
        (
            0u8..12,
            prop::option::of((0u8..4, 1u32..8, 1u64..16, any::<bool>())),
        )
    }

    proptest! {
        /// Whatever the order of changes, each host's usage is the sum of what the desktops
        /// charged to it hold: the same as counting them all again.
        #[test]
        fn sums_always_equal_a_full_count(ops in prop::collection::vec(op(), 1..200)) {
            let mut index = ChargeIndex::new();
            let mut model: BTreeMap<String, (String, Request)> = BTreeMap::new();
            for (d, charge) in ops {
                let desktop = format!("d{d}");
                let charge = charge.map(|(h, cpu, gi, dedicated)| {
                    let mut r = Request::new(cpu, gi * GI);
                    r.dedicated_cpus = dedicated;
                    (format!("h{h}"), r)
                });
                index.set(&desktop, charge.as_ref().map(|(h, r)| (h.as_str(), *r)));
                match charge {
                    Some(c) => model.insert(desktop, c),
                    None => model.remove(&desktop),
                };
                for h in 0..4 {
                    let host = format!("h{h}");
                    let want = Usage::of(model.values().filter(|(x, _)| *x == host).map(|(_, r)| r));
                    prop_assert_eq!(index.on(&host), want);
                    for d in 0..12 {
                        let except = format!("d{d}");
                        let want = Usage::of(
                            model.iter().filter(|(k, (x, _))| *x == host && **k != except).map(|(_, (_, r))| r),
                        );
                        prop_assert_eq!(index.on_except(&host, &except), want);
                    }
                }
            }
        }
    }
}
