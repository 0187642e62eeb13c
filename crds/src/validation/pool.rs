//! What a ResourcePool's schema cannot check: directories that are clean and apart, a host
//! prefix inside the pool CIDR, a bridge named when the mode needs one, a port range in order,
//! quantities and durations that parse, failover only on shared storage, label syntax, a
//! fixed CPU model.

use std::net::Ipv4Addr;

use super::labels::{check_map, check_selector};
use super::{Errors, FieldError, bytes, idle, interface, positive_bytes, positive_duration};
use crate::paths;
use crate::resource_pool::{NetworkMode, ResourcePoolSpec, is_host_cpu};

/// Every field error of a pool's spec; empty when the pool is valid.
pub fn pool(spec: &ResourcePoolSpec) -> Vec<FieldError> {
    let mut e = Errors::default();
    check_map(&mut e, "spec.nodeSelector", &spec.node_selector);
    if let Some(sel) = &spec.namespace_selector {
        check_selector(&mut e, "spec.namespaceSelector", sel);
    }

    let storage = &spec.storage;
    let image_dir = paths::check_dir(&storage.image_dir);
    let disk_dir = paths::check_dir(&storage.disk_dir);
    let both_clean = image_dir.is_ok() && disk_dir.is_ok();
    e.check("spec.storage.imageDir", image_dir);
    e.check("spec.storage.diskDir", disk_dir);
    if both_clean && let Err(err) = paths::check_apart(&storage.image_dir, &storage.disk_dir) {
        e.add(
            "spec.storage.diskDir",
            format!("must lie apart from spec.storage.imageDir: {err}"),
        );
    }
    if let Some(backup) = &spec.backup {
        let dir = paths::check_dir(&backup.dir);
        let clean = dir.is_ok();
        e.check("spec.backup.dir", dir);
        if clean && both_clean {
            for (other, field) in [
                (&storage.image_dir, "spec.storage.imageDir"),
                (&storage.disk_dir, "spec.storage.diskDir"),
            ] {
                if let Err(err) = paths::check_apart(other, &backup.dir) {
                    e.add(
                        "spec.backup.dir",
                        format!("must lie apart from {field}: {err}"),
                    );
                }
            }
        }
        if let Some(cron) = &backup.schedule
            && let Err(err) = deskvirt_core::backup::schedule::Cron::parse(cron)
        {
            e.add("spec.backup.schedule", err.to_string());
        }
        if let Some(age) = &backup.max_age {
            positive_duration(&mut e, "spec.backup.maxAge", age);
        }
    }

    let net = &spec.network;
    match (&net.mode, &net.bridge) {
        (NetworkMode::Bridge, None) => e.add(
            "spec.network.bridge",
            "is required when spec.network.mode is bridge",
        ),
        (_, Some(b)) => interface(&mut e, "spec.network.bridge", b),
        _ => {}
    }
    match parse_cidr(&net.cidr) {
        Err(msg) => e.add("spec.network.cidr", msg),
        Ok(prefix) if net.node_prefix_length < prefix => e.add(
            "spec.network.nodePrefixLength",
            format!(
                "/{} is wider than the pool CIDR {} (/{prefix}); it must be at least {prefix}",
                net.node_prefix_length, net.cidr
            ),
        ),
        Ok(_) => {}
    }

    let ports = &spec.display.spice_ports;
    if ports.first > ports.last {
        e.add(
            "spec.display.spicePorts.last",
            format!(
                "{} is below spec.display.spicePorts.first ({}); the range is reversed",
                ports.last, ports.first
            ),
        );
    }

    bytes(&mut e, "spec.reserved.memory", &spec.reserved.memory);
    positive_bytes(
        &mut e,
        "spec.referenceSize.memory",
        &spec.reference_size.memory,
    );
    positive_duration(&mut e, "spec.failover.after", &spec.failover.after);
    positive_duration(&mut e, "spec.orphans.after", &spec.orphans.after);
    if spec.failover.restart_elsewhere && !storage.shared {
        e.add(
            "spec.failover.restartElsewhere",
            "needs spec.storage.shared: a desktop restarted on another host must find its disk there",
        );
    }
    if let Some(policy) = &spec.defaults.idle {
        idle(&mut e, "spec.defaults.idle", policy);
    }
    if let Some(usb) = &spec.defaults.usb {
        super::usb::filters(&mut e, "spec.defaults.usb", usb);
    }
    if let Some(model) = spec.cpu.model.as_deref().filter(|m| is_host_cpu(m)) {
        e.add(
            "spec.cpu.model",
            format!(
                "{model} is the host's own CPU, which breaks live migration between unlike \
                 hosts; name a fixed model such as Westmere or EPYC (see a DomainNode's \
                 status.cpu.models), or leave it unset for the hypervisor's default"
            ),
        );
    }
    e.0
}

