//! Decides each desktop's address on this host's pool network (nat and isolated modes): the
//! network is defined once per process from the host's subnet, and every desktop gets a static
//! DHCP lease MAC→IP kept in the network's own definition, so it survives agent and libvirt
//! restarts. A desktop keeps the address it had; a new one takes the lowest address that no
//! static lease holds and that dnsmasq does not count as leased to another MAC (a deleted
//! desktop's guest never released its lease: dnsmasq would not hand that address to the new
//! MAC until the lease expires, and the guest would get another one than its status shows).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use deskvirt_crds::resource_pool::ResourcePool;

use super::context::DesktopContext;
use super::reason::Reason;
use super::status::Cond;
use crate::domain::{DhcpHost, NetworkInputs, Subnet, network_name, network_xml};
use crate::hypervisor::{Hypervisor, HypervisorError};
use deskvirt_crds::conditions::Status;
use deskvirt_crds::resource_pool::NetworkMode;

/// The address for `mac`: `wanted` when free, else the lowest address of the subnet's DHCP
/// range that no static lease (`leases`) holds and that the DHCP server does not count as
/// leased to another MAC (`leased`). When every free address is still leased so, the lowest
/// free one: the desktop runs, and its guest may get another address until that lease ends.
pub fn pick_address(
    subnet: &Subnet,
    leases: &[DhcpHost],
    leased: &[DhcpHost],
    mac: &str,
    wanted: Option<Ipv4Addr>,
) -> Option<Ipv4Addr> {
    let taken: BTreeSet<Ipv4Addr> = leases.iter().map(|h| h.ip).collect();
    let busy: BTreeSet<Ipv4Addr> = leased
        .iter()
        .filter(|l| !l.mac.eq_ignore_ascii_case(mac))
        .map(|l| l.ip)
        .collect();
    let free = |ip: &Ipv4Addr| !taken.contains(ip);
    if let Some(w) = wanted
        && subnet.contains_host(w)
        && free(&w)
        && !busy.contains(&w)
    {
        return Some(w);
    }
    let (first, last) = subnet.dhcp_range();
    let range = || (u32::from(first)..=u32::from(last)).map(Ipv4Addr::from);
    range()
        .find(|ip| free(ip) && !busy.contains(ip))
        .or_else(|| range().find(free))
}

/// Why no address could be pinned (reported as `DomainDefined=Unknown` or `False`).
pub enum Pending {
    /// Waiting for something outside the agent.
    Wait(Cond),
    /// libvirt failed.
    Failed(HypervisorError),
}

/// Makes sure the pool's network exists on this host and `mac` holds a lease; returns the
/// address, or `None` in bridge mode (addresses come from the outside network there).
pub async fn pin<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    pool: &ResourcePool,
    mac: &str,
    wanted: Option<&str>,
) -> Result<Option<Ipv4Addr>, Pending> {
    let _guard = ctx.network_lock.lock().await;
    let Some((inputs, mut leases)) = network(ctx, pool).await? else {
        return Ok(None);
    };
    let mac = mac.to_ascii_lowercase();
    if let Some(own) = leases
        .iter()
        .find(|h| h.mac == mac && inputs.subnet.contains_host(h.ip))
    {
        return Ok(Some(own.ip));
    }
    leases.retain(|h| h.mac != mac);
    let wanted = wanted.and_then(|w| w.parse().ok());
    // Advisory: unreadable, the address is picked from the static leases alone.
    let leased = match ctx.hypervisor.leased_addresses(&inputs.name).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(network = %inputs.name, error = %e, "cannot read the network's DHCP leases; an address a deleted desktop's guest still holds may be pinned");
            Vec::new()
        }
    };
    let Some(ip) = pick_address(&inputs.subnet, &leases, &leased, &mac, wanted) else {
        return Err(Pending::Wait(Cond::new(
            Status::False,
            Reason::AddressesExhausted,
            format!(
                "no free address left in this host's subnet {}",
                host_subnet(ctx)
            ),
        )));
    };
    leases.push(DhcpHost { mac, ip });
    ctx.hypervisor
        .sync_dhcp_hosts(&inputs.name, &leases)
        .await
        .map_err(Pending::Failed)?;
    Ok(Some(ip))
}

