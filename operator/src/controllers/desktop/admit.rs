//! Whether an unbound Desktop may be placed at all, before any host is looked at: its own spec
//! (and its pool's) valid, its namespace allowed by the pool, its namespace's ResourceQuotas
//! not exceeded. A refusal names the field, the pool or the quota; nothing is allocated.

use std::time::Duration;

use deskvirt_core::scheduler::Request;
use deskvirt_crds::ResourcePool;
use deskvirt_crds::constants::scheduled_reason::{
    INVALID_POOL, INVALID_SPEC, POOL_NOT_ALLOWED, QUOTA_EXCEEDED, RESTORE_UNAVAILABLE,
};
use deskvirt_crds::desktop::Desktop;
use deskvirt_crds::read::FromDesktopSpec;
use deskvirt_crds::validation::{self, ValidDesktop, summary};
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use crate::context::{Context, Ledgers, holds_binding};
use crate::tenancy::{Amount, Refused, pool_allows, within_quotas};

/// How often a desktop refused for its namespace (labels, quotas) looks again: a change of
/// its namespace's labels or quotas wakes it at once, another desktop's release does not.
const TENANCY_RECHECK: Duration = Duration::from_secs(15);

/// Why the desktop may not be placed now.
pub(super) struct Refusal {
    pub reason: &'static str,
    pub message: String,
    /// When to look again; `None` waits for a change of the desktop or its pool.
    pub retry: Option<Duration>,
}

/// How often a desktop whose backup cannot be restored yet looks again (a backup being
/// written, say); the backup's pass records the chain and wakes it once it can.
const RESTORE_RECHECK: Duration = Duration::from_secs(15);

/// A desktop restoring from a backup is placed only once the chain is recorded on it
/// (`status.restore`, by the backup's pass): its host builds the disk from that.
fn restorable(d: &Desktop, pool: &ResourcePool, ctx: &Context) -> Result<(), Refusal> {
    let Some(from) = d.spec.disk.restore_from.as_ref() else {
        return Ok(());
    };
    if d.status.as_ref().is_some_and(|s| s.restore.is_some()) {
        return Ok(());
    }
    let message = match crate::controllers::backup::restore::resolve(&ctx.stores, d, pool) {
        Ok(_) => format!(
            "spec.disk.restoreFrom.backup: the chain of backup {} is being recorded",
            from.backup
        ),
        Err(why) => format!("spec.disk.restoreFrom.backup: {why}"),
    };
    Err(Refusal {
        reason: RESTORE_UNAVAILABLE,
        message,
        retry: Some(RESTORE_RECHECK),
    })
}

/// Checks spec, pool, access and quotas: the spec read against its pool, or `Ok(None)` when the
/// namespace is not cached yet.
pub(super) fn admit(
    d: &Desktop,
    uid: &str,
    pool: Option<&ResourcePool>,
    ctx: &Context,
    ledgers: &Ledgers,
) -> Result<Option<ValidDesktop>, Refusal> {
    let invalid = |errors: &[validation::FieldError]| Refusal {
        reason: INVALID_SPEC,
        message: summary(errors),
        retry: None,
    };
    let valid = match validation::read_desktop(&d.spec, pool.map(|p| &p.spec)) {
        Ok(v) if v.refused.is_empty() => v,
        Ok(v) => return Err(invalid(&v.refused)),
        Err(errors) => return Err(invalid(&errors)),
    };
    // A missing pool is the scheduler's to report.
    let Some(pool) = pool else {
        return Ok(Some(valid));
    };
    restorable(d, pool, ctx)?;
    let name = &d.spec.pool;
    let errors = validation::pool(&pool.spec);
    if !errors.is_empty() {
        return Err(Refusal {
            reason: INVALID_POOL,
            message: format!(
                "pool {name} has an invalid spec, so nothing is placed into it: {}",
                summary(&errors)
            ),
            retry: None,
        });
    }
    let namespace = d.namespace().unwrap_or_default();
    let Some(ns) = ctx.stores.namespaces.get(&ObjectRef::new(&namespace)) else {
        return Ok(None);
    };
    let tenancy = |e: Refused| {
        let reason = match e {
            Refused::NotAllowed { .. } | Refused::BadSelector { .. } => POOL_NOT_ALLOWED,
            Refused::Quota(_) | Refused::UnreadableQuota { .. } | Refused::BackupStorage { .. } => {
                QUOTA_EXCEEDED
            }
        };
        Refusal {
            reason,
            message: e.to_string(),
            retry: Some(TENANCY_RECHECK),
        }
    };
    pool_allows(name, &pool.spec, &namespace, ns.labels()).map_err(tenancy)?;

    let quotas = ctx.stores.quota_limits(&namespace);
    if quotas.is_empty() {
        return Ok(Some(valid));
    }
    let used = ctx
        .stores
        .desktops
        .state()
        .iter()
        .filter(|o| o.namespace().as_deref() == Some(namespace.as_str()))
        .filter(|o| o.uid().as_deref() != Some(uid))
        .filter(|o| {
            let bound = o.status.as_ref().is_some_and(|s| s.node.is_some());
            holds_binding(o) && (bound || o.uid().is_some_and(|u| ledgers.reserved(&u)))
        })
        .map(|o| Request::from_spec(&o.spec).map_or_else(|_| Amount::default(), amount))
        .fold(Amount::default(), |a, b| a + b);
    within_quotas(
        &namespace,
        quotas.iter().map(|(n, h)| (n.as_str(), h)),
        used,
        amount(valid.asked),
    )
    .map_err(tenancy)?;
    Ok(Some(valid))
}

/// What a desktop of `size` holds against its namespace's quotas (an unreadable spec, which
/// was never admitted, holds nothing).
fn amount(size: Request) -> Amount {
    Amount {
        cpu: u64::from(size.vcpus),
        memory: size.memory,
    }
}
