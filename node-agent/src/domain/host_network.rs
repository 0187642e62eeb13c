//! Decides the per-host libvirt network of a pool in nat and isolated modes: the host's subnet
//! with the gateway on its first address, a DHCP range over the rest, and static MAC→IP entries
//! so each desktop keeps its address. Typed like the domain XML.

use std::net::Ipv4Addr;

use deskvirt_core::allocators::{HostSubnet, Ipv4Net};
use deskvirt_crds::resource_pool::{NetworkMode, PoolNetwork};
use serde::Serialize;

use super::error::XmlError;
use super::names::{bridge_device, name_uuid, network_name};
use super::network::normalize_mac;
use super::read::{attribute, walk};
use super::xml::to_string;

/// This host's subnet of a pool network: the core's [`HostSubnet`] (gateway on the first
/// address, DHCP over the rest), as the agent reads it from `status.subnet`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet(HostSubnet);

impl Subnet {
    /// Parses `a.b.c.d/n`; the host bits must be zero and `n` between 8 and 30.
    pub fn parse(cidr: &str) -> Result<Self, XmlError> {
        cidr.parse::<Ipv4Net>()
            .ok()
            .filter(|n| n.prefix() >= 8)
            .and_then(HostSubnet::new)
            .map(Self)
            .ok_or_else(|| XmlError::Invalid {
                field: "subnet",
                value: cidr.to_string(),
            })
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.0.net().prefix()
    }

    /// The host side of the network: the first address.
    pub fn gateway(&self) -> Ipv4Addr {
        self.0.gateway()
    }

    /// The DHCP range: every address after the gateway up to the one before broadcast.
    pub fn dhcp_range(&self) -> (Ipv4Addr, Ipv4Addr) {
        self.0.dhcp_range()
    }

    /// Whether `ip` may be handed to a desktop (inside the DHCP range).
    pub fn contains_host(&self, ip: Ipv4Addr) -> bool {
        let (first, last) = self.dhcp_range();
        (u32::from(first)..=u32::from(last)).contains(&u32::from(ip))
    }
}

/// A static DHCP lease: this MAC always gets this IP.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DhcpHost {
    /// MAC address, lower case.
    pub mac: String,
    /// The address it gets.
    pub ip: Ipv4Addr,
}

/// nat (outside access through the host) or isolated (host-only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostNetworkMode {
    /// NAT to the outside.
    Nat,
    /// No forwarding.
    Isolated,
}

/// Everything a pool network on one host is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkInputs {
    /// libvirt network name, see [`network_name`].
    pub name: String,
    /// nat or isolated.
    pub mode: HostNetworkMode,
    /// This host's subnet.
    pub subnet: Subnet,
    /// Static leases.
    pub hosts: Vec<DhcpHost>,
}

impl NetworkInputs {
    /// The network of `pool` on a host whose subnet (from DomainNode `status.subnet`) is
    /// `subnet`. `Ok(None)` in bridge mode, which needs no libvirt network.
    pub fn for_pool(
        pool: &str,
        network: &PoolNetwork,
        subnet: &str,
        hosts: Vec<DhcpHost>,
    ) -> Result<Option<Self>, XmlError> {
        let mode = match network.mode {
            NetworkMode::Nat => HostNetworkMode::Nat,
            NetworkMode::Isolated => HostNetworkMode::Isolated,
            NetworkMode::Bridge => return Ok(None),
        };
        Ok(Some(Self {
            name: network_name(pool),
            mode,
            subnet: Subnet::parse(subnet)?,
            hosts,
        }))
    }
}

#[derive(Serialize)]
#[serde(rename = "network")]
struct NetworkXml {
    name: String,
    uuid: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    forward: Option<Forward>,
    bridge: Bridge,
    ip: Ip,
}

#[derive(Serialize)]
struct Forward {
    #[serde(rename = "@mode")]
    mode: &'static str,
}

#[derive(Serialize)]
struct Bridge {
    #[serde(rename = "@name")]
    name: String,
    #[serde(rename = "@stp")]
    stp: &'static str,
    #[serde(rename = "@delay")]
    delay: u32,
}

#[derive(Serialize)]
struct Ip {
    #[serde(rename = "@address")]
    address: String,
    #[serde(rename = "@prefix")]
    prefix: u8,
    dhcp: Dhcp,
}

#[derive(Serialize)]
struct Dhcp {
    range: Range,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    host: Vec<HostXml>,
}

#[derive(Serialize)]
struct Range {
    #[serde(rename = "@start")]
    start: String,
    #[serde(rename = "@end")]
    end: String,
}

#[derive(Serialize)]
#[serde(rename = "host")]
struct HostXml {
    #[serde(rename = "@mac")]
    mac: String,
    #[serde(rename = "@ip")]
    ip: String,
}

fn host_xml(host: &DhcpHost) -> Result<HostXml, XmlError> {
    let mac = normalize_mac(&host.mac).ok_or_else(|| XmlError::Invalid {
        field: "dhcp host mac",
        value: host.mac.clone(),
    })?;
    Ok(HostXml {
        mac,
        ip: host.ip.to_string(),
    })
}