/// The subnet the operator assigned this host, as its DomainNode says.
fn host_subnet<H>(ctx: &DesktopContext<H>) -> String {
    ctx.domain_node()
        .and_then(|n| n.status.as_ref().and_then(|s| s.subnet.clone()))
        .unwrap_or_default()
}

/// Makes sure the pool's network exists on this host (nat and isolated modes), so a desktop
/// moved here live finds the network its NIC names.
pub async fn ensure<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    pool: &ResourcePool,
) -> Result<(), Pending> {
    let name = network_name(pool.metadata.name.as_deref().unwrap_or_default());
    if pool.spec.network.mode == NetworkMode::Bridge || ctx.network_ready(&name) {
        return Ok(());
    }
    let _guard = ctx.network_lock.lock().await;
    network(ctx, pool).await.map(|_| ())
}

/// The pool's network on this host, defined from the host's subnet when this process has not
/// yet, and its leases; `None` in bridge mode. The caller holds `ctx.network_lock`.
async fn network<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    pool: &ResourcePool,
) -> Result<Option<(NetworkInputs, Vec<DhcpHost>)>, Pending> {
    // Bridge mode: addresses come from the outside network.
    if pool.spec.network.mode == NetworkMode::Bridge {
        return Ok(None);
    }
    let pool_name = pool.metadata.name.clone().unwrap_or_default();
    let subnet = Some(host_subnet(ctx)).filter(|s| !s.is_empty());
    let Some(subnet) = subnet else {
        return Err(Pending::Wait(Cond::new(
            Status::Unknown,
            Reason::WaitingForSubnet,
            "the operator has not assigned this host a subnet of the pool yet",
        )));
    };
    let invalid =
        |message: String| Pending::Wait(Cond::new(Status::False, Reason::InvalidNetwork, message));
    let Some(inputs) = NetworkInputs::for_pool(&pool_name, &pool.spec.network, &subnet, vec![])
        .map_err(|e| invalid(e.to_string()))?
    else {
        return Ok(None);
    };
    let hv = &ctx.hypervisor;
    if ctx.network_ready(&inputs.name) {
        let leases = hv.dhcp_hosts(&inputs.name).await.map_err(Pending::Failed)?;
        return Ok(Some((inputs, leases)));
    }
    // Keep the leases a previous run pinned: read them first when the network exists.
    let existing = match hv.dhcp_hosts(&inputs.name).await {
        Ok(l) => l,
        Err(e) if e.is_not_found() => Vec::new(),
        Err(e) => return Err(Pending::Failed(e)),
    };
    let kept: Vec<DhcpHost> = existing
        .iter()
        .filter(|h| inputs.subnet.contains_host(h.ip))
        .cloned()
        .collect();
    let xml = network_xml(&NetworkInputs {
        hosts: kept.clone(),
        ..inputs.clone()
    })
    .map_err(|e| invalid(e.to_string()))?;
    hv.ensure_network(&xml).await.map_err(Pending::Failed)?;
    ctx.record_network(&inputs.name);
    tracing::info!(network = %inputs.name, subnet = %subnet, "pool network ready on this host");
    Ok(Some((inputs, kept)))
}

