//! The agent's command line: every flag has an environment fallback so a DaemonSet can set it
//! from the downward API. Decides the hypervisor type (`auto` → kvm when `/dev/kvm` opens) and
//! the address SPICE clients use.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use deskvirt_crds::constants::{
    CONSOLE_NAMESPACE_DEFAULT, IMAGES_NAMESPACE_DEFAULT, LEASE_NAMESPACE_DEFAULT,
};
use deskvirt_crds::domain_node::Hypervisor as DomainType;
use deskvirt_runtime::logging::LogFormat;

/// Per-host agent of deskvirt: registers this host as a DomainNode, heartbeats a Lease and
/// reports host facts from libvirt.
#[derive(Debug, Clone, Parser)]
#[command(name = "deskvirt-node-agent", version, about)]
pub struct Config {
    /// Name of this host; the DomainNode and the heartbeat Lease carry it (the Kubernetes Node
    /// name, from the downward API `spec.nodeName`).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// libvirt connection URI.
    #[arg(long, env = "LIBVIRT_URI", default_value = "qemu:///system")]
    pub libvirt_uri: String,

    /// Hypervisor of the domains: `auto` picks kvm when /dev/kvm is usable, else qemu (TCG).
    #[arg(long, env = "DESKVIRT_HYPERVISOR", value_enum, default_value_t = HypervisorChoice::Auto)]
    pub hypervisor: HypervisorChoice,

    /// How often the heartbeat Lease is renewed (such as 10s, 500ms, 1m).
    #[arg(long, env = "DESKVIRT_HEARTBEAT_INTERVAL", default_value = "10s", value_parser = parse_interval)]
    pub heartbeat_interval: Duration,

    /// Lease duration written into the heartbeat Lease; the operator declares the host lost
    /// when it passes without a renewal.
    #[arg(long, env = "DESKVIRT_LEASE_DURATION", default_value = "40s", value_parser = parse_interval)]
    pub lease_duration: Duration,

    /// Namespace of the heartbeat Leases (must exist).
    #[arg(long, env = "DESKVIRT_LEASE_NAMESPACE", default_value = LEASE_NAMESPACE_DEFAULT)]
    pub lease_namespace: String,

    /// Namespace of the console password mirrors the operator writes (must exist); the only
    /// Secrets the agent reads, and only those labelled with its host.
    #[arg(long, env = "DESKVIRT_CONSOLE_NAMESPACE", default_value = CONSOLE_NAMESPACE_DEFAULT)]
    pub console_namespace: String,

    /// Labels the agent sets on its DomainNode, as `key=value,key=value` (for example
    /// `deskvirt.io/pool=lab` to join the pool selecting that label). Other labels an admin
    /// puts on the DomainNode are left alone.
    #[arg(long, env = "DESKVIRT_NODE_LABELS", default_value = "", value_parser = parse_labels)]
    pub node_labels: BTreeMap<String, String>,

    /// The qemu-img program that makes desktop disks.
    #[arg(long, env = "DESKVIRT_QEMU_IMG", default_value = "qemu-img")]
    pub qemu_img: String,

    /// How long a `qemu-img info`, `create` or `resize` may run before it is killed and the
    /// desktop reports `DiskToolTimeout` (retried later).
    #[arg(long, env = "DESKVIRT_QEMU_IMG_TIMEOUT", default_value = "60s", value_parser = parse_interval)]
    pub qemu_img_timeout: Duration,

    /// How long a `qemu-img convert` (a full clone copies the whole base image) may run before
    /// it is killed.
    #[arg(long, env = "DESKVIRT_DISK_COPY_TIMEOUT", default_value = "30m", value_parser = parse_interval)]
    pub disk_copy_timeout: Duration,

    /// How long a libvirt call may take before the agent stops waiting for it. A call that
    /// misses it marks libvirt stalled: `LibvirtConnected=False`, not ready, and every call
    /// fails fast until libvirt answers a probe again. Running domains are not touched.
    #[arg(long, env = "DESKVIRT_LIBVIRT_TIMEOUT", default_value = "10s", value_parser = parse_interval)]
    pub libvirt_timeout: Duration,

