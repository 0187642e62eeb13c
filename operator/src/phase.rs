//! Reads a Desktop's conditions into the core's phase facts: the phase and `Ready` themselves
//! are decided by [`deskvirt_core::phase`].

use deskvirt_core::phase::Cond;
use deskvirt_crds::conditions::find;
use deskvirt_crds::constants::condition::{DOMAIN_DEFINED, RUNNING};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

pub use deskvirt_core::phase::{Derived, Facts, derive};

fn cond<'a>(conditions: &'a [Condition], type_: &str) -> Option<Cond<'a>> {
    find(conditions, type_).map(|c| Cond {
        status: &c.status,
        reason: &c.reason,
        message: &c.message,
    })
}

/// The agent's `DomainDefined` and `Running` among a Desktop's conditions.
pub fn agent_conditions(conditions: &[Condition]) -> (Option<Cond<'_>>, Option<Cond<'_>>) {
    (cond(conditions, DOMAIN_DEFINED), cond(conditions, RUNNING))
}