/// The network XML, ready for `virNetworkDefineXML`. Its UUID derives from the name, so a
/// second define updates the network in place.
pub fn network_xml(inputs: &NetworkInputs) -> Result<String, XmlError> {
    if !super::text::is_xml_text(&inputs.name) {
        return Err(XmlError::InvalidText {
            field: "network name",
        });
    }
    for host in &inputs.hosts {
        if !inputs.subnet.contains_host(host.ip) {
            return Err(XmlError::Invalid {
                field: "dhcp host ip",
                value: host.ip.to_string(),
            });
        }
    }
    let (start, end) = inputs.subnet.dhcp_range();
    let doc = NetworkXml {
        name: inputs.name.clone(),
        uuid: name_uuid(&inputs.name),
        forward: match inputs.mode {
            HostNetworkMode::Nat => Some(Forward { mode: "nat" }),
            HostNetworkMode::Isolated => None,
        },
        bridge: Bridge {
            name: bridge_device(&inputs.name),
            stp: "on",
            delay: 0,
        },
        ip: Ip {
            address: inputs.subnet.gateway().to_string(),
            prefix: inputs.subnet.prefix(),
            dhcp: Dhcp {
                range: Range {
                    start: start.to_string(),
                    end: end.to_string(),
                },
                host: inputs
                    .hosts
                    .iter()
                    .map(host_xml)
                    .collect::<Result<_, _>>()?,
            },
        },
    };
    Ok(to_string(&doc)?)
}

/// The `<host mac ip/>` fragment for `virNetworkUpdate` of the DHCP host section.
pub fn dhcp_host_xml(host: &DhcpHost) -> Result<String, XmlError> {
    let mut out = String::new();
    host_xml(host)?.serialize(quick_xml::se::Serializer::new(&mut out))?;
    Ok(out)
}

/// The static DHCP leases in a network XML as libvirt returns it.
pub fn parse_dhcp_hosts(xml: &str) -> Result<Vec<DhcpHost>, quick_xml::Error> {
    let mut hosts = Vec::new();
    walk(xml, |path, attrs| {
        if path.len() == 4 && path[1] == "ip" && path[2] == "dhcp" && path[3] == "host" {
            let mac = attribute(attrs, "mac").map(str::to_ascii_lowercase);
            let ip = attribute(attrs, "ip").and_then(|ip| ip.parse().ok());
            if let (Some(mac), Some(ip)) = (mac, ip) {
                hosts.push(DhcpHost { mac, ip });
            }
        }
    })?;
    Ok(hosts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_are_checked() {
        assert!(Subnet::parse("10.200.3.0/24").is_ok());
        assert!(Subnet::parse("10.200.3.1/24").is_err(), "host bits set");
        assert!(Subnet::parse("10.200.3.0/31").is_err());
        assert!(Subnet::parse("10.200.3.0").is_err());
        assert!(Subnet::parse("10.200.300.0/24").is_err());
    }

    #[test]
    fn gateway_and_range() {
        let Ok(s) = Subnet::parse("10.200.3.0/24") else {
            panic!("a /24 is a subnet");
        };
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 200, 3, 1));
        assert_eq!(
            s.dhcp_range(),
            (Ipv4Addr::new(10, 200, 3, 2), Ipv4Addr::new(10, 200, 3, 254))
        );
        assert!(!s.contains_host(Ipv4Addr::new(10, 200, 3, 1)));
        assert!(s.contains_host(Ipv4Addr::new(10, 200, 3, 254)));
    }

    #[test]
    fn host_fragment_and_read_back() {
        let host = DhcpHost {
            mac: "52:54:00:AA:00:01".into(),
            ip: Ipv4Addr::new(10, 0, 0, 5),
        };
        let fragment = dhcp_host_xml(&host).unwrap_or_default();
        assert_eq!(fragment, r#"<host mac="52:54:00:aa:00:01" ip="10.0.0.5"/>"#);
        let doc = format!(
            "<network><ip address='10.0.0.1'><dhcp><range start='a' end='b'/>{fragment}</dhcp></ip></network>"
        );
        let parsed = parse_dhcp_hosts(&doc).unwrap_or_default();
        assert_eq!(
            parsed,
            vec![DhcpHost {
                mac: "52:54:00:aa:00:01".into(),
                ip: Ipv4Addr::new(10, 0, 0, 5)
            }]
        );
    }

    #[test]
    fn hosts_outside_the_subnet_are_rejected() {
        let inputs = NetworkInputs {
            name: "deskvirt-a".into(),
            mode: HostNetworkMode::Nat,
            subnet: Subnet::parse("10.0.0.0/24").unwrap_or_else(|e| panic!("{e}")),
            hosts: vec![DhcpHost {
                mac: "52:54:00:00:00:01".into(),
                ip: Ipv4Addr::new(10, 0, 1, 5),
            }],
        };
        assert!(matches!(
            network_xml(&inputs),
            Err(XmlError::Invalid {
                field: "dhcp host ip",
                ..
            })
        ));
    }
}