    /// The deadline of the libvirt calls that move guest memory or wait for QEMU: managed
    /// save, start (which may restore saved memory) and destroy.
    #[arg(long, env = "DESKVIRT_LIBVIRT_SLOW_TIMEOUT", default_value = "10m", value_parser = parse_interval)]
    pub libvirt_slow_timeout: Duration,

    /// How long a guest gets to shut down after `spec.power: Off` (ACPI) before it is powered
    /// off hard.
    #[arg(long, env = "DESKVIRT_SHUTDOWN_GRACE", default_value = "60s", value_parser = parse_interval)]
    pub shutdown_grace: Duration,

    /// Where libvirt keeps the managed save images (the saved memory of suspended desktops), as
    /// `<dir>/<domain name>.save`: the QEMU driver's default for `qemu:///system`. It is a path
    /// on the libvirt host, opened by libvirtd, not by the agent. Before a suspended desktop is
    /// restored, the agent writes its current definition (SPICE port and password) into that
    /// image; when that fails, the image is discarded and the desktop boots from its disk.
    #[arg(long, env = "DESKVIRT_MANAGED_SAVE_DIR", default_value = MANAGED_SAVE_DIR_DEFAULT)]
    pub managed_save_dir: PathBuf,

    /// How often a running desktop's activity (guest CPU, disk and network bytes, SPICE client)
    /// is sampled. An idle countdown starts at most this long after the guest went quiet, so it
    /// bounds how late an idle action runs; each sample is two cheap libvirt calls per desktop.
    #[arg(long, env = "DESKVIRT_ACTIVITY_INTERVAL", default_value = "10s", value_parser = parse_interval)]
    pub activity_interval: Duration,

    /// How often host facts are re-read and reported even when libvirt's state did not change,
    /// and domains without a Desktop bound here are swept (those of desktops that moved to
    /// another host are undefined, others reported).
    #[arg(long, env = "DESKVIRT_REFRESH_INTERVAL", default_value = "60s", value_parser = parse_interval)]
    pub refresh_interval: Duration,

    /// The images namespace: DesktopImages with an http source are copied onto this host only
    /// from there (elsewhere they are ignored, with a warning).
    #[arg(long, env = "DESKVIRT_IMAGES_NAMESPACE", default_value = IMAGES_NAMESPACE_DEFAULT)]
    pub images_namespace: String,

    /// How many DesktopImage copies (fetches, or checks of a file found in place) run at once.
    #[arg(long, env = "DESKVIRT_IMAGE_COPIES", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub image_copies: u16,

    /// How long after a failed DesktopImage copy it is tried again; the wait doubles with
    /// each failure, up to 10 minutes.
    #[arg(long, env = "DESKVIRT_IMAGE_RETRY", default_value = "30s", value_parser = parse_interval)]
    pub image_retry: Duration,

    /// Deadline of one whole DesktopImage download (a server that stays slow is given up).
    #[arg(long, env = "DESKVIRT_IMAGE_FETCH_TIMEOUT", default_value = "4h", value_parser = parse_interval)]
    pub image_fetch_timeout: Duration,

    /// Largest DesktopImage file this host takes, in GiB: a larger one fails with `TooLarge`
    /// (its `Content-Length`, or its bytes as they arrive).
    #[arg(long = "image-max-size", env = "DESKVIRT_IMAGE_MAX_SIZE_GIB", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=16384))]
    pub image_max_size_gib: u32,

    /// GiB the image directory's file system keeps free: an image that would eat into them is
    /// not fetched (`NoSpace`), so that images never take the room desktops' disks need.
    #[arg(long = "image-reserve", env = "DESKVIRT_IMAGE_RESERVE_GIB", default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=16384))]
    pub image_reserve_gib: u32,

    /// Address of the /healthz, /readyz and /metrics endpoint.
    #[arg(long, env = "DESKVIRT_METRICS_ADDR", default_value = "0.0.0.0:8081")]
    pub metrics_addr: SocketAddr,

    /// Address SPICE clients use to reach this host; default: the first non-loopback IPv4
    /// address, else 127.0.0.1.
    #[arg(long, env = "NODE_ADDRESS")]
    pub node_address: Option<IpAddr>,

