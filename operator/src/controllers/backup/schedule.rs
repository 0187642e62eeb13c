//! Runs the pools' backup schedules and retention while this operator leads: at each moment a
//! pool's `spec.backup.schedule` falls due, a DesktopBackup for every running desktop of the
//! pool (`core::backup::schedule::due` decides which, and whether it starts a new chain), and
//! the scheduled backups that the pool's `keep` and `maxAge` let go are deleted first
//! (`core::backup::expired`: never a user's, never one a kept backup restores from).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use deskvirt_core::backup::schedule::{
    Cron, MISSED_AFTER_SECS, Planned, Policy, Subject, due, name,
};
use deskvirt_core::backup::{Backup, Origin, Retention, expired};
use deskvirt_crds::constants::condition::RUNNING;
use deskvirt_crds::constants::{
    ANNOTATION_BACKUP_SCHEDULE, ANNOTATION_POOL, FINALIZER_BACKUP_FILE, FINALIZER_OPERATOR,
    LABEL_MANAGED_BY, LABEL_NODE, LABEL_POOL, LABEL_SCHEDULED,
};
use deskvirt_crds::quantity::parse_duration;
use deskvirt_crds::{Desktop, DesktopBackup, ResourcePool, conditions};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, PostParams, Preconditions};
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio::sync::watch;

use super::{as_backup, origin, pinned};
use crate::context::Context;

/// How often the schedules are looked at: the resolution of a six-field schedule.
const EVERY: Duration = Duration::from_secs(2);

/// Runs the schedules while this operator leads, until `stop`.
pub async fn run(ctx: Arc<Context>, stop: watch::Receiver<bool>) {
    let made = Made::default();
    crate::sweep::while_leading(&ctx, EVERY, stop, || pass(&ctx, &made)).await;
}

/// The last moment a scheduled backup was made for, per Desktop UID, by this operator: a
/// backup deleted since (by its user, or by a `maxAge` shorter than the catch-up window) is not
/// made again, nor is one whose create this operator's clock, ahead of the API server's,
/// would otherwise repeat. Lost on restart: then the name refuses a second one.
#[derive(Default)]
pub struct Made(std::sync::Mutex<BTreeMap<String, i64>>);

impl Made {
    fn get(&self, uid: &str) -> Option<i64> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(uid)
            .copied()
    }

    fn set(&self, uid: &str, slot: i64) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(uid.to_string(), slot);
    }
}

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Done {
    pub created: usize,
    pub deleted: usize,
}

/// A pool's schedule and retention, read from its spec (a spec that does not parse was refused
/// by the pool's validation and schedules nothing).
struct PoolPlan {
    policy: Option<Policy>,
    /// The latest moment the schedule was due at, within the catch-up window.
    slot: Option<i64>,
    retention: Retention,
}

fn plan_of(pool: &ResourcePool, now: i64) -> Option<PoolPlan> {
    let b = pool.spec.backup.as_ref()?;
    let policy = b
        .schedule
        .as_deref()
        .and_then(|s| Cron::parse(s).ok())
        .map(|cron| Policy {
            cron,
            max_chain: b.max_chain,
        });
    let max_age_secs = b
        .max_age
        .as_deref()
        .and_then(|a| parse_duration(a).ok())
        .and_then(|d| i64::try_from(d.as_secs()).ok());
    let slot = policy
        .as_ref()
        .and_then(|p| p.cron.latest(now - MISSED_AFTER_SECS, now));
    Some(PoolPlan {
        policy,
        slot,
        retention: Retention {
            keep: b.keep,
            max_age_secs,
        },
    })
}

