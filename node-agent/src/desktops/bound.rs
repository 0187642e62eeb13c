//! Decides whether the operator bound a Desktop to this host, from records a tenant cannot
//! write: the operator-written `status.node` (tenants hold no `desktops/status` right) and the
//! console password mirror `console-<uid>` in the console namespace (only deskvirt writes
//! there), labelled with this host and the Desktop's UID. The `deskvirt.io/node` label, which
//! a tenant can set, only narrows the watch: a Desktop labelled or finalized by hand, or with a
//! status written by anyone but the operator, gets no domain, no disk and no teardown here.

use deskvirt_crds::Desktop;
use deskvirt_crds::constants::{
    ANNOTATION_DESKTOP, LABEL_DESKTOP_UID, LABEL_NODE, console_mirror_name,
};
use deskvirt_crds::names::label_value;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use super::context::DesktopContext;

/// Why a Desktop seen here is not this host's to act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotBound {
    /// `status.node` names another host, or none.
    StatusElsewhere(Option<String>),
    /// No mirror of the operator records a binding of this Desktop UID to this host.
    NoMirror,
    /// The mirror is for another Desktop or another host.
    MirrorDisagrees(&'static str),
}

impl std::fmt::Display for NotBound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::StatusElsewhere(Some(n)) => write!(f, "status.node is {n}"),
            Self::StatusElsewhere(None) => f.write_str("status.node is not set"),
            Self::NoMirror => f.write_str("the operator recorded no binding to this host"),
            Self::MirrorDisagrees(what) => write!(f, "the operator's binding record names {what}"),
        }
    }
}

/// Whether `d` (UID `uid`) is bound to this host, by the mirror in this host's cache; a refusal
/// is counted in `unbound_desktops`.
pub fn here<H>(ctx: &DesktopContext<H>, d: &Desktop, uid: &str) -> Result<(), NotBound> {
    let mirror = ctx
        .mirrors
        .get(&ObjectRef::new(&console_mirror_name(uid)).within(&ctx.config.console_namespace));
    let checked = check(d, mirror.as_deref(), &ctx.config.node_name);
    if checked.is_err() {
        ctx.metrics.unbound_desktops.inc();
    }
    checked
}

/// Whether `d` is bound to host `node`, given the mirror this host's cache holds for its UID.
pub fn check(d: &Desktop, mirror: Option<&Secret>, node: &str) -> Result<(), NotBound> {
    let status_node = d.status.as_ref().and_then(|s| s.node.clone());
    if status_node.as_deref() != Some(node) {
        return Err(NotBound::StatusElsewhere(status_node));
    }
    let mirror = mirror.ok_or(NotBound::NoMirror)?;
    let labels = mirror.labels();
    let uid = d.uid().unwrap_or_default();
    if uid.is_empty() || labels.get(LABEL_DESKTOP_UID) != Some(&uid) {
        return Err(NotBound::MirrorDisagrees("another desktop UID"));
    }
    if labels.get(LABEL_NODE) != Some(&label_value(node)) {
        return Err(NotBound::MirrorDisagrees("another host"));
    }
    let who = format!("{}/{}", d.namespace().unwrap_or_default(), d.name_any());
    if mirror.annotations().get(ANNOTATION_DESKTOP) != Some(&who) {
        return Err(NotBound::MirrorDisagrees("another desktop name"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use deskvirt_crds::desktop::DesktopStatus;
    use serde_json::json;

    const UID: &str = "0b7e9a4c-1111-4222-8333-444455556666";

    fn desktop(node: Option<&str>) -> Desktop {
        let mut d: Desktop = serde_json::from_value(json!({
            "apiVersion": "deskvirt.io/v1alpha1", "kind": "Desktop",
            "metadata": {"name": "a", "namespace": "team", "uid": UID,
                         "labels": {"deskvirt.io/node": "h1"},
                         "finalizers": ["deskvirt.io/node-agent"]},
            "spec": {"pool": "p", "cpu": 1, "memory": "1Gi", "disk": {"image": "i.qcow2"}}
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        d.status = Some(DesktopStatus {
            node: node.map(str::to_string),
            ..Default::default()
        });
        d
    }

    fn mirror(uid: &str, node: &str, who: &str) -> Secret {
        serde_json::from_value(json!({
            "metadata": {"name": format!("console-{uid}"), "namespace": "deskvirt-consoles",
                         "labels": {"deskvirt.io/desktop-uid": uid, "deskvirt.io/node": label_value(node)},
                         "annotations": {"deskvirt.io/desktop": who}}
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_binding_the_operator_made_is_accepted() {
        let m = mirror(UID, "h1", "team/a");
        assert_eq!(check(&desktop(Some("h1")), Some(&m), "h1"), Ok(()));
        let long = "h".repeat(200);
        let m = mirror(UID, &long, "team/a");
        assert_eq!(check(&desktop(Some(&long)), Some(&m), &long), Ok(()));
    }

    #[test]
    fn a_forged_label_and_finalizer_alone_are_refused() {
        assert_eq!(
            check(&desktop(None), None, "h1"),
            Err(NotBound::StatusElsewhere(None))
        );
    }

    #[test]
    fn a_forged_status_without_the_operators_record_is_refused() {
        assert_eq!(
            check(&desktop(Some("h1")), None, "h1"),
            Err(NotBound::NoMirror)
        );
        let other = mirror("9f2c1d3e-aaaa-4bbb-8ccc-ddddeeeeffff", "h1", "team/a");
        assert!(check(&desktop(Some("h1")), Some(&other), "h1").is_err());
        let elsewhere = mirror(UID, "h2", "team/a");
        assert!(check(&desktop(Some("h1")), Some(&elsewhere), "h1").is_err());
        let renamed = mirror(UID, "h1", "team/b");
        assert!(check(&desktop(Some("h1")), Some(&renamed), "h1").is_err());
    }
}
