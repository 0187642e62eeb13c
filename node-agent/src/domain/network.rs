//! Decides how a desktop's NIC is attached: to the pool's per-host libvirt network (nat and
//! isolated modes) or to an existing Linux bridge, with the MAC the operator allocated.

use deskvirt_core::allocators::Mac;
use deskvirt_crds::resource_pool::{NetworkMode, PoolNetwork};

use super::error::BuildError;
use super::names::network_name;
use super::xml::{Interface, InterfaceSource, MacAddress, TypedModel};

/// Where the desktop's NIC is plugged in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkAttachment {
    /// A libvirt network on the host (nat and isolated modes).
    Network {
        /// libvirt network name, see [`network_name`].
        name: String,
    },
    /// An existing Linux bridge on the host.
    Bridge {
        /// Bridge device name.
        bridge: String,
    },
}

impl NetworkAttachment {
    /// The attachment a pool's network settings call for.
    pub fn for_pool(pool: &str, network: &PoolNetwork) -> Result<Self, BuildError> {
        match network.mode {
            NetworkMode::Nat | NetworkMode::Isolated => Ok(Self::Network {
                name: network_name(pool),
            }),
            NetworkMode::Bridge => match network.bridge.as_deref() {
                Some(bridge) if !bridge.is_empty() => Ok(Self::Bridge {
                    bridge: bridge.to_string(),
                }),
                _ => Err(BuildError::MissingBridge),
            },
        }
    }
}

/// Normalizes a MAC address to lower case; `None` unless it is six colon-separated hex octets
/// with a unicast first octet (the core's [`Mac`] reads it).
pub fn normalize_mac(mac: &str) -> Option<String> {
    mac.parse::<Mac>()
        .ok()
        .filter(Mac::is_unicast)
        .map(|m| m.to_string())
}

/// `<interface>` with a virtio NIC.
pub fn interface(attachment: &NetworkAttachment, mac: &str) -> Interface {
    let (kind, source) = match attachment {
        NetworkAttachment::Network { name } => (
            "network",
            InterfaceSource {
                network: Some(name.clone()),
                bridge: None,
            },
        ),
        NetworkAttachment::Bridge { bridge } => (
            "bridge",
            InterfaceSource {
                network: None,
                bridge: Some(bridge.clone()),
            },
        ),
    };
    Interface {
        kind,
        mac: MacAddress {
            address: mac.to_string(),
        },
        source,
        model: TypedModel { kind: "virtio" },
        link: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_checked_and_lowercased() {
        assert_eq!(
            normalize_mac("52:54:00:AB:cd:01").as_deref(),
            Some("52:54:00:ab:cd:01")
        );
        assert_eq!(normalize_mac("53:54:00:ab:cd:01"), None, "multicast");
        assert_eq!(normalize_mac("52:54:00:ab:cd"), None);
        assert_eq!(normalize_mac("52:54:00:ab:cd:0g"), None);
        assert_eq!(normalize_mac(""), None);
    }

    #[test]
    fn bridge_mode_needs_a_bridge() {
        let mut net = PoolNetwork {
            mode: NetworkMode::Bridge,
            ..PoolNetwork::default()
        };
        assert_eq!(
            NetworkAttachment::for_pool("p", &net),
            Err(BuildError::MissingBridge)
        );
        net.bridge = Some("br0".into());
        assert_eq!(
            NetworkAttachment::for_pool("p", &net),
            Ok(NetworkAttachment::Bridge {
                bridge: "br0".into()
            })
        );
        net.mode = NetworkMode::Isolated;
        assert_eq!(
            NetworkAttachment::for_pool("p", &net),
            Ok(NetworkAttachment::Network {
                name: "deskvirt-p".into()
            })
        );
    }
}
