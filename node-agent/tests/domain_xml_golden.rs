//! Golden files for the generated libvirt XML: a minimal desktop, one with every optional
//! field, one with USB redirection off, and a nat network. `UPDATE_GOLDEN=1` rewrites them.

mod common;

use std::net::Ipv4Addr;

use common::{UID, assert_golden, binding, desktop, host, minimal_spec, valid};
use deskvirt_crds::resource_pool::{NetworkMode, PoolNetwork};
use deskvirt_node_agent::domain::{
    DhcpHost, DomainInputs, NetworkAttachment, NetworkInputs, domain_xml, network_xml,
    parse_dhcp_hosts, parse_identity,
};

fn inputs(
    spec: serde_json::Value,
    host: &deskvirt_node_agent::domain::HostContext,
    binding: &deskvirt_node_agent::domain::Binding,
) -> DomainInputs {
    let desktop = desktop("team-a", "alice", UID, spec);
    match DomainInputs::from_desktop(&desktop, &valid(&desktop), binding, host) {
        Ok(inputs) => inputs,
        Err(e) => panic!("fixture desktop does not convert: {e}"),
    }
}

fn render(inputs: &DomainInputs) -> String {
    match domain_xml(inputs) {
        Ok(xml) => xml,
        Err(e) => panic!("cannot render domain XML: {e}"),
    }
}

#[test]
fn minimal_desktop() {
    let inputs = inputs(minimal_spec(), &host(), &binding());
    let xml = render(&inputs);
    assert_golden("minimal-desktop.xml", &xml);
    assert_eq!(parse_identity(&xml), Some(inputs.identity.clone()));
}

#[test]
fn every_field_desktop() {
    let spec = serde_json::json!({
        "pool": "default",
        "user": "Alice O'Hara <alice@example.com> & co",
        "cpu": 4,
        "memory": "8Gi",
        "disk": { "image": "debian-12.qcow2", "size": "40Gi", "clone": "Linked", "persistent": true },
        "boot": { "kernel": "vmlinuz", "initrd": "initrd.img", "cmdline": "console=ttyS0 quiet msg=\"<a & b>\"" },
        "power": "On",
        "display": { "usb": {
            "redirect": true,
            "channels": 3,
            "allow": [ { "class": "0x03" }, { "vendor": "0x046d", "product": "0xc52b" } ],
            "deny": [ { "class": "0x08" } ]
        } },
        "network": { "mac": "52:54:00:aa:bb:cc" },
        "performance": { "dedicatedCpus": true, "hugepages": true }
    });
    let mut host = host();
    host.network = NetworkAttachment::Bridge {
        bridge: "br0".into(),
    };
    host.spice_tls = true;
    let mut binding = binding();
    binding.pinned_cpus = vec![4, 5, 6, 7, 8];
    binding.mac = "52:54:00:AA:BB:CC".into();
    let mut inputs = inputs(spec, &host, &binding);
    inputs.cpu_model = Some("Westmere".into());
    assert_eq!(inputs.cpu_pinning, vec![4, 5, 6, 7]);
    assert_eq!(inputs.mac, "52:54:00:aa:bb:cc");
    let xml = render(&inputs);
    assert_golden("every-field-desktop.xml", &xml);
    assert_eq!(parse_identity(&xml), Some(inputs.identity.clone()));
    assert!(
        !format!("{inputs:?}").contains("s3cret-pw"),
        "Debug must redact the SPICE password"
    );
}

#[test]
fn usb_redirection_off() {
    let mut spec = minimal_spec();
    spec["display"] =
        serde_json::json!({ "usb": { "redirect": false, "deny": [ { "class": "0x08" } ] } });
    let xml = render(&inputs(spec, &host(), &binding()));
    assert_golden("usb-off-desktop.xml", &xml);
    assert!(
        !xml.contains("<redirdev"),
        "no redirdev when redirect is off"
    );
    assert!(
        !xml.contains("<redirfilter"),
        "no redirfilter when redirect is off"
    );
    assert!(
        xml.contains("qemu-xhci"),
        "the tablet still needs a USB controller"
    );
}

#[test]
fn pool_default_usb_applies_when_the_desktop_sets_none() {
    let desktop = desktop("team-a", "alice", UID, minimal_spec());
    let pool: deskvirt_crds::ResourcePoolSpec =
        serde_json::from_value(serde_json::json!({ "defaults": { "usb": { "redirect": false } } }))
            .unwrap_or_else(|e| panic!("{e}"));
    let valid = deskvirt_crds::validation::read_desktop(&desktop.spec, Some(&pool))
        .unwrap_or_else(|e| panic!("{e:?}"));
    let inputs = DomainInputs::from_desktop(&desktop, &valid, &binding(), &host())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!render(&inputs).contains("<redirdev"));
}

#[test]
fn nat_network() {
    let hosts = vec![
        DhcpHost {
            mac: "52:54:00:12:34:56".into(),
            ip: Ipv4Addr::new(10, 200, 3, 10),
        },
        DhcpHost {
            mac: "52:54:00:AA:BB:CC".into(),
            ip: Ipv4Addr::new(10, 200, 3, 11),
        },
    ];
    let inputs =
        match NetworkInputs::for_pool("default", &PoolNetwork::default(), "10.200.3.0/24", hosts) {
            Ok(Some(inputs)) => inputs,
            other => panic!("nat pool must give a network: {other:?}"),
        };
    let xml = match network_xml(&inputs) {
        Ok(xml) => xml,
        Err(e) => panic!("cannot render network XML: {e}"),
    };
    assert_golden("nat-network.xml", &xml);
    let leases = parse_dhcp_hosts(&xml).unwrap_or_default();
    assert_eq!(leases.len(), 2);
    assert_eq!(leases[1].mac, "52:54:00:aa:bb:cc");
}

#[test]
fn bridge_pools_need_no_network() {
    let bridge = PoolNetwork {
        mode: NetworkMode::Bridge,
        bridge: Some("br0".into()),
        ..PoolNetwork::default()
    };
    assert!(matches!(
        NetworkInputs::for_pool("default", &bridge, "10.200.3.0/24", vec![]),
        Ok(None)
    ));
}
