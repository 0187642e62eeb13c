//! Decides when a running guest is made to ask for its address again: the address this host
//! pinned for it differs from the one the desktop had (it was moved live from another host, whose
//! subnet of a `nat` or `isolated` pool network is not this host's). Its NIC's link then goes
//! down and, after [`LINK_DOWN`], up again: a guest's DHCP client (NetworkManager,
//! systemd-networkd, dhcpcd) asks again on carrier, and gets the address pinned here. A guest
//! that ignores carrier keeps its old address until its lease runs out.

use std::time::Duration;

use kube::runtime::events::EventType;

use super::Error;
use super::context::DesktopContext;
use super::inputs::Inputs;
use crate::domain::interface_xml;
use crate::hypervisor::{Hypervisor, HypervisorError};

/// How long the link stays down: long enough for a guest that polls its carrier each second.
pub const LINK_DOWN: Duration = Duration::from_secs(2);

/// The address a running guest holds and the one pinned here, when they differ: `had` is the
/// desktop's address before this pass, `pinned` the one this host gives it.
pub fn stale<'a>(had: Option<&'a str>, pinned: Option<&'a str>) -> Option<(&'a str, &'a str)> {
    match (had, pinned) {
        (Some(h), Some(p)) if h != p => Some((h, p)),
        _ => None,
    }
}

/// Cycles the link of running domain `name` of `d`, whose address moves from `had` to
/// `pinned`, and says so in an Event.
pub(super) async fn renew<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    d: &deskvirt_crds::Desktop,
    inputs: &Inputs,
    name: &str,
    had: &str,
    pinned: &str,
) -> Result<(), Error> {
    let xml = |up| {
        interface_xml(&inputs.domain, up).map_err(|e| HypervisorError::Failed {
            op: "cycle the link",
            target: name.to_string(),
            message: e.to_string(),
        })
    };
    tracing::info!(
        domain = name,
        had,
        pinned,
        "the guest holds another host's address; cycling its link so that it asks again"
    );
    ctx.hypervisor
        .update_live_device(name, &xml(false)?)
        .await?;
    tokio::time::sleep(LINK_DOWN).await;
    ctx.hypervisor.update_live_device(name, &xml(true)?).await?;
    ctx.event(
        d,
        EventType::Normal,
        "AddressChanged",
        "CycleLink",
        format!(
            "the desktop's address on this host is {pinned} (it had {had}); its network link was \
             cycled so that the guest's DHCP client asks again"
        ),
    )
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_changed_address_is_stale() {
        assert_eq!(
            stale(Some("10.1.1.5"), Some("10.1.2.5")),
            Some(("10.1.1.5", "10.1.2.5"))
        );
        assert_eq!(stale(Some("10.1.1.5"), Some("10.1.1.5")), None);
        // A first address, or a pool without a pinned address (bridge mode), changes nothing.
        assert_eq!(stale(None, Some("10.1.1.5")), None);
        assert_eq!(stale(Some("10.1.1.5"), None), None);
    }
}
