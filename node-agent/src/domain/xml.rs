//! The libvirt domain XML as typed structs. Serialized with quick-xml, which escapes every
//! value, so no string from a Desktop can change the document's structure. Only the elements
//! deskvirt emits are modelled; the area modules fill them in.

use serde::Serialize;

use super::secret::Secret;

/// An element without attributes or content, such as `<acpi/>`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Empty {}

/// `<domain>`: the root.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename = "domain")]
pub struct Domain {
    /// `kvm` or `qemu`.
    #[serde(rename = "@type")]
    pub kind: &'static str,
    /// Domain name, see [`super::names::domain_name`].
    pub name: String,
    /// The Desktop's UID, so a second define updates the domain in place.
    pub uuid: String,
    /// The desktop identity under deskvirt's XML namespace.
    pub metadata: Metadata,
    /// Maximum memory.
    pub memory: SizedValue,
    /// Memory at boot (the balloon can lower it).
    #[serde(rename = "currentMemory")]
    pub current_memory: SizedValue,
    /// Hugepages backing.
    #[serde(rename = "memoryBacking", skip_serializing_if = "Option::is_none")]
    pub memory_backing: Option<MemoryBacking>,
    /// vCPU count.
    pub vcpu: Vcpu,
    /// vCPU pinning.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cputune: Option<CpuTune>,
    /// Boot settings.
    pub os: Os,
    /// Machine features (ACPI for graceful shutdown).
    pub features: Features,
    /// The pool's pinned CPU model; absent for the hypervisor's default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Cpu>,
    /// Guest clock.
    pub clock: Clock,
    /// Action when the guest powers off.
    pub on_poweroff: &'static str,
    /// Action when the guest reboots.
    pub on_reboot: &'static str,
    /// Action when the guest crashes.
    pub on_crash: &'static str,
    /// Devices.
    pub devices: Devices,
}

/// `<metadata>` holding `<deskvirt:desktop>`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metadata {
    /// The desktop identity.
    #[serde(rename = "deskvirt:desktop")]
    pub desktop: MetadataDesktop,
}

/// `<deskvirt:desktop>`: values are escaped with [`super::text::escape_value`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetadataDesktop {
    /// Namespace declaration, always [`super::metadata::METADATA_NS`].
    #[serde(rename = "@xmlns:deskvirt")]
    pub xmlns: &'static str,
    /// Desktop namespace.
    #[serde(rename = "deskvirt:namespace")]
    pub namespace: String,
    /// Desktop name.
    #[serde(rename = "deskvirt:name")]
    pub name: String,
    /// Desktop UID.
    #[serde(rename = "deskvirt:uid")]
    pub uid: String,
    /// Owner, when set.
    #[serde(rename = "deskvirt:user", skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// ResourcePool.
    #[serde(rename = "deskvirt:pool")]
    pub pool: String,
}

/// A number with a unit attribute, such as `<memory unit='KiB'>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SizedValue {
    /// Unit, `KiB`.
    #[serde(rename = "@unit")]
    pub unit: &'static str,
    /// The amount.
    #[serde(rename = "$text")]
    pub value: u64,
}

/// `<memoryBacking>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemoryBacking {
    /// `<hugepages/>`.
    pub hugepages: Empty,
}

/// `<vcpu placement='static'>N</vcpu>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Vcpu {
    /// Always `static`.
    #[serde(rename = "@placement")]
    pub placement: &'static str,
    /// vCPU count.
    #[serde(rename = "$text")]
    pub count: u32,
}

/// `<cpu mode='custom' match='exact'><model fallback='forbid'>NAME</model></cpu>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cpu {
    /// Always `custom`: a named model, the same on every host.
    #[serde(rename = "@mode")]
    pub mode: &'static str,
    /// Always `exact`.
    #[serde(rename = "@match")]
    pub matching: &'static str,
    /// The model.
    pub model: CpuModel,
}

/// `<model fallback='forbid'>NAME</model>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CpuModel {
    /// Always `forbid`: a host without the model refuses the domain rather than give it
    /// another CPU (which would break a later migration).
    #[serde(rename = "@fallback")]
    pub fallback: &'static str,
    /// The model's name.
    #[serde(rename = "$text")]
    pub name: String,
}

/// `<cputune>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CpuTune {
    /// One pin per vCPU.
    pub vcpupin: Vec<VcpuPin>,
}

/// `<vcpupin vcpu='0' cpuset='4'/>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VcpuPin {
    /// Guest vCPU index.
    #[serde(rename = "@vcpu")]
    pub vcpu: u32,
    /// Host CPU(s).
    #[serde(rename = "@cpuset")]
    pub cpuset: String,
}

/// `<os>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Os {
    /// `<type arch='x86_64' machine='q35'>hvm</type>`.
    #[serde(rename = "type")]
    pub os_type: OsType,
    /// Absolute kernel path for direct boot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Absolute initrd path for direct boot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// Kernel command line for direct boot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// Boot device when booting from disk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootDev>,
}

