//! Which subnet of the pool's IPv4 CIDR each host holds (one per host, `nodePrefixLength` long,
//! the lowest free one, the same for a host until released), and which addresses inside a host
//! subnet go to the gateway, the DHCP range and each desktop.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use super::conflict::{Conflict, Resource, Seniority};
use super::fnv::fnv1a64;
use super::macs::Mac;

/// Longest host prefix: a /30 still holds a gateway and one desktop.
pub const MAX_NODE_PREFIX: u8 = 30;

/// Why a CIDR or subnet could not be read or handed out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubnetError {
    /// Not `a.b.c.d/n` with n at most 32 and no host bits set.
    #[error("{value:?} is not an IPv4 CIDR like 10.200.0.0/16: {problem}")]
    InvalidCidr {
        /// The text as written.
        value: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// The host prefix is shorter than the pool's, or too long to hold a desktop.
    #[error(
        "nodePrefixLength {node_prefix} must be between the pool prefix /{pool_prefix} and /{max}",
        max = MAX_NODE_PREFIX
    )]
    InvalidNodePrefix {
        /// The requested host prefix length.
        node_prefix: u8,
        /// The pool CIDR's prefix length.
        pool_prefix: u8,
    },
    /// Every host subnet of the pool is held.
    #[error("all {count} /{node_prefix} subnets of {cidr} are assigned")]
    Exhausted {
        /// The pool CIDR.
        cidr: Ipv4Net,
        /// The host prefix length.
        node_prefix: u8,
        /// How many subnets the CIDR holds.
        count: u64,
    },
}

impl SubnetError {
    /// Short category for metrics and Events.
    pub fn category(&self) -> &'static str {
        match self {
            SubnetError::InvalidCidr { .. } => "InvalidCIDR",
            SubnetError::InvalidNodePrefix { .. } => "InvalidNodePrefix",
            SubnetError::Exhausted { .. } => "SubnetsExhausted",
        }
    }
}

/// An IPv4 network: an address with its host bits clear and a prefix length.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Ipv4Net {
    network: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Net {
    /// The network `network/prefix`, or `None` when the prefix exceeds 32 or host bits are set.
    pub fn new(network: Ipv4Addr, prefix: u8) -> Option<Self> {
        (prefix <= 32 && u32::from(network) & !mask(prefix) == 0)
            .then_some(Self { network, prefix })
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The last address (the broadcast address of a subnet).
    pub fn last(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !mask(self.prefix))
    }

    /// Whether `addr` lies inside the network.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & mask(self.prefix) == u32::from(self.network)
    }

    /// How many addresses the network spans.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Ipv4Net {
    type Err = SubnetError;

    /// Reads `a.b.c.d/n`. Host bits must be clear: `10.200.0.5/16` is refused rather than
    /// silently widened, so the pool says what it means.
    fn from_str(s: &str) -> Result<Self, SubnetError> {
        let bad = |problem| SubnetError::InvalidCidr {
            value: s.to_owned(),
            problem,
        };
        let (addr, len) = s.split_once('/').ok_or_else(|| bad("no /prefix length"))?;
        let network: Ipv4Addr = addr.parse().map_err(|_| bad("not an IPv4 address"))?;
        if len.is_empty() || len.len() > 2 || !len.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("the prefix length is not a number from 0 to 32"));
        }
        let prefix: u8 = len
            .parse()
            .map_err(|_| bad("the prefix length is not a number from 0 to 32"))?;
        if prefix > 32 {
            return Err(bad("the prefix length is not a number from 0 to 32"));
        }
        Self::new(network, prefix).ok_or_else(|| bad("host bits are set; use the network address"))
    }
}

fn mask(prefix: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0)
}

/// A host's subnet: at most a /30, so it always holds a gateway and at least one desktop.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct HostSubnet(Ipv4Net);

impl HostSubnet {
    /// `net` as a host subnet, or `None` when it is longer than a /30.
    pub fn new(net: Ipv4Net) -> Option<Self> {
        (net.prefix <= MAX_NODE_PREFIX).then_some(Self(net))
    }

