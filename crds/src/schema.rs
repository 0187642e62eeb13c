//! Schema patterns shared by several fields, so every resource validates names the same way.

/// A DNS-1123 label: how pools, hosts and bridges' owners are named in Kubernetes.
pub const DNS_LABEL: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// A DNS-1123 subdomain: Kubernetes Node names.
pub const DNS_SUBDOMAIN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// An IPv4 CIDR such as 10.200.0.0/16.
pub const IPV4_CIDR: &str = r"^((25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])/([0-9]|[12][0-9]|3[0-2])$";
/// The first three octets of a MAC address, such as 52:54:00. The first octet must be unicast.
pub const MAC_PREFIX: &str = r"^[0-9a-fA-F][02468aceACE](:[0-9a-fA-F]{2}){2}$";
/// A full unicast MAC address such as 52:54:00:12:34:56.
pub const MAC: &str = r"^[0-9a-fA-F][02468aceACE](:[0-9a-fA-F]{2}){5}$";
/// A file name inside a pool directory: no slashes, no leading dot (so no `..`).
pub const FILE_NAME: &str = r"^[A-Za-z0-9_][A-Za-z0-9._-]*$";
/// An absolute path on the host below `/`, without empty, `.` or `..` segments (one trailing
/// slash allowed). Whether two directories overlap is checked by the operator (`paths`).
pub const ABS_PATH: &str =
    r"^(/([A-Za-z0-9_-][A-Za-z0-9._-]*|\.[A-Za-z0-9_-][A-Za-z0-9._-]*|\.\.[A-Za-z0-9._-]+))+/?$";
/// A Linux network interface name.
pub const IFNAME: &str = r"^[A-Za-z0-9_.-]{1,15}$";
