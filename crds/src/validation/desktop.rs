//! A Desktop's spec read once, against its pool, into the core's value both binaries decide with
//! ([`ValidDesktop`]): quantities and durations that parse and are not zero, file and
//! interface names that are not `.` or `..`, and the idle and USB policies in force. What only
//! the pool forbids (a fixed MAC outside its `macPrefix`, a USB policy looser than its
//! default) is kept apart: the operator refuses on it, a host applies the pool's bound.

use deskvirt_core::idle;
use deskvirt_core::scheduler::Request;
pub use deskvirt_core::valid::ValidDesktop;

use super::{Errors, FieldError, interface, positive_bytes};
use crate::desktop::{DesktopSpec, UsbPolicy};
use crate::paths;
use crate::resource_pool::ResourcePoolSpec;

/// Reads `spec` against its pool's spec (when the pool exists): the value, or every field
/// error of the spec itself, the pool's refusals after them.
pub fn read_desktop(
    spec: &DesktopSpec,
    pool: Option<&ResourcePoolSpec>,
) -> Result<ValidDesktop, Vec<FieldError>> {
    let mut e = Errors::default();
    let memory = positive_bytes(&mut e, "spec.memory", &spec.memory);
    match (spec.disk.image.is_empty(), &spec.disk.image_ref) {
        (false, None) => e.check("spec.disk.image", paths::check_file_name(&spec.disk.image)),
        // A restore needs the base pinned before the desktop is bound; not yet for images.
        (true, Some(_)) if spec.disk.restore_from.is_some() => e.add(
            "spec.disk.restoreFrom",
            "cannot be combined with spec.disk.imageRef yet: restore onto a desktop with \
             spec.disk.image"
                .to_string(),
        ),
        (true, Some(_)) => {}
        (true, None) => e.add(
            "spec.disk.image",
            "set one of spec.disk.image and spec.disk.imageRef".to_string(),
        ),
        (false, Some(_)) => e.add(
            "spec.disk.imageRef",
            "set only one of spec.disk.image and spec.disk.imageRef".to_string(),
        ),
    }
    let disk_size = spec
        .disk
        .size
        .as_deref()
        .map(|size| positive_bytes(&mut e, "spec.disk.size", size));
    if let Some(boot) = &spec.boot {
        e.check("spec.boot.kernel", paths::check_file_name(&boot.kernel));
        if let Some(initrd) = &boot.initrd {
            e.check("spec.boot.initrd", paths::check_file_name(initrd));
        }
    }
    let own_idle = spec
        .idle
        .as_ref()
        .map(|policy| super::idle(&mut e, "spec.idle", policy));
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
    let refused = pool.map(|p| refusals(spec, p)).unwrap_or_default();
    let Some(memory) = memory.filter(|_| e.0.is_empty()) else {
        e.0.extend(refused);
        return Err(e.0);
    };
    let defaults = pool.map(|p| &p.defaults);
    let (idle, connected_is_active) = match (&spec.idle, own_idle) {
        (Some(own), Some(read)) => (read, own.connected_is_active),
        _ => match defaults.and_then(|d| d.idle.as_ref()) {
            Some(p) => (
                idle::Policy::read(&p.timeout, p.action).ok(),
                p.connected_is_active,
            ),
            None => (None, true),
        },
    };
    let mut asked = Request::new(spec.cpu, memory);
    asked.dedicated_cpus = spec.performance.dedicated_cpus;
    asked.hugepages = spec.performance.hugepages;
    Ok(ValidDesktop {
        asked,
        disk_size: disk_size.flatten(),
        idle,
        connected_is_active,
        usb: usb_in_force(
            spec.display.usb.as_ref(),
            defaults.and_then(|d| d.usb.as_ref()),
        ),
        refused,
        cpu_model: pool.and_then(|p| p.cpu.model.clone()),
    })
}

