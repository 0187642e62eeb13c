//! Decides how the areas are assembled into one `<domain>`, checking that every free-text
//! value is XML text before anything is serialized.

use super::boot::os;
use super::cpu_memory::{cpu, cputune, memory, memory_backing, vcpu};
use super::devices::{console, memballoon, serial, tablet};
use super::disks::disk;
use super::error::XmlError;
use super::graphics::{graphics, guest_agent_channel, vdagent_channel, video};
use super::inputs::{DomainInputs, domain_type_str};
use super::metadata::metadata;
use super::network::{NetworkAttachment, interface};
use super::text::is_xml_text;
use super::usb::{controller, redirdevs, redirfilter};
use super::xml::{self, Clock, Devices, Domain, Empty, Features, LinkState};

fn check(field: &'static str, value: &str) -> Result<(), XmlError> {
    if is_xml_text(value) {
        Ok(())
    } else {
        Err(XmlError::InvalidText { field })
    }
}

/// Checks the values that go into the XML unescaped (identity values are escaped instead).
fn check_inputs(inputs: &DomainInputs) -> Result<(), XmlError> {
    check("uid", &inputs.identity.uid)?;
    check("disk path", &inputs.disk_path)?;
    check("mac", &inputs.mac)?;
    check("spice listen address", &inputs.spice.listen)?;
    check("spice password", inputs.spice.password.expose())?;
    check("cpu model", inputs.cpu_model.as_deref().unwrap_or_default())?;
    if let Some(boot) = &inputs.boot {
        check("kernel", &boot.kernel)?;
        check("initrd", boot.initrd.as_deref().unwrap_or_default())?;
        check("cmdline", boot.cmdline.as_deref().unwrap_or_default())?;
    }
    match &inputs.network {
        NetworkAttachment::Network { name } => check("network", name)?,
        NetworkAttachment::Bridge { bridge } => check("bridge", bridge)?,
    }
    for f in inputs.usb.allow.iter().chain(&inputs.usb.deny) {
        for v in [&f.class, &f.vendor, &f.product].into_iter().flatten() {
            check("usb filter", v)?;
        }
    }
    Ok(())
}

/// The typed `<domain>` for `inputs`.
pub fn domain(inputs: &DomainInputs) -> Result<Domain, XmlError> {
    check_inputs(inputs)?;
    Ok(Domain {
        kind: domain_type_str(inputs.domain_type),
        name: inputs.domain_name(),
        uuid: inputs.identity.uid.to_ascii_lowercase(),
        metadata: metadata(&inputs.identity),
        memory: memory(inputs.memory_bytes),
        current_memory: memory(inputs.memory_bytes),
        memory_backing: memory_backing(inputs.hugepages),
        vcpu: vcpu(inputs.vcpus),
        cputune: cputune(&inputs.cpu_pinning),
        os: os(inputs.boot.as_ref()),
        features: Features {
            acpi: Empty {},
            apic: Empty {},
        },
        cpu: cpu(inputs.cpu_model.as_deref()),
        clock: Clock { offset: "utc" },
        on_poweroff: "destroy",
        on_reboot: "restart",
        on_crash: "destroy",
        devices: Devices {
            disk: disk(&inputs.disk_path),
            controller: vec![controller()],
            interface: interface(&inputs.network, &inputs.mac),
            serial: serial(&inputs.domain_name()),
            console: console(),
            channel: vec![vdagent_channel(), guest_agent_channel()],
            input: vec![tablet()],
            graphics: graphics(&inputs.spice),
            video: video(),
            redirdev: redirdevs(&inputs.usb),
            redirfilter: redirfilter(&inputs.usb),
            memballoon: memballoon(),
        },
    })
}

/// Only the `<graphics>` device of `inputs`, for changing the password of a running domain.
pub fn graphics_xml(inputs: &DomainInputs) -> Result<String, XmlError> {
    check_inputs(inputs)?;
    Ok(xml::to_string(&graphics(&inputs.spice))?)
}

/// Only the `<interface>` of `inputs`, its link `up` or down, for cycling a running domain's
/// link.
pub fn interface_xml(inputs: &DomainInputs, up: bool) -> Result<String, XmlError> {
    check_inputs(inputs)?;
    let mut nic = interface(&inputs.network, &inputs.mac);
    nic.link = Some(LinkState {
        state: if up { "up" } else { "down" },
    });
    Ok(xml::to_string(&nic)?)
}

/// The domain XML for `inputs`, ready for `virDomainDefineXML`.
pub fn domain_xml(inputs: &DomainInputs) -> Result<String, XmlError> {
    Ok(xml::to_string(&domain(inputs)?)?)
}
