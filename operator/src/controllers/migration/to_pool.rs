//! Whether a desktop may move into another pool (a migration's `spec.targetPool`): the pool
//! exists with a valid spec, its `namespaceSelector` admits the desktop's namespace, and the
//! desktop's spec is valid against it (its images, USB policy and sizes), as for a Desktop
//! created there. A refusal names the pool and the reason.

use std::sync::Arc;

use deskvirt_crds::validation::{self, summary};
use deskvirt_crds::{Desktop, ResourcePool};
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use crate::context::Stores;
use crate::tenancy::pool_allows;

/// The pool `name` when desktop `d` may move into it, else why not.
pub(super) fn access(
    stores: &Stores,
    d: &Desktop,
    name: &str,
) -> Result<Arc<ResourcePool>, String> {
    let Some(pool) = stores.pool(name) else {
        return Err(format!("spec.targetPool: pool {name} does not exist"));
    };
    let errors = validation::pool(&pool.spec);
    if !errors.is_empty() {
        return Err(format!(
            "spec.targetPool: pool {name} has an invalid spec, so nothing moves into it: {}",
            summary(&errors)
        ));
    }
    let namespace = d.namespace().unwrap_or_default();
    let Some(ns) = stores.namespaces.get(&ObjectRef::new(&namespace)) else {
        return Err(format!("namespace {namespace} is not known yet"));
    };
    pool_allows(name, &pool.spec, &namespace, ns.labels())
        .map_err(|e| format!("spec.targetPool: {e}"))?;
    match validation::read_desktop(&d.spec, Some(&pool.spec)) {
        Ok(v) if v.refused.is_empty() => Ok(pool),
        Ok(v) => Err(refused(name, &v.refused)),
        Err(errors) => Err(refused(name, &errors)),
    }
}

fn refused(pool: &str, errors: &[validation::FieldError]) -> String {
    format!(
        "spec.targetPool: pool {pool} refuses the desktop's spec: {}",
        summary(errors)
    )
}
