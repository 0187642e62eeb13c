//! How a component lets go of an object: it removes its own finalizers with a merge patch
//! guarded by the version it read, so a conflict means "read again" and never drops a
//! finalizer someone else added meanwhile. Not an apply: on Kubernetes 1.20 managedFields has no
//! subresource, so a component's status applies take over the entry of its metadata apply, and
//! an apply that leaves a finalizer out no longer removes it.

use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;

/// Removes `finalizers` from `obj` in one write under field manager `manager`, guarded by the
/// version read. An object already gone is fine: an earlier pass removed the last finalizer.
pub async fn remove<K>(
    api: &Api<K>,
    obj: &K,
    finalizers: &[&str],
    manager: &str,
) -> Result<(), kube::Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let rest: Vec<&String> = obj
        .finalizers()
        .iter()
        .filter(|f| !finalizers.contains(&f.as_str()))
        .collect();
    let patch = serde_json::json!({
        "metadata": { "resourceVersion": obj.resource_version(), "finalizers": rest }
    });
    let pp = PatchParams {
        field_manager: Some(manager.into()),
        ..Default::default()
    };
    match api.patch(&obj.name_any(), &pp, &Patch::Merge(&patch)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}