    /// This host's libvirt as the other hosts' libvirt reach it, for desktops moved here live
    /// (DesktopMigration), such as `qemu+tls://host-3.lab/system`; published in
    /// `DomainNode.status.migration`. Unset: the host takes in no migrations (it may still send
    /// its desktops away).
    #[arg(long, env = "DESKVIRT_MIGRATION_URI")]
    pub migration_uri: Option<String>,

    /// The address other hosts send a moving desktop's memory to (`tcp://<address>`); default:
    /// the host's address (`--node-address`).
    #[arg(long, env = "DESKVIRT_MIGRATION_ADDRESS")]
    pub migration_address: Option<IpAddr>,

    /// Log format.
    #[arg(long, env = "DESKVIRT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Deadlines of API calls.
    #[command(flatten)]
    pub api: deskvirt_runtime::api::ApiTimeouts,
}

/// Managed save images of libvirt's QEMU driver on `qemu:///system`.
pub const MANAGED_SAVE_DIR_DEFAULT: &str = "/var/lib/libvirt/qemu/save";

/// The `--hypervisor` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HypervisorChoice {
    /// kvm when /dev/kvm can be opened for reading and writing, else qemu.
    Auto,
    /// Hardware virtualization.
    Kvm,
    /// QEMU's software emulator (TCG).
    Qemu,
}

impl HypervisorChoice {
    /// The hypervisor to use, given whether `/dev/kvm` is usable.
    pub fn resolve(self, kvm_usable: bool) -> DomainType {
        match self {
            Self::Kvm => DomainType::Kvm,
            Self::Qemu => DomainType::Qemu,
            Self::Auto if kvm_usable => DomainType::Kvm,
            Self::Auto => DomainType::Qemu,
        }
    }
}

/// Whether `/dev/kvm` opens for reading and writing (what QEMU needs for `-enable-kvm`).
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

impl Config {
    /// The hypervisor type after resolving `auto` on this host.
    pub fn domain_type(&self) -> DomainType {
        self.hypervisor.resolve(kvm_usable())
    }

    /// The address reported to SPICE clients.
    pub fn address(&self) -> IpAddr {
        self.node_address.unwrap_or_else(default_address)
    }

    /// Where this host takes in migrations, when `--migration-uri` is set.
    pub fn migration(&self) -> Option<deskvirt_crds::MigrationEndpoint> {
        let uri = self
            .migration_uri
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty())?;
        Some(deskvirt_crds::MigrationEndpoint {
            uri: uri.to_string(),
            address: Some(
                self.migration_address
                    .unwrap_or_else(|| self.address())
                    .to_string(),
            ),
        })
    }

    /// The longest one desktop reconcile may take with every deadline it can meet (a full disk
    /// copy, two `qemu-img` runs, two slow and ten plain libvirt calls, ten API calls of 10 s),
    /// and a minute more: liveness fails only when one reconcile has been in flight that long,
    /// which is a stuck reconcile, not a slow host.
    pub fn reconcile_allowance(&self) -> Duration {
        self.disk_copy_timeout
            + 2 * self.qemu_img_timeout
            + 2 * self.libvirt_slow_timeout
            + 10 * self.libvirt_timeout
            + Duration::from_secs(10 * 10 + 60)
    }
}

/// The address of the interface that routes outwards (no packet is sent: a UDP socket is only
/// connected), when it is a non-loopback IPv4 address; else 127.0.0.1.
pub fn default_address() -> IpAddr {
    let probe = || -> Option<IpAddr> {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
        socket.connect((Ipv4Addr::new(192, 0, 2, 1), 9)).ok()?;
        let ip = socket.local_addr().ok()?.ip();
        usable_address(ip).then_some(ip)
    };
    probe().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

fn usable_address(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v4) if !v4.is_loopback() && !v4.is_unspecified() && !v4.is_link_local())
}

/// Parses `key=value,key=value` (empty: no labels).
pub fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                Ok((k.trim().to_string(), v.trim().to_string()))
            }
            _ => Err(format!("invalid label {kv:?}: use key=value")),
        })
        .collect()
}

