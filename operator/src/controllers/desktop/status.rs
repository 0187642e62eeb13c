//! What the operator writes on a Desktop: its part of the status (phase, binding, `Scheduled`
//! and `Ready`) and its metadata (pool and node labels, its finalizer), each applied only when
//! it differs from what is there.

use deskvirt_crds::conditions::{self, Status, condition};
use deskvirt_crds::constants::condition::{READY, SCHEDULED};
use deskvirt_crds::constants::{FINALIZER_OPERATOR, LABEL_NODE, LABEL_POOL};
use deskvirt_crds::desktop::{Desktop, DesktopStatus, Phase};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::{Error, kube};
use crate::controllers::{apply_meta, apply_status};

/// The operator's metadata: the pool label, the node label once bound, its finalizer. With
/// `resource_version` the API refuses it (409) when the Desktop changed since that version.
fn meta_body(
    d: &Desktop,
    node: Option<&str>,
    resource_version: Option<String>,
) -> serde_json::Value {
    let mut labels = serde_json::Map::new();
    labels.insert(LABEL_POOL.into(), json!(d.spec.pool));
    if let Some(n) = node {
        labels.insert(LABEL_NODE.into(), json!(n));
    }
    let mut metadata = json!({
        "name": d.name_any(),
        "namespace": d.namespace(),
        "labels": labels,
        "finalizers": [FINALIZER_OPERATOR],
    });
    if let Some(rv) = resource_version {
        metadata["resourceVersion"] = json!(rv);
    }
    json!({ "apiVersion": "deskvirt.io/v1alpha1", "kind": "Desktop", "metadata": metadata })
}

fn has_meta(d: &Desktop, node: Option<&str>) -> bool {
    let labels = d.labels();
    d.finalizers().iter().any(|f| f == FINALIZER_OPERATOR)
        && labels.get(LABEL_POOL) == Some(&d.spec.pool)
        && node.is_none_or(|n| labels.get(LABEL_NODE).map(String::as_str) == Some(n))
}

/// Applies the operator's labels and finalizer unless present; returns the Desktop as it is
/// now (the API's answer when written, so its resourceVersion is fresh).
pub(super) async fn ensure_meta(
    d: &Desktop,
    api: &Api<Desktop>,
    node: Option<&str>,
) -> Result<Option<Desktop>, Error> {
    if has_meta(d, node) {
        return Ok(None);
    }
    apply_meta(api, &d.name_any(), &meta_body(d, node, None))
        .await
        .map(Some)
        .map_err(kube("add finalizer and labels"))
}

/// The operator's part of the status, as applied.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Owned {
    pub phase: Phase,
    pub node: Option<String>,
    pub port: Option<u16>,
    pub mac: Option<String>,
    pub secret: Option<String>,
    pub conditions: Vec<Condition>,
    pub generation: Option<i64>,
}

impl Owned {
    pub fn from_status(st: &DesktopStatus) -> Self {
        Self {
            phase: st.phase.unwrap_or_default(),
            node: st.node.clone(),
            port: st.spice.as_ref().and_then(|s| s.port),
            mac: st.mac.clone(),
            secret: st.spice.as_ref().and_then(|s| s.password_secret.clone()),
            conditions: st
                .conditions
                .iter()
                .filter(|c| c.type_ == SCHEDULED || c.type_ == READY)
                .cloned()
                .collect(),
            generation: st.observed_generation,
        }
    }

    /// Sets the `Scheduled` and `Ready` verdicts (status, reason, message) at the current
    /// `generation`, keeping the transition time of a status that did not change in `prev`.
    pub fn judge(
        &mut self,
        prev: &[Condition],
        now: Timestamp,
        scheduled: (Status, &str, String),
        ready: (Status, &str, String),
    ) {
        for (type_, (status, reason, message)) in [(SCHEDULED, scheduled), (READY, ready)] {
            let c = condition(prev, type_, status, reason, message, self.generation, now);
            conditions::upsert(&mut self.conditions, c);
        }
    }

    fn same_as(&self, o: &Owned) -> bool {
        self.phase == o.phase
            && self.node == o.node
            && self.port == o.port
            && self.mac == o.mac
            && self.secret == o.secret
            && self.generation == o.generation
            && !conditions::differ_ignoring_time(&self.conditions, &o.conditions)
    }

    /// The apply body; with `resource_version` the API refuses it (409) when the Desktop
    /// changed since that version.
    fn body(&self, d: &Desktop, resource_version: Option<String>) -> serde_json::Value {
        let mut status = serde_json::Map::new();
        status.insert("phase".into(), json!(self.phase));
        if let Some(n) = &self.node {
            status.insert("node".into(), json!(n));
        }
        let mut spice = serde_json::Map::new();
        if let Some(p) = self.port {
            spice.insert("port".into(), json!(p));
        }
        if let Some(s) = &self.secret {
            spice.insert("passwordSecret".into(), json!(s));
        }
        if !spice.is_empty() {
            status.insert("spice".into(), spice.into());
        }
        if let Some(m) = &self.mac {
            status.insert("mac".into(), json!(m));
        }
        status.insert("conditions".into(), json!(self.conditions));
        if let Some(g) = self.generation {
            status.insert("observedGeneration".into(), json!(g));
        }
        let mut metadata = json!({ "name": d.name_any(), "namespace": d.namespace() });
        if let Some(rv) = resource_version {
            metadata["resourceVersion"] = json!(rv);
        }
        json!({
            "apiVersion": "deskvirt.io/v1alpha1",
            "kind": "Desktop",
            "metadata": metadata,
            "status": status,
        })
    }
}

/// Applies `want` unless it says nothing new beside `current`.
pub(super) async fn write(
    d: &Desktop,
    api: &Api<Desktop>,
    current: &Owned,
    want: &Owned,
) -> Result<(), Error> {
    if current.same_as(want) {
        return Ok(());
    }
    put(d, api, want, None, "apply desktop status").await
}

async fn put(
    d: &Desktop,
    api: &Api<Desktop>,
    want: &Owned,
    resource_version: Option<String>,
    action: &'static str,
) -> Result<(), Error> {
    apply_status(api, &d.name_any(), &want.body(d, resource_version))
        .await
        .map_err(kube(action))?;
    Ok(())
}

/// Writes a binding, only onto the version of `d` it was decided on: a binding is written once,
/// so a Desktop that changed meanwhile (bound by an earlier leader whose write landed late, or
/// read from a stale cache) is refused with a conflict and looked at again.
///
/// The node label goes first and the status last: on Kubernetes 1.20 managedFields has no
/// subresource, so the manager's last apply owns its entry, and that must be the binding.
pub(super) async fn write_binding(
    d: &Desktop,
    api: &Api<Desktop>,
    node: &str,
    want: &Owned,
) -> Result<(), Error> {
    let rv = d
        .resource_version()
        .ok_or(Error::MissingField("resourceVersion"))?;
    let labelled = apply_meta(api, &d.name_any(), &meta_body(d, Some(node), Some(rv)))
        .await
        .map_err(kube("label the bound desktop"))?;
    let rv = labelled
        .resource_version()
        .ok_or(Error::MissingField("resourceVersion"))?;
    put(d, api, want, Some(rv), "bind desktop").await
}
