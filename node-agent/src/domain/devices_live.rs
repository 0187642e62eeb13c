//! Reads what activity counters are keyed by from a live domain XML (disk and NIC target
//! devices) and who is connected from QEMU's `query-spice` reply. Pure.

use super::read::{attribute, walk};

/// Target device names of the domain's disks (`vda`) and NICs (`vnet3`), from its live XML.
pub fn stat_devices(xml: &str) -> Result<(Vec<String>, Vec<String>), quick_xml::Error> {
    let mut disks = Vec::new();
    let mut nics = Vec::new();
    walk(xml, |path, attrs| {
        let n = path.len();
        if n == 4
            && path[1] == "devices"
            && path[3] == "target"
            && let Some(dev) = attribute(attrs, "dev")
        {
            match path[2].as_str() {
                "disk" => disks.push(dev.to_string()),
                "interface" => nics.push(dev.to_string()),
                _ => {}
            }
        }
    })?;
    Ok((disks, nics))
}

/// The client address of the SPICE main channel in a `query-spice` reply, when a client is
/// connected; `Err` when the reply is not what QEMU sends.
pub fn spice_client(reply: &str) -> Result<Option<String>, String> {
    let v: serde_json::Value = serde_json::from_str(reply).map_err(|e| e.to_string())?;
    let ret = v
        .get("return")
        .ok_or("no \"return\" in query-spice reply")?;
    let channels = ret
        .get("channels")
        .and_then(|c| c.as_array())
        .cloned()
        .unwrap_or_default();
    // channel-type 1 is the main channel: present while a client is linked.
    Ok(channels
        .iter()
        .find(|c| c.get("channel-type").and_then(|t| t.as_u64()) == Some(1))
        .map(|c| {
            c.get("host")
                .and_then(|h| h.as_str())
                .unwrap_or_default()
                .to_string()
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_of_disks_and_nics() {
        let xml = "<domain><devices><disk type='file'><source file='/d/a.qcow2'/><target dev='vda' bus='virtio'/></disk>\
<interface type='network'><target dev='vnet7'/></interface><serial type='pty'><target port='0'/></serial></devices></domain>";
        let Ok((disks, nics)) = stat_devices(xml) else {
            panic!("parse");
        };
        assert_eq!(disks, ["vda"]);
        assert_eq!(nics, ["vnet7"]);
    }

    #[test]
    fn main_channel_means_connected() {
        let connected = r#"{"return":{"enabled":true,"channels":[{"host":"127.0.0.1","port":"51234","family":"ipv4","channel-type":1,"connection-id":1,"channel-id":0,"tls":false}]}}"#;
        assert_eq!(spice_client(connected), Ok(Some("127.0.0.1".into())));
        let none = r#"{"return":{"enabled":true,"channels":[]}}"#;
        assert_eq!(spice_client(none), Ok(None));
        assert!(spice_client("{}").is_err());
    }
}
