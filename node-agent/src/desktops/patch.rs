//! How the agent writes to a Desktop: its finalizer by a merge patch guarded by the object's
//! resourceVersion (a conflict means "read again", never a lost finalizer of someone else), and
//! its status fields by server-side apply as `deskvirt-node-agent`.

use deskvirt_crds::Desktop;
use deskvirt_crds::constants::{FINALIZER_AGENT, MANAGER_AGENT};
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use super::{Error, kube};

/// Whether the Desktop carries the agent's finalizer.
pub fn has_finalizer(d: &Desktop) -> bool {
    d.finalizers().iter().any(|f| f == FINALIZER_AGENT)
}

async fn set_finalizers(
    api: &Api<Desktop>,
    d: &Desktop,
    finalizers: Vec<String>,
    action: &'static str,
) -> Result<(), Error> {
    let patch = json!({
        "metadata": { "resourceVersion": d.resource_version(), "finalizers": finalizers }
    });
    api.patch(
        &d.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map_err(kube(action))?;
    Ok(())
}

/// Adds the agent's finalizer (before anything is created on the host).
pub async fn add_finalizer(api: &Api<Desktop>, d: &Desktop) -> Result<(), Error> {
    let mut finalizers = d.finalizers().to_vec();
    finalizers.push(FINALIZER_AGENT.to_string());
    set_finalizers(api, d, finalizers, "add the agent finalizer").await
}

/// Removes the agent's finalizer (after the host is clean).
pub async fn remove_finalizer(api: &Api<Desktop>, d: &Desktop) -> Result<(), Error> {
    let finalizers = d
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER_AGENT)
        .cloned()
        .collect();
    set_finalizers(api, d, finalizers, "remove the agent finalizer").await
}

/// Applies the agent's part of the status.
pub async fn apply_status(
    api: &Api<Desktop>,
    name: &str,
    status: serde_json::Value,
) -> Result<(), Error> {
    let body = json!({
        "apiVersion": "deskvirt.io/v1alpha1",
        "kind": "Desktop",
        "metadata": { "name": name },
        "status": status,
    });
    let pp = PatchParams::apply(MANAGER_AGENT).force();
    api.patch_status(name, &pp, &Patch::Apply(&body))
        .await
        .map_err(kube("apply the desktop status"))?;
    Ok(())
}