/// The prefix length of an IPv4 CIDR whose host bits are clear, or what is wrong with it.
fn parse_cidr(cidr: &str) -> Result<u8, String> {
    let bad = || format!("{cidr:?} is not an IPv4 CIDR like 10.200.0.0/16");
    let (addr, prefix) = cidr.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    if prefix > 32 {
        return Err(bad());
    }
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    if u32::from(addr) & !mask != 0 {
        return Err(format!(
            "{cidr:?} has host bits set; the network is {}/{prefix}",
            Ipv4Addr::from(u32::from(addr) & mask)
        ));
    }
    Ok(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: serde_json::Value) -> ResourcePoolSpec {
        serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"))
    }

    fn paths_of(errors: &[FieldError]) -> Vec<&str> {
        errors.iter().map(|e| e.path.as_str()).collect()
    }

    #[test]
    fn the_defaults_are_valid() {
        assert_eq!(pool(&spec(serde_json::json!({}))), vec![]);
    }

    #[test]
    fn the_hosts_own_cpu_is_refused_and_a_fixed_model_is_not() {
        for own in ["host-model", "host-passthrough", "Host-Passthrough"] {
            let errors = pool(&spec(serde_json::json!({ "cpu": { "model": own } })));
            assert_eq!(paths_of(&errors), ["spec.cpu.model"], "{own}");
            assert!(
                errors[0].message.contains("breaks live migration"),
                "{errors:?}"
            );
        }
        for fixed in ["Westmere", "EPYC", "qemu64", "hostile"] {
            let errors = pool(&spec(serde_json::json!({ "cpu": { "model": fixed } })));
            assert_eq!(errors, vec![], "{fixed}");
        }
    }

    #[test]
    fn a_host_prefix_wider_than_the_cidr_is_named() {
        let errors = pool(&spec(serde_json::json!({
            "network": { "cidr": "10.0.0.0/24", "nodePrefixLength": 16 }
        })));
        assert_eq!(paths_of(&errors), ["spec.network.nodePrefixLength"]);
        assert!(
            errors[0].message.contains("wider than the pool CIDR"),
            "{errors:?}"
        );
    }

    #[test]
    fn overlapping_directories_are_named() {
        let errors = pool(&spec(serde_json::json!({
            "storage": { "imageDir": "/srv/vm", "diskDir": "/srv/vm/disks" }
        })));
        assert_eq!(paths_of(&errors), ["spec.storage.diskDir"]);
        let errors = pool(&spec(serde_json::json!({
            "storage": { "imageDir": "/srv/../etc", "diskDir": "/srv//disks" }
        })));
        assert_eq!(
            paths_of(&errors),
            ["spec.storage.imageDir", "spec.storage.diskDir"]
        );
    }

    #[test]
    fn a_backup_dir_must_be_clean_and_apart_from_the_disks() {
        let ok = pool(&spec(
            serde_json::json!({ "backup": { "dir": "/srv/backups" } }),
        ));
        assert_eq!(ok, vec![]);
        for bad in ["/var/lib/deskvirt/disks/b", "/var/lib", "/srv/../etc"] {
            let errors = pool(&spec(serde_json::json!({ "backup": { "dir": bad } })));
            let paths = paths_of(&errors);
            assert!(
                !paths.is_empty() && paths.iter().all(|p| *p == "spec.backup.dir"),
                "{bad}: {errors:?}"
            );
        }
    }

    #[test]
    fn every_bad_field_is_named_at_once() {
        let errors = pool(&spec(serde_json::json!({
            "network": { "mode": "bridge", "cidr": "10.0.0.1/16" },
            "display": { "spicePorts": { "first": 6000, "last": 5999 } },
            "failover": { "restartElsewhere": true, "after": "0s" },
            "referenceSize": { "memory": "0" },
        })));
        assert_eq!(
            paths_of(&errors),
            [
                "spec.network.bridge",
                "spec.network.cidr",
                "spec.display.spicePorts.last",
                "spec.referenceSize.memory",
                "spec.failover.after",
                "spec.failover.restartElsewhere",
            ]
        );
    }
}
