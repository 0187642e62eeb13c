//! Which MAC address each desktop of a pool holds: a fixed one from `spec.network.mac`, else one
//! under the pool's 3-octet prefix derived from the desktop UID and probed linearly on collision.
//! Unique across the pool, unicast only, the same for a desktop until it is released.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use super::conflict::{Conflict, Resource, Seniority};
use super::fnv::fnv1a64;

/// How many addresses one prefix holds (the three free octets).
const SUFFIXES: u32 = 1 << 24;

/// A 48-bit MAC address, written lowercase as `52:54:00:ab:cd:ef`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac([u8; 6]);

impl Mac {
    /// A MAC from its six octets.
    pub const fn new(octets: [u8; 6]) -> Self {
        Self(octets)
    }

    /// The six octets.
    pub const fn octets(&self) -> [u8; 6] {
        self.0
    }

    /// Whether the address names one interface (the group bit of the first octet is clear).
    /// Broadcast and multicast addresses are not unicast.
    pub const fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0
    }

    fn from_prefix(prefix: MacPrefix, suffix: u32) -> Self {
        let [_, a, b, c] = suffix.to_be_bytes();
        let [p0, p1, p2] = prefix.0;
        Self([p0, p1, p2, a, b, c])
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mac({self})")
    }
}

impl FromStr for Mac {
    type Err = MacError;

    /// Reads six colon-separated hex octets, in either case.
    fn from_str(s: &str) -> Result<Self, MacError> {
        parse_octets::<6>(s)
            .map(Self)
            .ok_or_else(|| MacError::Malformed(s.to_owned()))
    }
}

/// The first three octets shared by every generated MAC of a pool, such as `52:54:00`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct MacPrefix([u8; 3]);

impl MacPrefix {
    /// The three octets.
    pub const fn octets(&self) -> [u8; 3] {
        self.0
    }
}

impl FromStr for MacPrefix {
    type Err = MacError;

    /// Reads three colon-separated hex octets; refuses a multicast first octet, because every
    /// address under such a prefix would be multicast.
    fn from_str(s: &str) -> Result<Self, MacError> {
        let octets = parse_octets::<3>(s).ok_or_else(|| MacError::MalformedPrefix(s.to_owned()))?;
        if octets[0] & 1 == 1 {
            return Err(MacError::MulticastPrefix(s.to_owned()));
        }
        Ok(Self(octets))
    }
}

impl fmt::Display for MacPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}")
    }
}

fn parse_octets<const N: usize>(s: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    let mut parts = s.split(':');
    for slot in &mut out {
        let part = parts.next()?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *slot = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Why a MAC could not be read or handed out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    /// Not six colon-separated hex octets.
    #[error("{0:?} is not a MAC address like 52:54:00:12:34:56")]
    Malformed(String),
    /// Not three colon-separated hex octets.
    #[error("{0:?} is not a MAC prefix like 52:54:00")]
    MalformedPrefix(String),
    /// The prefix's first octet has the group bit set.
    #[error("MAC prefix {0:?} is multicast; its first octet must be even")]
    MulticastPrefix(String),
    /// A fixed MAC is a broadcast or multicast address.
    #[error("MAC {0} is multicast or broadcast; a desktop needs a unicast address")]
    NotUnicast(Mac),
    /// A fixed MAC is already held by another desktop of the pool.
    #[error("MAC {mac} is already used by desktop {holder} in this pool")]
    Collision {
        /// The contested MAC.
        mac: Mac,
        /// Key of the desktop holding it.
        holder: String,
    },
    /// Every address under the prefix is held.
    #[error("all addresses under MAC prefix {0} are in use")]
    Exhausted(MacPrefix),
}

impl MacError {
    /// Short category for metrics and Events.
    pub fn category(&self) -> &'static str {
        match self {
            MacError::Malformed(_) | MacError::NotUnicast(_) => "InvalidMAC",
            MacError::MalformedPrefix(_) | MacError::MulticastPrefix(_) => "InvalidMACPrefix",
            MacError::Collision { .. } => "MACCollision",
            MacError::Exhausted(_) => "MACsExhausted",
        }
    }
}

