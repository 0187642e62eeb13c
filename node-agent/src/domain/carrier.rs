//! Decides the carrier of a move into another pool: a domain that holds the desktop's disk
//! alone (no NIC, no display, no USB, no pinned CPU model, little memory), under the desktop
//! domain's own name, UUID and deskvirt identity. The source starts it paused and moves it with
//! the disk's own layer copied: libvirt's ABI check would refuse the desktop's own domain with
//! the other pool's MAC or CPU model, and the carrier never runs guest code. Pure.

use serde::Serialize;

use super::disks::disk;
use super::error::XmlError;
use super::inputs::{DomainType, domain_type_str};
use super::metadata::{DesktopIdentity, metadata};
use super::text::is_xml_text;
use super::xml::{self, Disk, MemBalloon, Metadata, SizedValue, Vcpu};

/// Memory of a carrier: enough for QEMU to start a guest that never runs.
pub const CARRIER_MEMORY_BYTES: u64 = 32 << 20;

/// What a carrier is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Carrier<'a> {
    /// The desktop's identity, kept so that the agents on both hosts know whose it is.
    pub identity: &'a DesktopIdentity,
    /// The desktop domain's name.
    pub name: &'a str,
    /// The desktop domain's `<uuid>`, as libvirt holds it.
    pub uuid: &'a str,
    /// `kvm` or `qemu`, as this host's desktops.
    pub domain_type: DomainType,
}

/// `<domain>` of a carrier.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename = "domain")]
struct CarrierDomain {
    #[serde(rename = "@type")]
    kind: &'static str,
    name: String,
    uuid: String,
    metadata: Metadata,
    memory: SizedValue,
    #[serde(rename = "currentMemory")]
    current_memory: SizedValue,
    vcpu: Vcpu,
    os: CarrierOs,
    devices: CarrierDevices,
}

/// `<os><type arch='x86_64' machine='q35'>hvm</type></os>`: the machine desktops have.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct CarrierOs {
    #[serde(rename = "type")]
    os_type: xml::OsType,
}

/// `<devices>`: the disk, and libvirt told not to add a USB controller or a balloon.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct CarrierDevices {
    disk: Disk,
    controller: NoController,
    memballoon: MemBalloon,
}

/// `<controller type='usb' model='none'/>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct NoController {
    #[serde(rename = "@type")]
    kind: &'static str,
    #[serde(rename = "@model")]
    model: &'static str,
}

fn check(field: &'static str, value: &str) -> Result<(), XmlError> {
    if is_xml_text(value) {
        Ok(())
    } else {
        Err(XmlError::InvalidText { field })
    }
}

/// The carrier `c` with its disk at `disk_path` (this host's path to start it, the target
/// pool's path to move it there).
pub fn carrier_xml(c: &Carrier<'_>, disk_path: &str) -> Result<String, XmlError> {
    check("domain name", c.name)?;
    check("uuid", c.uuid)?;
    check("disk path", disk_path)?;
    let doc = CarrierDomain {
        kind: domain_type_str(c.domain_type),
        name: c.name.to_string(),
        uuid: c.uuid.to_ascii_lowercase(),
        metadata: metadata(c.identity),
        memory: super::cpu_memory::memory(CARRIER_MEMORY_BYTES),
        current_memory: super::cpu_memory::memory(CARRIER_MEMORY_BYTES),
        vcpu: super::cpu_memory::vcpu(1),
        os: CarrierOs {
            os_type: xml::OsType {
                arch: "x86_64",
                machine: "q35",
                value: "hvm",
            },
        },
        devices: CarrierDevices {
            disk: disk(disk_path),
            controller: NoController {
                kind: "usb",
                model: "none",
            },
            memballoon: MemBalloon { model: "none" },
        },
    };
    Ok(xml::to_string(&doc)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{parse_disk_sources, parse_identity};

    fn identity() -> DesktopIdentity {
        DesktopIdentity {
            namespace: "team".into(),
            name: "a".into(),
            uid: "0B7E9A4C-1111-4222-8333-444455556666".into(),
            user: Some("u".into()),
            pool: "b".into(),
        }
    }

    fn carrier(identity: &DesktopIdentity) -> Carrier<'_> {
        Carrier {
            identity,
            name: "team_a-0b7e9a4c",
            uuid: "0B7E9A4C-1111-4222-8333-444455556666",
            domain_type: DomainType::Qemu,
        }
    }

    #[test]
    fn a_carrier_holds_the_disk_alone_under_the_desktops_name_uuid_and_identity() {
        let id = identity();
        let xml = carrier_xml(&carrier(&id), "/var/lib/b/disks/team_a-0b7e9a4c.qcow2")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(xml.starts_with("<domain type=\"qemu\">"), "{xml}");
        assert!(xml.contains("<name>team_a-0b7e9a4c</name>"), "{xml}");
        assert!(
            xml.contains("<uuid>0b7e9a4c-1111-4222-8333-444455556666</uuid>"),
            "{xml}"
        );
        assert!(xml.contains("<memory unit=\"KiB\">32768</memory>"), "{xml}");
        assert!(xml.contains("<vcpu placement=\"static\">1</vcpu>"), "{xml}");
        assert!(
            xml.contains("<target dev=\"vda\" bus=\"virtio\"/>"),
            "the desktop's disk target: {xml}"
        );
        assert!(xml.contains("type=\"qcow2\""), "{xml}");
        assert!(
            xml.contains("<controller type=\"usb\" model=\"none\"/>"),
            "{xml}"
        );
        for absent in ["<cpu", "<interface", "<graphics", "<redirdev", "<channel"] {
            assert!(!xml.contains(absent), "{absent} in {xml}");
        }
        assert_eq!(parse_identity(&xml), Some(id));
        let sources = parse_disk_sources(&xml).unwrap_or_default();
        assert_eq!(
            sources.into_iter().collect::<Vec<_>>(),
            ["/var/lib/b/disks/team_a-0b7e9a4c.qcow2"]
        );
    }

    #[test]
    fn a_path_is_escaped_and_one_xml_cannot_carry_is_refused() {
        let id = identity();
        let odd = "/srv/a&b/<x>'\"/d.qcow2";
        let xml = carrier_xml(&carrier(&id), odd).unwrap_or_else(|e| panic!("{e}"));
        assert!(!xml.contains("<x>"), "{xml}");
        let sources = parse_disk_sources(&xml).unwrap_or_default();
        assert_eq!(sources.into_iter().collect::<Vec<_>>(), [odd]);
        assert!(matches!(
            carrier_xml(&carrier(&id), "/srv/\u{1}/d.qcow2"),
            Err(XmlError::InvalidText { field: "disk path" })
        ));
    }
}
