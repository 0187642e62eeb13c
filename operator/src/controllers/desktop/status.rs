//! What the operator writes on a Desktop: its part of the status (phase, binding, `Scheduled`,
//! `Ready` and `Idle`, what the idle policy reclaimed, the last wake and the last move) and its metadata (pool
//! and node labels, its finalizer), each applied only when it differs from what is there.

use deskvirt_crds::conditions::{self, Status, condition};
use deskvirt_crds::constants::condition::{
    CONSOLE_SECRET, IDLE, POOL_APPLIED, READY, SCHEDULED, SIZE_APPLIED,
};
use deskvirt_crds::constants::{FINALIZER_OPERATOR, LABEL_NODE, LABEL_POOL, MANAGER_OPERATOR};
use deskvirt_crds::desktop::{
    Allocation, Desktop, DesktopStatus, Move, Phase, Reclaimed, SpiceStatus, Wake,
};
use deskvirt_crds::image::ImagePin;
use deskvirt_crds::names::label_value;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use super::{Error, kube};
use crate::allocators::fnv::fnv1a64;
use crate::controllers::{StatusApply, apply_meta, apply_status};
use crate::fence;

/// The operator's metadata: the pool label, the node label once bound, its finalizer. With
/// `resource_version` the API refuses it (409) when the Desktop changed since that version.
fn meta_body(
    d: &Desktop,
    node: Option<&str>,
    resource_version: Option<String>,
) -> serde_json::Value {
    let mut labels = serde_json::Map::new();
    labels.insert(LABEL_POOL.into(), json!(label_value(d.pool())));
    if let Some(n) = node {
        labels.insert(LABEL_NODE.into(), json!(label_value(n)));
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
        && labels.get(LABEL_POOL) == Some(&label_value(d.pool()))
        && node.is_none_or(|n| labels.get(LABEL_NODE) == Some(&label_value(n)))
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
    fence::check()?;
    apply_meta(api, &d.name_any(), &meta_body(d, node, None))
        .await
        .map(Some)
        .map_err(kube("add finalizer and labels"))
}

/// The operator's part of the status, as applied.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Owned {
    pub phase: Phase,
    pub node: Option<String>,
    pub port: Option<u16>,
    pub mac: Option<String>,
    pub secret: Option<String>,
    pub conditions: Vec<Condition>,
    pub generation: Option<i64>,
    pub reclaimed: Option<Reclaimed>,
    pub wake: Option<Wake>,
    pub last_move: Option<Move>,
    pub allocation: Option<Allocation>,
    pub image: Option<ImagePin>,
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
                .filter(|c| {
                    [
                        SCHEDULED,
                        READY,
                        IDLE,
                        CONSOLE_SECRET,
                        SIZE_APPLIED,
                        POOL_APPLIED,
                    ]
                    .contains(&c.type_.as_str())
                })
                .cloned()
                .collect(),
            generation: st.observed_generation,
            reclaimed: st.reclaimed.clone(),
            wake: st.wake.clone(),
            last_move: st.last_move.clone(),
            allocation: st.allocation.clone(),
            image: st.image.clone(),
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

    /// Sets `ConsoleSecret` from what became of the user's console Secret.
    pub fn console(
        &mut self,
        prev: &[Condition],
        now: Timestamp,
        generation: Option<i64>,
        outcome: &crate::console::user::Outcome,
    ) {
        let (status, reason, message) = outcome.verdict();
        let c = condition(
            prev,
            CONSOLE_SECRET,
            status,
            reason,
            message,
            generation,
            now,
        );
        conditions::upsert(&mut self.conditions, c);
    }

    /// The `ConsoleSecret` condition, when set.
    pub fn console_condition(&self) -> Option<&Condition> {
        conditions::find(&self.conditions, CONSOLE_SECRET)
    }

    /// Whether this touches idle reclamation or what the host is charged: such a write is
    /// guarded by the version it was decided on, so a pass on a stale copy never brings back a
    /// `reclaimed`, a wake, a port or an admitted size that a later pass changed.
    pub fn needs_guard(&self, o: &Owned) -> bool {
        self.allocation != o.allocation || self.mac != o.mac || self.idle_involved(o)
    }

    fn idle_involved(&self, o: &Owned) -> bool {
        self.reclaimed.is_some()
            || o.reclaimed.is_some()
            || self.wake.is_some()
            || o.wake.is_some()
            || self.port != o.port
            || self.node != o.node
    }

    /// What [`Owned::same_as`] compares, hashed: equal for two values that are the same.
    pub(super) fn fingerprint(&self) -> u64 {
        let mut conditions: Vec<_> = self
            .conditions
            .iter()
            .map(|c| {
                (
                    &c.type_,
                    &c.status,
                    &c.reason,
                    &c.message,
                    c.observed_generation,
                )
            })
            .collect();
        conditions.sort();
        let text = format!(
            "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{conditions:?}",
            self.phase,
            self.node,
            self.port,
            self.mac,
            self.secret,
            self.generation,
            self.reclaimed,
            self.wake,
            self.last_move,
            self.allocation,
            self.image
        );
        fnv1a64(text.as_bytes())
    }

    pub(super) fn same_as(&self, o: &Owned) -> bool {
        self.phase == o.phase
            && self.node == o.node
            && self.port == o.port
            && self.mac == o.mac
            && self.secret == o.secret
            && self.generation == o.generation
            && self.reclaimed == o.reclaimed
            && self.wake == o.wake
            && self.last_move == o.last_move
            && self.allocation == o.allocation
            && self.image == o.image
            && !conditions::differ_ignoring_time(&self.conditions, &o.conditions)
    }

    /// The operator's fields of the status, typed: everything else stays unset, so the apply
    /// claims nothing the agent owns. `reclaimed` is left out once cleared; its removal is
    /// `clear_reclaimed`'s.
    fn fragment(&self) -> DesktopStatus {
        let spice = (self.port.is_some() || self.secret.is_some()).then(|| SpiceStatus {
            port: self.port,
            password_secret: self.secret.clone(),
            ..SpiceStatus::default()
        });
        DesktopStatus {
            phase: Some(self.phase),
            node: self.node.clone(),
            spice,
            mac: self.mac.clone(),
            conditions: self.conditions.clone(),
            observed_generation: self.generation,
            reclaimed: self.reclaimed.clone(),
            wake: self.wake.clone(),
            last_move: self.last_move.clone(),
            allocation: self.allocation.clone(),
            image: self.image.clone(),
            ..DesktopStatus::default()
        }
    }

    /// The apply body; with `resource_version` the API refuses it (409) when the Desktop
    /// changed since that version.
    fn body<'a>(
        &self,
        name: &'a str,
        namespace: Option<&'a str>,
        resource_version: Option<&'a str>,
    ) -> StatusApply<'a, DesktopStatus> {
        StatusApply::new::<Desktop>(name, namespace, self.fragment()).guarded(resource_version)
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
    put(d, api, want, None, "apply desktop status").await?;
    Ok(())
}