/// `<type>` inside `<os>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OsType {
    /// Guest architecture.
    #[serde(rename = "@arch")]
    pub arch: &'static str,
    /// Machine type.
    #[serde(rename = "@machine")]
    pub machine: &'static str,
    /// Always `hvm`.
    #[serde(rename = "$text")]
    pub value: &'static str,
}

/// `<boot dev='hd'/>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BootDev {
    /// Boot device.
    #[serde(rename = "@dev")]
    pub dev: &'static str,
}

/// `<features>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Features {
    /// ACPI, needed for graceful shutdown.
    pub acpi: Empty,
    /// APIC.
    pub apic: Empty,
}

/// `<clock offset='utc'/>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Clock {
    /// Clock offset.
    #[serde(rename = "@offset")]
    pub offset: &'static str,
}

/// `<devices>`, in the order libvirt itself writes them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Devices {
    /// The system disk.
    pub disk: Disk,
    /// USB controller.
    pub controller: Vec<Controller>,
    /// The NIC.
    pub interface: Interface,
    /// Serial port.
    pub serial: Serial,
    /// Console on the serial port.
    pub console: Console,
    /// SPICE vdagent and QEMU guest agent channels.
    pub channel: Vec<Channel>,
    /// Tablet for an absolute pointer.
    pub input: Vec<Input>,
    /// SPICE display.
    pub graphics: Graphics,
    /// Video card.
    pub video: Video,
    /// USB redirection channels.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub redirdev: Vec<RedirDev>,
    /// USB redirection filter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirfilter: Option<RedirFilter>,
    /// Memory balloon.
    pub memballoon: MemBalloon,
}

/// `<disk type='file' device='disk'>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Disk {
    /// `file`.
    #[serde(rename = "@type")]
    pub kind: &'static str,
    /// `disk`.
    #[serde(rename = "@device")]
    pub device: &'static str,
    /// Image format and cache settings.
    pub driver: DiskDriver,
    /// The image file.
    pub source: DiskSource,
    /// Guest-side device.
    pub target: DiskTarget,
}

/// `<driver name='qemu' type='qcow2' .../>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskDriver {
    /// `qemu`.
    #[serde(rename = "@name")]
    pub name: &'static str,
    /// Image format, `qcow2`.
    #[serde(rename = "@type")]
    pub format: &'static str,
    /// Pass guest discards to the image.
    #[serde(rename = "@discard")]
    pub discard: &'static str,
}

/// `<source file='...'/>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskSource {
    /// Absolute path of the image.
    #[serde(rename = "@file")]
    pub file: String,
}

/// `<target dev='vda' bus='virtio'/>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskTarget {
    /// Guest device name.
    #[serde(rename = "@dev")]
    pub dev: &'static str,
    /// Bus.
    #[serde(rename = "@bus")]
    pub bus: &'static str,
}

/// `<controller type='usb' model='qemu-xhci'/>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Controller {
    /// `usb`.
    #[serde(rename = "@type")]
    pub kind: &'static str,
    /// `qemu-xhci`.
    #[serde(rename = "@model")]
    pub model: &'static str,
    /// Number of ports.
    #[serde(rename = "@ports")]
    pub ports: u32,
}

/// `<interface type='network|bridge'>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename = "interface")]
pub struct Interface {
    /// `network` or `bridge`.
    #[serde(rename = "@type")]
    pub kind: &'static str,
    /// MAC address.
    pub mac: MacAddress,
    /// libvirt network or Linux bridge.
    pub source: InterfaceSource,
    /// NIC model.
    pub model: TypedModel,
    /// `<link state='up|down'/>`: only in a live update that cycles the link; absent (up) in
    /// a definition.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link: Option<LinkState>,
}

/// `<link state='...'/>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LinkState {
    /// `up` or `down`.
    #[serde(rename = "@state")]
    pub state: &'static str,
}

/// `<mac address='...'/>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MacAddress {
    /// The address.
    #[serde(rename = "@address")]
    pub address: String,
}

/// `<source network='...'/>` or `<source bridge='...'/>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InterfaceSource {
    /// libvirt network name.
    #[serde(rename = "@network", skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Linux bridge name.
    #[serde(rename = "@bridge", skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
}

/// `<model type='...'/>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TypedModel {
    /// Model name.
    #[serde(rename = "@type")]
    pub kind: &'static str,
}

/// `<serial type='pty'>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Serial {
    /// `pty`.
    #[serde(rename = "@type")]
    pub kind: &'static str,
    /// Port.
    pub target: SerialTarget,
    /// A file that keeps everything the guest writes, also while nobody is attached.
    pub log: SerialLog,
}