/// A MAC recorded in a desktop's status, replayed by [`MacLedger::rebuild`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MacBinding {
    /// Key of the desktop (its UID).
    pub desktop: String,
    /// Age of the desktop; the oldest keeps a contested MAC.
    pub seniority: Seniority,
    /// The MAC as recorded.
    pub mac: String,
}

/// The MACs held by the desktops of one pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MacLedger {
    prefix: MacPrefix,
    macs: BTreeMap<Mac, String>,
    desktops: BTreeMap<String, Mac>,
}

impl MacLedger {
    /// An empty ledger generating addresses under `prefix`.
    pub fn new(prefix: MacPrefix) -> Self {
        Self {
            prefix,
            macs: BTreeMap::new(),
            desktops: BTreeMap::new(),
        }
    }

    /// The prefix generated addresses start with.
    pub fn prefix(&self) -> MacPrefix {
        self.prefix
    }

    /// The MAC of `desktop`, whose key should be its UID.
    ///
    /// With `fixed` (from `spec.network.mac`) the desktop gets exactly that address, or
    /// [`MacError::Collision`] when another desktop holds it. Without, it keeps the MAC it holds,
    /// else gets the candidate derived from its key, probing upwards past held addresses.
    pub fn allocate(&mut self, desktop: &str, fixed: Option<&str>) -> Result<Mac, MacError> {
        let current = self.desktops.get(desktop).copied();
        let mac = match fixed {
            Some(text) => {
                let mac: Mac = text.parse()?;
                if !mac.is_unicast() {
                    return Err(MacError::NotUnicast(mac));
                }
                if current == Some(mac) {
                    return Ok(mac);
                }
                if let Some(holder) = self.macs.get(&mac) {
                    return Err(MacError::Collision {
                        mac,
                        holder: holder.clone(),
                    });
                }
                mac
            }
            None => match current {
                Some(mac) => return Ok(mac),
                None => self.probe(desktop)?,
            },
        };
        self.release(desktop);
        self.macs.insert(mac, desktop.to_owned());
        self.desktops.insert(desktop.to_owned(), mac);
        Ok(mac)
    }

    /// Records that `desktop` holds `mac` (as its status says), replacing what the ledger held
    /// for it. Refused (`false`, nothing changed) when the MAC is malformed, not unicast, or
    /// held by another desktop.
    pub fn adopt(&mut self, desktop: &str, mac: &str) -> bool {
        let Ok(mac) = mac.parse::<Mac>() else {
            return false;
        };
        if !mac.is_unicast() {
            return false;
        }
        match self.macs.get(&mac) {
            Some(holder) => holder == desktop,
            None => {
                self.release(desktop);
                self.macs.insert(mac, desktop.to_owned());
                self.desktops.insert(desktop.to_owned(), mac);
                true
            }
        }
    }

    /// The address a fresh ledger would give `desktop` first.
    pub fn candidate(&self, desktop: &str) -> Mac {
        Mac::from_prefix(self.prefix, fold24(fnv1a64(desktop.as_bytes())))
    }

    /// Frees the MAC of `desktop`, returning it.
    pub fn release(&mut self, desktop: &str) -> Option<Mac> {
        let mac = self.desktops.remove(desktop)?;
        self.macs.remove(&mac);
        Some(mac)
    }

    /// The MAC `desktop` holds.
    pub fn mac_of(&self, desktop: &str) -> Option<Mac> {
        self.desktops.get(desktop).copied()
    }

    /// Key of the desktop holding `mac`.
    pub fn holder(&self, mac: Mac) -> Option<&str> {
        self.macs.get(&mac).map(String::as_str)
    }

    /// How many desktops hold a MAC.
    pub fn len(&self) -> usize {
        self.desktops.len()
    }

