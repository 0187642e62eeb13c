//! Decides the names deskvirt gives things on a host: libvirt domain names, the per-pool libvirt
//! network and its bridge, disk file names, and the stable UUIDs derived from names.

/// Longest domain name we generate (a DNS label's length, short enough for every libvirt path).
pub const MAX_DOMAIN_NAME: usize = 63;

/// Separator between namespace and name in a domain name.
const SEPARATOR: &str = "--";

/// 64-bit FNV-1a hash: small, dependency-free and stable across releases and platforms.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET, |hash, b| (hash ^ u64::from(*b)).wrapping_mul(PRIME))
}

/// Whether `c` may appear in a domain name as is: safe in file names, shells and URLs.
fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// `value` if it is short and made of safe characters only; otherwise a readable prefix of its
/// safe characters, a dash and the FNV-1a hash of the whole value, `max` characters at most.
fn safe_or_hashed(value: &str, max: usize) -> String {
    if !value.is_empty() && value.len() <= max && value.chars().all(is_name_char) {
        return value.to_string();
    }
    let hash = format!("{:016x}", fnv1a64(value.as_bytes()));
    let room = max.saturating_sub(hash.len() + 1);
    let prefix: String = value
        .chars()
        .filter(|c| is_name_char(*c))
        .take(room)
        .collect();
    if prefix.is_empty() {
        hash
    } else {
        format!("{prefix}-{hash}")
    }
}

/// The libvirt domain name of a desktop: `<namespace>--<name>`, or, when that is longer than
/// [`MAX_DOMAIN_NAME`] or holds characters other than ASCII letters, digits, `-`, `_` and `.`,
/// a readable prefix followed by a hash of the full name. Deterministic, so the agent finds the
/// same domain again after a restart.
pub fn domain_name(namespace: &str, name: &str) -> String {
    safe_or_hashed(&format!("{namespace}{SEPARATOR}{name}"), MAX_DOMAIN_NAME)
}

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
    fn fnv1a_matches_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn short_names_are_readable() {
        assert_eq!(domain_name("team-a", "alice"), "team-a--alice");
    }

    #[test]
    fn long_names_are_hashed_deterministically() {
        let long = "x".repeat(80);
        let a = domain_name("ns", &long);
        assert_eq!(a.len(), MAX_DOMAIN_NAME);
        assert!(a.starts_with("ns--xxx"));
        assert_eq!(a, domain_name("ns", &long));
        assert_ne!(a, domain_name("ns", &"x".repeat(81)));
    }

    #[test]
    fn unsafe_characters_are_hashed() {
        let a = domain_name("ns", "a/b");
        assert!(a.chars().all(is_name_char), "{a}");
        assert!(a.starts_with("ns--ab-"));
        assert_ne!(a, domain_name("ns", "a b"));
        assert!(domain_name("<>", "&").chars().all(is_name_char));
    }

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