/// `<log file='...' append='on'/>` of a serial port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SerialLog {
    /// Absolute path of the log file.
    #[serde(rename = "@file")]
    pub file: String,
    /// `on`: a restart appends rather than truncates.
    #[serde(rename = "@append")]
    pub append: &'static str,
}

/// `<target port='0'/>` of a serial port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SerialTarget {
    /// Port number.
    #[serde(rename = "@port")]
    pub port: u32,
}

/// `<console type='pty'>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Console {
    /// `pty`.
    #[serde(rename = "@type")]
    pub kind: &'static str,
    /// Which serial port the console is.
    pub target: ConsoleTarget,
}

/// `<target type='serial' port='0'/>` of a console.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConsoleTarget {
    /// `serial`.
    #[serde(rename = "@type")]
    pub kind: &'static str,
    /// Port number.
    #[serde(rename = "@port")]
    pub port: u32,
}

/// `<channel type='spicevmc'>` (SPICE's vdagent) or `<channel type='unix'>` (the QEMU guest
/// agent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Channel {
    /// `spicevmc` or `unix`.
    #[serde(rename = "@type")]
    pub kind: &'static str,
    /// Guest side of the channel.
    pub target: ChannelTarget,
}

/// `<target type='virtio' name='com.redhat.spice.0'/>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChannelTarget {
    /// `virtio`.
    #[serde(rename = "@type")]
    pub kind: &'static str,
    /// Port name the guest agent opens.
    #[serde(rename = "@name")]
    pub name: &'static str,
}

/// `<input type='tablet' bus='usb'/>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Input {
    /// Input kind.
    #[serde(rename = "@type")]
    pub kind: &'static str,
    /// Bus.
    #[serde(rename = "@bus")]
    pub bus: &'static str,
}

/// `<graphics type='spice'>`. The password is a [`Secret`], redacted from Debug output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename = "graphics")]
pub struct Graphics {
    /// `spice`.
    #[serde(rename = "@type")]
    pub kind: &'static str,
    /// Plain port (without TLS).
    #[serde(rename = "@port", skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// TLS port (with TLS).
    #[serde(rename = "@tlsPort", skip_serializing_if = "Option::is_none")]
    pub tls_port: Option<u16>,
    /// Always `no`: the operator allocates ports.
    #[serde(rename = "@autoport")]
    pub autoport: &'static str,
    /// SPICE ticket.
    #[serde(rename = "@passwd")]
    pub passwd: Secret,
    /// `secure` with TLS.
    #[serde(rename = "@defaultMode", skip_serializing_if = "Option::is_none")]
    pub default_mode: Option<&'static str>,
    /// Listen address.
    pub listen: GraphicsListen,
}

/// `<listen type='address' address='...'/>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GraphicsListen {
    /// `address`.
    #[serde(rename = "@type")]
    pub kind: &'static str,
    /// IP address.
    #[serde(rename = "@address")]
    pub address: String,
}

/// `<video>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Video {
    /// The card.
    pub model: VideoModel,
}

/// `<model type='qxl' heads='1' primary='yes'/>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VideoModel {
    /// `qxl`.
    #[serde(rename = "@type")]
    pub kind: &'static str,
    /// Monitors.
    #[serde(rename = "@heads")]
    pub heads: u32,
    /// `yes`.
    #[serde(rename = "@primary")]
    pub primary: &'static str,
}

/// `<redirdev bus='usb' type='spicevmc'/>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RedirDev {
    /// `usb`.
    #[serde(rename = "@bus")]
    pub bus: &'static str,
    /// `spicevmc`.
    #[serde(rename = "@type")]
    pub kind: &'static str,
}

/// `<redirfilter>`: rules checked in order, first match wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RedirFilter {
    /// The rules.
    pub usbdev: Vec<UsbDevRule>,
}

/// `<usbdev class='0x08' vendor='..' product='..' allow='yes|no'/>`; a missing attribute
/// matches any device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsbDevRule {
    /// USB class.
    #[serde(rename = "@class", skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// Vendor id.
    #[serde(rename = "@vendor", skip_serializing_if = "Option::is_none")]
    pub vendor: Option<String>,
    /// Product id.
    #[serde(rename = "@product", skip_serializing_if = "Option::is_none")]
    pub product: Option<String>,
    /// `yes` or `no`.
    #[serde(rename = "@allow")]
    pub allow: &'static str,
}

/// `<memballoon model='virtio'/>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemBalloon {
    /// `virtio`.
    #[serde(rename = "@model")]
    pub model: &'static str,
}

/// Serializes a typed document with two-space indentation.
pub fn to_string<T: Serialize>(value: &T) -> Result<String, quick_xml::SeError> {
    let mut out = String::new();
    let mut serializer = quick_xml::se::Serializer::new(&mut out);
    serializer.indent(' ', 2);
    value.serialize(serializer)?;
    out.push('\n');
    Ok(out)
}
