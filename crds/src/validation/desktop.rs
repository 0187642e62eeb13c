//! What a Desktop's schema cannot check: quantities and durations that parse and are not zero,
//! a fixed MAC inside its pool's `macPrefix`, a USB policy no looser than its pool's, file
//! names and interface names that are not `.` or `..`.

use super::{Errors, FieldError, idle, interface, positive_bytes};
use crate::desktop::DesktopSpec;
use crate::paths;
use crate::resource_pool::ResourcePoolSpec;

/// Every field error of a desktop's spec, judged against its pool's spec when the pool exists.
pub fn desktop(spec: &DesktopSpec, pool: Option<&ResourcePoolSpec>) -> Vec<FieldError> {
    let mut e = Errors::default();
    positive_bytes(&mut e, "spec.memory", &spec.memory);
    e.check("spec.disk.image", paths::check_file_name(&spec.disk.image));
    if let Some(size) = &spec.disk.size {
        positive_bytes(&mut e, "spec.disk.size", size);
    }
    if let Some(boot) = &spec.boot {
        e.check("spec.boot.kernel", paths::check_file_name(&boot.kernel));
        if let Some(initrd) = &boot.initrd {
            e.check("spec.boot.initrd", paths::check_file_name(initrd));
        }
    }
    if let Some(policy) = &spec.idle {
        idle(&mut e, "spec.idle", policy);
    }
    for (i, sriov) in spec.performance.sriov.iter().enumerate() {
        interface(
            &mut e,
            &format!("spec.performance.sriov[{i}].physicalFunction"),
            &sriov.physical_function,
        );
    }
    if let Some(usb) = &spec.display.usb {
        super::usb::filters(&mut e, "spec.display.usb", usb);
    }
    let Some(pool) = pool else {
        return e.0;
    };
    if let Some(mac) = &spec.network.mac {
        let prefix = &pool.network.mac_prefix;
        let inside = mac
            .get(..prefix.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(prefix));
        if !inside {
            e.add(
                "spec.network.mac",
                format!(
                    "{mac} is outside the pool's MAC prefix {prefix} (spec.network.macPrefix \
                     of pool {}); a fixed MAC must start with it",
                    spec.pool
                ),
            );
        }
    }
    if let (Some(desk), Some(limit)) = (&spec.display.usb, &pool.defaults.usb) {
        super::usb::narrows(&mut e, desk, limit);
    }
    e.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desk(v: serde_json::Value) -> DesktopSpec {
        let mut base = serde_json::json!({ "pool": "a", "disk": { "image": "b.qcow2" } });
        if let (Some(b), Some(extra)) = (base.as_object_mut(), v.as_object()) {
            b.extend(extra.clone());
        }
        serde_json::from_value(base).unwrap_or_else(|e| panic!("{e}"))
    }

    fn pool(v: serde_json::Value) -> ResourcePoolSpec {
        serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_plain_desktop_is_valid() {
        assert_eq!(desktop(&desk(serde_json::json!({})), None), vec![]);
        let p = pool(serde_json::json!({}));
        assert_eq!(desktop(&desk(serde_json::json!({})), Some(&p)), vec![]);
    }

    #[test]
    fn a_mac_outside_the_prefix_is_refused() {
        let p = pool(serde_json::json!({ "network": { "macPrefix": "52:54:00" } }));
        let inside = desk(serde_json::json!({ "network": { "mac": "52:54:00:aa:bb:cc" } }));
        assert_eq!(desktop(&inside, Some(&p)), vec![]);
        let outside = desk(serde_json::json!({ "network": { "mac": "02:00:00:aa:bb:cc" } }));
        let errors = desktop(&outside, Some(&p));
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].path, "spec.network.mac");
    }

    #[test]
    fn zero_sizes_and_durations_are_named() {
        let d = desk(
            serde_json::json!({ "memory": "0", "idle": { "timeout": "0m" },
            "disk": { "image": "b.qcow2", "size": "99999999Ei" } }),
        );
        let paths: Vec<_> = desktop(&d, None).into_iter().map(|e| e.path).collect();
        assert_eq!(
            paths,
            ["spec.memory", "spec.disk.size", "spec.idle.timeout"]
        );
    }
}
