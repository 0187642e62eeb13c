//! A drain pass's writes: failed drain migrations deleted, new ones made (owned by the
//! DomainNode, labelled and annotated for it), then the drain's status fields applied under
//! their own field manager, only when they changed. Undraining deletes the drain's migrations
//! and removes those fields.

use std::collections::BTreeMap;

use deskvirt_core::drain::{self, Plan};
use deskvirt_core::names::{fnv1a64, label_value};
use deskvirt_crds::conditions::{self, Status, condition};
use deskvirt_crds::constants::condition::DRAINED;
use deskvirt_crds::constants::{ANNOTATION_DRAIN_NODE, LABEL_DRAIN, MANAGER_OPERATOR_DRAIN};
use deskvirt_crds::domain_node::{DrainLeft, DrainStatus};
use deskvirt_crds::{DesktopMigration, DomainNode, DomainNodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::{Error, RECHECK, RETRY_AFTER, bound_to, desktop_facts, kube, made_for, outcome};
use crate::context::Context;
use crate::controllers::{StatusApply, apply_status_as};
use crate::fence;

/// Desktops listed by name in `status.drain.desktops` (the CRD's `maxItems`); the counts
/// cover the rest.
const LISTED: usize = 50;

/// The `key=value` (or `key==value`) terms of a label selector; other terms are skipped (a
/// migration cannot be made to match them).
pub(super) fn selector_labels(selector: &str) -> Vec<(String, String)> {
    selector
        .split(',')
        .filter_map(|term| {
            let term = term.trim();
            if term.contains("!=") {
                return None;
            }
            let (k, v) = term.split_once("==").or_else(|| term.split_once('='))?;
            let (k, v) = (k.trim(), v.trim());
            (!k.is_empty() && !k.contains(' ')).then(|| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// The name of the migration the drain of `node` makes for the desktop `name`: the desktop's
/// name, cut to leave room, and a hash of the host, so that two drains never share one.
pub(super) fn migration_name(node: &str, name: &str) -> String {
    let prefix: String = name.chars().take(200).collect();
    let prefix = prefix.trim_end_matches(['-', '.']);
    format!("{prefix}-drain-{:016x}", fnv1a64(node.as_bytes()))
}

/// A pass over a draining host.
pub(super) async fn drain(
    ctx: &Context,
    n: &DomainNode,
    labels: &[(String, String)],
    now: Timestamp,
) -> Result<Action, Error> {
    let name = n.name_any();
    let stores = &ctx.stores;
    let desktops = bound_to(stores, &name);
    let migrations = made_for(stores, n);
    let pool = n
        .status
        .as_ref()
        .and_then(|s| s.pool.as_deref())
        .and_then(|p| stores.pool(p));
    let facts: Vec<_> = desktops.iter().map(|(k, d)| desktop_facts(d, k)).collect();
    let keys: Vec<String> = migrations
        .iter()
        .map(|m| format!("{}/{}", m.namespace().unwrap_or_default(), m.spec.desktop))
        .collect();
    let ms: Vec<_> = migrations
        .iter()
        .zip(&keys)
        .map(|(m, k)| drain::Migration {
            name: m.metadata.name.as_deref().unwrap_or_default(),
            desktop: k,
            outcome: outcome(m, now),
        })
        .collect();
    let shared = pool.is_some_and(|p| p.spec.storage.shared);
    let plan = drain::plan(&drain::Facts {
        desktops: &facts,
        migrations: &ms,
        shared_storage: shared,
        per_host: ctx.migrations.limits.per_host,
        retry_after_secs: RETRY_AFTER.as_secs() as i64,
    });
    for m in &plan.delete {
        if let Some(m) = migrations.iter().find(|o| o.name_any() == *m) {
            delete(ctx, m).await?;
        }
    }
    for k in &plan.create {
        if let Some((_, d)) = desktops.iter().find(|(key, _)| key == k) {
            // Without shared storage a drain moves desktops Cold, with their disk copied.
            let mode = if shared { "Live" } else { "Cold" };
            create(ctx, n, d, labels, mode).await?;
        }
    }
    let before = n.status.as_ref().and_then(|s| s.drain.clone());
    let migrated = ms
        .iter()
        .filter(|m| m.outcome == drain::Outcome::Succeeded)
        .count() as u32;
    let want = status_of(&plan, before.as_ref(), migrated, now);
    let prev = n
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let drained = plan.drained();
    let cond = condition(
        prev,
        DRAINED,
        Status::from_bool(drained),
        if drained { "Drained" } else { "Draining" },
        plan.summary(),
        n.metadata.generation,
        now,
    );
    let was = conditions::find(prev, DRAINED);
    let changed = before.as_ref() != Some(&want)
        || was.is_none_or(|c| {
            conditions::differ_ignoring_time(std::slice::from_ref(&cond), std::slice::from_ref(c))
        });
    if changed {
        write(ctx, &name, Some(want), vec![cond.clone()]).await?;
    }
    if was.is_none() {
        let note = format!("drain started: {}", plan.summary());
        ctx.event(n, EventType::Normal, "DrainStarted", "Drain", note)
            .await;
    }
    if drained && was.is_none_or(|c| c.status != "True") {
        let note = "every desktop left the host; it takes no new desktops while spec.drain is set";
        ctx.event(n, EventType::Normal, "Drained", "Drain", note.into())
            .await;
    }
    Ok(if drained {
        Action::await_change()
    } else {
        Action::requeue(RECHECK)
    })
}

/// The drain's status from its plan and how many of its migrations succeeded; the start time
/// is kept.
fn status_of(
    plan: &Plan,
    before: Option<&DrainStatus>,
    migrated: u32,
    now: Timestamp,
) -> DrainStatus {
    let start_time = before
        .and_then(|b| b.start_time.clone())
        .unwrap_or(Time(now));
    DrainStatus {
        start_time: Some(start_time),
        remaining: plan.left.len() as u32,
        migrating: plan.count(deskvirt_core::reasons::DrainReason::Migrating) as u32,
        migrated,
        desktops: plan
            .left
            .iter()
            .take(LISTED)
            .map(|l| DrainLeft {
                desktop: l.desktop.clone(),
                reason: l.reason.as_str().to_string(),
                message: l.message.clone(),
            })
            .collect(),
    }
}

/// Applies the drain's fields of the host's status (none: removes them).
async fn write(
    ctx: &Context,
    name: &str,
    drain: Option<DrainStatus>,
    conditions: Vec<Condition>,
) -> Result<(), Error> {
    let st = DomainNodeStatus {
        drain,
        conditions,
        ..DomainNodeStatus::default()
    };
    let body = StatusApply::new::<DomainNode>(name, None, st);
    fence::check()?;
    apply_status_as(
        &Api::<DomainNode>::all(ctx.client.clone()),
        &body,
        MANAGER_OPERATOR_DRAIN,
    )
    .await
    .map_err(kube("apply the drain status"))?;
    Ok(())
}

/// Makes the migration (`mode` Live or Cold) of desktop `d` for the drain of `n`. False when one of that name
/// exists already (ours, seen before the cache shows it, or a tenant's, which is left alone).
async fn create(
    ctx: &Context,
    n: &DomainNode,
    d: &deskvirt_crds::Desktop,
    labels: &[(String, String)],
    mode: &str,
) -> Result<bool, Error> {
    let (node, ns) = (n.name_any(), d.namespace().unwrap_or_default());
    let name = migration_name(&node, &d.name_any());
    let mut label_map: BTreeMap<String, String> = labels.iter().cloned().collect();
    label_map.insert(LABEL_DRAIN.into(), label_value(&node));
    let owner = OwnerReference {
        api_version: "deskvirt.io/v1alpha1".into(),
        kind: "DomainNode".into(),
        name: node.clone(),
        uid: n.uid().unwrap_or_default(),
        controller: Some(false),
        block_owner_deletion: Some(false),
    };
    let m: DesktopMigration = serde_json::from_value(json!({
        "apiVersion": "deskvirt.io/v1alpha1",
        "kind": "DesktopMigration",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": label_map,
            "annotations": { ANNOTATION_DRAIN_NODE: node },
            "ownerReferences": [owner],
        },
        "spec": { "desktop": d.name_any(), "mode": mode },
    }))
    .map_err(|e| kube("build a drain migration")(kube::Error::SerdeError(e)))?;
    fence::check()?;
    let api = Api::<DesktopMigration>::namespaced(ctx.client.clone(), &ns);
    match api.create(&PostParams::default(), &m).await {
        Ok(_) => {
            tracing::info!(desktop = %d.name_any(), %ns, migration = %name, "drain: live migration made");
            ctx.metrics.drain_migrations.inc();
            Ok(true)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            // Ours, made before the cache shows it; or someone else's of that name, which
            // blocks the drain of this desktop: said on the host, never touched.
            let theirs = api.get_opt(&name).await.ok().flatten().is_some_and(|o| {
                !o.owner_references()
                    .iter()
                    .any(|r| r.kind == "DomainNode" && Some(&r.uid) == n.uid().as_ref())
            });
            if theirs {
                let note = format!(
                    "DesktopMigration {ns}/{name} exists and was not made by the drain; {ns}/{} \
                     is not moved until it is gone",
                    d.name_any()
                );
                tracing::warn!(%note, "drain blocked by a look-alike migration");
                ctx.event(n, EventType::Warning, "DrainBlocked", "Drain", note)
                    .await;
            }
            Ok(false)
        }
        Err(e) => Err(kube("make a drain migration")(e)),
    }
}

/// Deletes a drain migration of ours, only the version (UID) that was judged.
async fn delete(ctx: &Context, m: &DesktopMigration) -> Result<(), Error> {
    let api =
        Api::<DesktopMigration>::namespaced(ctx.client.clone(), &m.namespace().unwrap_or_default());
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: m.uid(),
            resource_version: None,
        }),
        ..Default::default()
    };
    fence::check()?;
    match api.delete(&m.name_any(), &dp).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(e) => Err(kube("delete a drain migration")(e)),
    }
}