    /// The network.
    pub fn net(&self) -> Ipv4Net {
        self.0
    }

    /// The host's address on the desktop network: the first address after the network address.
    pub fn gateway(&self) -> Ipv4Addr {
        self.offset(1)
    }

    /// The broadcast address.
    pub fn broadcast(&self) -> Ipv4Addr {
        self.0.last()
    }

    /// The first and last address DHCP may hand out: everything but network, gateway and
    /// broadcast.
    pub fn dhcp_range(&self) -> (Ipv4Addr, Ipv4Addr) {
        (
            self.offset(2),
            Ipv4Addr::from(u32::from(self.broadcast()) - 1),
        )
    }

    /// How many desktops the subnet can address.
    pub fn desktop_capacity(&self) -> u32 {
        // A host subnet spans 4 (a /30) to 2^32 addresses, so this always fits.
        u32::try_from(self.0.size() - 3).unwrap_or(u32::MAX)
    }

    /// The address of the `n`-th desktop (from 0), or `None` past the DHCP range.
    pub fn desktop_ip(&self, n: u32) -> Option<Ipv4Addr> {
        (n < self.desktop_capacity()).then(|| self.offset(2 + n))
    }

    /// A stable address for `mac`: derived from a hash of the MAC, probing upwards past the
    /// addresses in `in_use`. `None` when every desktop address is in use.
    pub fn ip_for(&self, mac: Mac, in_use: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        let capacity = u64::from(self.desktop_capacity());
        let start = fnv1a64(&mac.octets()) % capacity;
        (0..capacity)
            .filter_map(|step| u32::try_from((start + step) % capacity).ok())
            .filter_map(|n| self.desktop_ip(n))
            .find(|ip| !in_use.contains(ip))
    }

    fn offset(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.0.network).wrapping_add(n))
    }
}

impl fmt::Display for HostSubnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// How a pool CIDR is cut: consecutive subnets of `node_prefix` bits, numbered from 0.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SubnetPlan {
    pool: Ipv4Net,
    node_prefix: u8,
}

impl SubnetPlan {
    /// Cuts `pool` into `/node_prefix` subnets.
    pub fn new(pool: Ipv4Net, node_prefix: u8) -> Result<Self, SubnetError> {
        if node_prefix < pool.prefix || node_prefix > MAX_NODE_PREFIX {
            return Err(SubnetError::InvalidNodePrefix {
                node_prefix,
                pool_prefix: pool.prefix,
            });
        }
        Ok(Self { pool, node_prefix })
    }

    /// Parses the pool's `cidr` and cuts it into `/node_prefix` subnets.
    pub fn parse(cidr: &str, node_prefix: u8) -> Result<Self, SubnetError> {
        Self::new(cidr.parse()?, node_prefix)
    }

    /// The pool CIDR.
    pub fn pool(&self) -> Ipv4Net {
        self.pool
    }

    /// How many host subnets the CIDR holds.
    pub fn count(&self) -> u64 {
        1u64 << (self.node_prefix - self.pool.prefix)
    }

    /// The `index`-th subnet, or `None` past the end.
    pub fn nth(&self, index: u64) -> Option<HostSubnet> {
        if index >= self.count() {
            return None;
        }
        let step = 1u64 << (32 - u32::from(self.node_prefix));
        let start = u64::from(u32::from(self.pool.network)) + index * step;
        let net = Ipv4Net::new(Ipv4Addr::from(u32::try_from(start).ok()?), self.node_prefix)?;
        HostSubnet::new(net)
    }

    /// The index of `subnet` in this plan, or `None` when it is not one of its subnets.
    pub fn index_of(&self, subnet: Ipv4Net) -> Option<u64> {
        if subnet.prefix != self.node_prefix || !self.pool.contains(subnet.network) {
            return None;
        }
        let offset = u64::from(u32::from(subnet.network) - u32::from(self.pool.network));
        Some(offset >> (32 - u32::from(self.node_prefix)))
    }
}