    /// Whether no desktop holds a MAC.
    pub fn is_empty(&self) -> bool {
        self.desktops.is_empty()
    }

    /// Every (desktop, MAC) held, ordered by MAC.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Mac)> + '_ {
        self.macs
            .iter()
            .map(|(mac, desktop)| (desktop.as_str(), *mac))
    }

    /// Replaces the ledger's contents with `bindings`, oldest first. A MAC an older desktop holds
    /// is reported as [`Conflict::Taken`]; a malformed or multicast MAC, or a second MAC for one
    /// desktop, as [`Conflict::Invalid`].
    pub fn rebuild(&mut self, bindings: impl IntoIterator<Item = MacBinding>) -> Vec<Conflict> {
        self.macs.clear();
        self.desktops.clear();
        let mut sorted: Vec<MacBinding> = bindings.into_iter().collect();
        sorted.sort_by(|a, b| {
            (&a.seniority, &a.desktop, &a.mac).cmp(&(&b.seniority, &b.desktop, &b.mac))
        });
        let mut conflicts = Vec::new();
        for b in sorted {
            let mac = match b.mac.parse::<Mac>() {
                Ok(mac) if mac.is_unicast() => mac,
                Ok(_) => {
                    conflicts.push(invalid(b, "it is multicast or broadcast".into()));
                    continue;
                }
                Err(e) => {
                    let problem = e.to_string();
                    conflicts.push(invalid(b, problem));
                    continue;
                }
            };
            if let Some(held) = self.desktops.get(&b.desktop) {
                if *held != mac {
                    let problem = format!("the desktop is already recorded with MAC {held}");
                    conflicts.push(invalid(b, problem));
                }
                continue;
            }
            if let Some(holder) = self.macs.get(&mac) {
                conflicts.push(Conflict::Taken {
                    resource: Resource::Mac(mac),
                    holder: holder.clone(),
                    loser: b.desktop,
                });
                continue;
            }
            self.macs.insert(mac, b.desktop.clone());
            self.desktops.insert(b.desktop, mac);
        }
        conflicts
    }

    fn probe(&self, desktop: &str) -> Result<Mac, MacError> {
        let start = fold24(fnv1a64(desktop.as_bytes()));
        (0..SUFFIXES)
            .map(|step| Mac::from_prefix(self.prefix, (start + step) % SUFFIXES))
            .find(|mac| !self.macs.contains_key(mac))
            .ok_or(MacError::Exhausted(self.prefix))
    }
}

fn invalid(b: MacBinding, problem: String) -> Conflict {
    Conflict::Invalid {
        owner: b.desktop,
        value: b.mac,
        problem,
    }
}

