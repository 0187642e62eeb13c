//! Decides how a duplicate binding is repaired: when a desktop's recorded SPICE port (on its
//! host) or MAC is held in the ledger by another desktop (a late binding of a fenced-out
//! leader that landed), the younger claim moves, as a ledger rebuild would decide (by
//! [`Seniority`]: creation time, then UID). A holder the cache does not know as a desktop (an
//! orphan domain still running on the host, or one just deleted) keeps what it holds.

use crate::allocators::{Ledger, Mac, Resource, Seniority};

/// A resource a desktop recorded that another claim holds in the ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Duplicate {
    pub resource: Resource,
    /// Key (UID) of the ledger's holder.
    pub holder: String,
}

/// What `desktop` recorded (`port` on `host`, `mac`) that the ledger gives to someone else.
pub fn duplicates(
    ledger: &Ledger,
    desktop: &str,
    host: &str,
    port: u16,
    mac: &str,
) -> Vec<Duplicate> {
    let mut out = Vec::new();
    if let Some(holder) = ledger.ports().holder(host, port).filter(|h| *h != desktop) {
        out.push(Duplicate {
            resource: Resource::Port {
                host: host.to_string(),
                port,
            },
            holder: holder.to_string(),
        });
    }
    if let Ok(m) = mac.parse::<Mac>()
        && let Some(holder) = ledger.macs().holder(m).filter(|h| *h != desktop)
    {
        out.push(Duplicate {
            resource: Resource::Mac(m),
            holder: holder.to_string(),
        });
    }
    out
}

/// Whose binding moves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Repair {
    /// This desktop is the younger claim (of at least one duplicate): it gets new values, the
    /// holders keep theirs.
    MoveMine,
    /// Every holder is younger: they lose the contested values (and get new ones on their next
    /// pass); this desktop keeps what it recorded.
    MoveTheirs(Vec<String>),
}

/// The repair of `mine`'s duplicates, each with its holder's seniority (`None`: not a desktop
/// the cache knows, which keeps what it holds).
pub fn decide(mine: &Seniority, holders: &[(Duplicate, Option<Seniority>)]) -> Repair {
    let mut younger = Vec::new();
    for (dup, seniority) in holders {
        match seniority {
            Some(s) if s > mine => {
                if !younger.contains(&dup.holder) {
                    younger.push(dup.holder.clone());
                }
            }
            _ => return Repair::MoveMine,
        }
    }
    Repair::MoveTheirs(younger)
}

/// The Warning a repair deserves, on the desktop that moves: both desktops and the resource,
/// the new values, and what becomes of a running domain.
pub fn message(resource: &Resource, mover: &str, keeper: &str, port: u16, mac: &str) -> String {
    format!(
        "{resource} was recorded for both {mover} and {keeper}, which is older and keeps it; \
         {mover} now has SPICE port {port} and MAC {mac}. A running domain is not stopped: \
         it keeps its current port and MAC until it next starts"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocators::{Claim, NetworkSpec};

    fn ledger() -> Ledger {
        Ledger::read(&NetworkSpec::DEFAULT).unwrap_or_else(|e| panic!("{e}"))
    }

    fn bind(l: &mut Ledger, d: &str) -> (u16, String) {
        let b = l
            .bind(&Claim {
                desktop: d,
                host: "h",
                fixed_mac: None,
            })
            .unwrap_or_else(|e| panic!("{e}"));
        (b.port, b.mac.to_string())
    }

    #[test]
    fn finds_a_port_or_mac_someone_else_holds() {
        let mut l = ledger();
        let (p1, m1) = bind(&mut l, "old");
        let (p2, m2) = bind(&mut l, "young");
        assert!(duplicates(&l, "young", "h", p2, &m2).is_empty(), "its own");
        assert!(duplicates(&l, "young", "other-host", p1, &m2).is_empty());
        let dups = duplicates(&l, "young", "h", p1, &m1);
        assert_eq!(dups.len(), 2);
        assert!(dups.iter().all(|d| d.holder == "old"));
        assert_eq!(
            dups[0].resource,
            Resource::Port {
                host: "h".into(),
                port: p1
            }
        );
        assert_eq!(
            duplicates(&l, "young", "h", p2, &m1).len(),
            1,
            "the MAC only"
        );
        assert!(duplicates(&l, "young", "h", p2, "not-a-mac").is_empty());
    }

    #[test]
    fn the_younger_claim_moves() {
        let dup = |holder: &str| Duplicate {
            resource: Resource::Port {
                host: "h".into(),
                port: 5900,
            },
            holder: holder.into(),
        };
        let me = Seniority::new(10, "me");
        let older = Some(Seniority::new(5, "old"));
        let younger = Some(Seniority::new(20, "young"));
        let same_second = Some(Seniority::new(10, "zz"));
        assert_eq!(
            decide(&me, &[(dup("old"), older.clone())]),
            Repair::MoveMine
        );
        assert_eq!(
            decide(&me, &[(dup("young"), younger.clone())]),
            Repair::MoveTheirs(vec!["young".into()])
        );
        assert_eq!(
            decide(&me, &[(dup("zz"), same_second)]),
            Repair::MoveTheirs(vec!["zz".into()]),
            "ties by UID"
        );
        assert_eq!(
            decide(&me, &[(dup("young"), younger), (dup("old"), older)]),
            Repair::MoveMine,
            "an older holder of either resource wins"
        );
        assert_eq!(
            decide(&me, &[(dup("orphan"), None)]),
            Repair::MoveMine,
            "an unknown holder (orphan domain) keeps its port"
        );
    }
}
