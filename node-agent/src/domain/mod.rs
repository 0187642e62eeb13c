//! Decides the libvirt XML of a desktop: a pure converter from a Desktop, its binding and the
//! host's context to a typed `<domain>` (and the pool's per-host `<network>`), one file per
//! area, serialized with quick-xml so no user string can inject XML. No I/O here.
//!
//! The agent calls [`DomainInputs::from_desktop`], then [`domain_xml`]; after a restart it
//! reads identities back from libvirt with [`parse_identity`].

pub mod boot;
pub mod carrier;
pub mod convert;
pub mod cpu_memory;
pub mod devices;
pub mod devices_live;
pub mod disks;
pub mod error;
pub mod graphics;
pub mod host_network;
pub mod inputs;
pub mod metadata;
pub mod names;
pub mod network;
pub mod read;
pub mod secret;
pub mod text;
pub mod usb;
pub mod xml;

pub use boot::KernelBoot;
pub use carrier::{Carrier, carrier_xml};
pub use convert::{domain_xml, graphics_xml, interface_xml};
pub use devices::serial_log_path;
pub use disks::{parse_disk_paths, parse_disk_sources};
pub use error::{BuildError, XmlError};
pub use graphics::{ANY_PORT, SpiceConfig, listen_address};
pub use host_network::{
    DhcpHost, HostNetworkMode, NetworkInputs, Subnet, dhcp_host_xml, network_xml, parse_dhcp_hosts,
};
pub use inputs::{Binding, DomainInputs, DomainType, HostContext};
pub use metadata::{DesktopIdentity, METADATA_NS, parse_identity, parse_identity_element};
pub use names::{disk_path, domain_name, legacy_domain_name, network_name};
pub use network::NetworkAttachment;
pub use secret::Secret;

impl DomainInputs {
    /// The domain XML for these inputs, see [`domain_xml`].
    pub fn to_xml(&self) -> Result<String, XmlError> {
        domain_xml(self)
    }
}
