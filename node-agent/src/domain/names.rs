//! Decides the names deskvirt gives things on a host: libvirt domain names, the per-pool libvirt
//! network and its bridge, disk file names, and the stable UUIDs derived from names.

/// Longest name a release before the UID suffix gave a domain, and longest network name.
pub const MAX_DOMAIN_NAME: usize = 63;

pub use deskvirt_crds::names::{MAX_DESKTOP_DOMAIN_NAME, domain_name, fnv1a64, legacy_domain_name};

use deskvirt_crds::names::safe_or_hashed;

/// Name of the per-host libvirt network that serves a pool's desktops (nat and isolated modes).
pub fn network_name(pool: &str) -> String {
    safe_or_hashed(&format!("deskvirt-{pool}"), MAX_DOMAIN_NAME)
}

/// Linux bridge device of a libvirt network: `dv-` and a hash, within the 15 bytes of IFNAMSIZ.
pub fn bridge_device(network: &str) -> String {
    format!("dv-{:08x}", fnv1a64(network.as_bytes()) & 0xffff_ffff)
}

/// Path of a desktop's disk (qcow2 overlay or full copy) inside the pool's disk directory.
pub fn disk_path(disk_dir: &str, domain_name: &str) -> String {
    format!("{}/{domain_name}.qcow2", disk_dir.trim_end_matches('/'))
}

/// A stable UUID derived from a name (for objects that have no Kubernetes UID, such as the pool
/// network), so that defining the same object again updates it in place. Version nibble 8
/// ("custom", RFC 9562) and the RFC variant bits are set.
pub fn name_uuid(name: &str) -> String {
    let high = fnv1a64(name.as_bytes());
    let low = fnv1a64(format!("deskvirt/{name}").as_bytes());
    let high = (high & !0xf000) | 0x8000;
    let low = (low & !(0b11 << 62)) | (0b10 << 62);
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        high >> 32,
        (high >> 16) & 0xffff,
        high & 0xffff,
        low >> 48,
        low & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_fits_ifnamsiz() {
        assert!(bridge_device(&network_name("pool-a")).len() <= 15);
    }

    #[test]
    fn name_uuid_is_stable_and_well_formed() {
        let u = name_uuid("deskvirt-a");
        assert_eq!(u, name_uuid("deskvirt-a"));
        assert_ne!(u, name_uuid("deskvirt-b"));
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "8");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"));
    }

    #[test]
    fn disk_path_joins_without_double_slash() {
        assert_eq!(disk_path("/var/disks/", "a--b"), "/var/disks/a--b.qcow2");
    }
}