/// What `pool` forbids in `spec`.
fn refusals(spec: &DesktopSpec, pool: &ResourcePoolSpec) -> Vec<FieldError> {
    let mut e = Errors::default();
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

/// The desktop's USB policy, else the pool's default, else redirection on with two channels.
/// A desktop policy looser than the pool's (an edit after binding: the operator refuses one
/// before) is never in force: the pool's is.
fn usb_in_force(desktop: Option<&UsbPolicy>, pool: Option<&UsbPolicy>) -> UsbPolicy {
    let desktop = match (desktop, pool) {
        (Some(d), Some(p)) if !super::usb_loosening(d, p).is_empty() => Some(p),
        (d, _) => d,
    };
    desktop.or(pool).cloned().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::desktop::IdleAction;

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

    fn valid(d: &DesktopSpec, p: Option<&ResourcePoolSpec>) -> ValidDesktop {
        read_desktop(d, p).unwrap_or_else(|e| panic!("{e:?}"))
    }

    fn paths(errors: Vec<FieldError>) -> Vec<String> {
        errors.into_iter().map(|e| e.path).collect()
    }

    #[test]
    fn a_plain_desktop_is_read_with_its_defaults() {
        let d = desk(serde_json::json!({}));
        let v = valid(&d, Some(&pool(serde_json::json!({}))));
        assert_eq!(v.asked, Request::new(2, 2 << 30));
        assert_eq!(v.disk_size, None);
        assert_eq!((v.idle, v.connected_is_active), (None, true));
        assert_eq!(v.usb, UsbPolicy::default());
        assert_eq!(v.refused, vec![]);
        assert_eq!(valid(&d, None).refused, vec![]);
    }

    #[test]
    fn a_mac_outside_the_prefix_is_refused_by_the_pool() {
        let p = pool(serde_json::json!({ "network": { "macPrefix": "52:54:00" } }));
        let inside = desk(serde_json::json!({ "network": { "mac": "52:54:00:aa:bb:cc" } }));
        assert_eq!(valid(&inside, Some(&p)).refused, vec![]);
        let outside = desk(serde_json::json!({ "network": { "mac": "02:00:00:aa:bb:cc" } }));
        assert_eq!(
            paths(valid(&outside, Some(&p)).refused),
            ["spec.network.mac"]
        );
        assert_eq!(valid(&outside, None).refused, vec![]);
    }

    #[test]
    fn zero_sizes_and_durations_are_named_with_the_pools_refusals_after_them() {
        let d = desk(
            serde_json::json!({ "memory": "0", "idle": { "timeout": "0m" },
            "network": { "mac": "02:00:00:aa:bb:cc" },
            "disk": { "image": "b.qcow2", "size": "99999999Ei" } }),
        );
        let p = pool(serde_json::json!({ "network": { "macPrefix": "52:54:00" } }));
        assert_eq!(
            read_desktop(&d, None).map_err(paths),
            Err(vec![
                "spec.memory".to_string(),
                "spec.disk.size".into(),
                "spec.idle.timeout".into()
            ])
        );
        let errors = read_desktop(&d, Some(&p)).map_err(paths);
        assert_eq!(
            errors.err().and_then(|e| e.last().cloned()).as_deref(),
            Some("spec.network.mac")
        );
    }

    #[test]
    fn every_size_is_parsed_once() {
        let d = desk(serde_json::json!({ "cpu": 3, "memory": "1536Mi",
            "performance": { "dedicatedCpus": true, "hugepages": true },
            "disk": { "image": "b.qcow2", "size": "20Gi" } }));
        let v = valid(&d, None);
        assert_eq!(v.asked, {
            let mut r = Request::new(3, 1536 << 20).dedicated();
            r.hugepages = true;
            r
        });
        assert_eq!(v.disk_size, Some(20 << 30));
    }

    #[test]
    fn the_size_admitted_is_the_recorded_one_with_the_specs_pinning() {
        let d = desk(serde_json::json!({ "cpu": 8, "memory": "8Gi",
            "performance": { "dedicatedCpus": true } }));
        let v = valid(&d, None);
        let st: crate::desktop::DesktopStatus = serde_json::from_value(serde_json::json!({
            "allocation": { "pool": "a", "cpu": 2, "memory": "2Gi" } }))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            v.admitted(crate::read::allocation(Some(&st))),
            Ok(Request::new(2, 2 << 30).dedicated())
        );
    }

    #[test]
    fn the_desktops_idle_policy_wins_over_the_pools_default() {
        let p = pool(serde_json::json!({ "defaults": { "idle":
            { "timeout": "30m", "action": "Shutdown", "connectedIsActive": false } } }));
        let inherit = valid(&desk(serde_json::json!({})), Some(&p));
        assert_eq!(
            (inherit.idle, inherit.connected_is_active),
            (
                Some(idle::Policy {
                    timeout: Duration::from_secs(1800),
                    action: IdleAction::Shutdown
                }),
                false
            )
        );
        let own = desk(serde_json::json!({ "idle": { "timeout": "5m", "action": "Suspend" } }));
        let own = valid(&own, Some(&p));
        assert_eq!(
            (
                own.idle.map(|i| (i.timeout, i.action)),
                own.connected_is_active
            ),
            (Some((Duration::from_secs(300), IdleAction::Suspend)), true)
        );
        let unreadable = pool(serde_json::json!({ "defaults": { "idle": { "timeout": "soon" } } }));
        assert_eq!(
            valid(&desk(serde_json::json!({})), Some(&unreadable)).idle,
            None
        );
    }

    #[test]
    fn a_usb_policy_looser_than_the_pools_is_refused_and_never_in_force() {
        let p =
            pool(serde_json::json!({ "defaults": { "usb": { "redirect": true, "channels": 2 } } }));
        let looser = desk(serde_json::json!({ "display": { "usb": { "channels": 4 } } }));
        let v = valid(&looser, Some(&p));
        assert_eq!(paths(v.refused), ["spec.display.usb.channels"]);
        assert_eq!(v.usb.channels, 2);
        let narrower = desk(serde_json::json!({ "display": { "usb": { "channels": 1 } } }));
        let v = valid(&narrower, Some(&p));
        assert_eq!((v.refused.len(), v.usb.channels), (0, 1));
        let off = pool(serde_json::json!({ "defaults": { "usb": { "redirect": false } } }));
        assert!(!valid(&desk(serde_json::json!({})), Some(&off)).usb.redirect);
        assert!(valid(&desk(serde_json::json!({})), None).usb.redirect);
    }
}