/// Applies `want` unless it says nothing new beside `current`; when it touches idle
/// reclamation or the charge ([`Owned::needs_guard`]) only onto the version of `d` it was decided on.
/// Returns whether it wrote.
pub(super) async fn write_bound(
    d: &Desktop,
    api: &Api<Desktop>,
    current: &Owned,
    want: &Owned,
) -> Result<bool, Error> {
    if current.same_as(want) {
        return Ok(false);
    }
    // A binding repaired (new port or MAC) is written only onto the version it was decided on.
    let mut rv = if want.needs_guard(current) {
        Some(
            d.resource_version()
                .ok_or(Error::MissingField("resourceVersion"))?,
        )
    } else {
        None
    };
    if current.reclaimed.is_some() && want.reclaimed.is_none() {
        // The guarded patch decides; the apply right after it needs no guard.
        clear_reclaimed(d, api, rv.take()).await?;
    }
    put(d, api, want, rv, "apply desktop status").await?;
    Ok(true)
}

/// Removes `status.reclaimed` with a merge patch, guarded by `resource_version` when given.
/// Not by leaving it out of an apply: on Kubernetes 1.20 that leaves a null behind, which the
/// schema refuses. The patch only removes, so the operator's update entry owns no field and a
/// later apply that leaves a field out still removes it.
async fn clear_reclaimed(
    d: &Desktop,
    api: &Api<Desktop>,
    resource_version: Option<String>,
) -> Result<(), Error> {
    let mut patch = json!({ "status": { "reclaimed": null } });
    if let Some(rv) = resource_version {
        patch["metadata"] = json!({ "resourceVersion": rv });
    }
    let pp = PatchParams {
        field_manager: Some(MANAGER_OPERATOR.into()),
        ..Default::default()
    };
    fence::check()?;
    api.patch_status(&d.name_any(), &pp, &Patch::Merge(&patch))
        .await
        .map_err(kube("clear status.reclaimed"))?;
    Ok(())
}

