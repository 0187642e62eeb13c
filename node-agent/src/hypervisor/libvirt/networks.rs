//! Decides how the pool's libvirt network is defined, started, torn down and kept in step with
//! the desired static DHCP leases (blocking calls on a libvirt connection).

use std::collections::BTreeSet;

use virt::connect::Connect;
use virt::error::ErrorNumber;
use virt::network::Network;
use virt::sys;

use super::errors::{found, has_code, map};
use crate::domain::{DhcpHost, dhcp_host_xml, parse_dhcp_hosts};
use crate::hypervisor::{Change, HypervisorError, ObjectKind, Result};

fn lookup(conn: &Connect, op: &'static str, name: &str) -> Result<Network> {
    conn.lookup_network_by_name(name)
        .map_err(|e| map(op, ObjectKind::Network, name, &e))
}

/// Defines (idempotent by `<uuid>`), sets autostart, starts when inactive; the network's name.
pub(super) fn ensure(conn: &Connect, xml: &str) -> Result<String> {
    let op = "ensure network";
    let net = conn
        .define_network_xml(xml)
        .map_err(|e| map(op, ObjectKind::Network, "-", &e))?;
    let name = net
        .name()
        .map_err(|e| map(op, ObjectKind::Network, "-", &e))?;
    let err = |e: virt::error::Error| map(op, ObjectKind::Network, &name, &e);
    if !net.autostart().map_err(err)? {
        net.set_autostart(true).map_err(err)?;
    }
    if !net.is_active().map_err(err)? {
        net.create().map_err(err)?;
    }
    Ok(name)
}

/// The persistent definition; the live one where the driver cannot tell them apart (the test
/// driver rejects `VIR_NETWORK_XML_INACTIVE`).
fn config(net: &Network) -> std::result::Result<String, virt::error::Error> {
    match net.xml_desc(sys::VIR_NETWORK_XML_INACTIVE) {
        Err(e) if has_code(&e, ErrorNumber::InvalidArg) => net.xml_desc(0),
        other => other,
    }
}

fn update(
    net: &Network,
    network: &str,
    command: sys::virNetworkUpdateCommand,
    host: &DhcpHost,
    flags: sys::virNetworkUpdateFlags,
) -> Result<()> {
    let op = "update dhcp hosts";
    let fragment = dhcp_host_xml(host).map_err(|e| HypervisorError::Rejected {
        op,
        target: network.to_string(),
        message: e.to_string(),
    })?;
    net.update(
        command,
        sys::VIR_NETWORK_SECTION_IP_DHCP_HOST,
        -1,
        &fragment,
        flags,
    )
    .map_err(|e| map(op, ObjectKind::Network, network, &e))
}

/// Deletes stale leases, then adds missing ones, live (when running) and in the definition.
pub(super) fn sync_dhcp_hosts(
    conn: &Connect,
    network: &str,
    desired: &BTreeSet<DhcpHost>,
) -> Result<Change> {
    let op = "update dhcp hosts";
    let net = lookup(conn, op, network)?;
    let err = |e: virt::error::Error| map(op, ObjectKind::Network, network, &e);
    let current: BTreeSet<DhcpHost> = parse_dhcp_hosts(&config(&net).map_err(err)?)
        .map_err(|e| HypervisorError::Failed {
            op,
            target: network.to_string(),
            message: e.to_string(),
        })?
        .into_iter()
        .collect();
    if &current == desired {
        return Ok(Change::AlreadyDone);
    }
    let mut flags = sys::VIR_NETWORK_UPDATE_AFFECT_CONFIG;
    if net.is_active().map_err(err)? {
        flags |= sys::VIR_NETWORK_UPDATE_AFFECT_LIVE;
    }
    for stale in current.difference(desired) {
        update(
            &net,
            network,
            sys::VIR_NETWORK_UPDATE_COMMAND_DELETE,
            stale,
            flags,
        )?;
    }
    for fresh in desired.difference(&current) {
        update(
            &net,
            network,
            sys::VIR_NETWORK_UPDATE_COMMAND_ADD_LAST,
            fresh,
            flags,
        )?;
    }
    Ok(Change::Done)
}

/// The static leases of the network's definition.
pub(super) fn dhcp_hosts(conn: &Connect, network: &str) -> Result<Vec<DhcpHost>> {
    let op = "read dhcp hosts";
    let net = lookup(conn, op, network)?;
    let xml = config(&net).map_err(|e| map(op, ObjectKind::Network, network, &e))?;
    parse_dhcp_hosts(&xml).map_err(|e| HypervisorError::Failed {
        op,
        target: network.to_string(),
        message: e.to_string(),
    })
}

/// Stops and undefines; done already when gone.
pub(super) fn remove(conn: &Connect, name: &str) -> Result<Change> {
    let op = "remove network";
    let Some(net) = found(lookup(conn, op, name))? else {
        return Ok(Change::AlreadyDone);
    };
    let err = |e: virt::error::Error| map(op, ObjectKind::Network, name, &e);
    if net.is_active().map_err(err)? {
        found(net.destroy().map_err(err))?;
    }
    if net.is_persistent().map_err(err)? {
        found(net.undefine().map_err(err))?;
    }
    Ok(Change::Done)
}

/// The addresses the network's dnsmasq leased and has not seen expire, with their MACs; empty
/// where the driver keeps no leases (the test driver).
pub(super) fn leased(conn: &Connect, network: &str) -> Result<Vec<DhcpHost>> {
    let op = "read dhcp leases";
    let net = lookup(conn, op, network)?;
    let leases = match deskvirt_libvirt_ext::dhcp_leases(&net) {
        Err(e) if has_code(&e, ErrorNumber::NoSupport) => return Ok(Vec::new()),
        other => other.map_err(|e| map(op, ObjectKind::Network, network, &e))?,
    };
    // IPv6 leases (and anything unreadable) name no address of the pool's IPv4 subnet.
    Ok(leases
        .into_iter()
        .filter_map(|l| {
            Some(DhcpHost {
                ip: l.ip.parse().ok()?,
                mac: l.mac,
            })
        })
        .collect())
}
