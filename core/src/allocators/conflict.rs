//! What a ledger rebuild reports when two desktops (or hosts) claim one resource, and which
//! claim keeps it: the oldest, by creation time then UID.

use std::fmt;

use super::macs::Mac;
use super::subnets::HostSubnet;

/// How old a claim is. Rebuilds replay claims oldest first, so the oldest keeps a contested
/// resource. Build it from `metadata.creationTimestamp` (seconds) and `metadata.uid`.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Seniority {
    /// Creation time in seconds since the epoch; older sorts first.
    pub created: i64,
    /// The object's UID, which breaks ties between objects created in the same second.
    pub uid: String,
}

impl Seniority {
    /// A seniority from a creation time and a UID.
    pub fn new(created: i64, uid: impl Into<String>) -> Self {
        Self {
            created,
            uid: uid.into(),
        }
    }
}

/// A resource the ledger hands out.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    /// A SPICE port on a host.
    Port {
        /// The host.
        host: String,
        /// The port.
        port: u16,
    },
    /// A MAC address in the pool.
    Mac(Mac),
    /// A host subnet in the pool's CIDR.
    Subnet(HostSubnet),
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resource::Port { host, port } => write!(f, "SPICE port {port} on host {host}"),
            Resource::Mac(mac) => write!(f, "MAC {mac}"),
            Resource::Subnet(subnet) => write!(f, "subnet {subnet}"),
        }
    }
}

/// A claim found during a rebuild that the ledger did not accept. The loser's recorded value must
/// be replaced: the operator allocates it again and records an Event on the object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Conflict {
    /// `loser` claimed a resource an older claim (`holder`) already holds.
    Taken {
        /// The contested resource.
        resource: Resource,
        /// Key of the older claim, which keeps the resource.
        holder: String,
        /// Key of the younger claim, which must be re-homed.
        loser: String,
    },
    /// `owner` recorded a value the ledger cannot hold (malformed, or outside the pool's plan).
    Invalid {
        /// Key of the claim.
        owner: String,
        /// The recorded value, as written.
        value: String,
        /// Why it was refused.
        problem: String,
    },
}

impl Conflict {
    /// Key of the desktop or host whose recorded value must be replaced.
    pub fn loser(&self) -> &str {
        match self {
            Conflict::Taken { loser, .. } => loser,
            Conflict::Invalid { owner, .. } => owner,
        }
    }

    /// CamelCase reason for an Event.
    pub fn reason(&self) -> &'static str {
        match self {
            Conflict::Taken { .. } => "AllocationConflict",
            Conflict::Invalid { .. } => "InvalidAllocation",
        }
    }
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Conflict::Taken {
                resource,
                holder,
                loser,
            } => {
                write!(
                    f,
                    "{resource} is held by older {holder}; {loser} must be re-allocated"
                )
            }
            Conflict::Invalid {
                owner,
                value,
                problem,
            } => {
                write!(
                    f,
                    "{owner} recorded {value:?}, which cannot be kept: {problem}"
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_sorts_first_and_uid_breaks_ties() {
        let mut v = [
            Seniority::new(5, "b"),
            Seniority::new(5, "a"),
            Seniority::new(1, "z"),
        ];
        v.sort();
        assert_eq!(
            v,
            [
                Seniority::new(1, "z"),
                Seniority::new(5, "a"),
                Seniority::new(5, "b")
            ]
        );
    }

    #[test]
    fn messages_name_both_sides() {
        let c = Conflict::Taken {
            resource: Resource::Port {
                host: "h1".into(),
                port: 5901,
            },
            holder: "old".into(),
            loser: "new".into(),
        };
        assert_eq!(c.loser(), "new");
        assert_eq!(
            c.to_string(),
            "SPICE port 5901 on host h1 is held by older old; new must be re-allocated"
        );
    }
}