async fn put(
    d: &Desktop,
    api: &Api<Desktop>,
    want: &Owned,
    resource_version: Option<String>,
    action: &'static str,
) -> Result<Desktop, Error> {
    fence::check()?;
    let (name, namespace) = (d.name_any(), d.namespace());
    let body = want.body(&name, namespace.as_deref(), resource_version.as_deref());
    let written = apply_status(api, &body).await.map_err(kube(action))?;
    tracing::debug!(
        phase = want.phase.as_str(),
        action,
        "desktop status written"
    );
    Ok(written)
}

/// A binding write that failed, and whether its metadata (finalizer, labels) landed first.
#[derive(Debug)]
pub(super) struct BindFailure {
    pub error: Error,
    pub labelled: bool,
}

/// The first write of a binding, only onto the version of `d` it was decided on: a binding is
/// written once, so a Desktop that changed meanwhile (bound by an earlier leader whose write
/// landed late, or read from a stale cache) is refused with a conflict and looked at again.
/// Returns the Desktop as labelled.
///
/// Two writes: the operator's metadata (its finalizer, the pool label and the node label the
/// host's agent watches for) in one apply, then the status (binding, `Scheduled`, phase,
/// [`put_binding`]). The metadata goes first and the status last: on Kubernetes 1.20
/// managedFields has no subresource, so the manager's last apply owns its entry, and that must
/// be the binding.
pub(super) async fn label_binding(
    d: &Desktop,
    api: &Api<Desktop>,
    node: &str,
) -> Result<Desktop, BindFailure> {
    let unlabelled = |error| BindFailure {
        error,
        labelled: false,
    };
    let rv = d
        .resource_version()
        .ok_or(Error::MissingField("resourceVersion"))
        .map_err(unlabelled)?;
    fence::check().map_err(Error::from).map_err(unlabelled)?;
    apply_meta(api, &d.name_any(), &meta_body(d, Some(node), Some(rv)))
        .await
        .map_err(kube("label the bound desktop"))
        .map_err(unlabelled)
}

/// The second write of a binding ([`label_binding`]): the status, onto the version the labels
/// were written as. Returns the Desktop as bound.
pub(super) async fn put_binding(
    labelled: &Desktop,
    api: &Api<Desktop>,
    want: &Owned,
) -> Result<Desktop, BindFailure> {
    let written = match labelled.resource_version() {
        Some(rv) => put(labelled, api, want, Some(rv), "bind desktop").await,
        None => Err(Error::MissingField("resourceVersion")),
    };
    written.map_err(|error| BindFailure {
        error,
        labelled: true,
    })
}

/// Moves the node label (the one the host agents watch by) of a desktop that moves to `node`,
/// only onto the version of `d` the move was decided on; returns the Desktop as written, whose
/// version the status write then is guarded by. The label first, the status last, as for a
/// binding.
pub(super) async fn relabel(d: &Desktop, api: &Api<Desktop>, node: &str) -> Result<Desktop, Error> {
    let rv = d
        .resource_version()
        .ok_or(Error::MissingField("resourceVersion"))?;
    fence::check()?;
    apply_meta(api, &d.name_any(), &meta_body(d, Some(node), Some(rv)))
        .await
        .map_err(kube("label the desktop for its new host"))
}