/// Removes `status.drain` and the `Drained` condition with a merge patch guarded by the
/// version read: the conditions list is sent whole, without `Drained`, so a concurrent change
/// of it makes the patch conflict and the pass look again. Not an apply leaving them out:
/// Kubernetes 1.20 keeps fields an apply no longer names.
async fn remove_status(ctx: &Context, n: &DomainNode) -> Result<(), Error> {
    let Some(st) = n.status.as_ref() else {
        return Ok(());
    };
    let has_condition = st.conditions.iter().any(|c| c.type_ == DRAINED);
    if st.drain.is_none() && !has_condition {
        return Ok(());
    }
    let kept: Vec<&Condition> = st
        .conditions
        .iter()
        .filter(|c| c.type_ != DRAINED)
        .collect();
    let body = json!({
        "metadata": { "resourceVersion": n.resource_version() },
        "status": { "drain": null, "conditions": kept },
    });
    fence::check()?;
    Api::<DomainNode>::all(ctx.client.clone())
        .patch_status(&n.name_any(), &PatchParams::default(), &Patch::Merge(&body))
        .await
        .map_err(kube("remove the drain status"))?;
    Ok(())
}

/// A pass over a host whose drain was cleared: its migrations are deleted (a move under way is
/// aborted by its source host; the finalizer holds until it is settled) and the drain's fields
/// removed.
pub(super) async fn undrain(ctx: &Context, n: &DomainNode) -> Result<Action, Error> {
    let migrations = made_for(&ctx.stores, n);
    for m in migrations
        .iter()
        .filter(|m| m.metadata.deletion_timestamp.is_none())
    {
        delete(ctx, m).await?;
    }
    remove_status(ctx, n).await?;
    let note = format!(
        "drain cleared; {} of its migrations cancelled or removed; the host takes desktops again \
         unless it is cordoned or in maintenance",
        migrations.len()
    );
    ctx.event(n, EventType::Normal, "DrainCleared", "Drain", note)
        .await;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_equality_terms_of_the_selector_become_labels() {
        assert_eq!(
            selector_labels("a=b, c==d,e!=f,g in (h),i"),
            [("a".into(), "b".into()), ("c".into(), "d".into())]
        );
        assert!(selector_labels("").is_empty());
    }

    #[test]
    fn migration_names_are_valid_and_differ_per_host() {
        let long = "x".repeat(253);
        let name = migration_name("host-a", &long);
        assert!(name.len() <= 253, "{}", name.len());
        assert_ne!(migration_name("a", "d"), migration_name("b", "d"));
        let odd = migration_name("a", &format!("{}.-y", "z".repeat(198)));
        assert!(!odd.contains(".-"), "{odd}");
    }
}