/// A subnet recorded in a host's status, replayed by [`SubnetLedger::rebuild`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetBinding {
    /// The host (DomainNode name).
    pub host: String,
    /// Age of the host's DomainNode; the oldest keeps a contested subnet.
    pub seniority: Seniority,
    /// The subnet as recorded.
    pub subnet: String,
}

/// The subnets held by the hosts of one pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetLedger {
    plan: SubnetPlan,
    by_index: BTreeMap<u64, String>,
    by_host: BTreeMap<String, u64>,
}

impl SubnetLedger {
    /// An empty ledger over `plan`.
    pub fn new(plan: SubnetPlan) -> Self {
        Self {
            plan,
            by_index: BTreeMap::new(),
            by_host: BTreeMap::new(),
        }
    }

    /// The plan subnets come from.
    pub fn plan(&self) -> SubnetPlan {
        self.plan
    }

    /// The subnet of `host`: the one it holds, else the lowest free one.
    pub fn assign(&mut self, host: &str) -> Result<HostSubnet, SubnetError> {
        let index = match self.by_host.get(host) {
            Some(index) => *index,
            None => {
                let index = self.lowest_free().ok_or(SubnetError::Exhausted {
                    cidr: self.plan.pool,
                    node_prefix: self.plan.node_prefix,
                    count: self.plan.count(),
                })?;
                self.by_index.insert(index, host.to_owned());
                self.by_host.insert(host.to_owned(), index);
                index
            }
        };
        self.subnet(index)
    }

    /// Frees the subnet of `host`, returning it.
    pub fn release(&mut self, host: &str) -> Option<HostSubnet> {
        let index = self.by_host.remove(host)?;
        self.by_index.remove(&index);
        self.plan.nth(index)
    }

    /// The subnet `host` holds.
    pub fn subnet_of(&self, host: &str) -> Option<HostSubnet> {
        self.by_host
            .get(host)
            .and_then(|index| self.plan.nth(*index))
    }

