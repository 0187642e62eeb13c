//! What the action controllers (DesktopMigration, DesktopBackup, a host's drain) share:
//! decides how a failed pass is reported and retried (an API call that failed, retried when
//! the API may recover; an object missing a field every object has; a write the fence
//! stopped), which failures end the pass quietly (a lost write race or a fenced write looks
//! again in a second, an object gone waits for its next change), and when a status write is
//! worth sending (only when more than condition times changed).

use std::fmt::Debug;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Categorized, StatusApply, apply_status, is_conflict, kube_transient};
use crate::fence;

/// Why a pass failed.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("cannot {action}")]
    Kube {
        action: &'static str,
        source: kube::Error,
    },
    #[error("object has no {0}")]
    MissingField(&'static str),
    #[error("write not sent")]
    Fenced(#[from] crate::fence::Fenced),
}

impl Categorized for PassError {
    fn category(&self) -> &'static str {
        match self {
            PassError::Kube { .. } => "KubeApi",
            PassError::MissingField(_) => "InvalidObject",
            PassError::Fenced(_) => "Fenced",
        }
    }
    fn is_transient(&self) -> bool {
        match self {
            PassError::Kube { source, .. } => kube_transient(source),
            PassError::Fenced(_) => true,
            PassError::MissingField(_) => false,
        }
    }
}

/// Wraps a failed API call made to `action`.
pub fn kube(action: &'static str) -> impl FnOnce(kube::Error) -> PassError {
    move |source| PassError::Kube { action, source }
}

/// The pass's answer: a fenced write or a lost write race looks again in a second, an object
/// deleted meanwhile waits for its next change; other errors go to the error policy.
pub fn settle(result: Result<Action, PassError>) -> Result<Action, PassError> {
    match result {
        Ok(action) => Ok(action),
        Err(PassError::Fenced(e)) => {
            tracing::warn!(error = %e, "pass stopped before writing");
            Ok(Action::requeue(Duration::from_secs(1)))
        }
        Err(PassError::Kube { source, .. }) if is_conflict(&source) => {
            tracing::debug!(error = %source, "lost a write race; looking again");
            Ok(Action::requeue(Duration::from_secs(1)))
        }
        Err(PassError::Kube {
            source: kube::Error::Api(s),
            ..
        }) if s.code == 404 => Ok(Action::await_change()),
        Err(e) => Err(e),
    }
}

/// A status with conditions.
pub trait Conditioned: Clone + PartialEq + Default + Serialize + Debug {
    fn conditions(&self) -> &[Condition];
    fn conditions_mut(&mut self) -> &mut Vec<Condition>;

    /// The status without its conditions.
    fn without_conditions(&self) -> Self {
        let mut s = self.clone();
        s.conditions_mut().clear();
        s
    }

    /// Sets condition `type_` as the pass at `now` decided, keeping its transition time from
    /// `previous` (the status the pass read) when its status did not change.
    #[allow(clippy::too_many_arguments)]
    fn set_condition(
        &mut self,
        previous: Option<&Self>,
        type_: &str,
        status: deskvirt_crds::conditions::Status,
        reason: &str,
        message: &str,
        generation: Option<i64>,
        now: k8s_openapi::jiff::Timestamp,
    ) {
        let prev = previous.map_or(&[][..], |p| p.conditions());
        let c = deskvirt_crds::conditions::condition(
            prev, type_, status, reason, message, generation, now,
        );
        deskvirt_crds::conditions::upsert(self.conditions_mut(), c);
    }
}

/// The reason of the `Ready` condition of `status`.
pub fn ready_reason<S: Conditioned>(status: Option<&S>) -> Option<String> {
    let ready = deskvirt_crds::constants::condition::READY;
    deskvirt_crds::conditions::find(status?.conditions(), ready).map(|c| c.reason.clone())
}

/// Applies status `want` onto the version of `obj` decided on (guarded by its
/// resourceVersion), unless nothing but condition times changed; returns the object as written
/// (or as it was).
pub async fn write_status<K, S>(
    api: &Api<K>,
    obj: &K,
    current: Option<&S>,
    want: &S,
    action: &'static str,
) -> Result<K, PassError>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    S: Conditioned,
{
    let current = current.cloned().unwrap_or_default();
    let same =
        !deskvirt_crds::conditions::differ_ignoring_time(current.conditions(), want.conditions())
            && current.without_conditions() == want.without_conditions();
    if same {
        return Ok(obj.clone());
    }
    let name = obj.name_any();
    let ns = obj.namespace();
    let body = StatusApply::new::<K>(&name, ns.as_deref(), want.clone())
        .guarded(obj.meta().resource_version.as_deref());
    fence::check()?;
    apply_status(api, &body).await.map_err(kube(action))
}

/// The statuses of the action objects, each with its own list of conditions.
macro_rules! conditioned {
    ($($status:ty),+) => {$(
        impl Conditioned for $status {
            fn conditions(&self) -> &[Condition] {
                &self.conditions
            }
            fn conditions_mut(&mut self) -> &mut Vec<Condition> {
                &mut self.conditions
            }
        }
    )+};
}

conditioned!(
    deskvirt_crds::DesktopMigrationStatus,
    deskvirt_crds::DesktopBackupStatus,
    deskvirt_crds::DesktopRestoreStatus
);

/// Removes the record field `field` of Desktop `d`'s status (an action's record for its host)
/// when `ours` says the record is the action's, read fresh from the API (the cache may not
/// show it yet) and guarded by the version read: a merge patch that only removes, as an apply
/// leaving the field out would leave a null on Kubernetes 1.20. A desktop gone is done.
pub async fn clear_desktop_record(
    desktops: &Api<deskvirt_crds::Desktop>,
    d: &deskvirt_crds::Desktop,
    field: &str,
    ours: impl Fn(&deskvirt_crds::DesktopStatus) -> bool,
    manager: &str,
    action: &'static str,
) -> Result<(), PassError> {
    let fresh = desktops
        .get_opt(&d.name_any())
        .await
        .map_err(kube("read the desktop"))?;
    let Some(fresh) = fresh.filter(|f| f.uid() == d.uid()) else {
        return Ok(());
    };
    if !fresh.status.as_ref().is_some_and(ours) {
        return Ok(());
    }
    let patch = serde_json::json!({
        "metadata": { "resourceVersion": fresh.resource_version() },
        "status": { field: null },
    });
    let pp = kube::api::PatchParams {
        field_manager: Some(manager.into()),
        ..Default::default()
    };
    fence::check()?;
    match desktops
        .patch_status(&fresh.name_any(), &pp, &kube::api::Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(kube(action)(e)),
    }
}

/// Applies `status` (an action's record: a part of the Desktop's status) to Desktop `d` under
/// field manager `manager`, guarded by the version of `d` the pass decided on.
pub async fn record_on_desktop(
    desktops: &Api<deskvirt_crds::Desktop>,
    d: &deskvirt_crds::Desktop,
    status: deskvirt_crds::DesktopStatus,
    manager: &str,
    action: &'static str,
) -> Result<(), PassError> {
    let name = d.name_any();
    let ns = d.namespace();
    let body = StatusApply::new::<deskvirt_crds::Desktop>(&name, ns.as_deref(), status)
        .guarded(d.metadata.resource_version.as_deref());
    fence::check()?;
    let pp = kube::api::PatchParams::apply(manager).force();
    desktops
        .patch_status(&name, &pp, &kube::api::Patch::Apply(&body))
        .await
        .map_err(kube(action))?;
    Ok(())
}
