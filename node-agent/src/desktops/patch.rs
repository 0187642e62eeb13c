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

/// Sets the finalizer list computed by `change` from the object's current list, guarded by its
/// resourceVersion; on a conflict (someone else wrote the object meanwhile, such as the
/// operator's status) it reads the object again and retries, a few times.
async fn set_finalizers(
    api: &Api<Desktop>,
    d: &Desktop,
    change: impl Fn(&[String]) -> Vec<String>,
    action: &'static str,
) -> Result<(), Error> {
    let name = d.name_any();
    let mut current = d.clone();
    for attempt in 0..4 {
        let patch = json!({
            "metadata": {
                "resourceVersion": current.resource_version(),
                "finalizers": change(current.finalizers()),
            }
        });
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return Ok(()),
            // Gone already: nothing holds it any more.
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 && attempt < 3 => {
                match api.get_opt(&name).await.map_err(kube(action))? {
                    Some(fresh) => current = fresh,
                    None => return Ok(()),
                }
            }
            Err(e) => return Err(kube(action)(e)),
        }
    }
    Ok(())
}

/// Adds the agent's finalizer (before anything is created on the host).
pub async fn add_finalizer(api: &Api<Desktop>, d: &Desktop) -> Result<(), Error> {
    let add = |list: &[String]| {
        let mut out = list.to_vec();
        if !out.iter().any(|f| f == FINALIZER_AGENT) {
            out.push(FINALIZER_AGENT.to_string());
        }
        out
    };
    set_finalizers(api, d, add, "add the agent finalizer").await
}

/// Removes the agent's finalizer (after the host is clean).
pub async fn remove_finalizer(api: &Api<Desktop>, d: &Desktop) -> Result<(), Error> {
    let remove = |list: &[String]| {
        list.iter()
            .filter(|f| *f != FINALIZER_AGENT)
            .cloned()
            .collect()
    };
    set_finalizers(api, d, remove, "remove the agent finalizer").await
}

/// Applies the agent's part of the status.
pub async fn apply_status(
    api: &Api<Desktop>,
    name: &str,
    status: serde_json::Value,
) -> Result<(), Error> {
    apply_status_as(api, name, status, MANAGER_AGENT, "apply the desktop status").await
}

/// Server-side apply of `status` (a part of the Desktop's status) under field manager
/// `manager`, which owns just those fields: the agent's migration and backup reports are
/// written apart from its main status so that neither write drops the other's.
pub async fn apply_status_as(
    api: &Api<Desktop>,
    name: &str,
    status: serde_json::Value,
    manager: &str,
    action: &'static str,
) -> Result<(), Error> {
    let body = json!({
        "apiVersion": "deskvirt.io/v1alpha1",
        "kind": "Desktop",
        "metadata": { "name": name },
        "status": status,
    });
    let pp = PatchParams::apply(manager).force();
    api.patch_status(name, &pp, &Patch::Apply(&body))
        .await
        .map_err(kube(action))?;
    Ok(())
}