    /// Every (host, subnet) held, in address order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, HostSubnet)> + '_ {
        self.by_index
            .iter()
            .filter_map(|(index, host)| self.plan.nth(*index).map(|s| (host.as_str(), s)))
    }

    /// Replaces the ledger's contents with `bindings`, oldest first. A subnet an older host holds
    /// is reported as [`Conflict::Taken`]; a malformed subnet or one outside the plan (the pool's
    /// CIDR or prefix changed) as [`Conflict::Invalid`].
    pub fn rebuild(&mut self, bindings: impl IntoIterator<Item = SubnetBinding>) -> Vec<Conflict> {
        self.by_index.clear();
        self.by_host.clear();
        let mut sorted: Vec<SubnetBinding> = bindings.into_iter().collect();
        sorted.sort_by(|a, b| {
            (&a.seniority, &a.host, &a.subnet).cmp(&(&b.seniority, &b.host, &b.subnet))
        });
        let mut conflicts = Vec::new();
        for b in sorted {
            let parsed = b
                .subnet
                .parse::<Ipv4Net>()
                .map_err(|e| e.to_string())
                .and_then(|net| {
                    self.plan.index_of(net).ok_or_else(|| {
                        format!(
                            "it is not a /{} subnet of {}",
                            self.plan.node_prefix, self.plan.pool
                        )
                    })
                });
            let index = match parsed {
                Ok(index) => index,
                Err(problem) => {
                    conflicts.push(Conflict::Invalid {
                        owner: b.host,
                        value: b.subnet,
                        problem,
                    });
                    continue;
                }
            };
            if let Some(held) = self.by_host.get(&b.host) {
                if *held != index {
                    let problem = "the host is already recorded with another subnet".to_owned();
                    conflicts.push(Conflict::Invalid {
                        owner: b.host,
                        value: b.subnet,
                        problem,
                    });
                }
                continue;
            }
            if let Some(holder) = self.by_index.get(&index) {
                if let Some(subnet) = self.plan.nth(index) {
                    conflicts.push(Conflict::Taken {
                        resource: Resource::Subnet(subnet),
                        holder: holder.clone(),
                        loser: b.host,
                    });
                }
                continue;
            }
            self.by_index.insert(index, b.host.clone());
            self.by_host.insert(b.host, index);
        }
        conflicts
    }

    fn subnet(&self, index: u64) -> Result<HostSubnet, SubnetError> {
        // Indexes come from `lowest_free` or `index_of`, so they are inside the plan.
        self.plan.nth(index).ok_or(SubnetError::Exhausted {
            cidr: self.plan.pool,
            node_prefix: self.plan.node_prefix,
            count: self.plan.count(),
        })
    }

    fn lowest_free(&self) -> Option<u64> {
        let mut next = 0u64;
        for index in self.by_index.keys() {
            if *index != next {
                break;
            }
            next += 1;
        }
        (next < self.plan.count()).then_some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(cidr: &str, node_prefix: u8) -> Result<SubnetPlan, SubnetError> {
        SubnetPlan::parse(cidr, node_prefix)
    }

    fn nth(p: &SubnetPlan, index: u64) -> HostSubnet {
        match p.nth(index) {
            Some(subnet) => subnet,
            None => panic!("{} has no subnet number {index}", p.pool()),
        }
    }

    fn binding(host: &str, created: i64, subnet: &str) -> SubnetBinding {
        SubnetBinding {
            host: host.into(),
            seniority: Seniority::new(created, host),
            subnet: subnet.into(),
        }
    }

    #[test]
    fn parses_cidrs_strictly() -> Result<(), SubnetError> {
        assert_eq!(
            "10.200.0.0/16".parse::<Ipv4Net>()?.to_string(),
            "10.200.0.0/16"
        );
        assert_eq!("0.0.0.0/0".parse::<Ipv4Net>()?.size(), 1 << 32);
        assert_eq!(
            "10.0.0.1/32".parse::<Ipv4Net>()?.last(),
            Ipv4Addr::new(10, 0, 0, 1)
        );
        for bad in [
            "10.200.0.0",
            "10.200.0.0/",
            "10.200.0.0/33",
            "10.200.0.0/+8",
            "10.200.0/16",
            "10.200.0.5/16",
            "10.200.0.0/016x",
            "300.0.0.0/8",
        ] {
            assert!(bad.parse::<Ipv4Net>().is_err(), "{bad} should be refused");
        }
        Ok(())
    }

    #[test]
    fn node_prefix_must_fit_the_pool() {
        assert_eq!(
            plan("10.200.0.0/16", 12),
            Err(SubnetError::InvalidNodePrefix {
                node_prefix: 12,
                pool_prefix: 16
            })
        );
        assert!(plan("10.200.0.0/16", 31).is_err());
        assert!(
            plan("10.200.0.0/16", 16).is_ok(),
            "one subnet for a single host is allowed"
        );
    }

    #[test]
    fn carves_the_lowest_free_subnet_per_host() -> Result<(), SubnetError> {
        let mut l = SubnetLedger::new(plan("10.200.0.0/16", 24)?);
        assert_eq!(l.assign("h1")?.to_string(), "10.200.0.0/24");
        assert_eq!(l.assign("h2")?.to_string(), "10.200.1.0/24");
        assert_eq!(
            l.assign("h1")?.to_string(),
            "10.200.0.0/24",
            "stable per host"
        );
        assert_eq!(
            l.release("h1").map(|s| s.to_string()),
            Some("10.200.0.0/24".into())
        );
        assert_eq!(
            l.assign("h3")?.to_string(),
            "10.200.0.0/24",
            "lowest free index first"
        );
        Ok(())
    }

    #[test]
    fn exhaustion_is_an_error() -> Result<(), SubnetError> {
        let mut l = SubnetLedger::new(plan("10.0.0.0/29", 30)?);
        l.assign("a")?;
        l.assign("b")?;
        let err = l.assign("c");
        assert!(matches!(err, Err(SubnetError::Exhausted { count: 2, .. })));
        assert_eq!(
            err.map_err(|e| e.to_string()),
            Err("all 2 /30 subnets of 10.0.0.0/29 are assigned".into())
        );
        Ok(())
    }

    #[test]
    fn plan_index_round_trips() -> Result<(), SubnetError> {
        let p = plan("10.200.0.0/16", 20)?;
        assert_eq!(p.count(), 16);
        for i in 0..p.count() {
            let s = nth(&p, i);
            assert_eq!(p.index_of(s.net()), Some(i));
        }
        assert_eq!(p.nth(16), None);
        assert_eq!(p.index_of("10.201.0.0/20".parse()?), None);
        assert_eq!(p.index_of("10.200.0.0/24".parse()?), None);
        Ok(())
    }

    #[test]
    fn the_whole_address_space_can_be_cut() -> Result<(), SubnetError> {
        let p = plan("0.0.0.0/0", 30)?;
        assert_eq!(p.count(), 1 << 30);
        assert_eq!(
            p.nth((1 << 30) - 1).map(|s| s.to_string()),
            Some("255.255.255.252/30".into())
        );
        Ok(())
    }

    #[test]
    fn host_subnet_addresses() -> Result<(), SubnetError> {
        let s = nth(&plan("10.200.0.0/16", 24)?, 3);
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 200, 3, 1));
        assert_eq!(s.broadcast(), Ipv4Addr::new(10, 200, 3, 255));
        assert_eq!(
            s.dhcp_range(),
            (Ipv4Addr::new(10, 200, 3, 2), Ipv4Addr::new(10, 200, 3, 254))
        );
        assert_eq!(s.desktop_capacity(), 253);
        assert_eq!(s.desktop_ip(0), Some(Ipv4Addr::new(10, 200, 3, 2)));
        assert_eq!(s.desktop_ip(252), Some(Ipv4Addr::new(10, 200, 3, 254)));
        assert_eq!(s.desktop_ip(253), None);

        let tiny = nth(&plan("10.0.0.0/30", 30)?, 0);
        assert_eq!(tiny.desktop_capacity(), 1);
        assert_eq!(
            tiny.dhcp_range(),
            (Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 2))
        );
        Ok(())
    }

    #[test]
    fn ip_for_mac_is_stable_and_avoids_used_addresses() -> Result<(), SubnetError> {
        let s = nth(&plan("10.0.0.0/29", 29)?, 0);
        let mac = Mac::new([0x52, 0x54, 0, 1, 2, 3]);
        let mut used = BTreeSet::new();
        let first = s.ip_for(mac, &used);
        assert_eq!(first, s.ip_for(mac, &used));
        let (lo, hi) = s.dhcp_range();
        for _ in 0..s.desktop_capacity() {
            let Some(ip) = s.ip_for(mac, &used) else {
                panic!("{s} ran out before its capacity")
            };
            assert!(ip >= lo && ip <= hi);
            assert!(used.insert(ip), "{ip} handed out twice");
        }
        assert_eq!(s.ip_for(mac, &used), None);
        Ok(())
    }

    #[test]
    fn rebuild_reports_duplicates_and_foreign_subnets() -> Result<(), SubnetError> {
        let mut l = SubnetLedger::new(plan("10.200.0.0/16", 24)?);
        let conflicts = l.rebuild([
            binding("young", 5, "10.200.0.0/24"),
            binding("old", 1, "10.200.0.0/24"),
            binding("moved", 2, "10.99.0.0/24"),
            binding("garbage", 3, "nonsense"),
            binding("fine", 4, "10.200.7.0/24"),
        ]);
        let losers: Vec<&str> = conflicts.iter().map(Conflict::loser).collect();
        assert_eq!(losers, ["moved", "garbage", "young"]);
        assert_eq!(
            l.subnet_of("old").map(|s| s.to_string()),
            Some("10.200.0.0/24".into())
        );
        assert_eq!(
            l.subnet_of("fine").map(|s| s.to_string()),
            Some("10.200.7.0/24".into())
        );
        assert_eq!(l.assign("young")?.to_string(), "10.200.1.0/24");
        Ok(())
    }
}