/// One pass over every pool's schedule and retention.
pub async fn pass(ctx: &Context, made: &Made) -> Done {
    let now = Timestamp::now().as_second();
    let plans: BTreeMap<String, PoolPlan> = ctx
        .stores
        .pools
        .state()
        .iter()
        .filter_map(|p| plan_of(p, now).map(|plan| (p.name_any(), plan)))
        .collect();
    if plans.is_empty() {
        return Done::default();
    }
    let backups = ctx.stores.backups.state();
    // Each desktop's backups, by the Desktop UID they pinned; a scheduled backup not pinned
    // yet is its desktop's by name.
    let mut by_desktop: BTreeMap<(String, String), Vec<&DesktopBackup>> = BTreeMap::new();
    let mut unpinned: BTreeMap<(String, String), Vec<&DesktopBackup>> = BTreeMap::new();
    for b in &backups {
        let ns = b.namespace().unwrap_or_default();
        match pinned(b) {
            Some(uid) => by_desktop.entry((ns, uid.to_string())).or_default(),
            None => unpinned.entry((ns, b.spec.desktop.clone())).or_default(),
        }
        .push(b);
    }
    let mut done = Done::default();
    // Retention first, per desktop (gone ones too: backups outlive their desktops), under the
    // pool whose schedule made them: what expired goes before a new backup is made, so that a
    // desktop never holds more than `keep` plus the one being written, and the old files free
    // their room first.
    for ((ns, _), group) in &by_desktop {
        let Some(pool) = group
            .iter()
            .filter(|b| origin(b) == Origin::Schedule)
            .find_map(|b| b.annotations().get(ANNOTATION_POOL))
        else {
            continue;
        };
        let Some(plan) = plans.get(pool) else {
            continue;
        };
        let all: Vec<Backup<'_>> = group.iter().map(|b| as_backup(b)).collect();
        for uid in expired(&all, plan.retention, now) {
            let Some(b) = group.iter().find(|b| b.uid().as_deref() == Some(uid)) else {
                continue;
            };
            if b.metadata.deletion_timestamp.is_some() || !ctx.is_leader() {
                continue;
            }
            if delete(ctx, ns, b, uid).await {
                done.deleted += 1;
            }
        }
    }
    for d in ctx.stores.desktops.state() {
        if !ctx.is_leader() {
            return done;
        }
        let pool = d.pool();
        let Some((policy, slot)) = plans
            .get(pool)
            .and_then(|p| Some((p.policy.as_ref()?, p.slot)))
        else {
            continue;
        };
        let (ns, uid) = (
            d.namespace().unwrap_or_default(),
            d.uid().unwrap_or_default(),
        );
        let mine: Vec<Backup<'_>> = by_desktop
            .get(&(ns.clone(), uid.clone()))
            .into_iter()
            .chain(unpinned.get(&(ns.clone(), d.name_any())))
            .flatten()
            .map(|b| as_backup(b))
            .collect();
        let subject = Subject {
            running: d
                .status
                .as_ref()
                .is_some_and(|s| conditions::is_true(&s.conditions, RUNNING)),
            stopped_at: super::stopped_at(&d),
            skipped: d
                .annotations()
                .get(ANNOTATION_BACKUP_SCHEDULE)
                .is_some_and(|v| v == "skip"),
            deleting: d.metadata.deletion_timestamp.is_some(),
            created: d
                .metadata
                .creation_timestamp
                .as_ref()
                .map_or(0, |t| t.0.as_second()),
        };
        if let Some(planned) = due(policy, subject, &mine, slot, made.get(&uid)) {
            match create(ctx, &d, pool, planned).await {
                Created::Made => {
                    done.created += 1;
                    made.set(&uid, planned.slot);
                }
                Created::Exists => made.set(&uid, planned.slot),
                Created::Failed => {}
            }
        }
    }
    done
}

/// What a create of a scheduled backup came to.
enum Created {
    Made,
    /// One of that name exists: made by an earlier pass or another replica (or, not labelled
    /// as the schedule's, by a user: the moment is skipped, and said so).
    Exists,
    /// Not now (the API refused, or this operator no longer leads); the next pass tries again.
    Failed,
}

/// Makes the scheduled backup `planned` of `d`.
async fn create(ctx: &Context, d: &Desktop, pool: &str, planned: Planned) -> Created {
    let ns = d.namespace().unwrap_or_default();
    let name = name(&d.name_any(), planned.slot);
    // The desktop's own labels (an operator that watches by label selector sees the backups
    // of the desktops it sees), but not those deskvirt sets on a desktop, then the schedule's
    // mark.
    let mut labels: BTreeMap<String, String> = d
        .labels()
        .iter()
        .filter(|(k, _)| ![LABEL_NODE, LABEL_POOL, LABEL_SCHEDULED].contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.insert(LABEL_SCHEDULED.into(), "true".into());
    labels.insert(LABEL_MANAGED_BY.into(), "deskvirt-operator".into());
    let body = json!({
        "apiVersion": "deskvirt.io/v1alpha1",
        "kind": "DesktopBackup",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": labels,
            "annotations": { ANNOTATION_POOL: pool },
            "finalizers": [FINALIZER_OPERATOR, FINALIZER_BACKUP_FILE],
        },
        "spec": {
            "desktop": d.name_any(),
            "type": "Incremental",
            "newChain": planned.new_chain,
        },
    });
    let b: DesktopBackup = match serde_json::from_value(body) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(desktop = %d.name_any(), error = %e, "cannot build a scheduled backup");
            return Created::Failed;
        }
    };
    let api: Api<DesktopBackup> = Api::namespaced(ctx.client.clone(), &ns);
    if ctx.fence.check().is_err() {
        return Created::Failed;
    }
    match api.create(&PostParams::default(), &b).await {
        Ok(_) => {
            tracing::info!(%ns, backup = %name, new_chain = planned.new_chain, "scheduled backup made");
            Created::Made
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let theirs = api
                .get_opt(&name)
                .await
                .ok()
                .flatten()
                .filter(|o| origin(o) != Origin::Schedule || o.spec.desktop != d.name_any());
            if theirs.is_some() {
                tracing::warn!(%ns, backup = %name, "a backup of the scheduled backup's name is not the schedule's; this moment is skipped for the desktop");
            }
            Created::Exists
        }
        Err(e) => {
            tracing::warn!(%ns, backup = %name, error = %e, "cannot make a scheduled backup");
            Created::Failed
        }
    }
}

/// Deletes the expired scheduled backup `b` (guarded by its UID); whether it did.
async fn delete(ctx: &Context, ns: &str, b: &DesktopBackup, uid: &str) -> bool {
    let api: Api<DesktopBackup> = Api::namespaced(ctx.client.clone(), ns);
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some(uid.to_string()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    if ctx.fence.check().is_err() {
        return false;
    }
    match api.delete(&b.name_any(), &dp).await {
        Ok(_) => {
            tracing::info!(%ns, backup = %b.name_any(), "scheduled backup expired and deleted");
            true
        }
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => false,
        Err(e) => {
            tracing::warn!(%ns, backup = %b.name_any(), error = %e, "cannot delete an expired backup");
            false
        }
    }
}