/// Parses an interval: `500ms`, `10s`, `15m`, `2h`; never zero.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let d = match s.strip_suffix("ms") {
        Some(ms) => ms
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|_| format!("invalid duration {s:?}: use 500ms, 10s, 15m or 2h"))?,
        None => deskvirt_crds::quantity::parse_duration(s)
            .map_err(|_| format!("invalid duration {s:?}: use 500ms, 10s, 15m or 2h"))?,
    };
    if d.is_zero() {
        return Err(format!("duration {s:?} must be positive"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_or_say_why_not() {
        let labels = parse_labels("deskvirt.io/pool=lab, tier = gold");
        assert_eq!(
            labels,
            Ok(BTreeMap::from([
                ("deskvirt.io/pool".to_string(), "lab".to_string()),
                ("tier".to_string(), "gold".to_string())
            ]))
        );
        assert_eq!(parse_labels(""), Ok(BTreeMap::new()));
        assert!(parse_labels("novalue").is_err_and(|e| e.contains("key=value")));
    }

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_interval("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_interval("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_interval("0s").is_err());
        assert!(parse_interval("ten").is_err());
        assert!(parse_interval("").is_err());
    }

    #[test]
    fn auto_picks_kvm_only_when_usable() {
        assert_eq!(HypervisorChoice::Auto.resolve(true), DomainType::Kvm);
        assert_eq!(HypervisorChoice::Auto.resolve(false), DomainType::Qemu);
        assert_eq!(HypervisorChoice::Qemu.resolve(true), DomainType::Qemu);
        assert_eq!(HypervisorChoice::Kvm.resolve(false), DomainType::Kvm);
    }

    #[test]
    fn defaults_and_flags() -> Result<(), clap::Error> {
        let c = Config::try_parse_from(["agent", "--node-name", "h1"])?;
        assert_eq!(c.node_name, "h1");
        assert_eq!(c.libvirt_uri, "qemu:///system");
        assert_eq!(c.hypervisor, HypervisorChoice::Auto);
        assert_eq!(c.heartbeat_interval, Duration::from_secs(10));
        assert_eq!(c.lease_duration, Duration::from_secs(40));
        assert_eq!(c.lease_namespace, "deskvirt-system");
        assert_eq!(c.metrics_addr.port(), 8081);
        assert_eq!(c.activity_interval, Duration::from_secs(10));
        assert_eq!(c.images_namespace, "deskvirt-system-images");
        assert_eq!(c.image_copies, 2);
        assert_eq!(c.image_retry, Duration::from_secs(30));
        assert_eq!(c.image_fetch_timeout, Duration::from_secs(4 * 3600));
        assert_eq!(c.image_max_size_gib, 64);
        assert_eq!(c.image_reserve_gib, 1);
        assert_eq!(
            c.managed_save_dir,
            PathBuf::from("/var/lib/libvirt/qemu/save")
        );
        let c = Config::try_parse_from([
            "agent",
            "--node-name=h2",
            "--hypervisor=qemu",
            "--node-address=10.0.0.5",
            "--heartbeat-interval=1s",
        ])?;
        assert_eq!(c.domain_type(), DomainType::Qemu);
        assert_eq!(c.address().to_string(), "10.0.0.5");
        assert_eq!(c.heartbeat_interval, Duration::from_secs(1));
        let c = Config::try_parse_from([
            "agent",
            "--node-name=h3",
            "--images-namespace=golden",
            "--image-copies=4",
            "--image-retry=500ms",
        ])?;
        assert_eq!(c.images_namespace, "golden");
        assert_eq!(c.image_copies, 4);
        assert_eq!(c.image_retry, Duration::from_millis(500));
        assert!(Config::try_parse_from(["agent", "--node-name=h", "--image-copies=0"]).is_err());
        Ok(())
    }

    #[test]
    fn loopback_is_never_the_default_address_unless_nothing_else() {
        assert!(!usable_address(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        assert!(usable_address(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))));
        let ip = default_address();
        assert!(ip.is_ipv4());
    }
}