/// Folds a 64-bit hash into the 24 bits of a MAC suffix, keeping every input bit in play.
fn fold24(hash: u64) -> u32 {
    let folded = (hash ^ (hash >> 24) ^ (hash >> 48)) & u64::from(SUFFIXES - 1);
    // The mask keeps 24 bits, so this never falls back.
    u32::try_from(folded).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger() -> MacLedger {
        MacLedger::new(MacPrefix([0x52, 0x54, 0x00]))
    }

    fn binding(desktop: &str, created: i64, mac: &str) -> MacBinding {
        MacBinding {
            desktop: desktop.into(),
            seniority: Seniority::new(created, desktop),
            mac: mac.into(),
        }
    }

    #[test]
    fn parses_and_prints_lowercase() -> Result<(), MacError> {
        let mac: Mac = "52:54:00:AB:cd:0F".parse()?;
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:01",
            "52-54-00-ab-cd-ef",
            "52:54:00:ab:cd:e",
            "g2:54:00:ab:cd:ef",
            "+2:54:00:ab:cd:ef",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad} should be refused");
        }
        Ok(())
    }

    #[test]
    fn prefixes_must_be_unicast() -> Result<(), MacError> {
        assert_eq!("52:54:00".parse::<MacPrefix>()?.to_string(), "52:54:00");
        assert_eq!(
            "01:00:5e".parse::<MacPrefix>(),
            Err(MacError::MulticastPrefix("01:00:5e".into()))
        );
        assert!("52:54".parse::<MacPrefix>().is_err());
        Ok(())
    }

    #[test]
    fn derives_a_stable_address_under_the_prefix() -> Result<(), MacError> {
        let mut a = ledger();
        let mut b = ledger();
        let uid = "4f1c7a52-0d5e-4c55-9f3e-3e1f1d2c9b10";
        let mac = a.allocate(uid, None)?;
        assert_eq!(
            mac,
            b.allocate(uid, None)?,
            "the same UID gives the same MAC on a fresh ledger"
        );
        assert_eq!(mac, a.candidate(uid));
        assert_eq!(a.allocate(uid, None)?, mac, "allocation is idempotent");
        assert_eq!(mac.octets()[..3], [0x52, 0x54, 0x00]);
        assert!(mac.is_unicast());
        Ok(())
    }

    #[test]
    fn probes_past_a_held_candidate() -> Result<(), MacError> {
        let mut l = ledger();
        let wanted = l.candidate("b");
        l.allocate("a", Some(&wanted.to_string()))?;
        let got = l.allocate("b", None)?;
        let [.., x, y, z] = wanted.octets();
        let next = (u32::from_be_bytes([0, x, y, z]) + 1) % SUFFIXES;
        assert_eq!(got, Mac::from_prefix(l.prefix(), next));
        Ok(())
    }

    #[test]
    fn honours_a_fixed_mac_and_reports_a_collision() -> Result<(), MacError> {
        let mut l = ledger();
        let fixed = "02:00:00:00:00:01";
        assert_eq!(l.allocate("a", Some(fixed))?.to_string(), fixed);
        assert_eq!(
            l.allocate("a", Some(fixed))?.to_string(),
            fixed,
            "idempotent"
        );
        let err = l.allocate("b", Some("02:00:00:00:00:01"));
        assert_eq!(
            err,
            Err(MacError::Collision {
                mac: fixed.parse()?,
                holder: "a".into()
            })
        );
        assert_eq!(
            err.map_err(|e| e.to_string()),
            Err("MAC 02:00:00:00:00:01 is already used by desktop a in this pool".into())
        );
        Ok(())
    }

    #[test]
    fn refuses_broadcast_and_multicast_fixed_macs() {
        let mut l = ledger();
        for bad in [
            "ff:ff:ff:ff:ff:ff",
            "01:00:5e:00:00:01",
            "33:33:00:00:00:01",
        ] {
            assert!(
                matches!(l.allocate("a", Some(bad)), Err(MacError::NotUnicast(_))),
                "{bad}"
            );
        }
        assert!(l.is_empty());
    }

    #[test]
    fn changing_the_fixed_mac_moves_the_desktop() -> Result<(), MacError> {
        let mut l = ledger();
        let first = l.allocate("a", None)?;
        let fixed = l.allocate("a", Some("02:00:00:00:00:09"))?;
        assert_ne!(first, fixed);
        assert_eq!(l.holder(first), None, "the old address is freed");
        assert_eq!(l.len(), 1);
        Ok(())
    }

    #[test]
    fn rebuild_keeps_the_older_and_reports_duplicates_and_junk() {
        let mut l = ledger();
        let conflicts = l.rebuild([
            binding("young", 9, "52:54:00:00:00:01"),
            binding("old", 1, "52:54:00:00:00:01"),
            binding("junk", 2, "not-a-mac"),
            binding("multi", 3, "01:00:5e:00:00:01"),
        ]);
        let losers: Vec<&str> = conflicts.iter().map(Conflict::loser).collect();
        assert_eq!(losers, ["junk", "multi", "young"]);
        assert_eq!(l.holder(Mac([0x52, 0x54, 0, 0, 0, 1])), Some("old"));
        assert_eq!(l.len(), 1);
    }
}