/// What `Scheduled` says of a bound desktop: its host, and its port and MAC when it has them.
pub(super) fn bound_message(node: &str, port: Option<u16>, mac: Option<&str>) -> String {
    let mut out = format!("bound to host {node}");
    if let Some(p) = port {
        out.push_str(&format!(", SPICE port {p}"));
    }
    if let Some(m) = mac {
        out.push_str(&format!(", MAC {m}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use deskvirt_crds::desktop::IdleAction;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    fn encode(body: StatusApply<'_, DesktopStatus>) -> serde_json::Value {
        serde_json::to_value(&body).unwrap_or_else(|e| panic!("{e}"))
    }

    /// What a pass applies reads back as the same: the next pass writes nothing.
    fn round_trip(want: &Owned) -> Owned {
        let body = encode(want.body("d", Some("ns"), None));
        let st: DesktopStatus = serde_json::from_value(body["status"].clone())
            .unwrap_or_else(|e| panic!("{e}: {body}"));
        Owned::from_status(&st)
    }

    #[test]
    fn fingerprints_follow_same_as_and_ignore_transition_times() {
        let mut a = Owned::from_status(&DesktopStatus::default());
        a.node = Some("h".into());
        a.port = Some(5900);
        let ready = |s, t| condition(&[], READY, s, "Running", "runs", Some(1), at(t));
        let scheduled = condition(&[], SCHEDULED, Status::True, "Bound", "b", Some(1), at(5));
        a.conditions = vec![scheduled.clone(), ready(Status::True, 10)];
        let mut b = a.clone();
        b.conditions = vec![ready(Status::True, 20), scheduled];
        assert!(a.same_as(&b));
        assert_eq!(a.fingerprint(), b.fingerprint());
        let mut c = a.clone();
        c.conditions = vec![ready(Status::False, 10)];
        assert_ne!(a.fingerprint(), c.fingerprint());
        let mut d = a.clone();
        d.phase = Phase::Running;
        assert_ne!(a.fingerprint(), d.fingerprint());
        let mut e = a.clone();
        e.port = None;
        assert_ne!(a.fingerprint(), e.fingerprint());
    }

    #[test]
    fn bound_message_names_what_is_known() {
        assert_eq!(
            bound_message("h", Some(5901), Some("52:54:00:00:00:01")),
            "bound to host h, SPICE port 5901, MAC 52:54:00:00:00:01"
        );
        assert_eq!(bound_message("h", None, None), "bound to host h");
    }

    #[test]
    fn idle_fields_round_trip_and_are_left_out_when_cleared() {
        let mut want = Owned::from_status(&DesktopStatus::default());
        want.node = Some("h".into());
        want.port = Some(5900);
        want.mac = Some("52:54:00:00:00:01".into());
        want.secret = Some("d-console".into());
        want.reclaimed = Some(Reclaimed {
            action: IdleAction::Suspend,
            at: Time(at(100)),
            port: Some(5900),
        });
        want.wake = Some(Wake {
            token: "1".into(),
            at: Time(at(50)),
        });
        let idle = condition(&[], IDLE, Status::True, "IdleTimeout", "m", None, at(100));
        conditions::upsert(&mut want.conditions, idle);
        let back = round_trip(&want);
        assert!(back.same_as(&want), "{back:?}");

        // Released: no port, and `spice` keeps only the password Secret.
        let mut released = want.clone();
        released.port = None;
        assert!(!released.same_as(&want) && released.needs_guard(&want));
        let body = encode(released.body("d", Some("ns"), Some("7")));
        assert_eq!(
            body["status"]["spice"],
            json!({ "passwordSecret": "d-console" })
        );
        assert_eq!(body["metadata"]["resourceVersion"], "7");

        // Woken: `reclaimed` is left out of the apply, so the operator's apply removes it.
        let mut woken = want.clone();
        woken.reclaimed = None;
        let body = encode(woken.body("d", Some("ns"), None));
        assert!(body["status"].get("reclaimed").is_none(), "{body}");
        assert!(!woken.same_as(&want));
        assert!(round_trip(&woken).same_as(&woken));
    }
}