/// Drops the lease of `mac` from the pool's network on this host (teardown); nothing to do in
/// bridge mode or when the network is gone.
pub async fn release<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    pool: &ResourcePool,
    mac: &str,
) -> Result<(), HypervisorError> {
    if pool.spec.network.mode == NetworkMode::Bridge {
        return Ok(());
    }
    let network = network_name(pool.metadata.name.as_deref().unwrap_or_default());
    let _guard = ctx.network_lock.lock().await;
    let hv = &ctx.hypervisor;
    let mut leases = match hv.dhcp_hosts(&network).await {
        Ok(l) => l,
        Err(e) if e.is_not_found() => return Ok(()),
        Err(e) => return Err(e),
    };
    let mac = mac.to_ascii_lowercase();
    let before = leases.len();
    leases.retain(|h| h.mac != mac);
    if leases.len() != before {
        hv.sync_dhcp_hosts(&network, &leases).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet() -> Subnet {
        match Subnet::parse("10.200.3.0/29") {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    }

    /// The MAC of the desktop an address is picked for.
    const NEW: &str = "52:54:00:00:00:aa";

    fn lease(mac: &str, ip: [u8; 4]) -> DhcpHost {
        DhcpHost {
            mac: mac.into(),
            ip: Ipv4Addr::from(ip),
        }
    }

    #[test]
    fn lowest_free_address_or_the_wanted_one() {
        let s = subnet();
        let leases = vec![lease("52:54:00:00:00:01", [10, 200, 3, 2])];
        assert_eq!(
            pick_address(&s, &leases, &[], NEW, None),
            Some(Ipv4Addr::new(10, 200, 3, 3))
        );
        assert_eq!(
            pick_address(&s, &leases, &[], NEW, Some(Ipv4Addr::new(10, 200, 3, 5))),
            Some(Ipv4Addr::new(10, 200, 3, 5))
        );
        // A taken or out-of-range wish is ignored.
        assert_eq!(
            pick_address(&s, &leases, &[], NEW, Some(Ipv4Addr::new(10, 200, 3, 2))),
            Some(Ipv4Addr::new(10, 200, 3, 3))
        );
        assert_eq!(
            pick_address(&s, &leases, &[], NEW, Some(Ipv4Addr::new(10, 200, 3, 1))),
            Some(Ipv4Addr::new(10, 200, 3, 3))
        );
    }

    #[test]
    fn a_full_subnet_has_no_address() {
        let s = subnet();
        let leases: Vec<DhcpHost> = (2..=6)
            .map(|i| lease(&format!("52:54:00:00:00:0{i}"), [10, 200, 3, i]))
            .collect();
        assert_eq!(pick_address(&s, &leases, &[], NEW, None), None);
    }

    #[test]
    fn an_address_still_leased_to_another_mac_is_skipped_while_another_is_free() {
        let s = subnet();
        let leases = vec![lease("52:54:00:00:00:01", [10, 200, 3, 2])];
        // A deleted desktop's guest still holds .3 in dnsmasq's leases; the static lease of
        // .2 holds it too (its own guest's lease is no obstacle to it).
        let leased = vec![
            lease("52:54:00:00:00:01", [10, 200, 3, 2]),
            lease("52:54:00:00:00:99", [10, 200, 3, 3]),
        ];
        assert_eq!(
            pick_address(&s, &leases, &leased, NEW, None),
            Some(Ipv4Addr::new(10, 200, 3, 4))
        );
        // Wanted, but leased to another MAC: skipped too.
        assert_eq!(
            pick_address(
                &s,
                &leases,
                &leased,
                NEW,
                Some(Ipv4Addr::new(10, 200, 3, 3))
            ),
            Some(Ipv4Addr::new(10, 200, 3, 4))
        );
        // Leased to this very MAC (its guest took it before): kept, whatever the case.
        let own = vec![lease("52:54:00:00:00:AA", [10, 200, 3, 3])];
        assert_eq!(
            pick_address(&s, &leases, &own, NEW, None),
            Some(Ipv4Addr::new(10, 200, 3, 3))
        );
    }

    #[test]
    fn when_every_free_address_is_still_leased_the_lowest_free_one_is_taken() {
        let s = subnet();
        let leases = vec![lease("52:54:00:00:00:01", [10, 200, 3, 2])];
        let leased: Vec<DhcpHost> = (3..=6)
            .map(|i| lease(&format!("52:54:00:00:01:0{i}"), [10, 200, 3, i]))
            .collect();
        assert_eq!(
            pick_address(&s, &leases, &leased, NEW, None),
            Some(Ipv4Addr::new(10, 200, 3, 3))
        );
    }
}
